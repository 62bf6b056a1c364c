"""Critiquing evaluation (FLARE section 4.6, Table 6): `recjax critique`.

1. In-sequence critiques: the same checkpoint ranks the test split of the dataset's
   `critique_precise`, `critique_broad` and `critique_none` tasks (the target's category
   path cut to 4 / 2 levels / no critique at the [MASK]): Recall@1/5/10, NDCG@10, MRR.
2. Out-of-sequence critiques: the target's precise critique is replaced by another valid
   category path that differs from it at level j (levels 1..j-1 kept, level j and below
   drawn from the catalogue's real paths, so the path stays valid), for j in {4, 3, 2};
   the new path must be the (4-level) path of at least `min_items` items (5: FLARE's
   footnote 2). Levels count from the catalogue's root category, as FLARE's do ("Office
   Products" is level 1): prepare sources that drop it with `--category_root`.
   Cat-nDCG@10: the relevance of a recommended item is the number of leading category
   levels (of the first 4) it shares with the critique path; DCG over the top 10 is
   normalised by the best achievable DCG over the whole catalogue (FLARE's definition).
   `cat_ndcg@10_candidates` normalises instead by the best DCG over the items the
   ranking may return (the catalogue minus the user's history), so a perfect ranking
   scores 1 there; it is never below `cat_ndcg@10`. Users whose target has no
   alternative path at level j are skipped and counted.

Full ranking, history excluded, as everywhere else in recjax.
"""

from __future__ import annotations

import collections
import json
import pathlib
from typing import Callable, Sequence

import gin
import jax.numpy as jnp
import numpy as np

from recjax.evaluation import evaluate as eval_lib
from recjax.evaluation import ranking
from recjax.train import mesh as mesh_lib

GRANULARITIES = ("precise", "broad", "none")
MAX_LEVELS = 4  # a precise critique keeps the first 4 category levels


def shared_levels(a: tuple, b: tuple) -> int:
  """How many leading levels two category paths share."""
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n


def mutate_path(path: tuple, level: int, paths: Sequence[tuple], rng: np.random.Generator) -> tuple | None:
  """A catalogue path equal to `path` on levels 1..level-1 and different at `level`
  (1-based), drawn uniformly from the distinct candidates; None when there is none."""
  if len(path) < level:
    return None
  keep = path[:level - 1]
  candidates = [p for p in paths if len(p) >= level and p[:level - 1] == keep and p[level - 1] != path[level - 1]]
  if not candidates:
    return None
  return candidates[rng.integers(len(candidates))]


def cat_dcg(relevances: np.ndarray, k: int = 10) -> float:
  rel = np.asarray(relevances, np.float64)[:k]
  return float(np.sum(rel / np.log2(np.arange(2, rel.size + 2))))


class CategoryIndex:
  """Category paths (first 4 levels) of every item id of a prepared dataset, and the
  precise-critique ids of paths."""

  def __init__(self, data_dir, critique_table: Sequence[str]):
    from recjax.data import sequence_preprocessors as sp
    from recjax.data.prepared import PreparedDataset
    ds = PreparedDataset(data_dir)
    table = ds.items(["item_id", "categories"]).to_pydict()
    self.vocab_size = ds.vocab_size
    self.paths: list[tuple] = [()] * ds.vocab_size
    for i, cats in zip(table["item_id"], table["categories"]):
      self.paths[i] = tuple((cats or [])[:MAX_LEVELS])
    self.items_per_path = collections.Counter(p for p in self.paths if p)
    self.distinct = sorted(self.items_per_path)
    index = {s: i for i, s in enumerate(critique_table)}
    self.critique_id = {p: index.get(sp.category_critique(list(p), MAX_LEVELS)) for p in self.distinct}
    self._counts: dict[tuple, np.ndarray] = {}

  def relevance(self, items: np.ndarray, path: tuple) -> np.ndarray:
    return np.array([shared_levels(self.paths[int(i)], path) for i in items], np.float64)

  def ideal_dcg(self, path: tuple, k: int = 10, exclude: Sequence[int] = ()) -> float:
    """The best DCG@k any ranking of the catalogue (minus the items in `exclude`) can
    reach for this critique path."""
    if path not in self._counts:  # catalogue items per relevance 0..MAX_LEVELS
      rel = self.relevance(np.arange(ranking.NUM_RESERVED, self.vocab_size), path).astype(np.int64)
      self._counts[path] = np.bincount(rel, minlength=MAX_LEVELS + 1)
    counts = self._counts[path].copy()
    gone = [int(i) for i in set(exclude) if ranking.NUM_RESERVED <= int(i) < self.vocab_size]
    counts -= np.bincount(self.relevance(gone, path).astype(np.int64), minlength=MAX_LEVELS + 1)
    best = np.repeat(np.arange(MAX_LEVELS, -1, -1), counts[::-1])[:k]
    return cat_dcg(best, k)


