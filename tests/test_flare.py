"""FLARE: the folded Perceiver equals the textbook one, masking and ablations behave."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.models import flare


def naive_cross_attention(layer: flare.PerceiverLayer, latents, parts):
  """The textbook form: tokens (x + theta) of every part concatenated, keys and values
  materialised per token, one softmax."""
  h, hd = layer.num_heads, layer.head_dim
  b, l = parts[0][1].shape[:2]
  xs, masks = [], []
  for states, mask, theta in parts:
    if states.ndim == 2:
      states = jnp.broadcast_to(states, (b, l, *states.shape))
    xs.append(states + theta)
    masks.append(mask)
  x, mask = jnp.concatenate(xs, axis=2), jnp.concatenate(masks, axis=2)
  k = (x @ layer.key[...]).reshape(*x.shape[:3], h, hd)
  v = (x @ layer.value[...] + layer.value_bias[...]).reshape(*x.shape[:3], h, hd)
  lat = latents if latents.ndim == 4 else jnp.broadcast_to(latents, (b, l, *latents.shape))
  q = layer.query(layer.norm(lat)).reshape(*lat.shape[:3], h, hd)
  logits = jnp.einsum("blnhd,blthd->blhnt", q, k) / math.sqrt(hd)
  m = mask[:, :, None, None, :]
  probs = jax.nn.softmax(jnp.where(m, logits, -1e30), axis=-1)
  probs = jnp.where(m.any(-1, keepdims=True), probs, 0.0)
  out = jnp.einsum("blhnt,blthd->blnhd", probs, v).reshape(*lat.shape[:3], h * hd)
  y = lat + layer.out(out)
  return y + layer.mlp(layer.mlp_norm(y), deterministic=True)


@pytest.mark.parametrize("shared", [True, False])
def test_folded_perceiver_matches_materialised_keys(shared):
  rngs = nnx.Rngs(0)
  layer = flare.PerceiverLayer(16, 12, 2, rngs=rngs, dtype=jnp.float32, dropout=0.0)
  layer.value_bias[...] = jax.random.normal(jax.random.key(5), layer.value_bias[...].shape)
  b, l, n = 2, 3, 4
  ks = jax.random.split(jax.random.key(1), 8)
  text = jax.random.normal(ks[0], (b, l, 5, 12))
  text_mask = jax.random.uniform(ks[1], (b, l, 5)) > 0.3
  text_mask = text_mask.at[0, 1].set(False)  # one position with no tokens at all
  crit = jax.random.normal(ks[4], (b, l, 3, 12))
  crit_mask = (jax.random.uniform(ks[5], (b, l, 3)) > 0.5).at[0, 1].set(False)
  token = jax.random.normal(ks[6], (1, 12))
  token_mask = jax.random.uniform(ks[7], (b, l, 1)) > 0.5
  types = jax.random.normal(ks[2], (2, 12))
  parts = [(text, text_mask, types[0]), (token, token_mask, types[0]), (crit, crit_mask, types[1])]
  latents = jax.random.normal(ks[3], (n, 16) if shared else (b, l, n, 16))
  got = layer(latents, parts, deterministic=True)
  want = naive_cross_attention(layer, latents, parts)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("mode", ["always", "never", "auto"])
def test_rows_parts_projected_or_gathered_match_the_textbook_form(mode):
  """Tables gathered by id (item text, critiques): projecting the table through the folded
  keys / values and gathering the result is the same computation as gathering states."""
  rngs = nnx.Rngs(0)
  layer = flare.PerceiverLayer(16, 12, 2, rngs=rngs, dtype=jnp.float32, dropout=0.0)
  layer.value_bias[...] = jax.random.normal(jax.random.key(5), layer.value_bias[...].shape)
  ks = jax.random.split(jax.random.key(2), 8)
  b, l, n = 2, 3, 4
  table = jax.random.normal(ks[0], (9, 5, 12))
  ids = jax.random.randint(ks[1], (b, l), 0, 9)
  mask = jax.random.uniform(ks[2], (b, l, 5)) > 0.3
  crit_table = jax.random.normal(ks[3], (4, 3, 12))
  crit_ids = jax.random.randint(ks[4], (b, l), 0, 4)
  crit_mask = jax.random.uniform(ks[5], (b, l, 3)) > 0.4
  types = jax.random.normal(ks[6], (2, 12))
  latents = jax.random.normal(ks[7], (n, 16))
  rows = [(flare.Rows(table, ids), mask, types[0]), (flare.Rows(crit_table, crit_ids), crit_mask, types[1])]
  dense = [(table[ids], mask, types[0]), (crit_table[crit_ids], crit_mask, types[1])]
  got = layer(latents, rows, deterministic=True, project_tables=mode)
  want = naive_cross_attention(layer, latents, dense)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
  with pytest.raises(ValueError, match="project_tables"):
    layer(latents, rows, deterministic=True, project_tables="sometimes")


def test_projected_tables_train_like_gathered_ones():
  model, batch = _model_and_batch()
  grads = {}
  for mode in ("always", "never"):
    m = flare.Flare(**{**model.__dict__, "project_tables": mode})
    net = m.network(nnx.Rngs(0))
    graphdef, params = nnx.split(net, nnx.Param)
    loss_fn = lambda p: m.loss_fn(nnx.merge(graphdef, p), batch, None)[0]
    grads[mode] = jax.value_and_grad(loss_fn)(params)
  (la, ga), (lb, gb) = grads["always"], grads["never"]
  np.testing.assert_allclose(float(la), float(lb), rtol=1e-5)
  for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-4)


def _text_tables(model, with_critiques=True):
  """Random token states and masks of every item (rows PAD and MASK empty) and critique."""
  rng = np.random.default_rng(0)
  v = model.padded_vocab_size
  tables = {"item_text": rng.normal(size=(v, 6, 12)).astype(np.float32),
            "item_text_mask": rng.uniform(size=(v, 6)) < 0.8}
  tables["item_text"][:2] = 0.0
  tables["item_text_mask"][:2] = False
  if with_critiques:
    tables["critique_text"] = rng.normal(size=(5, 4, 12)).astype(np.float32)
    tables["critique_text_mask"] = np.ones((5, 4), bool)
    tables["critique_text_mask"][0] = False
  return tables


def _model_and_batch(use_perceiver=True, alpha=0.5, with_critiques=True):
  model = flare.Flare(vocab_size=40, max_length=8, dim=16, num_layers=1, num_heads=2, mlp_dim=32,
                      text_dim=12, use_perceiver=use_perceiver, alpha=alpha, num_latents=3,
                      perceiver_dim=8, perceiver_heads=2, dropout=0.0, attention_dropout=0.0,
                      vocab_multiple=8, contrastive_positions=16)
  # The frozen inputs as the trainer places them (finish_frozen: the pooled model reads
  # per-row token sums instead of the token states).
  frozen = {k: v for k, (v, _) in model.finish_frozen(_text_tables(model, with_critiques)).items()}
  inputs = np.array([[5, 1, 7, 9, 0, 0, 0, 0], [11, 12, 1, 13, 14, 15, 0, 0]], np.int32)
  targets = np.array([[5, 6, 7, 9, 0, 0, 0, 0], [11, 12, 20, 13, 14, 15, 0, 0]], np.int32)
  segs = (inputs > 0).astype(np.int32)
  batch = {"inputs": inputs, "targets": targets, "weights": (inputs == 1).astype(np.float32),
           "segment_ids": segs, "positions": np.tile(np.arange(8), (2, 1)) * segs,
           "frozen": {k: jnp.asarray(x) for k, x in frozen.items()}}
  if with_critiques:
    batch["critiques"] = np.array([[1, 2, 2, 3, 0, 0, 0, 0], [4, 4, 1, 0, 2, 3, 0, 0]], np.int32)
  return model, batch


def test_pooled_text_is_the_typed_mean_of_every_token_a_position_reads():
  """use_perceiver=False reads per-row token sums and counts (finish_frozen), never the
  token states: the result must equal the mean over the item's real tokens (the learned
  token at a [MASK]) and the critique's, each plus its type embedding."""
  model, batch = _model_and_batch(use_perceiver=False)
  assert {"item_text", "item_text_mask", "critique_text"}.isdisjoint(batch["frozen"])
  net = model.network(nnx.Rngs(0))
  got = net.text_context(batch["inputs"], batch["critiques"], batch["frozen"], deterministic=True)
  raw = _text_tables(model)
  types, mask_token = np.asarray(net.text_types[...]), np.asarray(net.text_mask_token[...])
  want = np.zeros((*batch["inputs"].shape, 12), np.float32)
  for b, l in np.ndindex(*batch["inputs"].shape):
    item, crit = batch["inputs"][b, l], batch["critiques"][b, l]
    tokens = [x + types[0] for x in raw["item_text"][item][raw["item_text_mask"][item]]]
    tokens += [mask_token + types[0]] if item == 1 else []
    tokens += [x + types[1] for x in raw["critique_text"][crit][raw["critique_text_mask"][crit]]] if crit else []
    want[b, l] = np.mean(tokens, 0) if tokens else 0.0
  assert (want != 0).any(-1).sum() > 8  # items, [MASK]s and critiques all present
  np.testing.assert_allclose(np.asarray(got), np.asarray(net.fuse(jnp.asarray(want))), atol=1e-5)


