"""Family 4: the preference-discerning benchmark as SeqIO tasks, when one has been built.

For a dataset DS with preference_benchmark artifacts (DIR/artifacts/preference_benchmark/NAME/,
built by `recjax fit --gin_file=fits/preference_benchmark.gin --dataset DS=DIR`), one task
per axis; the prefix is DS_pref for NAME = "ground_truth", else DS_pref_NAME:

  DS_pref_recommendation    train "train", validation / test "valid_/test_recommendation"
  DS_pref_fine_steering     train / test "train_/test_fine_steering"
  DS_pref_coarse_steering   train / test "train_/test_coarse_steering"
  DS_pref_sentiment         train "train_sentiment", test the positive then the negative rows
  DS_pref_consolidation     test "test_consolidation"
  DS_pref_mix               the four training splits, at rates proportional to their rows

Features: "items" (the history, then the target: the item-sequence converters' layout, so
`ItemSequenceEvalConverter` holds the target out), "preferences" (statement ids + 1 into
the benchmark's table, 0 = empty slot; the vocabulary's `table` gives the strings),
"sign" (+1, or -1 for a negative preference whose item must not be recommended),
"example_id" (the row within its split) and "user_id". The arrays are read when a
dataset is built, not at registration (which reads only the statement table); an artifact
whose dataset content changed since is refused then, in one sentence naming the rebuild.
"""

from __future__ import annotations

import functools
import json
import pathlib

import numpy as np
import seqio
import tensorflow as tf

from recjax.artifacts import manifest
from recjax.data import sequence_preprocessors as sp
from recjax.data.prepared import PreparedDataset
from recjax.data.vocab import ItemVocabulary

DESCRIPTIONS: dict[str, str] = {}
KIND, FILE = "preference_benchmark", "benchmark.npz"  # = recjax.artifacts.preference_benchmark's (it loads more)

# axis -> {seqio split: benchmark split(s), concatenated in order}
AXES = {
    "recommendation": {"train": ("train",), "validation": ("valid_recommendation",), "test": ("test_recommendation",)},
    "fine_steering": {"train": ("train_fine_steering",), "test": ("test_fine_steering",)},
    "coarse_steering": {"train": ("train_coarse_steering",), "test": ("test_coarse_steering",)},
    "sentiment": {"train": ("train_sentiment",), "test": ("test_sentiment_positive", "test_sentiment_negative")},
    "consolidation": {"test": ("test_consolidation",)},
}


def describe(name: str) -> str | None:
  return DESCRIPTIONS.get(name)


def _meta(path: pathlib.Path) -> dict:
  with np.load(path) as f:
    return json.loads(str(f["meta"]))


@functools.lru_cache(maxsize=8)
def _arrays(path: str, mtime_ns: int, parts: tuple[str, ...]) -> dict[str, np.ndarray]:
  """The rows of benchmark splits `parts`, concatenated, as the tasks' features."""
  del mtime_ns  # part of the cache key: a rebuilt file is read again
  with np.load(path) as f:
    cols = {k: np.concatenate([f[f"{p}/{k}"] for p in parts]) for k in ("user", "history", "preferences",
                                                                          "target", "sign")}
  history = cols["history"]
  lengths = (history > 0).sum(1)
  items = np.concatenate([history, np.zeros((len(history), 1), history.dtype)], 1)
  items[np.arange(len(items)), lengths] = cols["target"]  # history is right-padded: the target goes after it
  return {"items": items, "lengths": lengths + 1, "preferences": cols["preferences"] + 1,
          "sign": cols["sign"], "user_id": cols["user"]}


