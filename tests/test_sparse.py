"""Row-wise lazy optimizer for the item tables (recjax/train/sparse.py): equal to the dense
optimizer when every row is touched, lazy on the rest, and correct sharded and resumed;
the step that differentiates only the gathered rows a step reads equals the one that
finds them in the tables' dense gradients."""

import functools

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from recjax.bench import scale
from recjax.models import base, bert4rec, losses, sasrec
from recjax.train import loop, mesh as mesh_lib, sparse

REPO = pathlib.Path(__file__).resolve().parents[1]


def _params():
  rng = np.random.default_rng(0)
  return {"items": {"embedding": jnp.asarray(rng.normal(size=(24, 4)), jnp.float32)},
          "output_bias": jnp.asarray(rng.normal(size=(24,)), jnp.float32),
          "head": {"kernel": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}}


def _run(tx, params, grads):
  state = tx.init(params)
  step = jax.jit(lambda g, s, p: tx.update(g, s, p))
  for g in grads:
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _grads(params, n, rows=None):
  out = []
  for i in range(n):
    g = jax.tree.map(lambda x: jax.random.normal(jax.random.key(i), x.shape), params)
    if rows is not None:  # only these rows of the item tables get a gradient
      keep = np.isin(np.arange(24), rows)
      g["items"]["embedding"] = g["items"]["embedding"] * keep[:, None]
      g["output_bias"] = g["output_bias"] * keep
    out.append(g)
  return out


@pytest.mark.parametrize("max_rows", [0, 24])  # masked over the table; gathered rows (all of them)
def test_every_row_touched_equals_dense_adamw(max_rows):
  kw = dict(learning_rate=1e-2, weight_decay=0.1, warmup_steps=2, schedule="cosine", clip_norm=1.0)
  params, grads = _params(), _grads(_params(), 5)
  want, _ = _run(loop.make_optimizer(10, **kw)[0], params, grads)
  got, _ = _run(sparse.make_optimizer(10, max_rows=max_rows, **kw)[0], params, grads)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)


def test_every_row_touched_lazy_adagrad_equals_optax_adagrad():
  params, grads = _params(), _grads(_params(), 4)
  table = {"items": params["items"]}
  want, _ = _run(optax.adagrad(0.1), table, [{"items": g["items"]} for g in grads])
  got, _ = _run(sparse.lazy("adagrad", 0.1, max_rows=24), table, [{"items": g["items"]} for g in grads])
  np.testing.assert_allclose(np.asarray(got["items"]["embedding"]), np.asarray(want["items"]["embedding"]),
                             atol=1e-6)


@pytest.mark.parametrize("max_rows", [8, 4, 0])  # room for the rows; exactly; masked over the table
def test_untouched_rows_stay_and_touched_rows_follow_adam(max_rows):
  rows = np.array([1, 5, 6, 20])
  params = _params()
  table = {"items": params["items"]}
  grads = [{"items": g["items"]} for g in _grads(params, 4, rows)]
  got, state = _run(sparse.lazy("adam", 1e-2, weight_decay=0.1, max_rows=max_rows), table, grads)
  # The touched rows alone, through optax's AdamW, give the same rows.
  sub = {"items": {"embedding": params["items"]["embedding"][rows]}}
  want, _ = _run(optax.adamw(1e-2, b1=0.9, b2=0.99, weight_decay=0.1), sub,
                 [{"items": {"embedding": g["items"]["embedding"][rows]}} for g in grads])
  t, t0 = np.asarray(got["items"]["embedding"]), np.asarray(params["items"]["embedding"])
  np.testing.assert_allclose(t[rows], np.asarray(want["items"]["embedding"]), atol=1e-6)
  others = np.setdiff1d(np.arange(24), rows)
  np.testing.assert_array_equal(t[others], t0[others])
  assert np.all(np.asarray(state.mu["items"]["embedding"])[others] == 0)
  assert int(state.count) == 4 and int(state.dropped_rows) == 0


