"""Discrete-event simulator and cost model of two-tier (Glinthawk) and split (Splitwise) clusters.

Pure Python + NumPy: nothing here imports jax, so planning runs anywhere in seconds.
"""
