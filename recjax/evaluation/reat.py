"""The `reat` evaluator: text-to-text recommendation (ReAT, recjax/models/reat.py).

Each task of the evaluated task / mixture is evaluated by its family (the name's
`_reat_<family>` suffix); families without a metric here (MIM, MLM, BPR) are skipped:
  retrieval / ranking: beam search (`num_beams`) over the text decoder; each beam's text is
    parsed back to an item through the catalogue's short ids ("I123"). A beam naming no
    item (or, for ranking, no item of the row's candidates) is counted invalid and
    skipped, as is a repeat of an item already ranked; the rank of the target is its
    position among the remaining beams. HR@k (= Recall@k, one target) and NDCG@k.
  rating: AUC-ROC of log p("yes") - log p("no") (each answer teacher-forced with its EOS).
A popularity baseline scores the same rows by training-split counts: retrieval ranks the
whole catalogue, ranking the row's candidates (ties: lower item id first); rating's AUC
scores the rated item's count.

Evaluates a checkpoint in one process; `max_rows` evaluates the first rows of each split
(in order) only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from recjax.evaluation import evaluate as eval_lib
from recjax.evaluation import scorer as scorer_lib

FAMILIES = ("retrieval", "ranking", "rating")
MISS = 1 << 30  # the rank of a target no beam names: past every cutoff


def family(task_name: str) -> str:
  return task_name.rsplit("_reat_", 1)[-1]


# -- parsing and metrics ----------------------------------------------------------------


def item_index(short_ids) -> dict[str, int]:
  """Short id ("I123") -> item id, from the catalogue's table (reserved rows are "")."""
  return {str(s): i for i, s in enumerate(short_ids) if s}


def parse_item(text: str, index: dict[str, int]) -> int:
  """The item a generated text names (0 = none: empty, not an id, or no such item)."""
  return index.get(text.strip(), 0)


def beam_ranks(texts, targets, index, candidates=None) -> tuple[np.ndarray, dict]:
  """0-based rank of each row's target among its beams' items (MISS if none names it).

  texts: per row, the beams' texts best first. Beams naming no item (or, with
  `candidates` [N, C], no candidate of the row) are invalid, and repeats of an item
  already ranked are duplicates: both are skipped, so later beams move up.
  """
  ranks = np.zeros(len(texts), np.int64)
  invalid = duplicates = total = top_invalid = 0
  for r, (beams, target) in enumerate(zip(texts, targets)):
    allowed = None if candidates is None else set(int(c) for c in candidates[r] if c > 0)
    seen: list[int] = []
    ranks[r] = MISS
    for b, text in enumerate(beams):
      total += 1
      item = parse_item(text, index)
      if not item or (allowed is not None and item not in allowed):
        invalid += 1
        top_invalid += b == 0
        continue
      if item in seen:
        duplicates += 1
        continue
      if item == target and ranks[r] == MISS:
        ranks[r] = len(seen)
      seen.append(item)
  counts = {"invalid_fraction": invalid / max(total, 1), "duplicate_fraction": duplicates / max(total, 1),
            "top1_invalid_fraction": top_invalid / max(len(texts), 1)}
  return ranks, counts


def hit_metrics(ranks: np.ndarray, ks=(1, 5, 10, 20), ndcg_ks=(5, 10, 20)) -> dict:
  ranks = np.asarray(ranks)
  out = {f"hr@{k}": float(np.mean(ranks < k)) for k in ks}
  out.update({f"ndcg@{k}": float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0))) for k in ndcg_ks})
  out["count"] = int(len(ranks))
  return out


def auc_roc(scores, labels) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties count
  half (Mann-Whitney U with average ranks). NaN without both classes."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  pos, neg = int(labels.sum()), int((~labels).sum())
  if not pos or not neg:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average 1-based rank over each run of equal scores.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
  ends = np.r_[starts[1:], len(scores)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + 1 + e) / 2.0
  return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def decode_ids(vocabulary, ids) -> str:
  ids = [int(t) for t in ids]
  ids = ids[:ids.index(1)] if 1 in ids else ids  # up to EOS
  return vocabulary.decode([t for t in ids if t > 1]).strip()


