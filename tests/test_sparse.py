"""Row-wise lazy optimizer for the item tables (recjax/train/sparse.py): equal to the dense
optimizer when every row is touched, lazy on the rest, and correct sharded and resumed."""

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

from recjax.train import loop, sparse

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
    tr, half = run(jax.devices()[:2], 3)
    rows_state = half.opt_state[1].inner_states["rows"].inner_state
    spec = str(rows_state.mu["items"]["embedding"].sharding.spec)
    d = tempfile.mkdtemp()
    ck = ckpt_lib.Checkpointer(d)
    with jax.set_mesh(tr.abstract_state.step.sharding.mesh):
      ck.save(3, half, {}, {"gin": "", "param_shapes": tr.param_shapes}, force=True)
      ck.wait()
      restored, _, _ = ck.restore(3, tr.abstract_state, tr.param_shapes)
    _, resumed = run(jax.devices()[:2], 3, restored)
    _, dense_init = run(jax.devices()[:1], 0)
    print("RESULT " + json.dumps({"spec": spec, "step": int(resumed.step),
        "max_diff": float(np.abs(table(one) - table(resumed)).max()),
        "dropped": int(resumed.opt_state[1].inner_states["rows"].inner_state.dropped_rows),
        "rows_changed": int((np.abs(table(one) - table(dense_init)).sum(1) > 0).sum())}))
""")


def test_sharded_resumed_sparse_training_matches_one_device(tmp_path):
  script = tmp_path / "mesh.py"
  script.write_text(_MESH_SCRIPT)
  out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT ", 1)[1])
  assert "model" in result["spec"]  # the moments are sharded like the table
  assert result["step"] == 6 and result["dropped"] == 0
  assert result["max_diff"] < 1e-5, result
  # Sampled softmax + lazy rows: only the rows the 6 steps used moved (of 512).
  assert 0 < result["rows_changed"] < 400, result
