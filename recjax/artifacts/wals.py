"""The `wals` artifact: WALS collaborative item and user vectors of a prepared dataset.

  recjax fit --gin_file=fits/wals.gin --dataset beauty=DIR     # -> artifacts/wals/wals/
  model = wals.load(DIR, "wals")                               # a recjax.models.wals.WALSModel

Fitted on every user's training items (all but the last two), with orbax checkpoints every
`checkpoint_every` sweeps in the build dir (an interrupted fit resumes); the manifest holds
the validation and test HR@10 / NDCG@10 next to popularity. Files: factors.npz
(item_factors [vocab_size, dim], user_factors [num_users, dim]) and losses.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Callable

import jax.numpy as jnp
import numpy as np

from recjax.artifacts import manifest
from recjax.models import wals as wals_lib

KIND = "wals"
FILE = "factors.npz"


def _stderr(s: str) -> None:
  print(s, file=sys.stderr, flush=True)


def train_interactions(data_dir) -> tuple[np.ndarray, np.ndarray, int, int]:
  """(users, items, num_users, vocab_size) of a prepared dataset's training part: every
  user's items except the last two (validation and test targets), so evaluation on either
  split never sees its target."""
  from recjax.data.prepared import PreparedDataset
  ds = PreparedDataset(data_dir)
  table = ds.sequences(["user_id", "items"]).to_pydict()
  users, items = [], []
  for u, seq in zip(table["user_id"], table["items"]):
    train = seq[:-2]
    users.extend([u] * len(train))
    items.extend(train)
  return np.asarray(users, np.int64), np.asarray(items, np.int64), ds.num_users, ds.vocab_size


def evaluate(model: wals_lib.WALSModel, data_dir, *, split: str = "test", k: int = 10, chunk: int = 2048) -> dict:
  """Full-catalog HR@k / NDCG@k of the held-out item of `split` (test: the last item,
  validation: the one before), each user's earlier items excluded, next to popularity.
  The factors come from the training part (`train_interactions`) either way."""
  from recjax.data.prepared import PreparedDataset
  if split not in ("test", "validation"):
    raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
  ds = PreparedDataset(data_dir)
  table = ds.sequences(["user_id", "items"]).to_pydict()
  cut = -1 if split == "test" else -2
  users = np.asarray(table["user_id"])
  targets = np.asarray([seq[cut] for seq in table["items"]])
  histories = [seq[:cut] for seq in table["items"]]
  train_users, train_items, _, vocab = train_interactions(data_dir)
  popularity = np.bincount(train_items, minlength=vocab).astype(np.float32)
  out = {}
  for name, score_fn in (("wals", lambda rows: model.user_factors[users[rows]] @ model.item_factors.T),
                         ("popularity", lambda rows: np.broadcast_to(popularity, (len(rows), vocab)).copy())):
    hits, ndcg = 0.0, 0.0
    for start in range(0, len(users), chunk):
      rows = np.arange(start, min(start + chunk, len(users)))
      s = score_fn(rows)
      s[:, :2] = -np.inf  # PAD, MASK
      for j, r in enumerate(rows):
        s[j, histories[r]] = -np.inf
      target_score = s[np.arange(len(rows)), targets[rows]]
      rank = (s >= target_score[:, None]).sum(1) - 1  # pessimistic ties, as recjax.evaluation
      hits += float((rank < k).sum())
      ndcg += float(np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0).sum())
    out[name] = {f"hr@{k}": hits / len(users), f"ndcg@{k}": ndcg / len(users), "count": len(users)}
  return out


def fit(data_dir, name: str = "wals", *, config: wals_lib.WALSConfig = wals_lib.WALSConfig(),
        checkpoint_every: int = 5, stop_after_steps: int | None = None, evaluate_splits=("validation", "test"),
        gin_file: str | None = None, log: Callable[[str], None] | None = _stderr) -> dict:
  """Fits WALS to the training pairs and writes artifact `name`; checkpoints every
  `checkpoint_every` sweeps (0 = never), resumes from them after an interruption;
  `stop_after_steps` stops (raising FitInterrupted) once that many sweeps are done.
  Returns the summary row (losses, evaluation, artifact path)."""
  from recjax.artifacts import checkpoints
  manifest.check_name(KIND, name)
  for field in ("dim", "sweeps", "cg_steps"):
    if getattr(config, field) < 1:
      raise ValueError(f"WALSConfig.{field} must be >= 1, got {getattr(config, field)}")
  for field in ("l2", "unobserved_weight", "alpha"):
    if getattr(config, field) < 0:
      raise ValueError(f"WALSConfig.{field} must be >= 0, got {getattr(config, field)}")
  start = time.time()
  users, items, num_users, vocab = train_interactions(data_dir)
  u, i, counts = (jnp.asarray(a) for a in wals_lib.merge_pairs(users, items, num_users=num_users, num_items=vocab))
  settings = {"wals": dataclasses.asdict(config), "checkpoint_every": checkpoint_every}
  with manifest.build(data_dir, KIND, name, fit=f"{__name__}.fit", config=settings, gin_file=gin_file) as b:
    ckpt = checkpoints.FitCheckpoints(b.checkpoint_dir)
    x, y = wals_lib.init_factors(config, num_users, vocab)
    done, losses = 0, []
    restored = ckpt.restore((x, y))
    if restored is not None:
      (x, y), extra, done = restored
      losses = extra["losses"]
      if log:
        log(f"wals: resuming at sweep {done}/{config.sweeps}")
    chunk = checkpoint_every or config.sweeps
    while done < config.sweeps:
      n = min(chunk - done % chunk, config.sweeps - done)
      x, y, part = wals_lib.run_sweeps(x, y, u, i, counts, cfg=config, sweeps=n, track_loss=True)
      done += n
      losses += [float(v) for v in np.asarray(part)]
      if log:
        log(f"wals sweep {done}/{config.sweeps}: loss {losses[-1]:.2f} ({time.time() - start:.0f}s)")
      if checkpoint_every and done % checkpoint_every == 0 and done < config.sweeps:
        ckpt.save(done, (x, y), {"losses": losses})
        if stop_after_steps is not None and done >= stop_after_steps:
          ckpt.close()
          raise checkpoints.FitInterrupted(done, b.checkpoint_dir)
    ckpt.close()
    model = wals_lib.WALSModel(np.asarray(x), np.asarray(y), losses, config)
    fit_s = time.time() - start
    np.savez(b.dir / FILE, item_factors=model.item_factors, user_factors=model.user_factors)
    (b.dir / "losses.json").write_text(json.dumps(losses) + "\n")
    row = {"interactions": int(len(users)), "users": num_users, "items": vocab - 2, "fit_s": round(fit_s, 2),
           "loss_first": losses[0], "loss_last": losses[-1]}
    for split in evaluate_splits:
      row[split] = evaluate(model, data_dir, split=split)
    b.manifest.update(metrics=row)
  return {**row, "config": dataclasses.asdict(config), "artifact": str(manifest.artifact_dir(data_dir, KIND, name))}


def load(data_dir, name: str = "wals") -> wals_lib.WALSModel:
  """The fitted WALSModel of artifact `name`; a missing or stale one is refused in one sentence."""
  path = manifest.require(data_dir, KIND, name)
  meta = manifest.read(path)
  with np.load(path / FILE) as f:
    item_factors, user_factors = f["item_factors"], f["user_factors"]
  losses = json.loads((path / "losses.json").read_text())
  return wals_lib.WALSModel(user_factors, item_factors, losses, wals_lib.WALSConfig(**meta["config"]["wals"]))


__all__ = ["fit", "load", "train_interactions", "evaluate"]
