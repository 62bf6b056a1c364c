"""Mender_Emb (Paulus et al. 2025, "Preference Discerning with LLM-Enhanced Generative
Retrieval"): TIGER's semantic-ID decoder conditioned on user preferences in language.

The encoder input is one vector per preference and one per history item, each the frozen
sentence encoder's embedding of its text (precomputed once: the `text_embeddings`
artifact for items, `recjax.evaluation.preferences` for preference statements),
projected to d_model, plus a learned type vector (preference / item); an item also adds
the mean of its semantic-ID token embeddings (`item_id_embeddings`), so the encoder sees
the same collaborative tokens TIGER does. A T5 encoder runs over [preferences ; items]
and TIGER's decoder generates the next item's semantic ID, trie-constrained at inference.

The tables (item text embeddings, preference embeddings, item -> semantic-ID tokens) are
Trainer frozen inputs: placed on the devices once and gathered inside the step.

Training rows carry a sign: +1 rows are trained by token cross-entropy; -1 rows (the
paper's negative preference data) by down-weighting the target ID's likelihood, here
sequence-level unlikelihood -log(1 - p(ID)), which is bounded (pushing log p itself down
is not) and vanishes once the ID is unlikely.

Mender_Tok: the preference(s) and the history's item titles, newest first, are one text
("Preference: ... History: title_n; title_{n-1}; ..."; truncation to `text_length` tokens
drops the oldest titles), encoded by a frozen pretrained language encoder (the bundled
MiniLM, or any BERT / T5 checkpoint directory). Its token states are computed once per
distinct text, cached on disk (`recjax.models.text.cache`, keyed by content hash) and
gathered inside the step; a trainable projection (optionally + a small trainable T5
encoder, `trainable_encoder`) turns them into the decoder's cross-attention memory. It sees
no semantic-ID tokens of the history.

`recjax mender` (`run`) trains TIGER (no preferences), Mender_Emb and Mender_Tok on the
same preference-discerning benchmark and reports its five axes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models import layers
from recjax.models import tiger
from recjax.models.text import t5

log = logging.getLogger("recjax.mender")


class MenderNetwork(tiger.TigerNetwork):
  def __init__(self, *, embed_dim: int, cfg, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg=cfg, rngs=rngs, **kwargs)
    self.item_proj = layers.dense(embed_dim, cfg.d_model, ("text_embed", "embed"), rngs=rngs)
    self.pref_proj = layers.dense(embed_dim, cfg.d_model, ("text_embed", "embed"), rngs=rngs)
    init = layers.param_init(nnx.initializers.normal(0.02), None, "embed")
    self.type_embed = nnx.Param(init(rngs.params(), (2, cfg.d_model)))  # preference, item


@dataclasses.dataclass
class MenderEmb(tiger.Tiger):
  """Mender_Emb hyper-parameters: TIGER's, plus the conditioning inputs."""

  embed_dim: int = 384  # the sentence encoder's width
  num_preferences: int = 5  # preference slots per example (-1 = empty)
  item_id_embeddings: bool = True
  negative_weight: float = 1.0  # weight of the unlikelihood term of sign -1 rows

  batch_fields = ("history", "preferences", "targets", "weights", "sign")

  @property
  def encoder_length(self) -> int:
    return self.num_preferences + self.max_items

  def network(self, rngs: nnx.Rngs) -> MenderNetwork:
    if self.vocab_size <= 2:
      raise ValueError(f"MenderEmb.vocab_size must be the semantic-ID vocabulary, got {self.vocab_size}")
    return MenderNetwork(embed_dim=self.embed_dim, vocab_size=self.vocab_size,
                         encoder_vocab_size=self.encoder_vocab_size, id_length=self.id_length,
                         cfg=self.t5_config(), rngs=rngs)

  @staticmethod
  def frozen_tables(item_embeddings: np.ndarray, pref_embeddings: np.ndarray, item_tokens: np.ndarray) -> dict:
    """Trainer frozen inputs: {name: (array, logical axes)}."""
    return {"item_text": (np.asarray(item_embeddings, np.float32), ("item", None)),
            "pref_text": (np.asarray(pref_embeddings, np.float32), (None, None)),
            "item_tokens": (np.asarray(item_tokens, np.int32), ("item", None))}

  def memory(self, net: MenderNetwork, batch):
    frozen, history, prefs = batch["frozen"], batch["history"], batch["preferences"]
    items = net.item_proj(jnp.take(frozen["item_text"], history, axis=0)) + net.type_embed[1]
    if self.item_id_embeddings:
      tokens = jnp.take(frozen["item_tokens"], history, axis=0)  # [B, M, L]; rows 0/1 are -1
      emb = net.encoder.embed(jnp.maximum(tokens, 0))
      items = items + jnp.mean(jnp.where(tokens[..., None] >= 0, emb, 0.0), axis=2)
    pref = net.pref_proj(jnp.take(frozen["pref_text"], jnp.maximum(prefs, 0), axis=0)) + net.type_embed[0]
    x = jnp.concatenate([pref, items], axis=1)
    mask = jnp.concatenate([prefs >= 0, history > 0], axis=1).astype(jnp.int32)
    return net.encoder.encode_embeddings(x, mask), mask

  def loss_fn(self, net: MenderNetwork, batch, rng: jax.Array | None):
    """Cross-entropy (float32) of the target IDs on sign +1 rows; on sign -1 rows,
    negative_weight * -log(1 - p(target ID)). Rows with weight 0 do not count."""
    del rng
    logits = self.logits(net, batch)
    targets = batch["targets"]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    w = batch["weights"].astype(jnp.float32)
    pos = w * (batch["sign"] > 0)
    neg = w * (batch["sign"] < 0)
    seq_nll = jnp.sum(nll, -1)
    # -log(1 - exp(-seq_nll)), stable; clamped where p(ID) ~ 1 (seq_nll ~ 0).
    unlikely = -jnp.log(-jnp.expm1(-jnp.maximum(seq_nll, 1e-6)))
    token_w = jnp.broadcast_to(pos[:, None], targets.shape)
    denom = jnp.maximum(jnp.sum(token_w), 1.0)
    loss = jnp.sum(nll * token_w) / denom + self.negative_weight * jnp.sum(unlikely * neg) / jnp.maximum(
        jnp.sum(neg), 1.0)
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return loss, {"loss_sum": jnp.sum(nll * token_w), "targets": jnp.sum(token_w),
                  "accuracy_sum": jnp.sum(correct * token_w), "unlikelihood_sum": jnp.sum(unlikely * neg),
                  "negatives": jnp.sum(neg), "dropped_targets": jnp.zeros((), jnp.float32),
                  "items": jnp.sum(w)}