def test_rows_past_the_capacity_are_counted():
  params = _params()
  table = {"items": params["items"]}
  grads = [{"items": g["items"]} for g in _grads(params, 2, np.array([1, 5, 6, 20]))]
  got, state = _run(sparse.lazy("adam", 1e-2, max_rows=3), table, grads)
  assert int(state.dropped_rows) == 2  # one row over, twice
  t, t0 = np.asarray(got["items"]["embedding"]), np.asarray(params["items"]["embedding"])
  assert np.all(t[20] == t0[20]) and np.all(t[[1, 5, 6]] != t0[[1, 5, 6]])  # the lowest ids fit


# -- the gathered-rows step ------------------------------------------------------------------

def test_distinct_ids_sorted_padded_and_counted():
  ids = jnp.asarray([[7, 3, 7], [0, 3, 9]])
  got, n = sparse.distinct_ids(ids, 6, fill=12)
  np.testing.assert_array_equal(np.asarray(got), [0, 3, 7, 9, 12, 12])
  assert int(n) == 4
  got, n = sparse.distinct_ids(ids, 3, fill=12)  # past the capacity: the smallest ids fit
  np.testing.assert_array_equal(np.asarray(got), [0, 3, 7])
  assert int(n) == 4


def test_item_rows_gradient_merges_duplicates_and_reads_missing_ids_from_the_table():
  table = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32)
  ids = jnp.asarray([4, 2, 4, 4, 9, 2])
  w = jnp.asarray(np.random.default_rng(1).normal(size=(6, 3)), jnp.float32)
  loss = lambda t: jnp.sum(jnp.sin(t[ids]) * w)
  dense = jax.grad(loss)(table)
  for k in (3, 2):  # every id fits; 9 past the capacity (read, not differentiated)
    uids, _ = sparse.distinct_ids(ids, k, fill=10)
    rows = table.at[uids].get(mode="fill", fill_value=0)
    value, g = jax.value_and_grad(lambda r: loss(base.ItemRows(uids, {"t": r}).view("t", table)))(rows)
    np.testing.assert_allclose(float(value), float(loss(table)), rtol=1e-6)  # the forward stays exact
    np.testing.assert_allclose(np.asarray(g), np.asarray(dense)[np.asarray(uids)], atol=1e-6)


def _trainer(model, opt, frozen=None):
  mesh = mesh_lib.create_mesh(data=1, fsdp=1, model=1, devices=jax.devices()[:1])
  return loop.Trainer(model, mesh, mesh_lib.DEFAULT_RULES, total_steps=8, optimizer_fn=opt,
                      frozen_inputs=frozen or {}), mesh


def _train(model, opt, batches, frozen=None):
  trainer, mesh = _trainer(model, opt, frozen)
  with jax.set_mesh(mesh):
    state, step, metrics = trainer.init_state(), trainer.make_train_step(), []
    for b in batches:
      state, m = step(state, trainer.to_global(b))
      metrics.append(jax.device_get(m))
  return state, metrics


def _lazy_state(state):
  clipped = isinstance(state.opt_state[0], optax.EmptyState)  # the (clip, partition) layout
  partition = state.opt_state[1] if clipped else state.opt_state
  return partition.inner_states["rows"].inner_state


def _close(a, b, atol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=atol, err_msg=jax.tree_util.keystr(path))


_TINY = dict(max_length=10, dim=16, num_layers=1, num_heads=2, mlp_dim=32, dropout=0.1, attention_dropout=0.1)


