"""The `preference_benchmark` artifact (Mender: "Preference Discerning with LLM-Enhanced Generative Retrieval").

  recjax fit --gin_file=fits/preference_benchmark.gin --dataset regen=DIR  # -> artifacts/preference_benchmark/ground_truth/
  bench = preference_benchmark.load(DIR, "ground_truth")

A recommender conditioned on natural-language user preferences is evaluated on five axes,
all built here from a prepared REGEN-format dataset whose `preferences` field lists, per
purchase step, the statements true for the user at that step:

  * recommendation ("valid_/test_recommendation"): the leave-one-out target with the user's
    statement that best matches it (cosine of sentence embeddings), taken from the step
    before the target so no information leaks from the target itself;
  * fine / coarse steering ("test_fine_steering", "test_coarse_steering"): the target is
    swapped for the item most similar / most distant to it and the preference for the
    pool statement best matching the new target; the history comes from another user with
    the same original target when there is one, so the history alone cannot explain it;
  * sentiment following ("test_sentiment_positive" / "_negative", row-aligned): a poorly
    rated item with the "Avoid ..." statement closest to it (sign -1: must not be
    recommended) and its inversion "Prefers ..." (sign +1: should be recommended);
    m@k = fraction of rows hit with the positive AND missed with the negative preference;
  * history consolidation ("test_consolidation"): the recommendation cases with several of
    the user's statements, only one of them matching the target.

"train" pairs every training step with its best-matching positive statement; the
"train_*" splits are the same constructions on the validation targets (steering) or the
hashed train part (sentiment) for training mixtures. No (preference, target) pair of a
test* split (all of them by default, see `held_out_splits`) appears in a train* split: such
train rows are dropped and counted.

Arrays of every split: user int32 [N], history int32 [N, max_items] (oldest first, right-
padded with 0), preferences int32 [N, num_preferences] (ids into `Benchmark.preferences`,
-1 = empty slot, real ids first), target int32 [N], sign float32 [N].

Item embeddings come from the `text_embeddings` artifact, statement embeddings from the
encoder that built it. On disk: benchmark.npz (arrays + a JSON "meta" entry) and the manifest.
The preference *approximation* step (an LLM summarising reviews into statements) and the
metrics are `recjax.evaluation.preferences`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
from typing import Any, Sequence

import numpy as np

from recjax.artifacts import manifest
from recjax.artifacts import text_embeddings
from recjax.data.prepared import PreparedDataset

NUM_RESERVED = 2  # item ids 0 (PAD) and 1 (MASK)
FORMAT_VERSION = 1
KIND = "preference_benchmark"
FILE = "benchmark.npz"

TEST_SPLITS = ("test_recommendation", "test_fine_steering", "test_coarse_steering", "test_sentiment_positive",
               "test_sentiment_negative", "test_consolidation")
TRAIN_SPLITS = ("train", "train_fine_steering", "train_coarse_steering", "train_sentiment")
SPLITS = TRAIN_SPLITS + ("valid_recommendation",) + TEST_SPLITS
ARRAY_KEYS = ("user", "history", "preferences", "target", "sign")

_NEGATIVE = re.compile(r"^\s*(avoid|exclude|no)\b\s*", re.IGNORECASE)
_CHUNK = 1024  # rows per vectorised similarity block: bounds memory on large catalogues


def is_negative(statement: str) -> bool:
  """Whether a statement says what to avoid ("Avoid ...", "Exclude ...", "No ...")."""
  return bool(_NEGATIVE.match(statement))


def invert(statement: str) -> str:
  """"Avoid green" -> "Prefers green": the positive counterpart of a negative statement."""
  m = _NEGATIVE.match(statement)
  if not m:
    raise ValueError(f"{statement!r} is not a negative statement (Avoid/Exclude/No ...)")
  return "Prefers " + statement[m.end():].strip()


# --- the benchmark --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Benchmark:
  preferences: list[str]  # distinct statements, sorted; id = index
  pref_embeddings: np.ndarray  # float32 [P, D], L2-normalised
  item_embeddings: np.ndarray  # float32 [vocab_size, D], L2-normalised (rows 0/1 zero)
  splits: dict[str, dict[str, np.ndarray]]
  stats: dict = dataclasses.field(default_factory=dict)

  @property
  def negative(self) -> np.ndarray:
    """bool [P]: which statements are "Avoid/Exclude/No ..."."""
    return np.array([is_negative(p) for p in self.preferences], bool)


@dataclasses.dataclass
class _User:
  user_id: int
  items: np.ndarray  # int32 [n]
  ratings: np.ndarray  # float32 [n], NaN = unrated
  steps: list[list[int]]  # statement ids true at each step


class _Rows:
  """Accumulates split rows, then turns them into the aligned arrays."""

  def __init__(self, max_items: int, num_preferences: int):
    self.max_items, self.num_preferences = max_items, num_preferences
    self.user, self.history, self.prefs, self.target, self.sign = [], [], [], [], []

  def add(self, user: int, before: np.ndarray, prefs: Sequence[int], target: int, sign: float = 1.0):
    h = np.zeros(self.max_items, np.int32)
    recent = before[-self.max_items:]
    h[:len(recent)] = recent
    p = np.full(self.num_preferences, -1, np.int32)
    real = [int(x) for x in prefs if x >= 0][:self.num_preferences]
    p[:len(real)] = real
    self.user.append(user)
    self.history.append(h)
    self.prefs.append(p)
    self.target.append(target)
    self.sign.append(sign)

  def arrays(self) -> dict[str, np.ndarray]:
    n = len(self.user)
    return {"user": np.asarray(self.user, np.int32).reshape(n),
            "history": np.asarray(self.history, np.int32).reshape(n, self.max_items),
            "preferences": np.asarray(self.prefs, np.int32).reshape(n, self.num_preferences),
            "target": np.asarray(self.target, np.int32).reshape(n),
            "sign": np.asarray(self.sign, np.float32).reshape(n)}


def _normalise(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  norm = np.linalg.norm(x, axis=-1, keepdims=True)
  return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _read_users(data_dir) -> tuple[list[_User], list[str]]:
  """Users with statement ids per step, and the statement pool (sorted) they index."""
  ds = PreparedDataset(data_dir)
  for field in ("items", "ratings", "preferences"):
    if not ds.has_field(field):
      raise ValueError(f"{data_dir}: the prepared dataset has no {field!r} field (needed for the preference "
                       "benchmark; prepare a REGEN-format dataset with ground-truth preferences)")
  rows = ds.sequences(["user_id", "items", "ratings", "preferences"]).to_pylist()
  if not rows:
    raise ValueError(f"{data_dir}: the prepared dataset has no users")
  pool = sorted({s for r in rows for step in r["preferences"] or [] for s in step or []})
  if not pool:
    raise ValueError(f"{data_dir}: the 'preferences' field holds no statements")
  index = {s: i for i, s in enumerate(pool)}
  users = []
  for r in rows:
    steps = r["preferences"] or []
    if len(steps) != len(r["items"]):
      raise ValueError(f"{data_dir}: user {r['user_id']} has {len(steps)} 'preferences' steps for "
                       f"{len(r['items'])} items")
    ratings = np.array([np.nan if x is None else x for x in (r["ratings"] or [None] * len(r["items"]))], np.float32)
    users.append(_User(int(r["user_id"]), np.asarray(r["items"], np.int32), ratings,
                       [sorted({index[s] for s in step or []}) for step in steps]))
  return users, pool


def _best_match(cands: list[list[int]], items: np.ndarray, pref_emb: np.ndarray, item_emb: np.ndarray) -> np.ndarray:
  """int [N]: the candidate statement (per row) with the highest cosine to items[n]; -1 without candidates."""
  n = len(cands)
  out = np.full(n, -1, np.int64)
  width = max((len(c) for c in cands), default=0)
  if n == 0 or width == 0:
    return out
  padded = np.full((n, width), -1, np.int64)
  for i, c in enumerate(cands):
    padded[i, :len(c)] = c
  for start in range(0, n, _CHUNK):
    ids = padded[start:start + _CHUNK]
    sims = np.einsum("ncd,nd->nc", pref_emb[np.maximum(ids, 0)], item_emb[items[start:start + _CHUNK]])
    sims = np.where(ids >= 0, sims, -np.inf)
    best = ids[np.arange(len(ids)), sims.argmax(1)]
    out[start:start + _CHUNK] = np.where(np.isfinite(sims.max(1)), best, -1)
  return out


def _steered_items(targets: np.ndarray, exclude: list[np.ndarray], item_emb: np.ndarray, farthest: bool) -> np.ndarray:
  """int [N]: the real item most similar (or least similar when `farthest`) to targets[n], other than the
  target and exclude[n]; -1 when no item is left."""
  n, vocab = len(targets), len(item_emb)
  out = np.full(n, -1, np.int64)
  for start in range(0, n, _CHUNK):
    t = targets[start:start + _CHUNK]
    sims = item_emb[t] @ item_emb.T
    banned = np.zeros_like(sims, bool)
    banned[:, :NUM_RESERVED] = True
    banned[np.arange(len(t)), t] = True
    for row, ex in enumerate(exclude[start:start + _CHUNK]):
      banned[row, ex[(ex >= 0) & (ex < vocab)]] = True
    if farthest:
      sims = np.where(banned, np.inf, sims)
      pick, ok = sims.argmin(1), np.isfinite(sims.min(1))
    else:
      sims = np.where(banned, -np.inf, sims)
      pick, ok = sims.argmax(1), np.isfinite(sims.max(1))
    out[start:start + _CHUNK] = np.where(ok, pick, -1)
  return out


def _pool_match(items: np.ndarray, pool_ids: np.ndarray, pref_emb: np.ndarray, item_emb: np.ndarray) -> np.ndarray:
  """int [N]: the statement among pool_ids with the highest cosine to each item."""
  out = np.full(len(items), -1, np.int64)
  if len(pool_ids) == 0:
    return out
  for start in range(0, len(items), _CHUNK):
    sims = item_emb[items[start:start + _CHUNK]] @ pref_emb[pool_ids].T
    out[start:start + _CHUNK] = pool_ids[sims.argmax(1)]
  return out


def _in_test(seed: int, statement: str, item: int, test_fraction: float) -> bool:
  """Deterministic coin for a (statement, item) pair: stable across runs and row orders (unlike hash())."""
  digest = hashlib.blake2b(f"{seed}\0{statement}\0{item}".encode(), digest_size=8).digest()
  return int.from_bytes(digest, "big") / 2.0**64 < test_fraction


def build_benchmark(data_dir, *, embeddings: str = "minilm", encoder=None, item_embeddings: np.ndarray | None = None,
                    max_items: int = 20, num_preferences: int = 5, seed: int = 0,
                    test_fraction: float = 0.2, held_out_splits: Sequence[str] = TEST_SPLITS) -> Benchmark:
  """Builds every split from the dataset's ground-truth `preferences` (see the module docstring).

  embeddings: the `text_embeddings` artifact holding the item embeddings; its encoder embeds the statements.
  encoder, item_embeddings: given both, used instead of the artifact (a loaded TextEncoder and its
  [vocab_size, D] embedding of the item texts).
  held_out_splits: the test splits whose (preference, target) pairs are removed from every train split. With
  a small statement vocabulary most pairs recur across users, so holding out the recommendation splits
  removes most of "train"; stats["dropped"] reports the cost.
  """
  unknown = sorted(set(held_out_splits) - set(TEST_SPLITS))
  if unknown:
    raise ValueError(f"held_out_splits {unknown} are not test splits; choose from {list(TEST_SPLITS)}")
  if max_items < 1 or num_preferences < 1:
    raise ValueError(f"max_items ({max_items}) and num_preferences ({num_preferences}) must be >= 1")
  if not 0.0 <= test_fraction <= 1.0:
    raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
  users, pool = _read_users(data_dir)
  inverted = sorted({invert(s) for s in pool if is_negative(s)} - set(pool))
  preferences = sorted(set(pool) | set(inverted))
  index = {s: i for i, s in enumerate(preferences)}
  # Re-map the pool's ids onto the full table (the inverted strings interleave in sort order).
  pool_ids = np.array([index[s] for s in pool], np.int64)
  for u in users:
    u.steps = [[int(pool_ids[i]) for i in step] for step in u.steps]
  negative = np.array([is_negative(s) for s in preferences], bool)
  pool_pos, pool_neg = pool_ids[~negative[pool_ids]], pool_ids[negative[pool_ids]]

  if encoder is None or item_embeddings is None:
    item_emb, meta = text_embeddings.load(data_dir, embeddings)
    enc = text_embeddings.load_encoder(meta)
  else:
    item_emb, enc = np.array(item_embeddings, np.float32), encoder
  item_emb = _normalise(item_emb)
  item_emb[:NUM_RESERVED] = 0.0
  pref_emb = _normalise(enc.embed_sentences(preferences))

  def positives(step: list[int]) -> list[int]:
    return [p for p in step if not negative[p]]

  splits: dict[str, dict[str, np.ndarray]] = {}
  stats: dict[str, Any] = {"num_users": len(users), "vocab_size": len(item_emb), "num_preferences": len(preferences),
                           "num_pool_preferences": len(pool), "num_inverted_added": len(inverted),
                           "num_negative_preferences": int(negative.sum())}
  eligible = [u for u in users if len(u.items) >= 3]  # leave-one-out needs train, valid and test items
  stats["skipped_users"] = len(users) - len(eligible)

  # Next-item rows: (user, position of the target); the preference comes from the step before.
  def next_item_rows(cases: list[tuple[_User, int]], name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    targets = np.array([u.items[j] for u, j in cases], np.int64)
    matched = _best_match([positives(u.steps[j - 1]) for u, j in cases], targets, pref_emb, item_emb)
    rows = _Rows(max_items, num_preferences)
    for (u, j), p in zip(cases, matched):
      rows.add(u.user_id, u.items[:j], [p], int(u.items[j]))
    stats.setdefault("rows_without_preference", {})[name] = int((matched < 0).sum())
    return rows.arrays(), matched

  train_cases = [(u, j) for u in eligible for j in range(1, len(u.items) - 2)]
  splits["train"], _ = next_item_rows(train_cases, "train")
  valid_cases = [(u, len(u.items) - 2) for u in eligible]
  splits["valid_recommendation"], _ = next_item_rows(valid_cases, "valid_recommendation")
  test_cases = [(u, len(u.items) - 1) for u in eligible]
  splits["test_recommendation"], test_matched = next_item_rows(test_cases, "test_recommendation")

  # Steering: swap the target for its nearest / farthest item and a pool statement matching that item;
  # the history comes from another user with the same original target, so it cannot explain the new one.
  same_target: dict[str, float] = {}

  def steering(cases: list[tuple[_User, int]], farthest: bool, salt: int, name: str) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, salt])
    by_target: dict[int, list[int]] = {}
    for k, (u, j) in enumerate(cases):
      by_target.setdefault(int(u.items[j]), []).append(k)
    donors, found = [], 0
    for k, (u, j) in enumerate(cases):
      others = [o for o in by_target[int(u.items[j])] if o != k]
      donors.append(others[rng.integers(len(others))] if others else k)
      found += bool(others)
    same_target[name] = round(found / max(len(cases), 1), 4)
    targets = np.array([u.items[j] for u, j in cases], np.int64)
    # The ranking never returns history items: neither the user's nor the donor's history may hold the new target.
    exclude = [np.concatenate([u.items[:j], cases[d][0].items[:cases[d][1]]]) for (u, j), d in zip(cases, donors)]
    steered = _steered_items(targets, exclude, item_emb, farthest)
    keep = np.flatnonzero(steered >= 0)
    prefs = _pool_match(steered[keep], pool_pos, pref_emb, item_emb)
    rows = _Rows(max_items, num_preferences)
    for k, p in zip(keep, prefs):
      du, dj = cases[donors[k]]
      rows.add(du.user_id, du.items[:dj], [p], int(steered[k]))
    return rows.arrays()

  for name, cases, farthest, salt in (("test_fine_steering", test_cases, False, 1),
                                      ("test_coarse_steering", test_cases, True, 2),
                                      ("train_fine_steering", valid_cases, False, 3),
                                      ("train_coarse_steering", valid_cases, True, 4)):
    splits[name] = steering(cases, farthest, salt, name)
  stats["steering_same_target_fraction"] = same_target

  # Sentiment following: every poorly rated item after the first position, with the closest negative statement
  # of the pool and its inversion; (statement, item) pairs are hashed into test or train.
  senti = [(u, j) for u in users for j in range(1, len(u.items)) if u.ratings[j] <= 2]
  neg = _pool_match(np.array([u.items[j] for u, j in senti], np.int64), pool_neg, pref_emb, item_emb)
  test_pos, test_neg, train_senti = (_Rows(max_items, num_preferences) for _ in range(3))
  for (u, j), n in zip(senti, neg):
    if n < 0:
      continue
    p, item = index[invert(preferences[n])], int(u.items[j])
    if _in_test(seed, preferences[n], item, test_fraction):
      test_pos.add(u.user_id, u.items[:j], [p], item, 1.0)
      test_neg.add(u.user_id, u.items[:j], [n], item, -1.0)
    else:  # interleaved so any contiguous batch sees both versions
      train_senti.add(u.user_id, u.items[:j], [p], item, 1.0)
      train_senti.add(u.user_id, u.items[:j], [n], item, -1.0)
  splits["test_sentiment_positive"], splits["test_sentiment_negative"] = test_pos.arrays(), test_neg.arrays()
  splits["train_sentiment"] = train_senti.arrays()
  stats["sentiment_cases"] = int((neg >= 0).sum())

  # History consolidation: the matched statement hidden among other statements of the user at that step.
  rng = np.random.default_rng([seed, 5])
  rows = _Rows(max_items, num_preferences)
  for (u, j), m in zip(test_cases, test_matched):
    others = [p for p in u.steps[j - 1] if p != m]
    chosen = ([int(m)] if m >= 0 else []) + [others[i] for i in rng.permutation(len(others))]
    chosen = chosen[:num_preferences]
    rows.add(u.user_id, u.items[:j], [chosen[i] for i in rng.permutation(len(chosen))], int(u.items[j]))
  splits["test_consolidation"] = rows.arrays()

  # No held-out (preference, target) pair may be trained on; every id of a multi-statement row counts.
  vocab = np.int64(len(item_emb))

  def pair_keys(split: dict[str, np.ndarray]) -> np.ndarray:
    return split["preferences"].astype(np.int64) * vocab + split["target"].astype(np.int64)[:, None]

  test_pairs = np.unique(np.concatenate([np.zeros(0, np.int64)] + [
      pair_keys(splits[s])[splits[s]["preferences"] >= 0] for s in held_out_splits]))
  dropped = {}
  for name in TRAIN_SPLITS:
    split = splits[name]
    clash = (np.isin(pair_keys(split), test_pairs) & (split["preferences"] >= 0)).any(axis=1)
    dropped[name] = int(clash.sum())
    splits[name] = {k: v[~clash] for k, v in split.items()}
  stats["held_out_splits"] = list(held_out_splits)
  stats["dropped"] = dropped
  stats["dropped_total"] = sum(dropped.values())
  stats["splits"] = {name: int(len(splits[name]["target"])) for name in SPLITS}
  stats["config"] = {"encoder": getattr(enc, "name", str(encoder)), "max_items": max_items,
                     "num_preferences": num_preferences, "seed": seed, "test_fraction": test_fraction}
  splits = {name: splits[name] for name in SPLITS}
  return Benchmark(preferences, pref_emb.astype(np.float32), item_emb.astype(np.float32), splits, stats)


# --- the artifact ---------------------------------------------------------------------------------------------------


def _write(bench: Benchmark, path: pathlib.Path) -> None:
  meta = {"format_version": FORMAT_VERSION, "preferences": list(bench.preferences), "stats": bench.stats,
          "splits": list(bench.splits)}
  arrays = {"meta": np.array(json.dumps(meta, ensure_ascii=False)), "pref_embeddings": bench.pref_embeddings,
            "item_embeddings": bench.item_embeddings}
  for split, cols in bench.splits.items():
    for key, value in cols.items():
      arrays[f"{split}/{key}"] = value
  np.savez(path, **arrays)


def save(bench: Benchmark, data_dir, name: str = "ground_truth", *, config: dict | None = None,
         gin_file: str | None = None, fit: str | None = None) -> pathlib.Path:
  """Writes `bench` as artifact preference_benchmark/name of data_dir; returns its directory."""
  with manifest.build(data_dir, KIND, name, fit=fit or f"{__name__}.save", config=config, gin_file=gin_file) as b:
    _write(bench, b.dir / FILE)
    b.manifest.update(stats=bench.stats, num_preferences=len(bench.preferences))
  return manifest.artifact_dir(data_dir, KIND, name)


def fit(data_dir, name: str = "ground_truth", *, embeddings: str = "minilm", held_out_splits=TEST_SPLITS,
        max_items: int = 20, num_preferences: int = 5, seed: int = 0, test_fraction: float = 0.2,
        gin_file: str | None = None) -> dict:
  """Builds the benchmark from the dataset's ground-truth preferences and writes artifact `name`.
  held_out_splits: 'all' or test split names (see `build_benchmark`)."""
  manifest.check_name(KIND, name)
  held_out = TEST_SPLITS if held_out_splits in ("all", None) else tuple(held_out_splits)
  config = {"embeddings": embeddings, "held_out_splits": list(held_out), "max_items": max_items,
            "num_preferences": num_preferences, "seed": seed, "test_fraction": test_fraction}
  bench = build_benchmark(data_dir, embeddings=embeddings, held_out_splits=held_out, max_items=max_items,
                          num_preferences=num_preferences, seed=seed, test_fraction=test_fraction)
  path = save(bench, data_dir, name, config=config, gin_file=gin_file, fit=f"{__name__}.fit")
  return {"artifact": str(path), "splits": bench.stats["splits"], "dropped": bench.stats["dropped"],
          "preferences": len(bench.preferences)}


def path_of(data_dir, name: str = "ground_truth") -> pathlib.Path:
  """The benchmark file of a complete, current artifact (missing / stale: one sentence)."""
  return manifest.require(data_dir, KIND, name) / FILE


def load(data_dir, name: str = "ground_truth") -> Benchmark:
  path = path_of(data_dir, name)
  with np.load(path) as f:
    meta = json.loads(str(f["meta"]))
    if meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    splits = {s: {k: f[f"{s}/{k}"] for k in ARRAY_KEYS} for s in meta["splits"]}
    return Benchmark(meta["preferences"], f["pref_embeddings"], f["item_embeddings"], splits, meta["stats"])