def out_of_sequence(scorer, batches, index: CategoryIndex, level: int, *, k: int = 10,
                    seed: int = 0, min_items: int = 5) -> dict[str, float]:
  """Cat-nDCG@k with the target's critique mutated at `level` (see the module docstring)."""
  rng = np.random.default_rng([seed, level])
  choices = [p for p in index.distinct if index.items_per_path[p] >= min_items]
  total, total_candidates, count, skipped = 0.0, 0.0, 0, 0
  for batch in batches:
    crit = np.array(batch["critiques"])
    rows, paths = [], []
    for r in np.flatnonzero(batch["valid"]):
      new = mutate_path(index.paths[int(batch["target"][r])], level, choices, rng)
      cid = index.critique_id.get(new) if new is not None else None
      if cid is None:
        skipped += 1
        continue
      crit[r, batch["mask_position"][r]] = cid
      rows.append(r)
      paths.append(new)
    if not rows:
      continue
    features = {key: jnp.asarray(batch[key]) for key in eval_lib._MODEL_FEATURES if key in batch}
    features["critiques"] = jnp.asarray(crit)
    query = scorer.queries_fn(scorer.params, features)
    _, ids = ranking.top_k(query, scorer.item_table, scorer.bias, k=k, exclude=features["inputs"],
                           vocab_size=scorer.vocab_size)
    ids = np.asarray(ids)
    history = np.asarray(batch["inputs"])
    for r, path in zip(rows, paths):
      dcg = cat_dcg(index.relevance(ids[r], path), k)
      ideal, ideal_candidates = index.ideal_dcg(path, k), index.ideal_dcg(path, k, exclude=history[r])
      total += dcg / ideal if ideal > 0 else 0.0
      total_candidates += dcg / ideal_candidates if ideal_candidates > 0 else 0.0
      count += 1
  n = max(count, 1)
  return {f"cat_ndcg@{k}": total / n, f"cat_ndcg@{k}_candidates": total_candidates / n, "count": count,
          "skipped": skipped}


def _dataset_prefix(task_name: str) -> str:
  for suffix in ("_critique_mix_precise", "_critique_mix", "_critique_precise", "_critique_broad", "_critique_none", "_items"):
    if task_name.endswith(suffix):
      return task_name[:-len(suffix)]
  raise ValueError(f"{task_name!r} is not a critique task of a prepared dataset "
                   "(expected a name ending in _critique_mix / _critique_precise / ...)")


@gin.configurable
def critique(*, model: Callable = gin.REQUIRED, mixture_or_task_name: str = gin.REQUIRED,
             task_feature_lengths: dict = gin.REQUIRED, model_dir: str = gin.REQUIRED,
             batch_size: int = 256, split: str = "test", levels: Sequence[int] = (4, 3, 2),
             ks: Sequence[int] = (1, 5, 10), seed: int = 0, min_items: int = 5, mesh_fn: Callable = mesh_lib.create_mesh,
             logical_axis_rules=mesh_lib.DEFAULT_RULES, verbose: bool = True, checkpoint: str = "latest") -> dict:
  """Runs both critiquing evaluations on the checkpoint in MODEL_DIR; writes
  MODEL_DIR/critique_step_N.json and prints the tables. `min_items`: the fewest items a
  mutated critique's category may have."""
  import seqio
  import recjax.tasks as tasks
  prefix = _dataset_prefix(mixture_or_task_name)
  scorer, step = eval_lib.checkpoint_scorer(model, mixture_or_task_name,
                                            eval_lib.checkpoint_dir(model_dir, checkpoint), mesh_fn(),
                                            logical_axis_rules)
  converter = model(vocab_size=scorer.vocab_size).eval_feature_converter()
  results = {}
  for g in GRANULARITIES:
    batches = eval_lib.eval_batches(f"{prefix}_critique_{g}", split, converter, task_feature_lengths, batch_size)
    results[g] = eval_lib.rank_split(scorer, batches, exclude_history=True, ks=ks)["model"]
  table = seqio.get_mixture_or_task(f"{prefix}_critique_precise").output_features["critiques"].vocabulary.table
  index = CategoryIndex(tasks.data_dir_of(f"{prefix}_critique_precise"), table)
  oos = {}
  for level in levels:
    batches = eval_lib.eval_batches(f"{prefix}_critique_precise", split, converter, task_feature_lengths,
                                    batch_size)
    oos[f"level_{level}"] = out_of_sequence(scorer, batches, index, level, seed=seed, min_items=min_items)
  payload = {"step": step, "task": mixture_or_task_name, "split": split,
             "protocol": ranking.ranking_protocol(scorer.vocab_size, True),
             "in_sequence": results, "out_of_sequence": oos, "min_items": min_items,
             # both tables as `recjax evaluate` names its rows, so `recjax sweep` aggregates them
             "results": {f"{split}/{name}": m for name, m in {**results, **oos}.items()},
             "source": "best checkpoint" if checkpoint == "best" else "checkpoint"}
  out = pathlib.Path(model_dir) / f"critique_step_{step}.json"
  out.write_text(json.dumps(payload, indent=2) + "\n")
  if verbose:
    columns = [f"recall@{k}" for k in ks] + ["ndcg@10", "mrr", "count"]
    print(ranking.format_metrics_table(results, [c for c in columns if c in results["none"]],
                                       payload["protocol"]))
    print("out-of-sequence critiques (target's critique changed at level j):")
    for name, m in oos.items():
      print(f"  {name}: Cat-nDCG@10 {m['cat_ndcg@10']:.4f} (ideal over the candidates, history left out: "
            f"{m['cat_ndcg@10_candidates']:.4f}) over {m['count']} users ({m['skipped']} without an alternative path of >= {min_items} items)")
  return payload


