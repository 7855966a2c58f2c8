"""Flax NNX models; they know nothing of placement or scheduling."""
