"""The HTTP API of `diffgentor serve`: the OpenAI-compatible app, its client to the engine-core processes, its limits,
metrics and pages."""
