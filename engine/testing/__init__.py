"""Test and demo tooling, kept out of the serving engine: the deterministic tiny checkpoint writer (`tiny_model`)."""