@pytest.mark.parametrize("use_perceiver", [True, False])
def test_flare_loss_and_gradients_are_finite(use_perceiver):
  model, batch = _model_and_batch(use_perceiver=use_perceiver)
  net = model.network(nnx.Rngs(0))
  graphdef, params = nnx.split(net, nnx.Param)
  loss_fn = lambda p: model.loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(0))
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  assert np.isfinite(float(loss))
  assert float(metrics["targets"]) == 2.0
  assert float(metrics["contrastive_count"]) == 8.0  # unmasked, non-padding positions: 3 + 5
  flat = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in flat)
  # The text path is trained: the fusion layer gets a non-zero gradient.
  assert float(jnp.abs(grads["fuse"]["kernel"][...]).sum()) > 0


def test_masked_position_hides_item_text_but_not_critique():
  model, batch = _model_and_batch()
  net = model.network(nnx.Rngs(0))
  ctx = lambda b: net.text_context(jnp.asarray(b["inputs"]), jnp.asarray(b["critiques"]), b["frozen"],
                                   deterministic=True)
  base = ctx(batch)
  # Changing the text of the item behind a [MASK] (row 1 is MASK; the target is 6) changes
  # nothing: the model never sees the masked item's text.
  changed = dict(batch, frozen=dict(batch["frozen"]))
  changed["frozen"]["item_text"] = batch["frozen"]["item_text"].at[6].add(1.0)
  np.testing.assert_allclose(np.asarray(ctx(changed))[0, 1], np.asarray(base)[0, 1], atol=1e-6)
  # Changing the critique at the masked position does change it.
  crit = dict(batch, critiques=batch["critiques"].copy())
  crit["critiques"][0, 1] = 3
  assert np.abs(np.asarray(ctx(crit))[0, 1] - np.asarray(base)[0, 1]).max() > 1e-4


