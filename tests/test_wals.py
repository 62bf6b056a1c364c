"""WALS: the CG half step solves the normal equations, sweeps never increase the loss,
and the factors recommend held-out items of a planted structure far above popularity."""

import numpy as np
import pytest

from recjax.models import wals


def _planted(num_users=240, num_items=60, clusters=4, per_user=8, seed=0):
  """Users who each consume items of one cluster; the last item of each is held out."""
  rng = np.random.default_rng(seed)
  members = np.array_split(rng.permutation(num_items), clusters)
  users, items, held = [], [], []
  for u in range(num_users):
    picks = rng.choice(members[u % clusters], size=per_user, replace=False)
    users += [u] * (per_user - 1)
    items += list(picks[:-1])
    held.append(picks[-1])
  return np.array(users), np.array(items), np.array(held), num_users, num_items


def test_cg_half_step_solves_every_rows_normal_equations():
  import jax.numpy as jnp
  rng = np.random.default_rng(1)
  n, m, d = 7, 11, 5
  cfg = wals.WALSConfig(dim=d, cg_steps=d + 2, l2=0.3, unobserved_weight=0.2)
  y = rng.normal(size=(m, d)).astype(np.float32)
  rows = np.repeat(np.arange(n), 3)
  cols = rng.integers(0, m, size=rows.size)
  conf = (1.0 + rng.integers(1, 4, size=rows.size)).astype(np.float32)
  x0 = rng.normal(size=(n, d)).astype(np.float32)
  got = np.asarray(wals._half_step(jnp.asarray(x0), jnp.asarray(y), jnp.asarray(rows), jnp.asarray(cols),
                                   jnp.asarray(conf), cfg))
  for r in range(n):
    a = cfg.unobserved_weight * y.T @ y + cfg.l2 * np.eye(d)
    b = np.zeros(d)
    for c, w in zip(cols[rows == r], conf[rows == r]):
      a += (w - cfg.unobserved_weight) * np.outer(y[c], y[c])
      b += w * y[c]
    np.testing.assert_allclose(got[r], np.linalg.solve(a, b), rtol=1e-3, atol=1e-4)


def test_sweeps_never_increase_the_loss_and_recover_the_structure():
  users, items, held, nu, ni = _planted()
  model = wals.fit(users, items, num_users=nu, num_items=ni,
                   config=wals.WALSConfig(dim=8, sweeps=8, cg_steps=2))
  losses = np.array(model.losses)
  assert np.all(np.diff(losses) <= 1e-3 * np.abs(losses[:-1])), losses
  assert losses[-1] < 0.5 * losses[0]
  scores = model.scores(np.arange(nu))
  scores[users, items] = -np.inf  # history excluded, as in every recjax evaluation
  top = np.argsort(-scores, axis=1)[:, :10]
  recall = np.mean([h in t for h, t in zip(held, top)])
  popularity = np.bincount(items, minlength=ni).astype(float)
  pop_hits = []
  for u, h in enumerate(held):
    p = popularity.copy()
    p[items[users == u]] = -np.inf
    pop_hits.append(h in np.argsort(-p)[:10])
  # 15 items per cluster, 7 seen: the held-out item is among 8 unseen cluster items.
  assert recall > 0.9 and recall > 2 * np.mean(pop_hits), (recall, np.mean(pop_hits))


def test_duplicates_merge_into_counts_and_bad_input_is_refused():
  a = wals.fit([0, 0, 1], [2, 2, 3], num_users=2, num_items=4, config=wals.WALSConfig(dim=2, sweeps=2))
  b = wals.fit([0, 1], [2, 3], num_users=2, num_items=4, counts=[2, 1], config=wals.WALSConfig(dim=2, sweeps=2))
  np.testing.assert_allclose(a.item_factors, b.item_factors, rtol=1e-5)
  with pytest.raises(ValueError, match=r"item ids must lie in \[0, 4\)"):
    wals.fit([0], [4], num_users=1, num_items=4)
  with pytest.raises(ValueError, match="at least one"):
    wals.fit([], [], num_users=1, num_items=4)


def test_normalize_by_mean_norm():
  v = np.array([[3.0, 4.0], [0.0, 1.0], [0.0, 0.0]])
  out = wals.normalize_by_mean_norm(v, rows=[0, 1])
  assert np.isclose(np.linalg.norm(out[:2], axis=1).mean(), 1.0)
  with pytest.raises(ValueError):
    wals.normalize_by_mean_norm(np.zeros((2, 2)))


def test_wals_on_the_default_synthetic_dataset_beats_popularity(tmp_path):
  # The main job's dataset (3,000 users x 800 items); the 300-user fixture is too small
  # for any collaborative model to beat popularity.
  from recjax.data import prepare, synthetic
  synthetic.write_synthetic(tmp_path / "raw", num_users=3000, num_items=800, seed=0, formats=("amazon2018",))
  data = tmp_path / "prepared"
  prepare.prepare("amazon2018", tmp_path / "raw" / "amazon2018" / "Synthetic.json.gz", data,
                  options=prepare.PrepareOptions(kcore=5))
  from recjax.artifacts import wals as wals_artifact
  users, items, num_users, vocab = wals_artifact.train_interactions(data)
  model = wals.fit(users, items, num_users=num_users, num_items=vocab, config=wals.WALSConfig(dim=16, sweeps=6))
  assert model.item_factors.shape == (vocab, 16)
  result = wals_artifact.evaluate(model, data, split="test")
  assert result["wals"]["count"] == result["popularity"]["count"] == num_users
  assert result["wals"]["ndcg@10"] > 1.5 * result["popularity"]["ndcg@10"], result


def test_fit_command_saves_vectors_and_reports_both_splits(synthetic_prepared, tmp_path):
  import json
  import os
  import pathlib
  import shutil
  import subprocess
  import sys
  from recjax.artifacts import wals as wals_artifact
  data = tmp_path / "synthetic"
  shutil.copytree(synthetic_prepared["synthetic"], data)
  repo = pathlib.Path(__file__).resolve().parents[1]
  fit = [sys.executable, "-m", "recjax.main", "fit", "--gin_file=fits/wals.gin", "--dataset", f"syn={data}"]
  out = subprocess.run([*fit, "--gin.wals_model.WALSConfig.dim=8", "--gin.wals_model.WALSConfig.sweeps=3",
                        "--gin.NAME=w8"], capture_output=True, text=True, cwd=repo, env=dict(os.environ), timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  row = json.loads(out.stdout.strip().splitlines()[-1])
  assert row["validation"]["wals"]["count"] == row["test"]["popularity"]["count"] > 200
  assert "wals sweep 3/3" in out.stderr  # progress lines
  model = wals_artifact.load(data, "w8")
  assert model.item_factors.shape[1] == 8 and model.user_factors.shape[0] == row["users"]
  assert model.config.sweeps == 3 and len(model.losses) == 3
  meta = json.loads((data / "artifacts" / "wals" / "w8" / "manifest.json").read_text())
  assert meta["gin_file"] == "fits/wals.gin" and "WALSConfig.dim = 8" in meta["gin_config"]
  assert meta["metrics"]["test"] == row["test"]
  bad = subprocess.run([*fit, "--gin.wals_model.WALSConfig.dim=0"], capture_output=True, text=True, cwd=repo,
                       env=dict(os.environ), timeout=300)
  assert bad.returncode == 2 and "WALSConfig.dim must be >= 1" in bad.stderr and "Traceback" not in bad.stderr
