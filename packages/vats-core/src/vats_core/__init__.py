"""vats-core."""