def test_alpha_one_is_the_cloze_loss_alone():
  model, batch = _model_and_batch(alpha=1.0)
  net = model.network(nnx.Rngs(0))
  loss, metrics = model.loss_fn(net, batch, None)
  assert "contrastive_sum" not in metrics
  assert float(loss) == pytest.approx(float(metrics["loss_sum"] / metrics["targets"]), rel=1e-6)


def test_contrastive_margin_and_duplicates():
  model, batch = _model_and_batch()
  net = model.network(nnx.Rngs(0))
  context = jax.random.normal(jax.random.key(3), (*batch["inputs"].shape, 16))
  loss0, n = model.contrastive_loss(net, context, batch, None)
  # A larger margin makes positives harder: the loss grows.
  harder = flare.Flare(**{**model.__dict__, "margin": 0.5})
  loss1, _ = harder.contrastive_loss(net, context, batch, None)
  assert float(loss1) > float(loss0)
  assert float(n) == 8.0


def test_without_text_is_bert4rec():
  model = flare.Flare(vocab_size=40, use_text=False)
  assert model.frozen_input_specs() == {}
  net = model.network(nnx.Rngs(0))
  assert not hasattr(net, "perceiver")


def test_sentence_table_is_the_masked_mean_normalised():
  rng = np.random.default_rng(1)
  states = rng.normal(size=(5, 4, 3)).astype(np.float16)
  mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1]], bool)
  out = flare.sentence_table(states, mask, chunk=2)  # chunks of 2 rows: the last one is partial
  for v in range(5):
    if not mask[v].any():
      np.testing.assert_array_equal(out[v], 0.0)  # no text: a zero row, not NaN
      continue
    mean = states[v][mask[v]].astype(np.float32).mean(0)
    np.testing.assert_allclose(out[v], mean / np.linalg.norm(mean), rtol=1e-5)


