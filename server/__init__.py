"""Entry points: the `diffgentor` CLI, the OpenAI-compatible server, batch jobs."""
