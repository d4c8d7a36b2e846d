"""Model implementations driven by the engine."""
