"""LUMEN (REGEN, Sayana et al. 2025): one language model that recommends the next item
and writes a narrative about it.

A decoder-only LM (`recjax.models.text.gemma.Gemma`) gains an item embedding table. In the
input, every `<item>` placeholder token is replaced by its item's embedding; the target
"ID: <item> Text: <narrative>" is trained with an item softmax (over the same table, tied)
at the ID position and the text softmax at every other target position. Decoding switches
vocabulary: after the "ID:" signal only item logits are live (their top K are the
recommendation), the chosen item's embedding is fed back in, and text decoding goes on
conditioned on it.

The same network trained on the `narrative_*` tasks (history and the true next item in
the prompt, narrative as the target; no ID position) is the LM half of REGEN's FLARE + LLM
hybrid, in the paper's upper-bound setting.

Layout of a row (fixed shapes, one compilation): the prompt (seqio "inputs") is
left-padded into `inputs_length` slots and the target right-padded into `targets_length`,
so every target starts at the same index and the text softmax runs only over the target
slots (the vocabulary projection is the largest matmul of a small LM).

  examples = build_examples(task_names, "train", lumen)    # numpy arrays, from SeqIO
  trainer, state, log = train_arrays(lumen, examples, steps=...)
  scores = evaluate(lumen, trainer.network(state.params), test_examples, vocabulary)
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models import layers
from recjax.models.bert4rec import NUM_RESERVED  # PAD, MASK: no TensorFlow in the model
from recjax.models.text import gemma

log = logging.getLogger("recjax.lumen")


class LumenNetwork(nnx.Module):
  def __init__(self, cfg: gemma.GemmaConfig, num_items: int, *, rngs: nnx.Rngs, dtype=jnp.float32,
               soft_dim: int = 0, adapter: str = "mlp"):
    self.lm = gemma.Gemma(cfg, rngs=rngs, dtype=dtype)
    # Same init and sqrt(hidden) input scale as the token embedding: an item is one more token.
    self.items = nnx.Embed(num_items, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
                           embedding_init=layers.param_init(nnx.initializers.normal(0.02), "vocab", "embed"))
    self.num_items = num_items
    # "Beyond Retrieval" adapter: one interaction's [CF ; content] vector -> one soft token.
    d = cfg.hidden_size
    if not soft_dim:
      self.adapter = None
    elif adapter == "linear":
      self.adapter = nnx.List([layers.dense(soft_dim, d, (None, "embed"), rngs=rngs, dtype=dtype)])
    else:
      self.adapter = nnx.List([layers.dense(soft_dim, 4 * d, (None, "mlp"), rngs=rngs, dtype=dtype),
                               layers.dense(4 * d, d, ("mlp", "embed"), rngs=rngs, dtype=dtype)])

  def soft_tokens(self, features):
    """[..., soft_dim] interaction features -> [..., hidden] input vectors."""
    x = features
    for i, dense in enumerate(self.adapter):
      x = dense(x if i == 0 else jax.nn.gelu(x))
    return x

  def input_vectors(self, tokens, item_ids):
    """Token embeddings with each placeholder slot (item_ids > 0) replaced by its item's."""
    x = self.lm.embed(tokens)
    items = self.items(item_ids) * jnp.asarray(math.sqrt(x.shape[-1]), x.dtype)
    return jnp.where((item_ids > 0)[..., None], items, x)

  def item_logits(self, hidden):
    """float32 [..., num_items]; the reserved ids (PAD, MASK) are never recommended."""
    logits = self.items.attend(hidden).astype(jnp.float32)
    reserved = jnp.arange(self.num_items) < NUM_RESERVED
    return jnp.where(reserved, -jnp.inf, logits)