class MenderTokNetwork(tiger.TigerNetwork):
  def __init__(self, *, text_dim: int, trainable_encoder: bool, cfg, rngs: nnx.Rngs, **kwargs):
    super().__init__(cfg=cfg, rngs=rngs, **kwargs)
    self.text_proj = layers.dense(text_dim, cfg.d_model, ("text_embed", "embed"), rngs=rngs)
    self.text_norm = t5.RMSNorm(cfg.d_model, eps=cfg.layer_norm_epsilon)
    if not trainable_encoder:  # the projected states are the memory: no unused encoder weights
      self.encoder = None


@dataclasses.dataclass
class MenderTok(tiger.Tiger):
  """Mender_Tok hyper-parameters: TIGER's decoder, plus the language-encoder inputs."""

  text_encoder: str = "minilm"  # "minilm" (bundled) or a Hugging Face BERT / T5 checkpoint directory
  text_length: int = 64  # tokens per text: the statement + ~3 newest synthetic titles (MiniLM tokens)
  text_dim: int = 0  # the encoder's width, set from the loaded encoder
  text_cache_dir: str | None = None  # default: <prepared dataset>/text_cache
  num_preferences: int = 5  # statements rendered per example
  # A T5 encoder (num_layers) over the projected frozen states. Off by default: on steer_senti
  # (docs/results.md) it was no better and took 2.7x the training time.
  trainable_encoder: bool = False
  negative_weight: float = 1.0  # as MenderEmb

  batch_fields = ("text", "targets", "weights", "sign")
  loss_fn = MenderEmb.loss_fn  # same signed objective: uses only logits and negative_weight

  @property
  def encoder_length(self) -> int:
    return self.text_length

  def network(self, rngs: nnx.Rngs) -> MenderTokNetwork:
    if self.vocab_size <= 2:
      raise ValueError(f"MenderTok.vocab_size must be the semantic-ID vocabulary, got {self.vocab_size}")
    if self.text_dim <= 0:
      raise ValueError("MenderTok.text_dim is unset: pass the text encoder's width (encoder.dim)")
    return MenderTokNetwork(text_dim=self.text_dim, trainable_encoder=self.trainable_encoder,
                            vocab_size=self.vocab_size, encoder_vocab_size=self.encoder_vocab_size,
                            id_length=self.id_length, cfg=self.t5_config(), rngs=rngs)

  @staticmethod
  def frozen_tables(states: np.ndarray, mask: np.ndarray) -> dict:
    """Trainer frozen inputs: the token states [U, T, D] (stored dtype, e.g. float16) and
    mask [U, T] of every distinct text; batch["text"] indexes their rows."""
    return {"tok_states": (states, (None, None, None)), "tok_mask": (np.asarray(mask, bool), (None, None))}

  def memory(self, net: MenderTokNetwork, batch):
    frozen = batch["frozen"]
    states = jnp.take(frozen["tok_states"], batch["text"], axis=0).astype(jnp.float32)
    mask = jnp.take(frozen["tok_mask"], batch["text"], axis=0).astype(jnp.int32)
    x = net.text_proj(states)
    if net.encoder is not None:
      return net.encoder.encode_embeddings(x, mask), mask
    return net.text_norm(x), mask


