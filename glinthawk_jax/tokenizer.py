"""Text <-> token ids through a Hugging Face tokenizer.json, with the checkpoint's bos/eos ids."""

from __future__ import annotations

import json
import os

import ml_collections
import tokenizers

from glinthawk_jax.config import tokenizer_path

# Special tokens looked up by name when neither tokenizer_config.json nor generation_config.json says.
EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>", "<|im_end|>")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>")


class Tokenizer:
  """Wraps `tokenizers.Tokenizer`; `encode` adds the BOS its post-processor defines."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file {path!r} does not exist")
    self.path = path
    self._tokenizer = tokenizers.Tokenizer.from_file(path)
    directory = os.path.dirname(os.path.abspath(path))
    tok_config = _read_json(os.path.join(directory, "tokenizer_config.json"))
    gen_config = _read_json(os.path.join(directory, "generation_config.json"))
    self.eos_token_ids = (_ids(gen_config.get("eos_token_id"))
                          or self._named(tok_config.get("eos_token")) or self._first_known(EOS_NAMES))
    self.bos_token_ids = (_ids(gen_config.get("bos_token_id"))
                          or self._named(tok_config.get("bos_token")) or self._first_known(BOS_NAMES))
    self.chat_template: str | None = tok_config.get("chat_template")

  @property
  def eos_token_id(self) -> int | None:
    """The main EOS id (generation_config.json may list several: all are in `eos_token_ids`)."""
    return self.eos_token_ids[0] if self.eos_token_ids else None

  @property
  def bos_token_id(self) -> int | None:
    return self.bos_token_ids[0] if self.bos_token_ids else None

  @property
  def vocab_size(self) -> int:
    """Number of ids, added tokens included."""
    return self._tokenizer.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return self._tokenizer.encode(text).ids

  def decode(self, ids) -> str:
    """Text of `ids`, special tokens (bos, eos, padding) left out."""
    return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

  def _named(self, token) -> tuple[int, ...]:
    if isinstance(token, dict):  # {"content": "</s>", ...} in older tokenizer_config.json files
      token = token.get("content")
    if not token:
      return ()
    token_id = self._tokenizer.token_to_id(token)
    return () if token_id is None else (token_id,)

  def _first_known(self, names) -> tuple[int, ...]:
    for name in names:
      if (found := self._named(name)):
        return found
    return ()


def load_tokenizer(config: ml_collections.ConfigDict) -> Tokenizer:
  """The tokenizer the config names (see `glinthawk_jax.config.tokenizer_path`)."""
  return Tokenizer(tokenizer_path(config))


def _read_json(path: str) -> dict:
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _ids(value) -> tuple[int, ...]:
  if value is None:
    return ()
  return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)
