"""Builds configs/assets/tiny_tokenizer.json: a deterministic byte-level BPE (vocab 512, <s> bos, </s> eos).

Trained on a small built-in text, so no download is needed. Run from the repository root:
  python configs/assets/build_tiny_tokenizer.py
"""

from __future__ import annotations

import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

VOCAB_SIZE = 512
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_tokenizer.json")

TEXT = """\
The quick brown fox jumps over the lazy dog. A language model predicts the next token from the ones
before it. Attention lets every token look at the tokens that came earlier in the sequence, and the
key and value cache keeps what each earlier token contributed so that it need not be computed again.
Offline inference runs many prompts at once: a batch of requests is scheduled, prefilled, and then
decoded one token at a time until each request reaches its end of sequence or its token limit.
The accelerator holds the model weights; the processors on the host hold the cache and compute the
attention, and the two tiers talk over the network. Throughput is measured in tokens per second.
Once upon a time there was a little robot who wanted to learn to read. Every morning it opened a
book and read one page, and every evening it wrote down the words it had learned. In the spring it
read about rivers and mountains; in the summer, about the stars; in the autumn, about the history of
the cities by the sea; and in the winter it read stories to the other robots by the fire.
Question: What is the capital of France? Answer: Paris. Question: How many days are in a week?
Answer: Seven. Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14159. def main(): return 0
"""


def build() -> Tokenizer:
  tokenizer = Tokenizer(models.BPE(unk_token=None))
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(TEXT.splitlines(), trainer=trainer)
  bos = tokenizer.token_to_id("<s>")
  tokenizer.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
  return tokenizer


if __name__ == "__main__":
  build().save(OUTPUT)
  print(f"wrote {OUTPUT}")
