"""georeg test suite."""