def _dataset_fn(data_dir: pathlib.Path, bench: str, axis: str):
  def dataset_fn(split: str, shuffle_files: bool = False, seed: int | None = None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory table per split; shuffling is the pipeline's
    path = manifest.require(data_dir, KIND, bench) / FILE  # a stale artifact is refused here
    a = _arrays(str(path), path.stat().st_mtime_ns, AXES[axis][split])
    n = len(a["sign"])
    items = tf.RaggedTensor.from_tensor(tf.constant(a["items"], tf.int32), lengths=tf.constant(a["lengths"]))
    prefs = tf.constant(a["preferences"], tf.int32)
    prefs = tf.RaggedTensor.from_tensor(prefs, lengths=tf.reduce_sum(tf.cast(prefs > 0, tf.int32), 1))
    return tf.data.Dataset.from_tensor_slices({
        "items": items, "preferences": prefs, "sign": tf.constant(a["sign"], tf.float32),
        "user_id": tf.constant(a["user_id"], tf.int32), "example_id": tf.range(n, dtype=tf.int64)})
  return dataset_fn


def benchmarks(data_dir) -> dict[str, pathlib.Path]:
  """{benchmark name: its file} of a prepared dataset's benchmark artifacts."""
  return {b: manifest.artifact_dir(data_dir, KIND, b) / FILE for b in manifest.find(data_dir, KIND)}


def require(data_dir, bench: str) -> pathlib.Path:
  """The benchmark's file; a missing or stale artifact is refused in one sentence."""
  return manifest.require(data_dir, KIND, bench) / FILE


def task_prefix(name: str, bench: str) -> str:
  return f"{name}_pref" if bench == "ground_truth" else f"{name}_pref_{bench}"


def split_arrays(path: pathlib.Path, axis: str, split: str) -> dict[str, np.ndarray]:
  """The rows of an axis task's split (see `_arrays`)."""
  return _arrays(str(path), path.stat().st_mtime_ns, AXES[axis][split])


def preference_vocabulary(path: pathlib.Path):
  """Statement id + 1 -> statement (0 = no preference)."""
  return sp.CritiqueVocabulary(table=["", *_meta(path)["preferences"]])


def split_sizes(path: pathlib.Path) -> dict[str, int]:
  """Rows of every benchmark split."""
  return dict(_meta(path)["stats"].get("splits", {}))


def train_rows(path: pathlib.Path, axis: str) -> int:
  """Rows of an axis's training split(s) (0: the axis has none)."""
  sizes = split_sizes(path)
  return sum(sizes.get(p, 0) for p in AXES[axis].get("train", ()))


def register(name: str, data_dir) -> list[str]:
  """Registers the axis tasks (and the training mixture) of every benchmark built for the
  dataset `name`; returns their names (none when no benchmark exists)."""
  ds = PreparedDataset(data_dir)
  items = seqio.Feature(ItemVocabulary(ds.num_items), add_eos=False, dtype=tf.int32)
  added: list[str] = []
  for bench in manifest.find(ds.data_dir, KIND):
    meta = _meta(manifest.artifact_dir(ds.data_dir, KIND, bench) / FILE)
    prefix = f"{name}_pref" if bench == "ground_truth" else f"{name}_pref_{bench}"
    vocab = sp.CritiqueVocabulary(table=["", *meta["preferences"]])
    features = {"items": items, "preferences": seqio.Feature(vocab, add_eos=False, dtype=tf.int32)}
    sizes = meta["stats"].get("splits", {})
    rates = []
    for axis, splits in AXES.items():
      task = f"{prefix}_{axis}"
      source = seqio.FunctionDataSource(_dataset_fn(ds.data_dir, bench, axis), splits=list(splits))
      seqio.TaskRegistry.add(task, source=source,
                             preprocessors=[seqio.CacheDatasetPlaceholder()], output_features=features)
      DESCRIPTIONS[task] = f"preference discerning ({bench}): {axis.replace('_', ' ')}"
      added.append(task)
      rows = sum(sizes.get(p, 0) for p in splits.get("train", ()))
      if rows:
        rates.append((task, float(rows)))
    if rates:
      seqio.MixtureRegistry.add(f"{prefix}_mix", rates)
      DESCRIPTIONS[f"{prefix}_mix"] = f"preference discerning ({bench}): every training split, rates by rows"
      added.append(f"{prefix}_mix")
  return added
