"""T5 encoder-decoder: parity with transformers' T5ForConditionalGeneration (teacher-forced
logits, greedy and beam `generate`), cached decoding, exact beam search on a tiny model,
loading errors, the loss and a tiny from-scratch training run.

References come from tools/make_t5_seq2seq_fixtures.py (PyTorch + transformers, run
elsewhere): tiny_t5_relu (original T5: ReLU, tied head with the d_model**-0.5 rescale,
bfloat16 sharded) and tiny_t5_gated_seq2seq (v1.1 / Flan-T5: gated-GELU, untied head).
"""

import functools
import itertools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.models.text import generate as gen
from recjax.models.text import t5, t5_seq2seq as s2s
from recjax.train import mesh as mesh_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
DIRS = {"relu": "tiny_t5_relu", "gated": "tiny_t5_gated_seq2seq"}


@pytest.fixture(scope="module")
def ref():
  return np.load(FIXTURES / "tiny_t5_seq2seq_reference.npz")


@pytest.fixture(scope="module")
def models():
  return {k: s2s.load_t5(FIXTURES / d).model for k, d in DIRS.items()}


@functools.partial(jax.jit, static_argnums=0)
def _teacher_forced(graphdef, state, ids, mask, dec):
  return nnx.merge(graphdef, state)(ids, mask, dec)


def teacher_forced(model, ids, mask, dec):
  return _teacher_forced(*nnx.split(model), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(dec))


@pytest.fixture(scope="module")
def generate_fn():
  # One jitted function of (graphdef, state); settings are static, so each compiles once.
  # length_penalty is traced: one compiled search per early_stopping mode.
  @functools.partial(jax.jit, static_argnums=(0, 4, 5, 7))
  def run(graphdef, state, ids, mask, max_new_tokens, num_beams, length_penalty, early_stopping):
    return s2s.generate(nnx.merge(graphdef, state), ids, mask, max_new_tokens=max_new_tokens,
                        num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping)

  def call(model, ids, mask, *, max_new_tokens, num_beams=1, length_penalty=1.0, early_stopping="never"):
    graphdef, state = nnx.split(model)
    return run(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), max_new_tokens, num_beams,
               jnp.float32(length_penalty), early_stopping)
  return call


def _setting(name: str):
  lp, early = name[2:].split("_")
  return float(lp), {"never": "never", "false": False, "true": True}[early]


