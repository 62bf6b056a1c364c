"""Gemma decoder: parity with Hugging Face, cached decoding, inputs_embeds, tokenizer,
loader errors, training.

References come from tools/make_gemma_fixtures.py (PyTorch + transformers, run elsewhere):
two tiny random GemmaForCausalLM checkpoints, multi-query float32 with a SentencePiece
tokenizer, and grouped-query bfloat16 sharded.
"""

import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.models.text import gemma

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
CHECKPOINTS = {"mq": "tiny_gemma", "gqa": "tiny_gemma_gqa"}
ATOL = 1e-4


@pytest.fixture(scope="module")
def ref():
  return dict(np.load(FIXTURES / "tiny_gemma_reference.npz"))


@functools.cache
def _loaded(name):
  return gemma.load_gemma(FIXTURES / CHECKPOINTS[name])


@nnx.jit
def _logits(model, ids, mask):
  return model(ids, mask)


@functools.partial(nnx.jit, static_argnames=("max_new_tokens",))
def _greedy(model, ids, mask, max_new_tokens, eos_id):
  return gemma.greedy_generate(model, ids, mask, max_new_tokens=max_new_tokens, eos_id=eos_id)


@functools.partial(nnx.jit, static_argnames=("max_length",))
def _cached_logits(model, prompt, mask, continuation, max_length):
  """Prefill, then decode the continuation one token at a time: logits [B, 1 + N, V]."""
  first, cache = model.start_decoding(max_length, prompt, mask)

  def step(cache, token):
    logits, cache = model.decode_step(cache, token)
    return cache, logits

  _, rest = jax.lax.scan(step, cache, continuation.T)
  return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)


def _valid(x, mask):
  return x[np.asarray(mask) > 0]


# --- parity with Hugging Face ------------------------------------------------------------