# -- data ---------------------------------------------------------------------------------


def recent_items(history: np.ndarray, m: int) -> np.ndarray:
  """The most recent m items of each right-padded history (oldest first), right-padded to m."""
  h = np.asarray(history)
  lengths = (h > 0).sum(1)
  idx = np.maximum(lengths - m, 0)[:, None] + np.arange(m)
  out = np.take_along_axis(np.pad(h, ((0, 0), (0, m))), idx, 1)
  return np.where(np.arange(m) < np.minimum(lengths, m)[:, None], out, 0)


def model_examples(split: dict, item_tokens: np.ndarray, model: tiger.Tiger) -> dict[str, np.ndarray]:
  """A benchmark split (`recjax.evaluation.preferences`: history, preferences, target, sign)
  -> the arrays `model` trains and evaluates on (TIGER: semantic-ID tokens of the history,
  preferences unused; Mender_Emb: item and preference ids; Mender_Tok: the row of its text
  in the token-state table, `tok_text_table`)."""
  history = recent_items(split["history"], model.max_items)
  target = np.asarray(split["target"], np.int64)
  out = {"targets": item_tokens[target].astype(np.int32), "target_items": target.astype(np.int32),
         "weights": np.ones(len(target), np.float32), "sign": np.asarray(split["sign"], np.float32)}
  if isinstance(model, MenderTok):
    if "text" not in split:
      raise ValueError("Mender_Tok needs each split's text row index: build it with tok_text_table")
    out.update(text=np.asarray(split["text"], np.int32))
  elif isinstance(model, MenderEmb):
    prefs = np.asarray(split["preferences"], np.int32)[:, :model.num_preferences]
    if prefs.shape[1] < model.num_preferences:
      prefs = np.pad(prefs, ((0, 0), (0, model.num_preferences - prefs.shape[1])), constant_values=-1)
    out.update(history=history.astype(np.int32), preferences=prefs)
  else:
    tokens = np.where(history[..., None] > 0, item_tokens[history], 0).reshape(len(history), -1)
    out.update(encoder_tokens=tokens.astype(np.int32), encoder_mask=(tokens > 0).astype(np.int32))
  return out


def render_texts(split: dict, statements, titles, *, max_items: int, num_preferences: int) -> list[str]:
  """One text per row: "Preference: s1; s2. History: title_n; title_{n-1}; ..." with the
  history newest first, so truncating the tokens drops the oldest items."""
  history = recent_items(split["history"], max_items)
  prefs = np.asarray(split["preferences"])[:, :num_preferences]
  out = []
  for h, p in zip(history, prefs):
    said = "; ".join(statements[i].strip().rstrip(".") for i in p if i >= 0)
    names = "; ".join(titles[i].strip() or f"item {i}" for i in h[h > 0][::-1])
    out.append(f"Preference: {said}. History: {names}" if said else f"History: {names}")
  return out


def item_titles(data_dir) -> list[str]:
  """The title of every item id ("" for PAD, MASK and items without one)."""
  from recjax.data.prepared import PreparedDataset
  ds = PreparedDataset(data_dir)
  titles = [""] * ds.vocab_size
  for r in ds.items(["item_id", "title"]).to_pylist():
    titles[r["item_id"]] = " ".join((r["title"] or "").split())
  return titles


