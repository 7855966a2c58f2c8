"""Phase splitting (Splitwise): prefill and decode workers, layer-wise KV transfer, router, replay."""