@dataclasses.dataclass
class Lumen:
  """LUMEN hyper-parameters (the trainer's model protocol). The LM is a Gemma-architecture
  decoder trained from scratch at the sizes given here."""

  vocab_size: int = 0  # text vocabulary (the tasks' SentencePiece model)
  num_items: int = 0  # item vocabulary, reserved ids included (PreparedDataset.vocab_size)
  inputs_length: int = 256
  targets_length: int = 64
  id_position: int = 0  # index of the ID placeholder in the targets; 0 = no item (narrative tasks)
  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 1  # Gemma 2B is multi-query
  head_dim: int = 32
  mlp_dim: int = 512
  item_loss_weight: float = 1.0
  item_embeddings: bool = True  # learned item vectors at the prompt's placeholders (False: plain tokens)
  # "Beyond Retrieval" soft prompts: one token per history interaction (newest `soft_tokens`),
  # from the frozen tables "cf" (WALS item vectors / mean norm) and / or "content" (sentence
  # embedding of item text + review), through an MLP or linear adapter; prepended to the prompt.
  soft_prompt: str = ""  # "", "cf", "content" or "cf+content"
  adapter: str = "mlp"
  soft_tokens: int = 0
  cf_dim: int = 64
  content_dim: int = 384

  batch_fields = ("tokens", "item_ids", "mask", "text_weights", "item_targets", "weights", "soft_items",
                  "soft_rows")

  def __post_init__(self):
    parts = set(self.soft_prompt.split("+")) - {""}
    if parts - {"cf", "content"} or self.adapter not in ("mlp", "linear"):
      raise ValueError(f"Lumen.soft_prompt {self.soft_prompt!r} / adapter {self.adapter!r}: use '', 'cf', "
                       "'content' or 'cf+content', and 'mlp' or 'linear'")
    if parts and self.soft_tokens < 1:
      raise ValueError("Lumen.soft_prompt needs soft_tokens >= 1")
    if self.id_position and self.soft_tokens:
      raise ValueError("soft prompts are for the narrative tasks (id_position 0)")

  @property
  def soft_parts(self) -> tuple[str, ...]:
    return tuple(p for p in ("cf", "content") if p in self.soft_prompt.split("+"))

  @property
  def prefix(self) -> int:
    """Slots before the text prompt: the soft tokens, masked out when the model uses none
    (so settings with and without soft prompts share their examples)."""
    return self.soft_tokens

  @property
  def targets_start(self) -> int:
    return self.prefix + self.inputs_length

  def gemma_config(self) -> gemma.GemmaConfig:
    return gemma.GemmaConfig(vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                             intermediate_size=self.mlp_dim, num_hidden_layers=self.num_layers,
                             num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
                             head_dim=self.head_dim, max_position_embeddings=self.length,
                             pad_token_id=0, eos_token_id=1)  # seqio's ids

  @property
  def length(self) -> int:
    return self.prefix + self.inputs_length + self.targets_length

  def network(self, rngs: nnx.Rngs) -> LumenNetwork:
    if self.vocab_size <= 2 or self.num_items <= NUM_RESERVED:
      raise ValueError(f"Lumen needs vocab_size and num_items from the data, got {self.vocab_size}, "
                       f"{self.num_items}")
    soft_dim = sum({"cf": self.cf_dim, "content": self.content_dim}[p] for p in self.soft_parts)
    return LumenNetwork(self.gemma_config(), self.num_items, rngs=rngs, soft_dim=soft_dim, adapter=self.adapter)

  def soft_features(self, frozen, batch):
    """[B, S, soft_dim] interaction features of the soft slots (zeros where empty)."""
    parts = []
    if "cf" in self.soft_parts:
      parts.append(jnp.take(frozen["cf"], batch["soft_items"], axis=0))
    if "content" in self.soft_parts:
      parts.append(jnp.take(frozen["content"], batch["soft_rows"], axis=0))
    return jnp.concatenate(parts, -1)

  def input_vectors(self, net: LumenNetwork, batch, stop: int | None = None):
    """Input vectors of slots [0, stop): soft tokens, then text with item vectors."""
    stop = self.length if stop is None else stop
    tokens, items = batch["tokens"][:, :stop], batch["item_ids"][:, :stop]
    if not self.item_embeddings:
      items = jnp.zeros_like(items)
    x = net.input_vectors(tokens, items)
    if self.soft_parts:
      soft = net.soft_tokens(self.soft_features(batch["frozen"], batch)).astype(x.dtype)
      x = jnp.concatenate([soft, x[:, self.prefix:]], 1)
    return x

  def attention_mask(self, batch, stop: int | None = None):
    mask = batch["mask"][:, :stop]
    if self.prefix and not self.soft_parts:
      mask = mask.at[:, :self.prefix].set(0)
    return mask

  def loss_fn(self, net: LumenNetwork, batch, rng):
    """Mean cross-entropy over target tokens, the ID counting as one token scored by the
    item softmax (weighted by `item_loss_weight`). `rng` is unused (no dropout)."""
    del rng
    li, tokens = self.targets_start, batch["tokens"]
    x = self.input_vectors(net, batch)
    hidden = net.lm.hidden_states(inputs_embeds=x, mask=self.attention_mask(batch))
    logits = net.lm.logits(hidden[:, li - 1:-1])  # predicts the target slots
    targets = tokens[:, li:]
    w = batch["text_weights"][:, li:].astype(jnp.float32) * batch["weights"][:, None]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    loss_sum, count, hits = jnp.sum(nll * w), jnp.sum(w), jnp.sum(correct * w)
    item_sum = jnp.zeros((), jnp.float32)
    if self.id_position:
      item_logits = net.item_logits(hidden[:, li + self.id_position - 1])
      label = batch["item_targets"]
      iw = batch["weights"] * (label > 0)
      item_nll = jax.nn.logsumexp(item_logits, -1) - jnp.take_along_axis(item_logits, label[:, None], -1)[:, 0]
      item_sum = jnp.sum(item_nll * iw)
      loss_sum, count = loss_sum + item_sum, count + jnp.sum(iw)
      hits = hits + jnp.sum((jnp.argmax(item_logits, -1) == label) * iw)
    loss = (loss_sum + (self.item_loss_weight - 1.0) * item_sum) / jnp.maximum(count, 1.0)
    return loss, {"loss_sum": loss_sum, "targets": count, "accuracy_sum": hits,
                  "dropped_targets": jnp.zeros((), jnp.float32), "items": jnp.sum(batch["weights"])}


