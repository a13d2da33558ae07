"""Tests of georeg.registry against real docker-registry processes."""
