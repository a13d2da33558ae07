"""Test support code: real registries, tokens, images and a fault-injecting proxy."""
