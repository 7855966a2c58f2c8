"""Tier 2: CPU processes that hold the KV cache and compute attention, served over gRPC."""
