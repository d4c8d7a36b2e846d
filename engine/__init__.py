"""Requests, scheduling, KV blocks, workers and the HunyuanImage-3.0 model itself."""
