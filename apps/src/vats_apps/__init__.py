"""vats apps."""