def popularity_ranks(counts: np.ndarray, targets, candidates=None) -> np.ndarray:
  """0-based rank of each target by training count (more first, ties: lower id first),
  among all items (reserved rows have count 0 and id < every item) or, with
  `candidates` [N, C], among the row's candidates."""
  counts = np.asarray(counts, np.int64)
  targets = np.asarray(targets, np.int64)
  if candidates is None:
    ahead = lambda t: np.sum(counts > counts[t]) + np.sum((counts == counts[t]) & (np.arange(len(counts)) < t))
    return np.array([ahead(t) for t in targets], np.int64)
  ranks = np.zeros(len(targets), np.int64)
  for r, (t, cands) in enumerate(zip(targets, np.asarray(candidates, np.int64))):
    cands = cands[cands > 0]
    if t not in cands:
      ranks[r] = MISS
      continue
    ranks[r] = np.sum(counts[cands] > counts[t]) + np.sum((counts[cands] == counts[t]) & (cands < t))
  return ranks


# -- the evaluator ---------------------------------------------------------------------


def _jitted(source, name: str, build):
  return scorer_lib.jitted_for(source.trainer, (id(source.model), name), build)


def evaluate(*, source, mixture_or_task_name: str, task_feature_lengths, splits, batch_size: int, ks,
             num_beams: int = 20, max_rows: int | None = None, popularity_baseline: bool = True,
             **_) -> tuple[dict, str]:
  """{"split/task/model": metrics, "split/task/popularity": ...} for every retrieval,
  ranking and rating task of `mixture_or_task_name`, and the protocol line."""
  import seqio
  import recjax.tasks as tasks
  from recjax.data import preprocessors as P
  if source.export_dir:
    raise ValueError("the reat evaluator evaluates checkpoints (an export holds no text decoder)")
  if jax.process_count() > 1:
    raise NotImplementedError("the reat evaluator parses beams on the host: run it in one process")
  if num_beams < 1:
    raise ValueError(f"evaluators.reat.num_beams is {num_beams}; it must be >= 1")
  hit_ks = tuple(k for k in ks if k <= num_beams)
  if not hit_ks:
    raise ValueError(f"every cutoff in ks {tuple(ks)} exceeds evaluators.reat.num_beams = {num_beams}")
  ndcg_ks = tuple(k for k in hit_ks if k > 1)
  names = eval_lib.eval_task_names(mixture_or_task_name)
  evaluated = [t for t in names if family(t) in FAMILIES]
  if not evaluated:
    raise ValueError(f"{mixture_or_task_name!r} has no ReAT {'/'.join(FAMILIES)} task to evaluate "
                     f"(its tasks: {names}); evaluate a mixture that has them, e.g. MIXTURE_OR_TASK_NAME = "
                     "'DATASET_ut'")
  data_dir = tasks.data_dir_of(evaluated[0])
  if data_dir is None:
    raise ValueError(f"{evaluated[0]!r} was not registered from a prepared dataset: no catalogue of short ids")
  catalog = P.catalog(data_dir)
  index = item_index(catalog.short_ids)
  vocabulary = seqio.get_mixture_or_task(evaluated[0]).output_features["targets"].vocabulary
  # The longest short id's tokens + EOS: beams need no more steps than the longest answer.
  max_new = max(len(vocabulary.encode(str(s))) for s in catalog.short_ids if s) + 1
  model, trainer, params = source.model, source.trainer, source.params

  def build_beams():
    return jax.jit(lambda params, batch: model.predict_batch(trainer.network(params), batch, num_beams=num_beams,
                                                             max_new_tokens=max_new))

  def build_gap():
    return jax.jit(lambda params, batch, answers: model.answer_gap(trainer.network(params), batch, answers))

  beams_fn = _jitted(source, f"reat_beams_{num_beams}_{max_new}", build_beams)
  gap_fn = _jitted(source, "reat_gap", build_gap)
  yes, no = vocabulary.encode(P.LIKE) + [1], vocabulary.encode(P.DISLIKE) + [1]
  answers = np.zeros((2, max(len(yes), len(no))), np.int32)
  answers[0, :len(yes)], answers[1, :len(no)] = yes, no
  converter = model.eval_feature_converter()

  results = {}
  for split in splits:
    for task in evaluated:
      fam = family(task)
      targets, candidates, out = [], [], []
      for batch in eval_lib.eval_batches(task, split, converter, task_feature_lengths, batch_size, max_rows):
        valid = batch["valid"]
        features = {"encoder_input_tokens": source.put(batch["encoder_input_tokens"])}
        if fam == "rating":
          got = gap_fn(params, features, answers)
          # A row's label: its target is the "yes" answer (+ EOS, then padding).
          width = answers.shape[1]
          label = np.all(batch["decoder_target_tokens"][:, :width] == answers[0], axis=1)
          out.append((got, valid))
          targets.append(label[valid])
          candidates.append(batch["target_item"][valid])  # the rated item, for popularity
        else:
          out.append((beams_fn(params, features)[0], valid))
          targets.append(batch["target_item"][valid])
          candidates.append(batch["candidates"][valid])
      got = [g[v] for g, v in zip(jax.device_get([g for g, _ in out]), [v for _, v in out])]
      targets = np.concatenate(targets) if targets else np.zeros(0, np.int64)
      key = f"{split}/{task}"
      if fam == "rating":
        scores = np.concatenate(got) if got else np.zeros(0, np.float32)
        results[f"{key}/model"] = {"auc": auc_roc(scores, targets), "positive_fraction": float(np.mean(targets)),
                                   "accuracy": float(np.mean((scores > 0) == targets)), "count": int(len(scores))}
        if popularity_baseline:
          items = np.concatenate(candidates)
          results[f"{key}/popularity"] = {"auc": auc_roc(catalog.train_count[items], targets),
                                          "count": int(len(items))}
      else:
        seqs = np.concatenate(got) if got else np.zeros((0, num_beams, max_new), np.int32)
        texts = [[decode_ids(vocabulary, b) for b in row] for row in seqs]
        cands = np.concatenate(candidates) if fam == "ranking" else None
        ranks, counts = beam_ranks(texts, targets, index, cands)
        results[f"{key}/model"] = {**hit_metrics(ranks, hit_ks, ndcg_ks), **counts}
        if popularity_baseline:
          results[f"{key}/popularity"] = hit_metrics(popularity_ranks(catalog.train_count, targets, cands),
                                                     hit_ks, ndcg_ks)
  limit = f"the first {max_rows} rows per split" if max_rows else "every row"
  protocol = (f"ReAT text-to-text, {limit}: retrieval / ranking HR@k and NDCG@k of the target among "
              f"{num_beams} beams parsed to items by short id (invalid and repeated beams skipped; ranking: "
              "only the row's candidates); rating: AUC-ROC of log p(yes) - log p(no); popularity: training "
              "counts")
  return results, protocol