def test_output_text_scores_items_by_their_sentence():
  model, batch = _model_and_batch()
  model = flare.Flare(**{**model.__dict__, "output_text": True})
  frozen = dict(batch["frozen"])
  frozen["item_sentence"] = jnp.asarray(flare.sentence_table(np.asarray(frozen["item_text"]),
                                                            np.asarray(frozen["item_text_mask"])))
  batch = dict(batch, frozen=frozen)
  net = model.network(nnx.Rngs(0))
  table, _ = model.output_table(net, frozen)
  ids, _ = net.item_table()
  np.testing.assert_allclose(np.asarray(table), np.asarray(ids + frozen["item_sentence"] @ net.text_out.kernel[...]),
                             rtol=1e-5, atol=1e-7)
  # Changing item 6's sentence moves item 6's logit and no other.
  queries = jax.random.normal(jax.random.key(1), (3, 16))
  base = model.score_logits(net, queries, frozen)
  moved = dict(frozen, item_sentence=frozen["item_sentence"].at[6].add(1.0))
  diff = np.abs(np.asarray(model.score_logits(net, queries, moved) - base))
  assert diff[:, 6].min() > 0 and np.delete(np.nan_to_num(diff), 6, axis=1).max() == 0
  # The projection is trained by the cloze loss, and the scorer needs the sentences.
  graphdef, params = nnx.split(net, nnx.Param)
  grads = jax.grad(lambda p: model.loss_fn(nnx.merge(graphdef, p), batch, None)[0])(params)
  assert float(jnp.abs(grads["text_out"]["kernel"][...]).sum()) > 0
  with pytest.raises(ValueError, match="item_sentence"):
    model.output_table(net, {})
  with pytest.raises(ValueError, match="use_text"):
    flare.Flare(vocab_size=40, use_text=False, output_text=True)