@pytest.mark.parametrize("kind", ["sasrec_uniform", "bert4rec_untied_mixed_in_batch"])
def test_gathered_rows_equal_dense_gradient_rows(kind):
  v = 300
  if kind == "sasrec_uniform":
    model = sasrec.SASRec(vocab_size=v, num_negatives=16, **_TINY)
    batches = [scale.random_batch(v, 4, 10, mask_prob=1.0, seed=i) for i in range(4)]
    frozen = None
  else:  # a separate output table, popularity-drawn and in-batch negatives (frozen inputs)
    model = bert4rec.Bert4Rec(vocab_size=v, num_negatives=16, negatives="mixed", in_batch_negatives=8,
                              tie_embeddings=False, **_TINY)
    batches = [scale.random_batch(v, 4, 10, mask_prob=0.3, seed=i) for i in range(4)]
    counts = np.random.default_rng(0).integers(0, 50, model.padded_vocab_size)
    frozen = {k: (x, (None,)) for k, x in losses.popularity_inputs(counts, 2, v).items()}
  opt = functools.partial(sparse.make_optimizer, max_rows=128, learning_rate=1e-2, weight_decay=0.01,
                          warmup_steps=1, schedule="cosine")
  want, want_m = _train(model, functools.partial(opt, gather_rows=False), batches, frozen)
  got, got_m = _train(model, opt, batches, frozen)
  _close(want.params, got.params)
  _close(want.opt_state, got.opt_state)
  for a, b in zip(want_m, got_m):
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=1e-5)
    np.testing.assert_allclose(b["grad_norm"], a["grad_norm"], rtol=1e-5)  # clipping saw the same norm
  assert int(_lazy_state(got).dropped_rows) == 0
  # Sampled + lazy: some rows never read, so never moved.
  init, _ = _train(model, opt, [], frozen)
  moved = np.abs(np.asarray(got.params["items"]["embedding"]) - np.asarray(init.params["items"]["embedding"])).sum(1)
  assert 0 < (moved > 0).sum() < v


def test_gathered_rows_equal_dense_adam_when_every_row_is_read_every_step():
  # 6 items, 40 targets and 8 negatives per step: every item row is read at every step
  # (row 0, PAD, never is); without weight decay, dense Adam leaves unread rows alone too.
  v = 8
  model = sasrec.SASRec(vocab_size=v, vocab_multiple=8, num_negatives=8, **_TINY)
  batches = [scale.random_batch(v, 4, 10, mask_prob=1.0, seed=i) for i in range(5)]
  assert all(set(b["targets"].ravel()) == set(range(2, v)) for b in batches)
  kw = dict(learning_rate=1e-2, warmup_steps=2, schedule="cosine", clip_norm=0.5)
  want, want_m = _train(model, functools.partial(loop.make_optimizer, **kw), batches)
  got, got_m = _train(model, functools.partial(sparse.make_optimizer, **kw), batches)
  _close(want.params, got.params)
  assert max(m["grad_norm"] for m in got_m) > 0.5  # the clipping was exercised
  np.testing.assert_allclose([m["grad_norm"] for m in got_m], [m["grad_norm"] for m in want_m], rtol=1e-5)


def test_gathered_rows_past_the_capacity_are_counted_and_read_exactly():
  v = 300
  model = sasrec.SASRec(vocab_size=v, num_negatives=16, **_TINY)
  batches = [scale.random_batch(v, 4, 10, mask_prob=1.0, seed=i) for i in range(2)]
  cap = 20
  opt = functools.partial(sparse.make_optimizer, max_rows=cap, learning_rate=1e-2, clip_norm=None)
  got, got_m = _train(model, opt, batches)
  want, want_m = _train(model, functools.partial(opt, max_rows=0), batches)  # room for every id
  # The ids each step read, as the model lists them (inputs, targets, negatives).
  read = [np.unique(np.asarray(model.item_ids(jax.tree.map(jnp.asarray, b),
                                              jax.random.fold_in(jax.random.key(0), i)))) for i, b in enumerate(batches)]
  assert int(_lazy_state(got).dropped_rows) == sum(len(r) - cap for r in read) > 0
  np.testing.assert_allclose(got_m[0]["loss"], want_m[0]["loss"], rtol=1e-6)  # the forward is exact
  t0 = np.asarray(_train(model, opt, [])[0].params["items"]["embedding"])
  t = np.asarray(got.params["items"]["embedding"])
  fit = np.union1d(read[0][:cap], read[1][:cap])
  never = np.setdiff1d(np.arange(v), fit)
  np.testing.assert_array_equal(t[never], t0[never])  # ids past the capacity are not updated
  assert np.all(np.abs(t[read[0][:cap]] - t0[read[0][:cap]]).sum(1) > 0)