def infer(source, mixture_or_task_name: str, task_feature_lengths, path, *, split: str, top_k: int,
          batch_size: int, max_rows: int | None = None) -> int:
  """Writes, per row of each retrieval / ranking task (its first `max_rows`, or all), the
  `top_k` beams' texts and the items they name (invalid and repeated beams skipped) as JSON
  lines; returns the rows."""
  import json
  import seqio
  import recjax.tasks as tasks
  from recjax.data import preprocessors as P
  names = [t for t in eval_lib.eval_task_names(mixture_or_task_name) if family(t) in ("retrieval", "ranking")]
  if not names:
    raise ValueError(f"{mixture_or_task_name!r} has no ReAT retrieval or ranking task to recommend from")
  catalog = P.catalog(tasks.data_dir_of(names[0]))
  index = item_index(catalog.short_ids)
  vocabulary = seqio.get_mixture_or_task(names[0]).output_features["targets"].vocabulary
  max_new = max(len(vocabulary.encode(str(s))) for s in catalog.short_ids if s) + 1
  model, trainer = source.model, source.trainer
  beams_fn = _jitted(source, f"reat_beams_{top_k}_{max_new}", lambda: jax.jit(
      lambda params, batch: model.predict_batch(trainer.network(params), batch, num_beams=top_k,
                                                max_new_tokens=max_new)))
  rows = 0
  with open(path, "w") as f:
    for task in names:
      for batch in eval_lib.eval_batches(task, split, model.eval_feature_converter(), task_feature_lengths,
                                         batch_size, max_rows):
        seqs, scores = jax.device_get(beams_fn(source.params, {"encoder_input_tokens": source.put(
            batch["encoder_input_tokens"])}))
        for r in np.flatnonzero(batch["valid"]):
          texts = [decode_ids(vocabulary, b) for b in seqs[r]]
          allowed = set(batch["candidates"][r][batch["candidates"][r] > 0]) if family(task) == "ranking" else None
          items = []
          for t in texts:
            item = parse_item(t, index)
            if item and item not in items and (allowed is None or item in allowed):
              items.append(item)
          f.write(json.dumps({"task": task, "target": int(batch["target_item"][r]), "items": items,
                              "beams": texts, "scores": [round(float(s), 6) for s in scores[r]]}) + "\n")
          rows += 1
  return rows