@pytest.mark.parametrize("mode", ["always", "never"])
def test_inference_item_context_is_the_per_position_text_vector(mode, monkeypatch):
  """Ranking without critiques gathers each item's fused text vector from a table computed
  once (`inference_frozen`); the queries equal the per-position Perceiver's, including at
  MASK and padding positions, and across chunk boundaries (chunks of 16 rows here)."""
  monkeypatch.setattr(flare, "CONTEXT_CHUNK", 16)
  model, batch = _model_and_batch(with_critiques=False)
  model = flare.Flare(**{**model.__dict__, "project_tables": mode})
  net = model.network(nnx.Rngs(0))
  batch = dict(batch, mask_position=np.array([1, 2], np.int32))
  derived = jax.jit(lambda f: model.inference_frozen(net, f))(batch["frozen"])
  assert derived["item_context"].shape == (model.padded_vocab_size, 16)
  want = model.queries(net, batch)
  fast = dict(batch, frozen={**batch["frozen"], **derived})
  np.testing.assert_allclose(np.asarray(model.queries(net, fast)), np.asarray(want), atol=1e-5, rtol=1e-5)
  # The table is what the queries read: changing item 7's row moves the first user's query.
  # (A random change: a constant one would vanish in the embedding's layer norm.)
  step = jax.random.normal(jax.random.key(4), (16,))
  moved = dict(fast, frozen=dict(fast["frozen"], item_context=derived["item_context"].at[7].add(step)))
  assert np.abs(np.asarray(model.queries(net, moved) - want))[0].max() > 1e-4


def test_critique_batches_do_not_read_the_item_context_table():
  model, batch = _model_and_batch()
  net = model.network(nnx.Rngs(0))
  batch = dict(batch, mask_position=np.array([1, 2], np.int32))
  want = model.queries(net, batch)
  bogus = dict(batch, frozen=dict(batch["frozen"], item_context=jax.random.normal(
      jax.random.key(5), (model.padded_vocab_size, 16))))
  np.testing.assert_array_equal(np.asarray(model.queries(net, bogus)), np.asarray(want))
  assert flare.Flare(vocab_size=40, use_text=False).inference_frozen(None, {}) == {}


