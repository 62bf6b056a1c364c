"""SASRec+: the next-item converter, causality, eval alignment, and the main job with it."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

REPO = pathlib.Path(__file__).resolve().parents[1]


def _convert(sequences, length, pack, critiques=None):
  import tensorflow as tf
  from recjax.data.converters import NextItemPackingConverter
  feats = {"items": tf.ragged.constant(sequences, dtype=tf.int32),
           "example_id": tf.range(len(sequences), dtype=tf.int64)}
  if critiques is not None:
    feats["critiques"] = tf.ragged.constant(critiques, dtype=tf.int32)
  ds = tf.data.Dataset.from_tensor_slices(feats)
  return list(NextItemPackingConverter(pack=pack)(ds, {"items": length}).as_numpy_iterator())


def test_converter_shifts_targets_and_drops_single_items():
  rows = _convert([[5, 6, 7, 8], [9], [10, 11]], length=6, pack=False, critiques=[[1, 2, 3, 4], [5], [6, 7]])
  assert len(rows) == 2  # [9] has no next item
  np.testing.assert_array_equal(rows[0]["inputs"], [5, 6, 7, 0, 0, 0])
  np.testing.assert_array_equal(rows[0]["targets"], [6, 7, 8, 0, 0, 0])
  np.testing.assert_array_equal(rows[0]["weights"], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(rows[0]["critiques"], [1, 2, 3, 0, 0, 0])  # the input steps' critiques
  np.testing.assert_array_equal(rows[1]["inputs"], [10, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(rows[1]["targets"], [11, 0, 0, 0, 0, 0])


def test_converter_packs_every_target_once():
  rng = np.random.default_rng(0)
  seqs = [list(rng.integers(2, 50, size=n)) for n in rng.integers(1, 12, size=200)]
  rows = _convert(seqs, length=10, pack=True)
  got = sorted((int(i), int(t)) for r in rows for i, t, w in zip(r["inputs"], r["targets"], r["weights"]) if w)
  # Histories longer than the row keep their most recent 10 items, i.e. 9 targets.
  want = sorted((int(s[j]), int(s[j + 1])) for s in seqs for j in range(max(0, len(s) - 10), len(s) - 1))
  assert got == want
  for r in rows:  # positions restart at every segment
    seg, pos = r["segment_ids"], r["positions"]
    for s in set(seg[seg > 0]):
      np.testing.assert_array_equal(pos[seg == s], np.arange((seg == s).sum()))


def _tiny(**kw):
  from recjax.models import sasrec
  model = sasrec.SASRec(vocab_size=40, max_length=8, dim=16, num_layers=2, num_heads=2, mlp_dim=32,
                        dropout=0.0, attention_dropout=0.0, **kw)
  return model, model.network(nnx.Rngs(0))


def test_no_position_sees_its_future_or_another_segment():
  model, net = _tiny()
  inputs = jnp.array([[5, 6, 7, 8, 20, 21, 22, 0]])
  seg = jnp.array([[1, 1, 1, 1, 2, 2, 2, 0]])
  pos = jnp.array([[0, 1, 2, 3, 0, 1, 2, 0]])
  base = model.hidden(net, {"inputs": inputs, "segment_ids": seg, "positions": pos}, deterministic=True)
  changed = inputs.at[0, 2].set(30)  # segment 1, position 2
  out = model.hidden(net, {"inputs": changed, "segment_ids": seg, "positions": pos}, deterministic=True)
  diff = np.abs(np.asarray(out - base)).max(axis=-1)[0]
  assert np.all(diff[:2] == 0) and np.all(diff[4:7] == 0)  # the past and the other segment
  assert np.all(diff[2:4] > 0)  # the changed step and its future


def test_eval_query_is_the_last_history_item_in_training_layout():
  model, net = _tiny()
  history = [5, 6, 7]
  train = {"inputs": jnp.array([history + [0] * 5]), "segment_ids": jnp.array([[1, 1, 1] + [0] * 5]),
           "positions": jnp.array([[0, 1, 2] + [0] * 5])}
  want = net.query(model.hidden(net, train, deterministic=True)[0, 2])
  mask_id = 1
  ev = {"inputs": jnp.array([history + [mask_id] + [0] * 4]), "segment_ids": jnp.array([[1] * 4 + [0] * 4]),
        "positions": jnp.array([[0, 1, 2, 3] + [0] * 4]), "mask_position": jnp.array([3])}
  np.testing.assert_allclose(model.queries(net, ev)[0], want, atol=1e-6)


def _randomize_relative_bias(net):
  table = net.relative_bias[...]
  net.relative_bias[...] = jnp.asarray(np.random.default_rng(1).normal(size=table.shape), jnp.float32)


@pytest.mark.parametrize("encoding", ["relative", "absolute"])
def test_relative_positions_read_the_history_by_recency(encoding):
  # The same history at positions 0.. and 3..: with relative positions only the distances
  # matter, so the last item's state is the same (a right-aligned row and a packed one agree);
  # absolute position embeddings tell the two apart.
  model, net = _tiny(position_encoding=encoding)
  if encoding == "relative":
    assert net.positions is None and net.relative_bias[...].shape == (2, 8)
    _randomize_relative_bias(net)
  seg = jnp.array([[1, 1, 1, 0, 0, 0, 0, 0]])
  h0 = model.hidden(net, {"inputs": jnp.array([[5, 6, 7, 0, 0, 0, 0, 0]]), "segment_ids": seg,
                          "positions": jnp.array([[0, 1, 2, 0, 0, 0, 0, 0]])}, deterministic=True)
  h3 = model.hidden(net, {"inputs": jnp.array([[5, 6, 7, 0, 0, 0, 0, 0]]), "segment_ids": seg,
                          "positions": jnp.array([[3, 4, 5, 0, 0, 0, 0, 0]])}, deterministic=True)
  gap = float(jnp.abs(h0[0, :3] - h3[0, :3]).max())
  assert (gap < 1e-5) if encoding == "relative" else (gap > 1e-3)


def test_inverse_positions_count_back_from_the_newest_item():
  # Training rows: positions count back from each segment's last input; evaluation rows
  # (history + MASK): from the last history item, so the query embeds the same position.
  model, net = _tiny(position_encoding="inverse")
  train = {"inputs": jnp.array([[5, 6, 7, 20, 21, 0]]), "segment_ids": jnp.array([[1, 1, 1, 2, 2, 0]]),
           "positions": jnp.array([[0, 1, 2, 0, 1, 0]])}
  np.testing.assert_array_equal(model.positions(train), [[2, 1, 0, 1, 0, 0]])
  ev = {"inputs": jnp.array([[5, 6, 7, 1, 0, 0]]), "segment_ids": jnp.array([[1, 1, 1, 1, 0, 0]]),
        "positions": jnp.array([[0, 1, 2, 3, 0, 0]]), "mask_position": jnp.array([3])}
  np.testing.assert_array_equal(model.positions(ev), [[2, 1, 0, 0, 0, 0]])
  want = net.query(model.hidden(net, train, deterministic=True)[0, 2])
  np.testing.assert_allclose(model.queries(net, ev)[0], want, atol=1e-6)
  from recjax.models import bert4rec
  cloze = bert4rec.Bert4Rec(vocab_size=40, max_length=8, position_encoding="inverse")
  np.testing.assert_array_equal(cloze.positions(ev), [[3, 2, 1, 0, 0, 0]])  # the MASK is the query


def test_relative_bias_is_looked_up_by_distance():
  from recjax.models import layers
  table = jnp.arange(2 * 4, dtype=jnp.float32).reshape(2, 4)  # heads 2, distances 0..3
  pos = jnp.array([[0, 1, 2, 3, 4, 0]])
  bias = layers.relative_position_bias(table, pos, causal=True)
  assert bias.shape == (1, 2, 6, 6)
  assert float(bias[0, 1, 4, 1]) == table[1, 3]  # distance 3
  assert float(bias[0, 0, 4, 0]) == table[0, 3]  # distance 4 clipped to the last entry
  assert float(bias[0, 1, 2, 2]) == table[1, 0]
  sym = jnp.arange(2 * 7, dtype=jnp.float32).reshape(2, 7)  # signed -3..3
  bias = layers.relative_position_bias(sym, pos, causal=False)
  assert float(bias[0, 0, 1, 3]) == sym[0, 1] and float(bias[0, 0, 3, 1]) == sym[0, 5]


def test_relative_sasrec_trains_and_unknown_encoding_is_refused():
  model, net = _tiny(position_encoding="relative")
  rows = _convert([[5, 6, 7, 8, 9], [10, 11, 12]], length=8, pack=True)
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  grads = nnx.grad(lambda n: model.loss_fn(n, batch, None)[0])(net)
  assert float(jnp.abs(grads.relative_bias[...]).sum()) > 0
  from recjax.models import sasrec
  with pytest.raises(ValueError, match="position_encoding"):
    sasrec.SASRec(vocab_size=40, position_encoding="rotary")


def test_bidirectional_sasrec_is_refused():
  from recjax.models import sasrec
  with pytest.raises(ValueError, match="causal=True"):
    sasrec.SASRec(vocab_size=40, causal=False)


def test_loss_scores_every_position():
  model, net = _tiny()
  rows = _convert([[5, 6, 7, 8, 9], [10, 11, 12]], length=8, pack=True)
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  loss, metrics = model.loss_fn(net, batch, None)
  assert float(metrics["targets"]) == 6 and float(metrics["dropped_targets"]) == 0
  assert np.isfinite(float(loss))


@pytest.mark.parametrize("loss", ["full", "chunked"])
def test_loss_can_leave_each_positions_history_out_of_its_softmax(loss):
  """loss_excludes_history: each position's cross-entropy is the dense one with the ids its
  segment has read so far (the target excepted, repeats once) set to -inf; other segments'
  items and later items stay in. Checked against that dense reference per position."""
  model, net = _tiny(loss=loss, loss_chunk=16, loss_excludes_history=True)
  plain, _ = _tiny(loss=loss, loss_chunk=16)
  # Row 0: item 6 repeats; its second occurrence is also a target (6 -> 7 -> 6 -> 8).
  rows = _convert([[5, 6, 7, 6, 8], [10, 11, 5]], length=8, pack=True)
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  loss_value, metrics = model.loss_fn(net, batch, None)
  inputs, targets = np.asarray(batch["inputs"]).ravel(), np.asarray(batch["targets"]).ravel()
  segs = np.asarray(batch["segment_ids"]).ravel()
  hidden = model.hidden(net, batch, deterministic=True).reshape(len(inputs), -1)
  table, bias = model.output_table(net)
  logits = np.asarray(net.query(hidden) @ table.T + bias, np.float64)
  logits[:, :2] = logits[:, model.vocab_size:] = -np.inf  # PAD, MASK and padding rows
  want = []
  for p in np.flatnonzero(segs):
    read = {int(inputs[q]) for q in range(p + 1) if segs[q] == segs[p]} - {int(targets[p])}
    row = logits[p].copy()
    row[sorted(read)] = -np.inf
    want.append(np.logaddexp.reduce(row) - row[targets[p]])
  assert float(metrics["targets"]) == len(want) == 6
  np.testing.assert_allclose(float(loss_value), np.mean(want), rtol=1e-5)
  # Leaving items out only lowers the loss; here every position had something to leave out.
  assert float(loss_value) < float(plain.loss_fn(net, batch, None)[0])


def test_history_exclusion_refuses_a_sampled_loss():
  from recjax.models import sasrec
  with pytest.raises(ValueError, match="loss_excludes_history needs the full or chunked loss"):
    sasrec.SASRec(vocab_size=40, num_negatives=8, loss_excludes_history=True)


def test_sampled_softmax_scores_the_target_against_shared_negatives():
  import jax
  from recjax.models import bert4rec
  model, net = _tiny(num_negatives=12)
  full, _ = _tiny()
  rows = _convert([[5, 6, 7, 8, 9], [10, 11, 12]], length=8, pack=True)
  batch = {k: jnp.asarray(np.stack([r[k] for r in rows])) for k in rows[0]}
  rng = jax.random.key(3)
  loss, metrics = model.loss_fn(net, batch, rng)
  assert float(metrics["targets"]) == 6
  # The same loss from scratch: the step's negatives, each target masked out of them.
  negatives = np.asarray(jax.random.randint(jax.random.split(rng)[1], (12,), bert4rec.NUM_RESERVED, 40))
  hidden = model.hidden(net, batch, deterministic=True)
  table, bias = (np.asarray(x) for x in net.item_table())
  want = []
  for r, l in zip(*np.nonzero(np.asarray(batch["weights"]))):
    q = np.asarray(net.query(hidden[r, l]), np.float64)
    t = int(batch["targets"][r, l])
    neg = [q @ table[n] + bias[n] for n in negatives if n != t]
    pos = q @ table[t] + bias[t]
    want.append(np.logaddexp.reduce([pos, *neg]) - pos)
  np.testing.assert_allclose(float(loss), np.mean(want), rtol=1e-5)
  # Evaluation (rng None) keeps the full-catalog loss; a full-softmax model agrees there.
  np.testing.assert_allclose(float(model.loss_fn(net, batch, None)[0]), float(full.loss_fn(net, batch, None)[0]),
                             rtol=1e-6)
  # Gradients reach the item table only through the target and sampled rows.
  grads = nnx.grad(lambda n: model.loss_fn(n, batch, rng)[0])(net)
  touched = np.flatnonzero(np.abs(np.asarray(grads["items"]["embedding"][...])).sum(-1))
  allowed = set(np.asarray(batch["inputs"]).ravel()) | set(np.asarray(batch["targets"]).ravel()) | set(negatives)
  assert len(touched) > 0 and set(touched) <= allowed
  with pytest.raises(ValueError, match="num_negatives"):
    _tiny(num_negatives=-1)


def test_main_job_with_sasrec_beats_popularity(tmp_path):
  cmd = [sys.executable, "-m", "recjax.main", "main", "--workdir", str(tmp_path), "--num_users", "300",
         "--num_items", "120", "--gin_file", "experiments/quickstart_sasrec.gin",
         "--gin.TRAIN_STEPS=80", "--gin.BATCH_SIZE=16", "--flare_steps", "0",
         "--lumen_steps", "0"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO, env=dict(os.environ))
  assert out.returncode == 0, out.stderr[-3000:]
  assert "metrics identical" in out.stdout
  assert "sasrec.SASRec" in (tmp_path / "model" / "config.gin").read_text()
  test = json.loads((tmp_path / "model" / "eval_step_80.json").read_text())["results"]
  assert test["test/model"]["ndcg@10"] > 1.2 * test["test/popularity"]["ndcg@10"], test
