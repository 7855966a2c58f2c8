"""The tokenizer wrapper: round trips, BOS from the post-processor, bos/eos from a checkpoint's files."""

import json
import shutil

import pytest
import transformers

from configs import tiny
from configs.assets import build_tiny_tokenizer
from glinthawk_jax.config import TINY_TOKENIZER
from glinthawk_jax.tokenizer import Tokenizer, load_tokenizer

TEXTS = ["The quick brown fox.", "Hello wörld, ünïcödé: 你好 🙂 — ok", "", "  spaces\tand\nnewlines  "]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_adds_bos_and_decodes_without_it(text):
  tok = Tokenizer(TINY_TOKENIZER)
  ids = tok.encode(text)
  assert ids[0] == tok.bos_token_id
  assert all(0 <= i < tok.vocab_size for i in ids)
  assert tok.decode(ids) == text
  assert tok.decode(ids + [tok.eos_token_id]) == text


def test_tiny_tokenizer_fits_the_tiny_model_and_compresses_text():
  tok = load_tokenizer(tiny.get_config())
  assert tok.vocab_size <= tiny.get_config().model.vocab_size
  assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
  text = "The key and value cache keeps what each earlier token contributed."
  assert len(tok.encode(text)) < len(text) / 2


def test_committed_json_is_what_the_script_builds():
  with open(TINY_TOKENIZER) as f:
    committed = json.load(f)
  assert json.loads(build_tiny_tokenizer.build().to_str()) == committed


def test_matches_transformers_fast_tokenizer():
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=TINY_TOKENIZER)
  tok = Tokenizer(TINY_TOKENIZER)
  for text in TEXTS:
    assert tok.encode(text) == ref(text)["input_ids"]


def test_checkpoint_files_set_bos_and_eos(tmp_path):
  shutil.copy(TINY_TOKENIZER, tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"eos_token": {"content": "<unk>"}, "bos_token": "</s>", "chat_template": "{{ x }}"}))
  tok = Tokenizer(str(tmp_path / "tokenizer.json"))
  assert (tok.bos_token_id, tok.eos_token_id, tok.chat_template) == (2, 0, "{{ x }}")
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
  tok = Tokenizer(str(tmp_path / "tokenizer.json"))
  assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token_ids) == (1, 2, (2, 0))


def test_load_tokenizer_uses_the_checkpoint_dir(tmp_path):
  shutil.copy(TINY_TOKENIZER, tmp_path / "tokenizer.json")
  config = tiny.get_config()
  config.checkpoint = str(tmp_path)
  assert load_tokenizer(config).path == str(tmp_path / "tokenizer.json")


def test_missing_file_names_the_path(tmp_path):
  config = tiny.get_config()
  config.checkpoint = str(tmp_path)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
    load_tokenizer(config)
