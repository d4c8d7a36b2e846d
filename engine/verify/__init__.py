"""Verification tooling, kept out of the serving engine: the golden-set verifier (`golden`) and the reference
pipeline (`pipeline`: one request at a time, the official control flow) it and the tests compare the engine with."""