# -- data -------------------------------------------------------------------------------


def _placeholder_slots(row: np.ndarray, placeholder: int) -> np.ndarray:
  return np.flatnonzero(row == placeholder)


def build_examples(task_names, split: str, model: Lumen, *, placeholder_id: int,
                   limit: int | None = None, interactions: np.ndarray | None = None) -> dict:
  """Numpy rows of `model`'s layout from SeqIO text tasks (`ds_lumen_*` with an ID
  position, or `ds_narrative_*` without), plus per-row "task", "reference" (the narrative)
  and "user" for the evaluation. Every placeholder must pair with an item id; a target
  whose ID placeholder is not at `model.id_position` is an error naming the task.

  Soft prompts (model.prefix > 0) need `interactions` (`interaction_index`): the newest
  interactions of the example's window get "soft_items" (item ids) and "soft_rows"
  (1 + row in the interaction tables)."""
  import seqio
  s0, li, lt, p = model.prefix, model.targets_start, model.targets_length, model.id_position
  width = li + lt
  if s0 and interactions is None:
    raise ValueError("soft prompts need the interactions (interaction_index(data_dir))")
  rows = collections.defaultdict(list)
  truncated = 0
  for name in task_names:
    task = seqio.get_mixture_or_task(name)
    # Targets are read whole and cut here, so cut narratives are counted, not hidden.
    ds = task.get_dataset({"inputs": model.inputs_length, "targets": 4096}, split=split, shuffle=False,
                          num_epochs=1, use_cached=False, seed=0)
    for n, ex in enumerate(ds.as_numpy_iterator()):
      if limit is not None and n >= limit:
        break
      where = f"{name} ({split}) example {ex.get('example_id')}"
      inputs, targets = ex["inputs"], ex["targets"]
      if len(targets) > lt:
        truncated += 1
        targets = np.concatenate([targets[:lt - 1], targets[-1:]])  # keep the EOS
      tokens = np.zeros(width, np.int32)
      tokens[li - len(inputs):li] = inputs
      tokens[li:li + len(targets)] = targets
      mask = np.zeros(width, np.int32)
      mask[li - len(inputs):li + len(targets)] = 1
      items = np.zeros(width, np.int32)
      slots = _placeholder_slots(tokens[:li], placeholder_id)
      given = ex.get("inputs_item_ids", np.zeros(0, np.int32))
      if len(slots) != len(given):
        raise ValueError(f"{where}: {len(slots)} item placeholders in the prompt but {len(given)} "
                         "inputs_item_ids")
      items[slots] = given
      text_w = mask.copy()
      text_w[:li] = 0
      target_item = 0
      if p:
        slots = _placeholder_slots(targets, placeholder_id)
        if len(slots) != 1 or slots[0] != p:
          raise ValueError(f"{where}: the ID placeholder is at {slots.tolist()} of the targets, expected "
                           f"[{p}] (Lumen.id_position)")
        target_item = int(ex["targets_item_ids"][0])
        items[li + p] = target_item
        text_w[li + p] = 0  # scored by the item softmax
      soft_items = np.zeros(max(s0, 1), np.int32)
      soft_rows = np.zeros(max(s0, 1), np.int32)
      if s0:
        # The whole window, not just the items the text prompt kept room for.
        history = ex["history"]
        k = min(len(history), s0)
        user, pos = int(ex["user_id"]), int(ex["position"])
        offsets, flat = interactions
        rows_k = offsets[user] + np.arange(pos - k, pos)
        if pos > offsets[user + 1] - offsets[user] or not np.array_equal(flat[rows_k], history[len(history) - k:]):
          raise ValueError(f"{where}: history does not match user {user}'s interactions before position {pos}")
        soft_items[s0 - k:] = history[len(history) - k:]
        soft_rows[s0 - k:] = rows_k + 1
        mask[s0 - k:s0] = 1
      reference = ex["targets_pretokenized"].decode()
      if p:
        reference = reference.split(" Text: ", 1)[-1]
      for key, value in (("tokens", tokens), ("item_ids", items), ("mask", mask), ("text_weights", text_w),
                         ("item_targets", target_item), ("weights", 1.0), ("soft_items", soft_items),
                         ("soft_rows", soft_rows), ("task", name), ("reference", reference),
                         ("user", int(ex.get("user_id", -1)))):
        rows[key].append(value)
  if not rows:
    raise ValueError(f"no {split} examples in {list(task_names)}")
  out = {k: np.asarray(v) for k, v in rows.items()}
  out["weights"] = out["weights"].astype(np.float32)
  out["item_targets"] = out["item_targets"].astype(np.int32)
  out["truncated_targets"] = truncated
  log.info("%s %s: %d rows, %d targets cut to %d tokens", split, list(task_names), len(out["weights"]),
           truncated, lt)
  return out


