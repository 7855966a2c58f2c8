"""The engine end to end against transformers: greedy parity, continuous batching, chunked prefill,
preemption, stop rules, seeded sampling and the compile count."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import tiny
from glinthawk_jax.checkpoint import load_hf_checkpoint
from glinthawk_jax.engine import Engine
from glinthawk_jax.paged_cache import GIB
from glinthawk_jax.requests import FINISH_LENGTH, FINISH_STOP, SamplingParams
from tests.hf_models import VOCAB_SIZE, make_hf_model

PROMPT_LENGTHS = (5, 23, 1, 12, 30)  # 5 prompts for 4 slots; 23 and 30 exceed max_prefill_tokens=16
NEW_TOKENS = 12
GREEDY = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
EOS = 2


def _config(path, **engine):
  c = tiny.get_config()
  c.placement = "local"
  c.checkpoint = path
  c.dtype = "float32"
  c.engine.update(dict(max_num_seqs=4, page_size=4, kv_cache_gb=0.0, max_model_len=64, max_prefill_tokens=16,
                       decode_steps_per_call=3))
  c.engine.update(engine)
  return c


def _prompts(seed=0, lengths=PROMPT_LENGTHS):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, VOCAB_SIZE, n).tolist() for n in lengths]


def _hf_greedy(hf_model, prompt, n=NEW_TOKENS):
  with torch.no_grad():
    out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  path, hf_model = make_hf_model("llama_mha", tmp_path_factory.mktemp("llama"))
  return path, hf_model, Engine(_config(path))


@pytest.mark.parametrize("kind", ["llama3_gqa", pytest.param("mistral", marks=pytest.mark.slow),
                                  pytest.param("qwen2_tied", marks=pytest.mark.slow)])
def test_greedy_matches_transformers(kind, tmp_path):
  path, hf_model = make_hf_model(kind, tmp_path)
  prompts = _prompts()
  outs = Engine(_config(path)).generate(prompts, GREEDY)
  assert [o.token_ids for o in outs] == [_hf_greedy(hf_model, p) for p in prompts]


def test_llama_greedy_continuous_batching_and_chunked_prefill(llama):
  path, hf_model, engine = llama
  prompts = _prompts()
  finished = []
  outs = engine.generate(prompts, GREEDY, request_ids=[f"r{i}" for i in range(5)], on_output=finished.append)
  assert [o.token_ids for o in outs] == [_hf_greedy(hf_model, p) for p in prompts]
  assert [o.request_id for o in outs] == ["r0", "r1", "r2", "r3", "r4"]
  assert sorted(o.request_id for o in finished) == ["r0", "r1", "r2", "r3", "r4"]
  assert finished[-1].request_id == "r4"  # the fifth prompt waited for a free slot
  for o in outs:
    assert o.finish_reason == FINISH_LENGTH and o.prompt_token_ids == prompts[int(o.request_id[1:])]
    assert len(o.token_times_s) == NEW_TOKENS and 0 < o.ttft_s == o.token_times_s[0]
    # decode_steps_per_call=3: tokens of one call get distinct, increasing times (no zero gaps)
    assert all(gap > 0 for gap in o.time_between_tokens_s)
    assert o.decode_time_s == pytest.approx(o.token_times_s[-1] - o.token_times_s[0])


@pytest.mark.slow
def test_unrolled_layer_loop_gives_the_same_tokens(llama):
  path, _, engine = llama
  c = _config(path)
  c.engine.layer_loop = "unrolled"
  prompts = _prompts(seed=6, lengths=(7, 19))
  sampled = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=5, ignore_eos=True)
  want = engine.generate(prompts, [GREEDY, sampled])
  assert [o.token_ids for o in Engine(c).generate(prompts, [GREEDY, sampled])] == [o.token_ids for o in want]


def test_pallas_decode_attention_gives_transformers_tokens(llama):
  """The Pallas decode kernel (interpreted on the CPU) inside the unrolled engine: HF's greedy tokens."""
  path, hf_model, _ = llama
  prompts = _prompts(seed=3, lengths=(9, 3))
  engine = Engine(_config(path, layer_loop="unrolled", decode_attention="pallas"))
  assert [o.token_ids for o in engine.generate(prompts, GREEDY)] == [_hf_greedy(hf_model, p) for p in prompts]


def test_compilations_are_bounded_and_reused(llama):
  _, _, engine = llama
  engine.generate(_prompts(), GREEDY)
  first = engine.stats.num_compilations
  assert first <= 10
  engine.generate(_prompts(seed=1), GREEDY)
  assert engine.stats.num_compilations == first
  assert engine.runner._decode._cache_size() + engine.runner._prefill._cache_size() == first


def test_decode_widths_follow_the_context_with_transformers_tokens(llama):
  """engine.width_buckets_per_octave=4, page 16: decode block tables grow from 4 to 5 pages as the longest
  context passes 64 tokens (2^k and 1.5 * 2^k would jump to 6); one compile per width."""
  path, hf_model, _ = llama
  prompts = _prompts(seed=4, lengths=(5, 30))
  engine = Engine(_config(path, page_size=16, max_model_len=128, max_prefill_tokens=64, width_buckets_per_octave=4))
  outs = engine.generate(prompts, SamplingParams(max_tokens=42, ignore_eos=True))
  assert [o.token_ids for o in outs] == [_hf_greedy(hf_model, p, 42) for p in prompts]
  shapes = engine.runner.compiled_shapes
  assert sorted(s[2][1] for s in shapes if s[0] == "decode") == [4, 5]
  assert engine.stats.num_compilations == len(shapes) == engine.runner._decode._cache_size() + \
      engine.runner._prefill._cache_size()