@pytest.mark.parametrize("name", ["mq", "gqa"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_logits_match_hugging_face(ref, name, side):
  model = _loaded(name).model
  ids, mask = ref[f"{side}_ids"], ref[f"{side}_mask"]
  logits = np.asarray(_logits(model, ids, mask))
  assert logits.dtype == np.float32 and logits.shape == (*ids.shape, model.config.vocab_size)
  expected = ref[f"{name}_{side}_logits"]
  np.testing.assert_allclose(_valid(logits, mask), _valid(expected, mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", ["mq", "gqa"])
def test_greedy_generation_matches_hugging_face(ref, name):
  model = _loaded(name).model
  tokens = _greedy(model, ref["left_ids"], ref["left_mask"], 8, eos_id=model.config.eos_token_id)
  np.testing.assert_array_equal(tokens, ref[f"{name}_greedy"])
  # An EOS that fires at the 3rd token of row 0: that row stops there and is padded.
  early = _greedy(model, ref["left_ids"], ref["left_mask"], 8, eos_id=ref[f"{name}_early_eos"])
  np.testing.assert_array_equal(early, ref[f"{name}_greedy_early"])
  assert (np.asarray(early)[0, 3:] == 0).all()


def test_prompt_step_fn_drives_a_start_token_search(ref):
  """A generic search feeds one start token to every row first; the adapter replaces it
  with each row's last prompt column (here: vectors), then follows the search's tokens."""
  model = _loaded("mq").model

  @nnx.jit
  def search(model, ids, mask):
    step_fn, state = gemma.prompt_step_fn(model, ids.shape[1] + 8, inputs_embeds=model.embed(ids), mask=mask)

    def body(carry, _):
      state, token = carry
      logits, state = step_fn(state, token)
      token = jnp.argmax(logits, -1).astype(jnp.int32)
      return (state, token), token

    start = jnp.full((ids.shape[0],), 123, jnp.int32)  # any start token: it is ignored
    return jax.lax.scan(body, (state, start), length=8)[1].T

  np.testing.assert_array_equal(search(model, ref["left_ids"], ref["left_mask"]), ref["mq_greedy"])


def test_config_from_dict():
  legacy = {"model_type": "gemma", "vocab_size": 100, "hidden_size": 48, "num_attention_heads": 4,
            "num_key_value_heads": 1, "hidden_act": "gelu", "rope_theta": 500.0, "eos_token_id": [1, 7],
            "rope_scaling": None}
  cfg = gemma.GemmaConfig.from_dict(legacy)
  assert (cfg.head_dim, cfg.groups, cfg.rope_theta, cfg.eos_token_id) == (12, 4, 500.0, 1)
  assert gemma.GemmaConfig.from_dict(
      json.loads((FIXTURES / "tiny_gemma" / "config.json").read_text())).rope_theta == 10000.0
  for bad, match in (({"model_type": "gemma2"}, "gemma2"), ({"hidden_act": "relu"}, "relu"),
                     ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "linear"),
                     ({"attention_bias": True}, "attention_bias"),
                     ({"tie_word_embeddings": False}, "tie_word_embeddings"),
                     ({"num_key_value_heads": 3}, "multiple")):
    with pytest.raises(ValueError, match=match):
      gemma.GemmaConfig.from_dict({**legacy, **bad})


# --- cached decoding -------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["left", "right"])
def test_cached_decoding_equals_full_forward(ref, side):
  """Prompts of different lengths in one padded batch, then 5 forced tokens."""
  model = _loaded("mq").model
  ids, mask = ref[f"{side}_ids"], ref[f"{side}_mask"]
  b, t = ids.shape
  continuation = np.random.default_rng(0).integers(4, model.config.vocab_size, (b, 5)).astype(np.int32)
  cached = np.asarray(_cached_logits(model, ids, mask, continuation, t + 5))
  full = np.asarray(_logits(model, np.concatenate([ids, continuation], 1),
                            np.concatenate([mask, np.ones_like(continuation)], 1)))
  last = t - 1 if side == "left" else mask.sum(1) - 1  # each row's last prompt token
  np.testing.assert_allclose(cached[:, 0], full[np.arange(b), last], atol=ATOL, rtol=0)
  np.testing.assert_allclose(cached[:, 1:], full[:, t:], atol=ATOL, rtol=0)
  # A search reorders beams with jax.tree.map: every cache leaf is batch-major.
  assert all(leaf.shape[0] == b for leaf in jax.tree.leaves(model.init_cache(b, 3)))


def test_inputs_embeds_equal_ids_and_soft_prompt_prefill(ref):
  model = _loaded("mq").model
  ids, mask = jnp.asarray(ref["left_ids"]), jnp.asarray(ref["left_mask"])

  @nnx.jit
  def run(model, ids, mask, soft):
    vectors = model.embed(ids)
    by_vectors = model(inputs_embeds=vectors, mask=mask)
    # Soft prompt vectors prepended to the text: one full forward vs two prefill chunks.
    full = model(inputs_embeds=jnp.concatenate([soft, vectors], 1),
                 mask=jnp.concatenate([jnp.ones(soft.shape[:2], jnp.int32), mask], 1))
    cache = model.init_cache(ids.shape[0], soft.shape[1] + ids.shape[1])
    _, cache = model.prefill(cache, inputs_embeds=soft)
    chunked, _ = model.prefill(cache, ids, mask)
    greedy = gemma.greedy_generate(model, inputs_embeds=vectors, mask=mask, max_new_tokens=4)
    return by_vectors, full[:, -1], chunked, greedy

  soft = jax.random.normal(jax.random.key(1), (ids.shape[0], 3, model.config.hidden_size))
  by_vectors, full_last, chunked, greedy = run(model, ids, mask, soft)
  by_ids = _logits(model, ids, mask)
  np.testing.assert_array_equal(greedy, ref["mq_greedy"][:, :4])
  np.testing.assert_allclose(_valid(by_vectors, mask), _valid(by_ids, mask), atol=1e-5, rtol=0)
  np.testing.assert_allclose(chunked, full_last, atol=ATOL, rtol=0)
  with pytest.raises(ValueError, match="exactly one"):
    model(ids, inputs_embeds=model.embed(ids))


# --- tokenizer -----------------------------------------------------------------------------

def test_tokenizer_matches_hugging_face(ref):
  tok = _loaded("mq").tokenizer
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 340)
  strings = [str(s) for s in ref["tokenizer_strings"]]
  ends = np.cumsum(ref["token_lengths"])
  for s, end, n in zip(strings, ends, ref["token_lengths"]):
    assert tok.encode(s) == ref["token_ids_flat"][end - n:end].tolist(), s
  ids, mask = tok.encode_batch(strings, ref["batch_ids"].shape[1])  # left padding, as Gemma's
  np.testing.assert_array_equal(ids, ref["batch_ids"])
  np.testing.assert_array_equal(mask, ref["batch_mask"])
  assert tok.decode(tok.encode(strings[0]) + [tok.eos_id]) == strings[0]
  assert gemma.load_gemma(FIXTURES / "tiny_gemma_gqa").tokenizer is None


# --- loader ----------------------------------------------------------------------------------

def test_loader_errors_and_tied_head(tmp_path, ref):
  from safetensors.numpy import load_file, save_file
  copy = tmp_path / "copy"
  shutil.copytree(FIXTURES / "tiny_gemma", copy)
  weights = copy / "model.safetensors"
  tensors = load_file(weights)

  save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, weights)
  logits = _logits(gemma.load_gemma(copy).model, ref["right_ids"], ref["right_mask"])
  np.testing.assert_allclose(_valid(logits, ref["right_mask"]),
                             _valid(ref["mq_right_logits"], ref["right_mask"]), atol=ATOL, rtol=0)

  save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"] + 1}, weights)
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    gemma.load_gemma(copy)

  missing = dict(tensors)
  del missing["model.layers.1.mlp.up_proj.weight"]
  save_file(missing, weights)
  with pytest.raises(KeyError, match=r"model\.safetensors.*model\.layers\.1\.mlp\.up_proj\.weight"):
    gemma.load_gemma(copy)

  save_file({**tensors, "model.layers.2.mlp.up_proj.weight": tensors["model.layers.1.mlp.up_proj.weight"]},
            weights)
  with pytest.raises(ValueError, match=r"not used.*model\.layers\.2"):
    gemma.load_gemma(copy)

  config = json.loads((copy / "config.json").read_text())
  (copy / "config.json").write_text(json.dumps({**config, "model_type": "gemma3_text"}))
  with pytest.raises(ValueError, match="gemma3_text"):
    gemma.load_gemma(copy)
  with pytest.raises(FileNotFoundError, match="no-such"):
    gemma.load_gemma(tmp_path / "no-such")


# --- training --------------------------------------------------------------------------------

def test_training_from_scratch_lowers_the_loss():
  """Counting task: after 4 prompt tokens, predict start + t (mod 12); prompt tokens and
  padding are not targets."""
  cfg = gemma.GemmaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16)
  model = gemma.Gemma(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  starts = rng.integers(0, 12, (32, 1))
  ids = ((starts + np.arange(10)) % 12 + 4).astype(np.int32)
  mask = np.ones_like(ids)
  mask[16:, 8:] = 0  # some rows padded
  ids = ids * mask
  target = mask * (np.arange(10) >= 4)

  graphdef, params = nnx.split(model, nnx.Param)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  def loss_fn(params):
    return gemma.next_token_loss(nnx.merge(graphdef, params)(ids, mask), ids, target)

  @jax.jit
  def train_step(params, opt):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  losses = []
  for _ in range(30):
    params, opt, loss = train_step(params, opt)
    losses.append(float(loss))
  assert losses[0] > 2.0 and losses[-1] < 0.1 * losses[0], losses[::5]


def test_next_token_loss_counts_only_targets():
  logits = jnp.log(jnp.asarray([[[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]]))
  ids = jnp.asarray([[0, 0, 1]])
  loss = gemma.next_token_loss(logits, ids, jnp.asarray([[0, 0, 1]]))  # only the last: from p=0.1
  np.testing.assert_allclose(loss, -np.log(0.1), rtol=1e-6)
  both = gemma.next_token_loss(logits, ids, jnp.asarray([[1, 1, 1]]))  # first token is never a target
  np.testing.assert_allclose(both, -(np.log(0.5) + np.log(0.1)) / 2, rtol=1e-6)