def interaction_index(data_dir) -> tuple[np.ndarray, np.ndarray]:
  """(offsets int64 [num_users + 1], items [interactions]): user u's interactions are rows
  offsets[u]:offsets[u + 1] of the flattened sequences (users in id order)."""
  from recjax.data.prepared import PreparedDataset
  table = PreparedDataset(data_dir).sequences(["user_id", "items"])
  users = table.column("user_id").to_numpy()
  if not np.array_equal(users, np.arange(len(users))):
    raise ValueError(f"{data_dir}: sequences are not stored in user-id order")
  items = table.column("items").combine_chunks()
  return (np.asarray(items.offsets, np.int64),
          np.asarray(items.values.to_numpy(zero_copy_only=False), np.int64))


def fusion_tables(data_dir, *, cf_dim: int = 64, wals: str = "wals", embeddings: str = "minilm", log_fn=None) -> dict:
  """Trainer frozen inputs of the soft prompts: "cf" [vocab, cf_dim], the `wals` artifact's
  item vectors (fitted on the training part) scaled to mean norm 1 over real items; "content"
  [1 + interactions, D], the unit-normalised sum of the item text's (the `text_embeddings`
  artifact) and the review's sentence embeddings (row 0 = no interaction; reviews are
  embedded by the same encoder and cached under DIR/text_cache/). Both artifacts are built
  by `recjax fit` (gin/fits/wals.gin, gin/fits/text_embeddings.gin)."""
  from recjax.artifacts import text_embeddings
  from recjax.artifacts import wals as wals_artifact
  from recjax.data.prepared import PreparedDataset
  from recjax.models import wals as wals_lib
  model = wals_artifact.load(data_dir, wals)
  if model.item_factors.shape[1] != cf_dim:
    raise ValueError(f"the wals artifact {wals!r} of {data_dir} has {model.item_factors.shape[1]} dims but the "
                     f"model's cf_dim is {cf_dim}; fit one with --gin.wals_model.WALSConfig.dim={cf_dim}")
  vocab = len(model.item_factors)
  cf = wals_lib.normalize_by_mean_norm(model.item_factors, rows=np.arange(NUM_RESERVED, vocab))
  cf[:NUM_RESERVED] = 0
  item_text, meta = text_embeddings.load(data_dir, embeddings)
  encoder = text_embeddings.load_encoder(meta)
  table = PreparedDataset(data_dir).sequences(["items", "reviews"]).to_pydict()
  flat_items = np.asarray([i for seq in table["items"] for i in seq], np.int64)
  reviews = [str(r or "") for seq in table["reviews"] for r in seq]
  review_emb = _review_embeddings(data_dir, encoder, reviews, log_fn)
  content = item_text[flat_items] + review_emb
  content /= np.maximum(np.linalg.norm(content, axis=-1, keepdims=True), 1e-12)
  content = np.concatenate([np.zeros((1, content.shape[1]), np.float32), content]).astype(np.float32)
  return {"cf": (cf.astype(np.float32), ("item", None)), "content": (content, (None, None))}


def _review_embeddings(data_dir, encoder, reviews: list[str], log_fn) -> np.ndarray:
  """Sentence embeddings of the reviews (empty ones: zeros), each distinct text once, cached."""
  from recjax.artifacts import text_embeddings as te
  unique = sorted(set(r for r in reviews if r.strip()))
  path = pathlib.Path(data_dir) / "text_cache" / f"reviews-{te.strings_key(encoder.fingerprint, unique)}.npy"
  if path.is_file():
    emb = np.load(path)
  else:
    start = time.perf_counter()
    emb = te.embed_by_length(encoder, unique) if unique else np.zeros((0, encoder.dim), np.float32)
    te.save_npy_atomic(path, emb)
    if log_fn:
      log_fn(f"embedded {len(unique):,} distinct reviews with {encoder.name} in "
             f"{time.perf_counter() - start:.0f}s -> {path}")
  index = {r: i for i, r in enumerate(unique)}
  out = np.zeros((len(reviews), encoder.dim), np.float32)
  for i, r in enumerate(reviews):
    if r in index:
      out[i] = emb[index[r]]
  return out