def test_preemption_by_recompute_keeps_greedy_and_seeded_tokens(llama, tmp_path):
  path, _, engine = llama
  prompts = _prompts(seed=2, lengths=(20, 9, 14, 3, 17))
  params = [GREEDY, SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)] * 2
  params.append(SamplingParams(max_tokens=30, temperature=0.8, top_k=20, seed=3, ignore_eos=True))
  want = engine.generate(prompts, params)
  page_bytes = 4 * engine.model_config.kv_bytes_per_token
  small = Engine(_config(path, kv_cache_gb=(16 + 5) * page_bytes / GIB, decode_steps_per_call=1))
  got = small.generate(prompts, params)
  assert small.num_pages == 21 and small.stats.num_preemptions > 0
  assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_seeded_sampling_does_not_depend_on_batch_composition(llama):
  _, _, engine = llama
  prompts = _prompts(seed=3)
  sampled = SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, top_k=50, seed=11, ignore_eos=True)
  batch = engine.generate(prompts, [GREEDY, sampled, GREEDY, GREEDY, sampled])
  alone = engine.generate([prompts[1]], sampled)[0]
  assert batch[1].token_ids == alone.token_ids
  other = engine.generate([prompts[1]], dataclasses.replace(sampled, seed=12))[0]
  assert other.token_ids != alone.token_ids


def test_stop_rules(llama):
  path, _, engine = llama
  prompt = _prompts(seed=4, lengths=(6,))[0]
  free_run = engine.generate([prompt], SamplingParams(max_tokens=20, ignore_eos=True))[0]
  g = free_run.token_ids
  tok = engine.tokenizer
  assert free_run.text == tok.decode(g) and free_run.finish_reason == FINISH_LENGTH

  short = engine.generate([prompt], SamplingParams(max_tokens=3, ignore_eos=True))[0]
  assert short.token_ids == g[:3] and short.finish_reason == FINISH_LENGTH

  k = next(i for i in range(4, 20) if tok.decode(g[:i]) and tok.decode(g[:i]) not in tok.decode(g[:i - 1]))
  stop = tok.decode(g[:k])[len(tok.decode(g[:k - 1])):]
  stopped = engine.generate([prompt], SamplingParams(max_tokens=20, stop=(stop,), ignore_eos=True))[0]
  assert stopped.finish_reason == FINISH_STOP and stop not in stopped.text
  assert tok.decode(g).startswith(stopped.text) and stopped.token_ids == g[:len(stopped.token_ids)]

  stop_id = engine.generate([prompt], SamplingParams(max_tokens=20, stop_token_ids=(g[k],), ignore_eos=True))[0]
  first = g.index(g[k])
  assert stop_id.token_ids == g[:first + 1] and stop_id.finish_reason == FINISH_STOP


def test_eos_stops_unless_ignore_eos(llama):
  """Swapping the LM-head rows of EOS and the k-th greedy token makes the model emit EOS at step k."""
  path, _, engine = llama
  prompt = _prompts(seed=5, lengths=(6,))[0]
  g = engine.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0].token_ids
  k = next(i for i in range(2, 10) if g[i] not in g[:i] and EOS not in g[:i + 1])
  model = load_hf_checkpoint(path, "float32")
  head = model.lm_head[...]
  model.lm_head[...] = head.at[jnp.asarray([g[k], EOS])].set(head[jnp.asarray([EOS, g[k]])])
  swapped = Engine(engine.config, model=model)
  out = swapped.generate([prompt], SamplingParams(max_tokens=10))[0]
  assert out.token_ids == g[:k] + [EOS] and out.finish_reason == FINISH_STOP
  assert out.text == engine.tokenizer.decode(g[:k])
  ignored = swapped.generate([prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
  assert ignored.token_ids[:k + 1] == g[:k] + [EOS] and len(ignored.token_ids) == 10


def test_prompt_too_long_or_bad_is_rejected_by_request_id(llama):
  _, _, engine = llama
  with pytest.raises(ValueError, match=r"request 'long-one': prompt of 64 tokens .*max_model_len - 1 = 63"):
    engine.generate([[5] * 3, [5] * 64], GREEDY, request_ids=["ok", "long-one"])
  with pytest.raises(ValueError, match=r"request 'x': token ids"):
    engine.generate([[5, VOCAB_SIZE]], GREEDY, request_ids=["x"])
  out = engine.generate([[5] * 63], SamplingParams(max_tokens=8, ignore_eos=True))[0]
  assert len(out.token_ids) == 1 and out.finish_reason == FINISH_LENGTH  # clipped at max_model_len


def test_text_prompts_use_the_tokenizer(llama):
  _, _, engine = llama
  out = engine.generate(["The capital of France is"], GREEDY)[0]
  assert out.prompt_token_ids == engine.tokenizer.encode("The capital of France is")
  assert len(out.token_ids) == NEW_TOKENS