def _flare(v, **kw):
  from recjax.models import flare
  model = flare.Flare(vocab_size=v, text_dim=12, num_latents=3, perceiver_dim=8, perceiver_heads=2,
                      contrastive_positions=16, num_negatives=12, **_TINY, **kw)
  rng = np.random.default_rng(0)
  frozen = {"item_text": rng.normal(size=(model.padded_vocab_size, 6, 12)).astype(np.float32),
            "item_text_mask": rng.uniform(size=(model.padded_vocab_size, 6)) < 0.8}
  if kw.get("output_text"):
    frozen["item_sentence"] = flare.sentence_table(frozen["item_text"], frozen["item_text_mask"])
  return model, frozen


@pytest.mark.parametrize("kind", ["sasrec_mixed_in_batch", "bert4rec_untied", "flare", "flare_id"])
def test_models_list_every_row_their_sampled_loss_reads(kind):
  """The contract behind the gathered step: the loss read through `ItemRows` equals the
  loss, its gradient w.r.t. the gathered rows equals the tables' gradient at those rows,
  and the tables' gradient is zero outside `item_ids`."""
  from flax import nnx
  v = 200
  frozen = {}
  if kind == "sasrec_mixed_in_batch":
    model = sasrec.SASRec(vocab_size=v, num_negatives=12, in_batch_negatives=4, negatives="mixed", **_TINY)
  elif kind == "bert4rec_untied":
    model = bert4rec.Bert4Rec(vocab_size=v, num_negatives=12, tie_embeddings=False, **_TINY)
  else:
    model, frozen = _flare(v, use_text=kind == "flare")
  net = model.network(nnx.Rngs(0))
  batch = {k: jnp.asarray(x) for k, x in scale.random_batch(v, 3, 10, mask_prob=0.3, seed=1).items()}
  frozen.update(losses.popularity_inputs(np.arange(model.padded_vocab_size), 2, v))
  batch["frozen"] = {k: jnp.asarray(x) for k, x in frozen.items()}
  rng = jax.random.key(5)
  loss, grads = nnx.value_and_grad(lambda n: model.loss_fn(n, batch, rng)[0])(net)
  ids = model.item_ids(batch, rng)
  uids, _ = sparse.distinct_ids(ids, ids.size, fill=model.padded_vocab_size)
  names = [n for n in sparse.ITEM_TABLES if n in grads]
  _, params = nnx.split(net, nnx.Param)
  tables = {n: jax.tree.leaves(params[n])[0] for n in names}
  rows = {n: t.at[uids].get(mode="fill", fill_value=0) for n, t in tables.items()}
  f = lambda rows: model.loss_fn(net, dict(batch, item_rows=base.ItemRows(uids, rows)), rng)[0]
  got, row_grads = jax.value_and_grad(f)(rows)
  np.testing.assert_allclose(float(got), float(loss), rtol=1e-6)
  listed = set(np.asarray(ids).tolist())
  for n in names:
    g = np.asarray(jax.tree.leaves(grads[n])[0])
    read = set(np.flatnonzero(np.abs(g.reshape(g.shape[0], -1)).sum(1)).tolist())
    assert read and read <= listed, (n, sorted(read - listed))
    want = np.asarray(jnp.asarray(g).at[uids].get(mode="fill", fill_value=0))
    np.testing.assert_allclose(np.asarray(row_grads[n]), want, atol=1e-6, err_msg=n)
  assert model.item_ids(batch, None) is None