def id_position(task_name: str, vocabulary, placeholder_id: int) -> int:
  """Where "ID: <item>" puts the placeholder in a tokenized LUMEN target (0 if none)."""
  from recjax.data import preprocessors as P
  ids = vocabulary.encode(P.LUMEN_TARGET_TEMPLATE.format(placeholder=P.item_placeholder(vocabulary),
                                                         narrative="x"))
  return ids.index(placeholder_id) if "_lumen_" in task_name else 0


# -- evaluation ---------------------------------------------------------------------------


def evaluate(model: Lumen, net: LumenNetwork, examples: dict, vocabulary, *, encoder=None,
             ks=(10,), batch_size: int = 64, max_new_tokens: int | None = None,
             return_outputs: bool = False, frozen: dict | None = None, text_metrics: bool = True) -> dict:
  """Item metrics (full ranking over the catalogue, nothing excluded: REGEN's setting) and
  narrative metrics per task. LUMEN rows: the item logits after "ID:" rank the catalogue,
  the top item is fed back and the narrative is decoded greedily after it. Narrative rows
  (id_position 0): the narrative is decoded after the prompt. Returns
  {"items": {...}, "narratives": {task: {...}}, "samples": [...]}, plus "generated" (texts)
  and "top_items" [N, max(ks)] with `return_outputs`. `frozen`: the trainer's frozen
  inputs on device (`Trainer.frozen`), for soft prompts."""
  from recjax.evaluation import narratives
  from recjax.evaluation.ranking import RankingMetrics
  p = model.id_position
  prompt_len = model.targets_start + p
  new = max_new_tokens or model.targets_length - p
  graphdef, params = nnx.split(net)

  @jax.jit  # parameters and frozen tables as arguments, not constants baked into the program
  def run(params, frozen, batch):
    net = nnx.merge(graphdef, params)
    x = model.input_vectors(net, dict(batch, frozen=frozen), stop=prompt_len)
    mask = model.attention_mask(batch, prompt_len)
    if p:
      hidden = net.lm.hidden_states(inputs_embeds=x, mask=mask)[:, -1]
      logits = net.item_logits(hidden)
      target = batch["item_targets"]
      score = jnp.take_along_axis(logits, target[:, None], -1)
      rank = jnp.sum(logits >= score, -1) - 1  # pessimistic: ties rank above the target
      top = jax.lax.top_k(logits, max(ks))[1]
      chosen = net.input_vectors(jnp.zeros_like(top[:, :1]), top[:, :1])
      x = jnp.concatenate([x, chosen], 1)
      mask = jnp.concatenate([mask, jnp.ones_like(mask[:, :1])], 1)
    else:
      rank = top = jnp.zeros((x.shape[0], 1), jnp.int32)
    text = gemma.greedy_generate(net.lm, inputs_embeds=x, mask=mask, max_new_tokens=new, eos_id=1, pad_id=0)
    return rank, top, text

  n = len(examples["weights"])
  ranking = RankingMetrics(ks)
  generated, tops = [], []
  start = time.perf_counter()
  for s in range(0, n, batch_size):
    batch = {k: examples[k][s:s + batch_size] for k in model.batch_fields}
    pad = batch_size - len(batch["weights"])
    batch = {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}
    rank, top, text = jax.device_get(run(params, frozen or {}, batch))
    keep = slice(0, batch_size - pad)
    if p:
      ranking.update(rank[keep], valid=batch["weights"][keep] > 0)
      tops.append(top[keep])
    generated += [decode_text(vocabulary, row, strip_prefix=bool(p)) for row in text[keep]]
  out = {"rows": n, "seconds": round(time.perf_counter() - start, 1)}
  if p:
    out["items"] = ranking.result()
  by_task = collections.defaultdict(list)
  for i, task in enumerate(examples["task"]):
    by_task[str(task)].append(i)
  if text_metrics:
    out["narratives"] = {task: narratives.narrative_metrics([generated[i] for i in rows],
                                                            [str(examples["reference"][i]) for i in rows],
                                                            encoder=encoder)
                         for task, rows in sorted(by_task.items())}
  tops = np.concatenate(tops) if tops else None
  out["samples"] = [{"task": str(examples["task"][i]), "generated": generated[i],
                     "reference": str(examples["reference"][i]),
                     **({"top_items": tops[i, :5].tolist()} if tops is not None else {})}
                    for i in range(min(3, n))]
  if return_outputs:
    out["generated"], out["top_items"] = generated, tops
  return out


