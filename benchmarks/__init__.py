"""Benchmarks of georeg against real registries; run each as `python -m benchmarks.<name>` (see README.md)."""
