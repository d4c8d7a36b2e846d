"""Tensor-parallel execution of the engine core: the wire messages, the rank process, and the frontend executor."""