def explain_user(scorer, task_name: str, converter, task_feature_lengths, user: int, *,
                 critique: str | None = None, split: str = "test", top_k: int = 10) -> str:
  """Prints (and returns) one user's history and top-k items, with titles and category
  paths, without a critique and with one (FLARE Tables 10 and 11)."""
  import seqio
  import recjax.tasks as tasks
  from recjax.data.prepared import PreparedDataset
  task = seqio.get_mixture_or_task(task_name)
  if "critiques" not in task.output_features:
    raise ValueError(f"task {task_name!r} has no critiques; use a <dataset>_critique_* task or mixture")
  table = list(task.output_features["critiques"].vocabulary.table)
  # A mixture's examples repeat per sub-task; the precise task holds each user once.
  single = f"{_dataset_prefix(task_name)}_critique_precise"
  batch = None
  for b in eval_lib.eval_batches(single, split, converter, task_feature_lengths, 64):
    hit = np.flatnonzero(b["valid"] & (b["example_id"] == user))
    if hit.size:
      batch = {k: v[hit[:1]] for k, v in b.items()}
      break
  if batch is None:
    raise ValueError(f"user {user} is not in the {split} split of {single}")
  items = PreparedDataset(tasks.data_dir_of(single)).items(["item_id", "title", "categories"]).to_pydict()
  titles = dict(zip(items["item_id"], items["title"]))
  paths = dict(zip(items["item_id"], items["categories"]))
  describe = lambda i: f"{i:>6}  {(titles.get(i) or '')[:60]:<60}  {' > '.join((paths.get(i) or [])[:MAX_LEVELS])}"
  pos = int(batch["mask_position"][0])
  target = int(batch["target"][0])
  own = int(batch["critiques"][0, pos])
  if critique is None:
    cid = own
  elif critique in table:
    cid = table.index(critique)
  else:
    raise ValueError(f"critique {critique!r} is not in the task's critique table ({len(table) - 1} strings), "
                     f"e.g. {table[1]!r}")
  lines = [f"user {user} ({split} split): history, oldest first"]
  lines += ["  " + describe(int(i)) for i in batch["inputs"][0, :pos]]
  lines.append(f"held-out item:\n  {describe(target)}")
  for label, c in (("no critique", 0), (f"critique {table[cid]!r}", cid)):
    crit = np.array(batch["critiques"])
    crit[0, pos] = c
    features = {k: jnp.asarray(batch[k]) for k in eval_lib._MODEL_FEATURES if k in batch}
    features["critiques"] = jnp.asarray(crit)
    query = scorer.queries_fn(scorer.params, features)
    _, ids = ranking.top_k(query, scorer.item_table, scorer.bias, k=top_k, exclude=features["inputs"],
                           vocab_size=scorer.vocab_size)
    lines.append(f"top {top_k} with {label}:")
    lines += [("* " if int(i) == target else "  ") + describe(int(i)) for i in np.asarray(ids)[0]]
  text = "\n".join(lines)
  print(text)
  return text