def tok_text_table(bench, titles, model: MenderTok, encoder, cache_dir, split_names) -> tuple:
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
  return dataclasses.replace(bench, splits=splits), MenderTok.frozen_tables(states, mask), info


def concat_splits(*splits: dict) -> dict:
  return {k: np.concatenate([s[k] for s in splits]) for k in splits[0]}


# -- the benchmark run ----------------------------------------------------------------------

TRAIN_EXTRAS = ("train_fine_steering", "train_coarse_steering", "train_sentiment")


AXES = ("recommendation", "fine_steering", "coarse_steering", "consolidation")


def _rank_metrics(items: np.ndarray, targets: np.ndarray, ks=(5, 10)) -> dict:
  """Recall@k / NDCG@k of each target's position among the returned items (one relevant)."""
  hit = items == targets[:, None]
  rank = np.where(hit.any(1), hit.argmax(1), items.shape[1])
  out = {}
  for k in ks:
    out[f"recall@{k}"] = float(np.mean(rank < k))
    out[f"ndcg@{k}"] = float(np.mean(np.where(rank < k, 1.0 / np.log2(rank + 2.0), 0.0)))
  return out


def evaluate_axes(model, net, bench, item_tokens, tables, *, frozen=None, num_beams: int = 20,
                  k: int = 10) -> dict:
  """Recall@5/k and NDCG@5/k per axis (recommendation, fine / coarse steering, history
  consolidation) and sentiment following m@k (hit with the positive preference and no hit
  with the negative one). Every axis is decoded in one pass (one compiled beam search)."""
  from recjax.evaluation import preferences as prefs_lib
  names = [f"test_{a}" for a in AXES] + ["test_sentiment_positive", "test_sentiment_negative"]
  parts = [(n, bench.splits[n]) for n in names if n in bench.splits and len(bench.splits[n]["target"])]
  examples = concat_splits(*[model_examples(split, item_tokens, model) for _, split in parts])
  items = tiger.evaluate_tiger(model, net, examples, tables, num_beams=num_beams, ks=(k,), frozen=frozen,
                               return_items=True)["items"]
  top, start = {}, 0
  for name, split in parts:
    n = len(split["target"])
    top[name], start = (items[start:start + n], np.asarray(split["target"])), start + n
  out = {}
  for axis in AXES:
    if f"test_{axis}" in top:
      got, targets = top[f"test_{axis}"]
      out[axis] = {**_rank_metrics(got, targets, (5, k)), "count": int(len(targets))}
  if "test_sentiment_positive" in top and "test_sentiment_negative" in top:
    (pos, targets), (neg, _) = top["test_sentiment_positive"], top["test_sentiment_negative"]
    out["sentiment"] = {f"m@{k}": prefs_lib.sentiment_following(pos, neg, targets, k),
                        f"hit_positive@{k}": float(prefs_lib.hit_at_k(pos, targets, k).mean()),
                        f"hit_negative@{k}": float(prefs_lib.hit_at_k(neg, targets, k).mean()),
                        "count": int(len(targets))}
  return out


def load_or_build_benchmark(data_dir, name: str = "ground_truth", held_out: tuple[str, ...] | None = None):
  """The preference_benchmark artifact `name` (built by `recjax fit
  --gin_file=fits/preference_benchmark.gin`; missing or stale: one sentence naming it).
  `held_out`: the test splits whose (preference, target) pairs no train split may contain
  (default: all); the artifact must have been built alike."""
  from recjax.artifacts import preference_benchmark
  held_out = tuple(held_out or preference_benchmark.TEST_SPLITS)
  bench = preference_benchmark.load(data_dir, name)
  if tuple(bench.stats.get("held_out_splits", ())) != held_out:
    raise ValueError(f"the preference_benchmark artifact {name!r} holds out {bench.stats.get('held_out_splits')}, "
                     f"not {list(held_out)}: fit another one (--gin.NAME=...) with those held_out_splits")
  return bench


MODELS = ("tiger", "mender_emb", "mender_emb_extras", "mender_tok", "mender_tok_extras")