def decode_text(vocabulary, ids: np.ndarray, *, strip_prefix: bool) -> str:
  """Generated ids up to EOS as text; LUMEN rows drop the "Text:" marker that follows the ID."""
  ids = [int(t) for t in ids]
  ids = ids[:ids.index(1)] if 1 in ids else ids
  text = vocabulary.decode([t for t in ids if t > 1]).strip()
  if strip_prefix and text.startswith("Text:"):
    text = text[len("Text:"):].strip()
  return text


# -- the `recjax lumen` command -----------------------------------------------------------


NARRATIVE_TYPES = ("endorsement", "purchase_reason", "explanation", "brief_summary")
# setting -> (task kind, task suffix, Lumen overrides). The fusion_* settings are "Beyond
# Retrieval" (its Table 1): the narrative tasks with soft prompts and no learned item
# vectors, so collaborative signal reaches the LM only through the soft tokens.
_SOFT = {"soft_tokens": 20}  # every narrative setting: one set of examples serves them all
_FUSION = {**_SOFT, "item_embeddings": False}
SETTING_SPECS = {
    "lumen": ("lumen", "", {}),
    "lumen_no_critiques": ("lumen", "_no_critiques", {}),
    "narrative": ("narrative", "", _SOFT),
    "fusion_text": ("narrative", "", _FUSION),
    "fusion_cf": ("narrative", "", {**_FUSION, "soft_prompt": "cf"}),
    "fusion_content": ("narrative", "", {**_FUSION, "soft_prompt": "content"}),
    "fusion_cf_content": ("narrative", "", {**_FUSION, "soft_prompt": "cf+content"}),
    "fusion_cf_content_linear": ("narrative", "", {**_FUSION, "soft_prompt": "cf+content", "adapter": "linear"}),
}
SETTINGS = tuple(SETTING_SPECS)


def setting_tasks(dataset: str, setting: str, narratives) -> list[str]:
  kind, suffix, _ = SETTING_SPECS[setting]
  return [f"{dataset}_{kind}_{n}{suffix}" for n in narratives]


def adapter_norm_split(model: Lumen, net: LumenNetwork, examples: dict, frozen: dict) -> dict:
  """"Beyond Retrieval" section 6.2 for a linear cf+content adapter: over the test rows'
  soft slots, the norms of W_cf x_cf and W_content x_content and the CF share of their sum."""
  if model.adapter != "linear" or model.soft_parts != ("cf", "content"):
    raise ValueError("the norm split needs a linear adapter over cf+content")
  kernel = np.asarray(net.adapter[0].kernel[...])
  used = examples["soft_items"] > 0
  cf = np.asarray(frozen["cf"])[examples["soft_items"][used]] @ kernel[:model.cf_dim]
  content = np.asarray(frozen["content"])[examples["soft_rows"][used]] @ kernel[model.cf_dim:]
  a, b = np.linalg.norm(cf, axis=-1), np.linalg.norm(content, axis=-1)
  return {"cf_norm": float(a.mean()), "content_norm": float(b.mean()),
          "cf_share": float(np.mean(a / np.maximum(a + b, 1e-12))), "slots": int(used.sum())}


def format_results(results: list[dict]) -> str:
  """One line per (setting, narrative type): item metrics, then narrative metrics."""
  head = f"{'setting':<25} {'narrative':<16} {'R@10':>7} {'NDCG@10':>8} {'MRR':>7} {'BLEU':>6} {'R-1':>6} {'R-2':>6} {'R-L':>6} {'sim':>6}"
  lines = [head, "-" * len(head)]
  for r in results:
    items = r.get("items")
    item_cols = (f"{items['recall@10']:>7.4f} {items['ndcg@10']:>8.4f} {items['mrr']:>7.4f}" if items
                 else f"{'-':>7} {'-':>8} {'-':>7}")
    for task, m in r.get("narratives", {}).items():
      kind = task.split("_lumen_", 1)[-1].split("_narrative_", 1)[-1].replace("_no_critiques", "")
      lines.append(f"{r['setting']:<25} {kind:<16} {item_cols} {m['bleu']:>6.2f} {m['rouge1']:>6.2f} "
                   f"{m['rouge2']:>6.2f} {m['rougeL']:>6.2f} {m.get('similarity', float('nan')):>6.3f}")
  lines.append("(items: LUMEN's ID position, full ranking, nothing excluded; narrative: the true next item given)")
  return "\n".join(lines)


class SentencePieceText:
  """Decodes ids with the tasks' SentencePiece model file alone (no seqio / TensorFlow), so
  training and generation can run where only JAX is installed."""

  def __init__(self, model_file):
    import sentencepiece
    self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))

  def encode(self, text: str) -> list[int]:
    return list(self.sp.encode(text))

  def decode(self, ids) -> str:
    size = self.sp.get_piece_size()
    return self.sp.decode([int(i) for i in ids if 0 <= int(i) < size])


