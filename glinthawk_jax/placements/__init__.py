"""Two-tier placements: attention and the KV cache on tier-2 servers (callback, pipelined)."""