def run(data_dir, *, ids: str = "rqvae", benchmark: str = "ground_truth", held_out: tuple[str, ...] | None = None,
        steps: int = 2000, batch_size: int = 128, learning_rate: float = 1e-3, num_beams: int = 20, seed: int = 0,
        models: tuple[str, ...] = ("tiger", "mender_emb", "mender_emb_extras"), text_encoder: str = "minilm",
        text_length: int = 64, text_cache_dir: str | None = None, tok_trainable_encoder: bool = False,
        **sizes) -> list[dict]:
  """`recjax mender`: train each model on the benchmark's training data and report every
  axis. tiger = no preferences; mender_emb / mender_tok = preference-conditioned on
  "train"; *_extras = + the steering and sentiment (positive / negative) training data.
  Mender_Tok's texts (train, extras and test splits) are encoded once by `text_encoder`
  and cached under `text_cache_dir` (default DATA/text_cache)."""
  from recjax.evaluation import preferences as prefs_lib
  from recjax.models import beam_search as bs
  from recjax.artifacts import semantic_ids
  unknown = sorted(set(models) - set(MODELS))
  if unknown:
    raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODELS)}")
  rows = []

  def emit(row):
    rows.append(row)
    print(json.dumps(row), flush=True)

  t0 = time.perf_counter()
  sids = semantic_ids.load(data_dir, ids)
  bench = load_or_build_benchmark(data_dir, benchmark, held_out)
  tables = bs.trie_tables_of(sids)
  item_tokens = sids.tokens
  emit({"event": "data", "benchmark": benchmark, "held_out": bench.stats.get("held_out_splits"),
        "splits": {k: int(len(v["target"])) for k, v in bench.splits.items()},
        "preferences": len(bench.preferences), "seconds": round(time.perf_counter() - t0, 1)})
  tok_bench = tok_frozen = None
  if any(m.startswith("mender_tok") for m in models):
    from recjax.models import text as text_lib
    t1 = time.perf_counter()
    encoder = text_lib.load_text_encoder(text_encoder)
    tok_model = MenderTok(vocab_size=sids.vocab_size, text_encoder=text_encoder, text_length=text_length,
                          text_dim=encoder.dim, text_cache_dir=text_cache_dir,
                          trainable_encoder=tok_trainable_encoder, **sizes)
    needed = [n for n in ("train", *TRAIN_EXTRAS, *prefs_lib.TEST_SPLITS) if n in bench.splits]
    tok_bench, tok_frozen, info = tok_text_table(bench, item_titles(data_dir), tok_model, encoder,
                                                 text_cache_dir or pathlib.Path(data_dir) / "text_cache", needed)
    emit({"event": "text", "encoder": encoder.name, **info, "total_seconds": round(time.perf_counter() - t1, 1)})
  for name in models:
    source = bench
    if name == "tiger":
      model = tiger.Tiger(vocab_size=sids.vocab_size, **sizes)
      frozen_in = None
    elif name.startswith("mender_emb"):
      model = MenderEmb(vocab_size=sids.vocab_size, embed_dim=bench.pref_embeddings.shape[1], **sizes)
      frozen_in = MenderEmb.frozen_tables(bench.item_embeddings, bench.pref_embeddings, item_tokens)
    else:
      model, frozen_in, source = tok_model, tok_frozen, tok_bench
    parts = [source.splits["train"]]
    if name.endswith("_extras"):
      parts += [source.splits[s] for s in TRAIN_EXTRAS if s in source.splits]
    train = concat_splits(*parts)
    if name == "tiger":  # negatives are preference data: TIGER cannot condition on them
      train = {k: v[np.asarray(train["sign"]) > 0] for k, v in train.items()}
    examples = model_examples(train, item_tokens, model)
    t1 = time.perf_counter()
    trainer, state, history = tiger.train_tiger(
        model, examples, steps=steps, batch_size=batch_size, seed=seed, learning_rate=learning_rate,
        warmup_steps=min(200, steps // 10), log_every=max(steps // 5, 1), frozen_inputs=frozen_in,
        callback=lambda step, row: emit({"event": "progress", "model": name, **row}))
    net = trainer.network(state.params)
    emit({"event": "train", "model": name, "examples": int(len(examples["weights"])), "steps": steps,
          "loss": round(history[-1]["loss"], 4), "seconds": round(time.perf_counter() - t1, 1)})
    t1 = time.perf_counter()
    axes = evaluate_axes(model, net, source, item_tokens, tables, frozen=trainer.frozen if frozen_in else None,
                         num_beams=num_beams)
    emit({"event": "test", "model": name, **axes, "seconds": round(time.perf_counter() - t1, 1)})
  return rows


__all__ = ["MenderEmb", "MenderNetwork", "MenderTok", "MenderTokNetwork", "render_texts", "tok_text_table", "model_examples", "evaluate_axes", "load_or_build_benchmark", "run"]