def prepare(data_dir, examples_dir, *, dataset: str = "regen", narratives=NARRATIVE_TYPES,
            settings=SETTINGS, eval_limit: int | None = 500, seed: int = 0, **model_kwargs) -> pathlib.Path:
  """Everything that needs SeqIO / TensorFlow / the sentence encoder, written to
  `examples_dir`: per task kind `KIND.train.npz` / `KIND.test.npz` (compressed), per setting
  its Lumen fields (meta.json), the fusion tables, the SentencePiece model.
  `run(examples_dir)` then needs JAX only."""
  import shutil
  import seqio
  from recjax.data import preprocessors as P
  from recjax.data.prepared import PreparedDataset
  from recjax.tasks import text as text_tasks
  out = pathlib.Path(examples_dir)
  out.mkdir(parents=True, exist_ok=True)
  text_tasks.register(dataset, data_dir)
  vocabulary = P.text_vocabulary(str(PreparedDataset(data_dir).data_dir))
  placeholder = P.item_placeholder_id(vocabulary)
  shutil.copyfile(vocabulary.sentencepiece_model_file, out / "spm.model")
  meta = {"data_dir": str(data_dir), "dataset": dataset, "narratives": list(narratives), "settings": {},
          "data": {}}
  tables = None
  for setting in settings:
    names = setting_tasks(dataset, setting, narratives)
    missing = [n for n in names if n not in seqio.TaskRegistry.names()]
    if missing:
      raise ValueError(f"{data_dir}: no task {missing[0]} (the dataset lacks that narrative or critiques)")
    model = Lumen(vocab_size=vocabulary.vocab_size, num_items=PreparedDataset(data_dir).vocab_size,
                  id_position=id_position(names[0], vocabulary, placeholder),
                  **{**model_kwargs, **SETTING_SPECS[setting][2]})
    if model.soft_parts and tables is None:  # WALS + sentence embeddings: once, shared
      tables = fusion_tables(data_dir, cf_dim=model.cf_dim, log_fn=log.info)
      # float16 storage halves what travels; the model reads float32 (`run`).
      np.savez(out / "fusion_tables.npz", **{k: v[0].astype(np.float16) for k, v in tables.items()})
    kind, suffix, _ = SETTING_SPECS[setting]
    data = f"{kind}{suffix}"  # settings of one task kind share their examples
    if data not in meta["data"]:
      offsets = interaction_index(data_dir) if model.prefix else None
      for split, limit in (("train", None), ("test", eval_limit)):
        ex = build_examples(names, split, model, placeholder_id=placeholder, limit=limit, interactions=offsets)
        _save_examples(out / f"{data}.{split}.npz", ex)
      meta["data"][data] = {"tasks": names, "model": dataclasses.asdict(model)}
    meta["settings"][setting] = {"tasks": names, "data": data, "model": dataclasses.asdict(model)}
  (out / "meta.json").write_text(json.dumps(meta, indent=1))
  return out


