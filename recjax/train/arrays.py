"""Training a contract model on in-memory example arrays, on one host, and the arrays of
the preference-discerning benchmark's splits (unit tests of TIGER / Mender behaviour).

The drivers of LUMEN, ReAT and the Mender benchmark still build numpy example arrays
and train here (issue: they move onto SeqIO tasks + `loop.train`); every other model
trains through `recjax.train.loop.train`. No checkpoints, no resume, one process.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Callable

import jax
import numpy as np

from recjax.models import mender
from recjax.train import loop
from recjax.train import mesh as mesh_lib

log = logging.getLogger("recjax.train.arrays")


def batches(examples: dict, batch_size: int, *, seed: int, fields):
  """Endless shuffled batches (reshuffled every epoch; the ragged tail is dropped)."""
  n = len(examples["weights"])
  if n < batch_size:
    raise ValueError(f"{n} examples are fewer than one batch of {batch_size}")
  rng = np.random.default_rng(seed)
  while True:
    order = rng.permutation(n)
    for s in range(0, n - batch_size + 1, batch_size):
      rows = order[s:s + batch_size]
      yield {k: examples[k][rows] for k in fields}


# -- training and evaluation -------------------------------------------------------------


def train_arrays(model, examples: dict, *, steps: int, batch_size: int = 256, seed: int = 0,
                learning_rate: float = 1e-3, warmup_steps: int = 100, weight_decay: float = 0.0,
                log_every: int = 100, callback: Callable[[int, dict], None] | None = None,
                frozen_inputs: dict | None = None, init_params: Callable | None = None):
  """Trains with `recjax.train.loop.Trainer`'s jitted step on one host. Returns
  (trainer, state, history [{step, loss, accuracy, seconds}]). `frozen_inputs` as for the
  Trainer (models whose memory reads frozen tables, e.g. Mender_Emb); `init_params(params)`
  replaces the fresh parameters (e.g. with a pretrained checkpoint's). Any model with
  `network`, `loss_fn` and `batch_fields` trains here (TIGER, Mender, LUMEN, ReAT)."""
  opt = lambda total: loop.make_optimizer(total, learning_rate=learning_rate, warmup_steps=warmup_steps,
                                          weight_decay=weight_decay, schedule="cosine",
                                          end_learning_rate_fraction=0.1)
  trainer = loop.Trainer(model, mesh_lib.create_mesh(), mesh_lib.DEFAULT_RULES, seed=seed,
                         total_steps=steps, optimizer_fn=opt, frozen_inputs=frozen_inputs or {})
  data = batches(examples, batch_size, seed=seed, fields=model.batch_fields)
  history, window, start = [], [], time.perf_counter()
  with jax.set_mesh(trainer.mesh):
    state = trainer.init_state()
    if init_params is not None:
      # Adam's moments start at zero whatever the values, so only the parameters change.
      state = dataclasses.replace(state, params=jax.device_put(init_params(state.params),
                                                               trainer.param_shardings))
    step_fn = trainer.make_train_step()
    for step in range(1, steps + 1):
      state, metrics = step_fn(state, trainer.to_global(next(data)))
      window.append({k: metrics[k] for k in ("loss_sum", "accuracy_sum", "targets")})
      if step % log_every == 0 or step == steps:
        got = jax.device_get(window)  # the only host sync
        tot = {k: float(sum(m[k] for m in got)) for k in got[0]}
        row = {"step": step, "loss": tot["loss_sum"] / tot["targets"],
               "accuracy": tot["accuracy_sum"] / tot["targets"],
               "seconds": round(time.perf_counter() - start, 1)}
        history.append(row)
        log.info("train %s", row)
        if callback:
          callback(step, row)
        window = []
  return trainer, state, history


# -- preference-benchmark arrays ------------------------------------------------------


def recent_items(history: np.ndarray, m: int) -> np.ndarray:
  """The most recent m items of each right-padded history (oldest first), right-padded to m."""
  h = np.asarray(history)
  lengths = (h > 0).sum(1)
  idx = np.maximum(lengths - m, 0)[:, None] + np.arange(m)
  out = np.take_along_axis(np.pad(h, ((0, 0), (0, m))), idx, 1)
  return np.where(np.arange(m) < np.minimum(lengths, m)[:, None], out, 0)


def model_examples(split: dict, item_tokens: np.ndarray, model) -> dict[str, np.ndarray]:
  """A benchmark split (`recjax.evaluation.preferences`: history, preferences, target, sign)
  -> the arrays `model` trains and evaluates on (TIGER: semantic-ID tokens of the history,
  preferences unused; Mender_Emb: item and preference ids; Mender_Tok: the row of its text
  in the token-state table, `tok_text_table`)."""
  history = recent_items(split["history"], model.max_items)
  target = np.asarray(split["target"], np.int64)
  out = {"decoder_target_tokens": item_tokens[target].astype(np.int32), "target_items": target.astype(np.int32),
         "weights": np.ones(len(target), np.float32), "sign": np.asarray(split["sign"], np.float32)}
  if isinstance(model, mender.MenderTok):
    if "text" not in split:
      raise ValueError("Mender_Tok needs each split's text row index: build it with tok_text_table")
    out.update(text=np.asarray(split["text"], np.int32))
  elif isinstance(model, mender.MenderEmb):
    prefs = np.asarray(split["preferences"], np.int32)[:, :model.num_preferences]
    if prefs.shape[1] < model.num_preferences:
      prefs = np.pad(prefs, ((0, 0), (0, model.num_preferences - prefs.shape[1])), constant_values=-1)
    out.update(history=history.astype(np.int32), preferences=prefs)
  else:
    tokens = np.where(history[..., None] > 0, item_tokens[history], 0).reshape(len(history), -1)
    out.update(encoder_input_tokens=tokens.astype(np.int32),
               decoder_loss_weights=np.ones(out["decoder_target_tokens"].shape, np.float32))
  return out


def render_texts(split: dict, statements, titles, *, max_items: int, num_preferences: int) -> list[str]:
  """One text per row: "Preference: s1; s2. History: title_n; title_{n-1}; ..." with the
  history newest first, so truncating the tokens drops the oldest items."""
  from recjax.data.sequence_preprocessors import preference_text
  history = recent_items(split["history"], max_items)
  prefs = np.asarray(split["preferences"])[:, :num_preferences]
  return [preference_text(h, p, statements, titles) for h, p in zip(history, prefs)]


def item_titles(data_dir) -> list[str]:
  """The title of every item id ("" for PAD, MASK and items without one)."""
  from recjax.data.prepared import PreparedDataset
  ds = PreparedDataset(data_dir)
  titles = [""] * ds.vocab_size
  for r in ds.items(["item_id", "title"]).to_pylist():
    titles[r["item_id"]] = " ".join((r["title"] or "").split())
  return titles


def tok_text_table(bench, titles, model, encoder, cache_dir, split_names) -> tuple:
  """(bench with a "text" row index in each of `split_names`, frozen tables, info).

  The texts of those splits are deduplicated and sorted (the cache key does not depend on
  split order or on which models run), then encoded once and cached on disk."""
  from recjax.models.text import cache
  texts = {n: render_texts(bench.splits[n], bench.preferences, titles, max_items=model.max_items,
                           num_preferences=model.num_preferences) for n in split_names}
  unique = sorted({t for ts in texts.values() for t in ts})
  index = {t: i for i, t in enumerate(unique)}
  key = cache.cache_key(encoder, unique, model.text_length, "float16")
  cached = (pathlib.Path(cache_dir) / f"text-{key}" / "states.npy").is_file()
  t0 = time.perf_counter()
  states, mask = cache.encode_strings_cached(encoder, unique, model.text_length, cache_dir, dtype="float16")
  splits = dict(bench.splits)
  for n in split_names:
    splits[n] = dict(splits[n], text=np.array([index[t] for t in texts[n]], np.int32))
  info = {"rows": {n: len(t) for n, t in texts.items()}, "texts": len(unique), "cached": cached,
          "length": model.text_length, "mean_tokens": round(float(mask.sum(1).mean()), 1),
          "at_max_length": round(float(mask[:, -1].mean()), 3), "seconds": round(time.perf_counter() - t0, 1)}
  return dataclasses.replace(bench, splits=splits), mender.MenderTok.frozen_tables(states, mask), info


def concat_splits(*splits: dict) -> dict:
  return {k: np.concatenate([s[k] for s in splits]) for k in splits[0]}