# --- parity with transformers ----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["relu", "gated"])
def test_teacher_forced_logits_match_hugging_face(models, ref, kind):
  model = models[kind]
  assert model.config.tie_word_embeddings == (kind == "relu")
  assert model.config.output_scale == (16 ** -0.5 if kind == "relu" else 1.0)
  logits = teacher_forced(model, ref["enc_ids"], ref["enc_mask"], ref["dec_ids"])
  assert logits.dtype == jnp.float32 and logits.shape == ref[kind + "_logits"].shape
  # The bfloat16 relu checkpoint is widened to float32, as the reference ran it.
  np.testing.assert_allclose(logits, ref[kind + "_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["relu", "gated"])
def test_greedy_generation_matches_hugging_face(models, ref, generate_fn, kind):
  n = ref[kind + "_greedy"].shape[1] - 1
  out = generate_fn(models[kind], ref["enc_ids"], ref["enc_mask"], max_new_tokens=n)
  np.testing.assert_array_equal(out.tokens, ref[kind + "_greedy"][:, 1:])  # HF pads with 0 after EOS too
  if kind == "gated":  # rows ending in EOS at 4 and 3 tokens; the first runs to the limit
    np.testing.assert_array_equal(out.lengths, [8, 4, 3])


def _check_beams(out, ref, prefix):
  seqs, scores = ref[prefix + "_sequences"][:, :, 1:], ref[prefix + "_scores"]
  lengths = np.asarray(out.lengths)
  for i, j in itertools.product(range(seqs.shape[0]), range(seqs.shape[1])):
    n = lengths[i, j]
    np.testing.assert_array_equal(out.sequences[i, j, :n], seqs[i, j, :n], err_msg=f"{prefix} row {i} beam {j}")
    # HF fills after EOS with EOS (pad 0 is falsy there) or -1 where it cropped; we pad.
    assert n == seqs.shape[2] or seqs[i, j, n - 1] == 1
    assert (np.asarray(out.sequences[i, j, n:]) == 0).all()
  np.testing.assert_allclose(out.scores, scores, atol=1e-5, rtol=0)


def test_beam_search_matches_hugging_face(models, ref, generate_fn):
  nb = int(ref["num_beams"])
  for name in ref["beam_settings"]:
    lp, early = _setting(str(name))
    for kind in ["gated"]:  # the search is model-agnostic; relu greedy covers the tied head
      prefix = f"{kind}_beam_{name}"
      out = generate_fn(models[kind], ref["enc_ids"], ref["enc_mask"], max_new_tokens=ref[prefix + "_sequences"].shape[2] - 1,
                        num_beams=nb, length_penalty=lp, early_stopping=early)
      _check_beams(out, ref, prefix)


def test_beam_width_one_is_greedy(models, ref, generate_fn):
  # early_stopping=True: a row stops at its first finished hypothesis, as greedy does.
  model = models["gated"]
  greedy = generate_fn(model, ref["enc_ids"], ref["enc_mask"], max_new_tokens=8)
  # s2s.generate routes num_beams=1 to greedy: call the beam search itself.
  @nnx.jit
  def beam_one(model, ids, mask):
    cross = model.cross_kv(model.encode(ids, mask))
    return gen.beam_search(lambda c, tok: model.decode_step(c, tok, cross, mask), model.init_cache(3, 8),
                           batch_size=3, num_beams=1, max_new_tokens=8, start_token=0, eos_token=1,
                           length_penalty=0.0, early_stopping=True)
  beam = beam_one(model, jnp.asarray(ref["enc_ids"]), jnp.asarray(ref["enc_mask"]))
  np.testing.assert_array_equal(beam.sequences[:, 0], greedy.tokens)
  np.testing.assert_array_equal(beam.lengths[:, 0], greedy.lengths)
  np.testing.assert_allclose(beam.scores[:, 0], greedy.scores, atol=1e-5)


# --- cached decoding ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["relu", "gated"])
def test_cached_decoding_equals_teacher_forcing(models, ref, kind):
  @nnx.jit
  def run(model, ids, mask, dec):
    memory = model.encode(ids, mask)
    cross = model.cross_kv(memory)

    def body(c, tok):
      logits, c = model.decode_step(c, tok, cross, mask)
      return c, logits
    # A cache longer than the sequence: later slots are masked out.
    cache = model.init_cache(dec.shape[0], dec.shape[1] + 3)
    stepped = jax.lax.scan(body, cache, dec.T)[1].transpose(1, 0, 2)
    # Input vectors instead of ids: the same logits.
    return model.decode(dec, memory, mask), stepped, model.decode_embeddings(model.embed(dec), memory, mask)

  full, stepped, from_vectors = run(models[kind], *(jnp.asarray(ref[k]) for k in ("enc_ids", "enc_mask", "dec_ids")))
  np.testing.assert_allclose(stepped, full, atol=1e-5, rtol=0)
  np.testing.assert_allclose(from_vectors, full, atol=1e-6)


# --- exact beam search on a tiny model -----------------------------------------------------

def _tiny(vocab=5, seed=0, **kw):
  cfg = s2s.T5Seq2SeqConfig(**{**dict(vocab_size=vocab, d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                      num_decoder_layers=2, num_heads=2, relative_attention_num_buckets=8,
                                      relative_attention_max_distance=16), **kw})
  return s2s.T5EncoderDecoder(cfg, rngs=nnx.Rngs(seed))


def test_beam_search_is_exact_when_nothing_is_pruned(generate_fn):
  """With num_beams >= V**(T-1) no prefix is ever pruned: the N hypotheses returned are the
  N best of every EOS-terminated or length-T sequence, found by enumeration."""
  vocab, steps, eos, lp = 4, 3, 1, 1.0
  model = _tiny(vocab, tie_word_embeddings=False)
  # Make EOS likely enough that early endings compete.
  model.lm_head.kernel.set_value(model.lm_head.kernel[...].at[:, eos].multiply(3.0))
  ids = jnp.array([[3, 2, 2, 1], [2, 1, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  nb = vocab ** (steps - 1)
  out = generate_fn(model, ids, mask, max_new_tokens=steps, num_beams=nb, length_penalty=lp)

  hyps = [()]
  for length in range(1, steps + 1):
    hyps += [p for p in itertools.product(range(vocab), repeat=length)
             if eos not in p[:-1] and (p[-1] == eos or length == steps)]
  hyps = hyps[1:]
  padded = np.array([list(h) + [0] * (steps - len(h)) for h in hyps], np.int32)
  lengths = np.array([len(h) for h in hyps])
  rows, ranked_lengths = len(hyps), set()
  for row in range(ids.shape[0]):
    logits = teacher_forced(model, jnp.repeat(ids[row:row + 1], rows, 0), jnp.repeat(mask[row:row + 1], rows, 0),
                            s2s.shift_right(jnp.asarray(padded)))
    logp = jax.nn.log_softmax(logits, -1)
    tok_logp = np.take_along_axis(np.asarray(logp), padded[..., None], -1)[..., 0]
    scores = (tok_logp * (np.arange(steps) < lengths[:, None])).sum(1) / lengths ** lp
    order = np.argsort(-scores)[:nb]
    np.testing.assert_allclose(out.scores[row], scores[order], atol=1e-5)
    np.testing.assert_array_equal(out.sequences[row, 0], padded[order[0]])
    assert out.lengths[row, 0] == lengths[order[0]]
    ranked_lengths.update(lengths[order].tolist())
  assert len(ranked_lengths) > 1  # early EOS and full-length hypotheses both rank


# --- loading ---------------------------------------------------------------------------------------

def _copy(tmp_path, name="tiny_t5_gated_seq2seq"):
  d = tmp_path / name
  shutil.copytree(FIXTURES / name, d)
  return d


def _edit_tensors(directory, fn):
  from safetensors.numpy import load_file, save_file
  tensors = load_file(directory / "model.safetensors")
  fn(tensors)
  save_file(tensors, directory / "model.safetensors")


def _edit_config(directory, **changes):
  config = json.loads((directory / "config.json").read_text())
  for k, v in changes.items():
    if v is None:
      config.pop(k, None)
    else:
      config[k] = v
  (directory / "config.json").write_text(json.dumps(config))


def test_load_errors_name_the_tensor(tmp_path):
  with pytest.raises(FileNotFoundError, match="no-such"):
    s2s.load_t5(tmp_path / "no-such")
  d = _copy(tmp_path)
  _edit_tensors(d, lambda t: t.pop("decoder.block.1.layer.2.DenseReluDense.wi_1.weight"))
  with pytest.raises(KeyError, match="decoder.block.1.layer.2.DenseReluDense.wi_1.weight"):
    s2s.load_t5(d)
  d = _copy(tmp_path / "a")
  _edit_tensors(d, lambda t: t.update(extra=np.zeros(3, np.float32)))
  with pytest.raises(ValueError, match="'extra'"):
    s2s.load_t5(d)
  d = _copy(tmp_path / "b")
  _edit_config(d, num_decoder_layers=1)
  with pytest.raises(ValueError, match="decoder.block.1"):
    s2s.load_t5(d)
  d = _copy(tmp_path / "c")
  _edit_tensors(d, lambda t: t.pop("lm_head.weight"))  # config says untied: the head is required
  with pytest.raises(KeyError, match="lm_head.weight"):
    s2s.load_t5(d)
  _edit_config(d, tie_word_embeddings=True, scale_decoder_outputs=False)  # as transformers 5 writes v1.1
  model = s2s.load_t5(d).model
  assert model.lm_head is None and model.config.output_scale == 1.0
  d = _copy(tmp_path / "d")
  _edit_config(d, d_ff=40)
  with pytest.raises(ValueError, match=r"block.0.layer.1.DenseReluDense.wi_0 has shape \(32, 48\), the model "
                                       r"expects \(32, 40\)"):
    s2s.load_t5(d)


def test_checkpoint_variants_and_the_encoder_loader(ref, models, tmp_path):
  # Saved copies of the tied embedding are accepted (old checkpoints), as is the stale
  # cross-attention bias table of original T5 checkpoints.
  d = _copy(tmp_path, "tiny_t5_relu")
  from safetensors.numpy import load_file, save_file
  tensors = {}
  for f in sorted(d.glob("model-*.safetensors")):
    tensors.update(load_file(f))
    f.unlink()
  (d / "model.safetensors.index.json").unlink()
  for name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
    tensors[name] = tensors["shared.weight"]
  tensors["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = np.zeros((8, 2), np.float32)
  save_file(tensors, d / "model.safetensors")
  _edit_config(d, tie_word_embeddings=None, scale_decoder_outputs=None)  # old configs: tied by default
  loaded = s2s.load_t5(d)
  assert loaded.model.lm_head is None and loaded.tokenizer is None
  enc_ids, enc_mask, dec = (jnp.asarray(ref[k]) for k in ("enc_ids", "enc_mask", "dec_ids"))
  np.testing.assert_allclose(teacher_forced(loaded.model, enc_ids, enc_mask, dec), ref["relu_logits"], atol=1e-4,
                             rtol=0)
  # The encoder-only loader reads a seq2seq checkpoint (decoder tensors skipped), same states.
  gated = t5.load_t5_encoder(FIXTURES / "tiny_t5_gated_seq2seq")
  encode = nnx.jit(lambda m, ids, mask: m(ids, mask))
  np.testing.assert_allclose(encode(gated.model, enc_ids, enc_mask), encode(models["gated"].encoder, enc_ids, enc_mask),
                             atol=1e-6)
  tok = s2s.load_t5(FIXTURES / "tiny_t5_gated_seq2seq").tokenizer
  ids, mask = tok.encode_batch(["red mascara"], 8)
  assert ids[0, mask[0].sum() - 1] == 1


def test_parameters_carry_logical_axes(models):
  names = set()
  for path, var in jax.tree_util.tree_leaves_with_path(nnx.state(models["gated"], nnx.Param),
                                                      is_leaf=lambda x: isinstance(x, nnx.Variable)):
    spec = tuple(nnx.spmd.get_var_pspec(var))
    assert len(spec) == var.get_value().ndim, jax.tree_util.keystr(path)
    mesh_lib.logical_to_mesh(spec)  # every name has a rule
    names.update(n for n in spec if n)
  assert {"vocab", "embed", "heads", "mlp"} <= names


# --- loss and training -------------------------------------------------------------------------

def test_cross_entropy_masks_padding_and_z_loss():
  logits = jax.random.normal(jax.random.key(0), (2, 3, 7))
  targets = jnp.array([[1, 2, 0], [3, 0, 0]])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  loss, m = s2s.cross_entropy(logits, targets, mask)
  logp = jax.nn.log_softmax(logits)
  expected = -(logp[0, 0, 1] + logp[0, 1, 2] + logp[1, 0, 3]) / 3
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert m["targets"] == 3 and m["z_loss_sum"] == 0
  z_loss, mz = s2s.cross_entropy(logits, targets, mask, z_loss=1e-2)
  np.testing.assert_allclose(z_loss - loss, mz["z_loss_sum"] / 3, rtol=1e-5)
  assert mz["z_loss_sum"] > 0


def test_tiny_model_learns_to_reverse_from_scratch(generate_fn):
  vocab, n, batch = 10, 4, 64
  model = _tiny(vocab, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=1, num_decoder_layers=1)
  tx = optax.adam(5e-3)
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)

  def batch_at(key):
    body = jax.random.randint(key, (batch, n), 2, vocab)
    enc = jnp.concatenate([body, jnp.ones((batch, 1), jnp.int32)], 1)  # + EOS
    return {"encoder_tokens": enc, "encoder_mask": jnp.ones_like(enc), "targets": enc.at[:, :n].set(body[:, ::-1]),
            "target_mask": jnp.ones_like(enc)}

  @jax.jit
  def train_step(params, opt_state, key):
    loss_fn = lambda p: s2s.seq2seq_loss(nnx.merge(graphdef, p), batch_at(key))[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for step in range(150):
    params, opt_state, loss = train_step(params, opt_state, jax.random.key(step))
    losses.append(float(loss))
  assert losses[0] > 2.0 and np.mean(losses[-20:]) < 0.5 * losses[0], losses[::30]
  trained = nnx.merge(graphdef, params)
  b = batch_at(jax.random.key(10_000))
  out = generate_fn(trained, b["encoder_tokens"][:8], b["encoder_mask"][:8], max_new_tokens=n + 1)
  accuracy = float(np.mean(np.asarray(out.tokens) == np.asarray(b["targets"][:8])))
  assert accuracy > 0.5, (accuracy, losses[::30])
