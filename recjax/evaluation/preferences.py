"""Preference discerning (Mender: "Preference Discerning with LLM-Enhanced Generative Retrieval"):
the preference *approximation* step and the benchmark's metrics.

The benchmark itself (five axes built from a REGEN-format dataset's ground-truth preferences) is
the `preference_benchmark` artifact, `recjax.artifacts.preference_benchmark` (built by
`recjax fit --gin_file=fits/preference_benchmark.gin`); its names are re-exported here.

The approximation step of the paper (an LLM summarising reviews into statements) is provided as
prompts + parsing (`build_prompt`, `generate_preferences`); the generator itself is pluggable
(`PreferenceGenerator`) and not run here. m@k for sentiment following: `sentiment_following`.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Iterable, Protocol

import numpy as np

from recjax.artifacts.preference_benchmark import (  # noqa: F401  (re-exported)
    ARRAY_KEYS, NUM_RESERVED, SPLITS, TEST_SPLITS, TRAIN_SPLITS, Benchmark, build_benchmark, invert,
    is_negative)
from recjax.data.prepared import PreparedDataset


# --- preference approximation (the LLM step) ---------------------------------------------------------------------


class PreferenceGenerator(Protocol):
  """Anything that maps prompts to raw LLM completions, one per prompt, in order."""

  def __call__(self, prompts: list[str]) -> list[str]:
    ...


def build_prompt(history: list[dict], max_preferences: int = 5) -> str:
  """The paper's preference-approximation prompt for one user.

  history: purchases oldest first, each {"title", "rating", "review"} (rating/review may be None).
  """
  if not history:
    raise ValueError("build_prompt needs at least one purchase in the history")
  if max_preferences < 1:
    raise ValueError(f"max_preferences must be >= 1, got {max_preferences}")
  lines = []
  for n, entry in enumerate(history, 1):
    missing = [k for k in ("title", "rating", "review") if k not in entry]
    if missing:
      raise ValueError(f"history entry {n} lacks {', '.join(missing)} (needs title, rating, review)")
    title = " ".join(str(entry["title"] or "untitled item").split())
    rating = "not rated" if entry["rating"] is None else f"rated {float(entry['rating']):g}/5"
    review = " ".join(str(entry["review"] or "").split()) or "(no review)"
    lines.append(f"{n}. {title} ({rating}). Review: {review}")
  return "\n".join([
      "Below is a user's purchase history, oldest first, with the rating and review they gave each item.",
      "",
      *lines,
      "",
      f"Summarise this user's preferences in at most {max_preferences} short statements, one per line.",
      "Rules:",
      "- Cover both what the user likes and what they want to avoid (look at low ratings and complaints).",
      "- Make every statement specific (type, color, material, brand, style, price) and grounded in the reviews.",
      "- Do not copy item names verbatim; describe the attributes instead.",
      "- Start statements to avoid with \"Avoid\".",
      "- Write only the statements: no numbering, no introduction, no explanation.",
  ])


_BULLET = re.compile(r"^\s*(?:[-*+\u2022\u00b7\u2013\u2014>]+\s*|\(?\d{1,3}\s*[.):\]]\s*|#+\s*)+")


def parse_preferences(text: str, max_preferences: int = 5) -> list[str]:
  """Statements from a raw completion: bullets/numbering/markdown stripped, empties and repeats dropped."""
  out, seen = [], set()
  for line in (text or "").splitlines():
    s = _BULLET.sub("", line).replace("**", "").strip().strip("\"'`").strip()
    if s and s.lower() not in seen:
      seen.add(s.lower())
      out.append(s)
    if len(out) >= max_preferences:
      break
  return out


def generate_preferences(data_dir, generator: PreferenceGenerator, *, max_preferences: int = 5,
                         batch_size: int = 32) -> list[dict]:
  """Runs `generator` on one prompt per user; history = items[:-1] (everything before the test target).

  Returns [{"user_id": int, "preferences": [str]}] in the dataset's user order.
  """
  ds = PreparedDataset(data_dir)
  cols = ["user_id", "items"] + [f for f in ("ratings", "reviews") if ds.has_field(f)]
  rows = ds.sequences(cols).to_pylist()
  if not rows:
    raise ValueError(f"{data_dir}: the prepared dataset has no users")
  titles = {r["item_id"]: r["title"] for r in ds.items(["item_id", "title"]).to_pylist()}
  prompts, users = [], []
  for r in rows:
    items = r["items"][:-1]
    if not items:
      continue
    ratings, reviews = r.get("ratings") or [None] * len(r["items"]), r.get("reviews") or [None] * len(r["items"])
    history = [{"title": titles.get(i), "rating": ratings[j], "review": reviews[j]} for j, i in enumerate(items)]
    prompts.append(build_prompt(history, max_preferences))
    users.append(int(r["user_id"]))
  out = []
  for start in range(0, len(prompts), batch_size):
    batch = prompts[start:start + batch_size]
    texts = list(generator(batch))
    if len(texts) != len(batch):
      raise ValueError(f"generator returned {len(texts)} outputs for {len(batch)} prompts")
    for uid, text in zip(users[start:start + batch_size], texts):
      out.append({"user_id": uid, "preferences": parse_preferences(text, max_preferences)})
  return out


def save_preferences_jsonl(rows: Iterable[dict], path) -> pathlib.Path:
  """One {"user_id": int, "preferences": [str]} per line; written atomically."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in rows:
      f.write(json.dumps({"user_id": int(r["user_id"]), "preferences": [str(p) for p in r["preferences"]]},
                         ensure_ascii=False) + "\n")
  os.replace(tmp, path)
  return path


def load_preferences_jsonl(path) -> dict[int, list[str]]:
  """{user_id: statements}; a malformed line raises ValueError naming the file and line."""
  out: dict[int, list[str]] = {}
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
      uid = row.get("user_id") if isinstance(row, dict) else None
      prefs = row.get("preferences") if isinstance(row, dict) else None
      if not isinstance(uid, int) or isinstance(uid, bool):
        raise ValueError(f"{path}:{n}: expected an integer user_id, got {uid!r:.60}")
      if not isinstance(prefs, list) or not all(isinstance(p, str) for p in prefs):
        raise ValueError(f"{path}:{n}: expected preferences as a list of strings, got {prefs!r:.60}")
      if uid in out:
        raise ValueError(f"{path}:{n}: user_id {uid} appears twice")
      out[uid] = prefs
  return out


# --- metrics --------------------------------------------------------------------------------------------------------


def hit_at_k(topk_items: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
  """bool [N]: whether targets[n] is among the first k of topk_items[n]."""
  topk_items, targets = np.asarray(topk_items), np.asarray(targets)
  if topk_items.ndim != 2 or targets.shape != topk_items.shape[:1]:
    raise ValueError(f"expected topk [N, K] and targets [N], got {topk_items.shape} and {targets.shape}")
  if not 1 <= k <= topk_items.shape[1]:
    raise ValueError(f"k={k} must be in 1..{topk_items.shape[1]} (the top-k width)")
  return (topk_items[:, :k] == targets[:, None]).any(axis=1)


def sentiment_following(top_pos: np.ndarray, top_neg: np.ndarray, targets: np.ndarray, k: int) -> float:
  """m@k: fraction of aligned rows whose target is hit under the positive preference and missed
  under the negative one (NaN for no rows)."""
  hit_pos, hit_neg = hit_at_k(top_pos, targets, k), hit_at_k(top_neg, targets, k)
  if len(hit_pos) == 0:
    return float("nan")
  return float(np.mean(hit_pos & ~hit_neg))
