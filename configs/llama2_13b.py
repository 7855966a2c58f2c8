"""Llama-2-13B: pass --config.checkpoint=/path for real weights; otherwise random weights of this shape.

Llama-2-7B's engine settings with the 13B dimensions (26 GB of bf16 weights: one H200, or split over
two GPUs with engine.tensor_parallel=2 or engine.layer_slices=2; benchmarks/multi_device.py).
"""

from configs import llama2_7b


def get_config():
  c = llama2_7b.get_config()
  c.name = "llama2_13b"
  c.model.hidden_size = 5120
  c.model.intermediate_size = 13824
  c.model.num_layers = 40
  c.model.num_heads = 40
  c.model.num_kv_heads = 40
  return c
