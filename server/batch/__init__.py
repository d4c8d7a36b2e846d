"""Batch jobs: `diffgentor edit` and `diffgentor t2i` over CSV / parquet / prompt lists, run by local model
instances or on a Ray cluster."""