def _next_item_model_and_batch(**overrides):
  """FlareSASRec on a packed next-item batch: row 0 holds two sequences, row 1 one."""
  model, batch = _model_and_batch(with_critiques=False)
  kwargs = {k: v for k, v in model.__dict__.items() if k not in ("causal", "max_predictions_fraction")}
  model = flare.FlareSASRec(**{**kwargs, **overrides})
  inputs = np.array([[5, 6, 7, 21, 22, 0, 0, 0], [11, 12, 13, 14, 15, 16, 17, 0]], np.int32)
  targets = np.array([[6, 7, 8, 22, 23, 0, 0, 0], [12, 13, 14, 15, 16, 17, 18, 0]], np.int32)
  segs = np.array([[1, 1, 1, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
  positions = np.array([[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 0]], np.int32)
  batch = dict(batch, inputs=inputs, targets=targets, weights=(segs > 0).astype(np.float32),
               segment_ids=segs, positions=positions)
  return model, batch


def _sasrec_twin(model):
  """The SASRec+ with `model`'s network hyper-parameters."""
  from recjax.models import sasrec
  return sasrec.SASRec(**{k: getattr(model, k) for k in (
      "vocab_size", "max_length", "dim", "num_layers", "num_heads", "mlp_dim", "dropout",
      "attention_dropout", "vocab_multiple")})


def _eval_batch(frozen, inputs=(5, 6, 7, 1)):
  """One history + MASK row (length 8) of the evaluation converter's layout."""
  n = len(inputs)
  return {"inputs": np.array([[*inputs] + [0] * (8 - n)], np.int32),
          "segment_ids": np.array([[1] * n + [0] * (8 - n)], np.int32),
          "positions": np.array([list(range(n)) + [0] * (8 - n)], np.int32),
          "mask_position": np.array([n - 1], np.int32), "frozen": frozen}


@pytest.mark.parametrize("excludes_history", [False, True])
def test_flare_sasrec_without_text_is_sasrec(excludes_history):
  """use_text=False is SASRec+ itself: the same parameters, loss (also with the history
  left out of the softmax) and queries."""
  model, batch = _next_item_model_and_batch(use_text=False, loss_excludes_history=excludes_history)
  plain = dataclasses.replace(_sasrec_twin(model), loss_excludes_history=excludes_history)
  a, b = model.network(nnx.Rngs(0)), plain.network(nnx.Rngs(0))
  assert jax.tree.structure(nnx.state(a, nnx.Param)) == jax.tree.structure(nnx.state(b, nnx.Param))
  (la, ma), (lb, mb) = model.loss_fn(a, batch, None), plain.loss_fn(b, batch, None)
  assert float(la) == pytest.approx(float(lb), rel=1e-6)
  if excludes_history:  # and the option is not dropped on the way
    assert float(la) < float(_sasrec_twin(model).loss_fn(b, batch, None)[0])
  assert float(ma["targets"]) == float(mb["targets"]) == 12.0  # every non-padding position
  ev = _eval_batch(batch["frozen"])
  np.testing.assert_allclose(np.asarray(model.queries(a, ev)), np.asarray(plain.queries(b, ev)), rtol=1e-6)


def test_flare_sasrec_trains_text_at_every_position_and_reads_only_the_past():
  model, batch = _next_item_model_and_batch()
  assert model.causal and model.EVAL_QUERY_OFFSET == 1
  assert type(model.feature_converter()).__name__ == "NextItemPackingConverter"
  net = model.network(nnx.Rngs(0))
  graphdef, params = nnx.split(net, nnx.Param)
  loss_fn = lambda p: model.loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(0))
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  assert np.isfinite(float(loss)) and float(metrics["targets"]) == 12.0
  assert float(metrics["contrastive_count"]) == 12.0  # no masked inputs: every position
  assert float(jnp.abs(grads["fuse"]["kernel"][...]).sum()) > 0
  # Evaluation: the query at the last history item (position 2) never reads the MASK
  # after it, nor the text of the item behind it.
  ev = _eval_batch(batch["frozen"])
  want = model.queries(net, ev)
  later = _eval_batch(batch["frozen"], inputs=(5, 6, 7, 9))
  np.testing.assert_array_equal(np.asarray(model.queries(net, later)), np.asarray(want))
  # Its own history's text does move it.
  moved = dict(ev, frozen=dict(ev["frozen"], item_text=ev["frozen"]["item_text"].at[6].add(1.0)))
  assert np.abs(np.asarray(model.queries(net, moved) - want)).max() > 1e-4


def test_flare_sasrec_refuses_critiques():
  model, batch = _next_item_model_and_batch()
  net = model.network(nnx.Rngs(0))
  with pytest.raises(ValueError, match="FlareSASRec cannot condition on critiques"):
    model.loss_fn(net, dict(batch, critiques=np.ones_like(batch["inputs"])), None)


def test_zero_fuse_init_starts_as_the_id_model_and_the_text_still_learns():
  """fuse_init_std=0: the fused text vector is zero at initialisation, so the first loss's
  next-item part is SASRec+'s exactly; the projection's gradient is not zero."""
  model, batch = _next_item_model_and_batch(fuse_init_std=0.0)
  plain = _sasrec_twin(model)
  net = model.network(nnx.Rngs(0))
  assert float(jnp.abs(net.fuse.kernel[...]).max()) == 0.0
  _, ours = model.loss_fn(net, batch, None)
  _, theirs = plain.loss_fn(plain.network(nnx.Rngs(0)), batch, None)
  assert float(ours["loss_sum"]) == pytest.approx(float(theirs["loss_sum"]), rel=1e-6)
  graphdef, params = nnx.split(net, nnx.Param)
  grads = jax.grad(lambda p: model.loss_fn(nnx.merge(graphdef, p), batch, jax.random.key(0))[0])(params)
  assert float(jnp.abs(grads["fuse"]["kernel"][...]).sum()) > 0
  with pytest.raises(ValueError, match="fuse_init_std"):
    flare.Flare(vocab_size=40, fuse_init_std=-1.0)