def run(examples_dir, *, settings=None, steps: int = 1000, batch_size: int = 32, learning_rate: float = 3e-3,
        log_path=None, seed: int = 0, encoder=None, callback=None, **model_kwargs) -> list[dict]:
  """Trains and evaluates one model per setting from `prepare`'s directory ("lumen": item +
  narrative with critiques in the prompt, "lumen_no_critiques", "narrative": FLARE + LLM's LM
  given the true next item, and the fusion_* soft-prompt ablations of `SETTING_SPECS`).
  `model_kwargs` override the prepared Lumen fields that do not change the data (sizes).
  Narrative metrics need `encoder` (a sentence encoder) or are left to `score`; the
  generated texts are kept in each row's "outputs". `callback(setting, model, test,
  generated, top_items)` sees each setting's outputs (e.g. to show one conversation).
  Returns one row per setting (appended to `log_path` as JSON lines)."""
  from recjax.train.arrays import train_arrays  # the driver's trainer (issue 19 moves LUMEN onto loop.train)
  root = pathlib.Path(examples_dir)
  meta = json.loads((root / "meta.json").read_text())
  vocabulary = SentencePieceText(root / "spm.model")
  results = []
  for setting in settings or list(meta["settings"]):
    if setting not in meta["settings"]:
      raise ValueError(f"{root}: setting {setting!r} was not prepared (prepared: {sorted(meta['settings'])})")
    spec = meta["settings"][setting]
    fields = dict(spec["model"])
    data_fields = ("vocab_size", "num_items", "inputs_length", "targets_length", "id_position", "soft_tokens",
                   "soft_prompt", "item_embeddings", "adapter", "cf_dim", "content_dim")
    clash = [k for k in model_kwargs if k in data_fields and model_kwargs[k] != fields[k]]
    if clash:
      raise ValueError(f"{clash} shape the prepared examples: prepare again to change them")
    model = Lumen(**{**fields, **model_kwargs})
    load = lambda split: _load_examples(root / f"{spec['data']}.{split}.npz")
    train, test = load("train"), load("test")
    frozen = {}
    if model.soft_parts:
      tables = np.load(root / "fusion_tables.npz")
      frozen = {"cf": (tables["cf"].astype(np.float32), ("item", None)),
                "content": (tables["content"].astype(np.float32), (None, None))}
      frozen = {k: frozen[k] for k in model.soft_parts}
    start = time.perf_counter()
    trainer, state, history = train_arrays(model, train, steps=steps, batch_size=batch_size, seed=seed,
                                                learning_rate=learning_rate, warmup_steps=min(100, steps // 10),
                                                frozen_inputs=frozen)
    train_s = time.perf_counter() - start
    net = trainer.network(state.params)
    scores = evaluate(model, net, test, vocabulary, encoder=encoder, frozen=trainer.frozen, return_outputs=True,
                      text_metrics=encoder is not None)
    if model.adapter == "linear" and model.soft_parts == ("cf", "content"):
      scores["norm_split"] = adapter_norm_split(model, net, test, {k: v[0] for k, v in frozen.items()})
    generated, top_items = scores.pop("generated"), scores.pop("top_items")
    if callback:
      callback(setting, model, test, generated, top_items)
    row = {"setting": setting, "tasks": spec["tasks"], "train_rows": len(train["weights"]),
           "test_rows": len(test["weights"]), "steps": steps, "batch_size": batch_size,
           "train_seconds": round(train_s, 1), "seconds_per_step": round(train_s / steps, 4),
           "final_loss": history[-1]["loss"], "device": str(jax.devices()[0].device_kind),
           "model": dataclasses.asdict(model), **scores,
           "outputs": [{"task": str(t), "generated": g, "reference": str(r)}
                       for t, g, r in zip(test["task"], generated, test["reference"])]}
    log.info("lumen %s: %s", setting, {k: row[k] for k in ("items", "train_seconds") if k in row})
    results.append(row)
    if log_path:
      _append(log_path, row)
  return results


def conversation(model: Lumen, test: dict, row: int, vocabulary, generated: str, top_items, titles) -> str:
  """One test row as a conversation: the prompt (history, critique), the recommended items
  and the generated narrative, next to the held-out item and the reference."""
  li = model.targets_start
  prompt = vocabulary.decode([t for t in test["tokens"][row, model.prefix:li] if t > 1])
  truth = int(test["item_targets"][row])
  lines = [f"prompt: {prompt}", "recommended (top 5):"]
  lines += [f"  {'*' if int(i) == truth else ' '} {int(i):>6}  {titles.get(int(i), '?')}" for i in top_items[:5]]
  lines += [f"generated: {generated}", f"held-out item: {truth}  {titles.get(truth, '?')}",
            f"reference: {test['reference'][row]}"]
  return "\n".join(lines)


def score(rows: list[dict], encoder) -> list[dict]:
  """Narrative metrics per task from each row's kept "outputs" (rows from `run`)."""
  from recjax.evaluation import narratives
  for row in rows:
    by_task = collections.defaultdict(lambda: ([], []))
    for o in row["outputs"]:
      by_task[o["task"]][0].append(o["generated"])
      by_task[o["task"]][1].append(o["reference"])
    row["narratives"] = {t: narratives.narrative_metrics(g, r, encoder=encoder) for t, (g, r) in sorted(by_task.items())}
  return rows


# Narrow storage: the examples travel (e.g. to an accelerator machine) and are mostly padding.
_STORE = {"tokens": np.uint16, "item_ids": np.uint16, "mask": np.uint8, "text_weights": np.uint8,
          "item_targets": np.uint16, "soft_items": np.uint16, "soft_rows": np.int32}


def _save_examples(path, ex: dict) -> None:
  for k, dtype in _STORE.items():
    if np.iinfo(dtype).max < ex[k].max(initial=0):
      raise ValueError(f"{k} values up to {ex[k].max()} do not fit {np.dtype(dtype).name}")
  np.savez_compressed(path, **{k: v.astype(_STORE[k]) if k in _STORE else v for k, v in ex.items()})


def _load_examples(path) -> dict:
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k].astype(np.int32) if k in _STORE else f[k] for k in f.files}


def _append(path, row: dict) -> None:
  pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a") as f:
    f.write(json.dumps(row, default=float) + "\n")