def test_losses_over_whole_tables_list_no_rows():
  batch = {k: jnp.asarray(x) for k, x in scale.random_batch(50, 2, 10, mask_prob=0.3).items()}
  for model in (sasrec.SASRec(vocab_size=50, loss="chunked", **_TINY), bert4rec.Bert4Rec(vocab_size=50, **_TINY),
                _flare(50, output_text=True)[0]):  # the output table mixes in every item's sentence
    assert model.item_ids(batch, jax.random.key(0)) is None


_MESH_SCRIPT = textwrap.dedent("""
    import functools, json, sys, tempfile
    import jax, numpy as np
    from recjax.bench import scale
    from recjax.models import sasrec
    from recjax.train import checkpoint as ckpt_lib, loop, mesh as mesh_lib, sparse
    V = 500
    model = sasrec.SASRec(vocab_size=V, max_length=10, dim=16, num_layers=1, num_heads=2, mlp_dim=32,
                          dropout=0.1, attention_dropout=0.1, num_negatives=16)
    batches = [scale.random_batch(V, 4, 10, mask_prob=1.0, seed=i) for i in range(6)]
    opt = functools.partial(sparse.make_optimizer, max_rows=128, learning_rate=1e-2, weight_decay=0.01)

    @functools.cache
    def trainer(n):  # one trainer (one compiled step) per device count
      mesh = mesh_lib.create_mesh(data=1, fsdp=1, model=n, devices=jax.devices()[:n])
      tr = loop.Trainer(model, mesh, mesh_lib.DEFAULT_RULES, total_steps=6, optimizer_fn=opt)
      return tr, mesh, tr.make_train_step()

    def run(devices, steps, state=None):
      tr, mesh, fn = trainer(len(devices))
      with jax.set_mesh(mesh):
        state = tr.init_state() if state is None else state
        for b in batches[int(state.step):int(state.step) + steps]:
          state, _ = fn(state, tr.to_global(b))
      return tr, state

    table = lambda s: np.asarray(s.params["items"]["embedding"])
    _, one = run(jax.devices()[:1], 6)
    tr, half = run(jax.devices()[:8], 3)
    rows_state = half.opt_state[1].inner_states["rows"].inner_state
    spec = str(rows_state.mu["items"]["embedding"].sharding.spec)
    d = tempfile.mkdtemp()
    ck = ckpt_lib.Checkpointer(d)
    with jax.set_mesh(tr.abstract_state.step.sharding.mesh):
      ck.save(3, half, {}, {"gin": "", "param_shapes": tr.param_shapes}, force=True)
      ck.wait()
      restored, _, _ = ck.restore(3, tr.abstract_state, tr.param_shapes)
    _, resumed = run(jax.devices()[:8], 3, restored)
    _, dense_init = run(jax.devices()[:1], 0)
    print("RESULT " + json.dumps({"spec": spec, "step": int(resumed.step),
        "max_diff": float(np.abs(table(one) - table(resumed)).max()),
        "dropped": int(resumed.opt_state[1].inner_states["rows"].inner_state.dropped_rows),
        "rows_changed": int((np.abs(table(one) - table(dense_init)).sum(1) > 0).sum())}))
""")


def test_sharded_resumed_sparse_training_matches_one_device(tmp_path):
  """The gathered-rows step (SASRec+, sampled) on a (1, 1, 8) mesh, the table and its
  moments sharded 8 ways on `model`, checkpointed at step 3 and resumed: the same table as
  six uninterrupted steps on one device."""
  script = tmp_path / "mesh.py"
  script.write_text(_MESH_SCRIPT)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT ", 1)[1])
  assert "model" in result["spec"]  # the moments are sharded like the table
  assert result["step"] == 6 and result["dropped"] == 0
  assert result["max_diff"] < 1e-5, result
  # Sampled softmax + lazy rows: only the rows the 6 steps used moved (of 512).
  assert 0 < result["rows_changed"] < 400, result
