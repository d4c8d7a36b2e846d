"""Ops with a pure-torch reference and (where a GPU helps) a fast path with the same semantics."""
