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

They train on the preference tasks over semantic IDs (tasks/semantic_ids.py) through the
gin trainer (gin/models/mender_{emb,tok}.gin, experiments/mender_*_synthetic.gin) and are
evaluated by the preference_axes evaluator (the benchmark's five axes).
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models import base
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

  batch_fields = ("history", "preferences", "decoder_target_tokens", "weights", "sign")

  @property
  def encoder_length(self) -> int:
    return self.num_preferences + self.max_items

  def task_feature_lengths(self) -> dict[str, int]:
    # The history's tokens are converted (and unused: the memory reads item ids).
    return {"inputs": self.max_items * self.id_length, "targets": self.id_length}

  def feature_converter(self, pack: bool = False, seed: int = 0):
    """A preference task's rows: TIGER's, + history item ids, preference ids and sign."""
    del pack, seed
    from recjax.data.converters import PreferenceConverter
    return PreferenceConverter(max_items=self.max_items, num_preferences=self.num_preferences,
                               input_unit=self.id_length, start_token=tiger.START_TOKEN)

  eval_feature_converter = feature_converter

  @staticmethod
  def frozen_input_specs() -> dict:
    """What it reads beside the batch, as the task provides it: item text embeddings and
    preference embeddings (the benchmark's) and every item's semantic-ID tokens."""
    return {"item_text": base.TaskArray("item_embeddings", ("item", None)),
            "pref_text": base.TaskArray("preference_embeddings", (None, None)),
            "item_tokens": base.TaskArray("semantic_id_tokens", ("item", None))}

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
    # Table rows are item ids (the item_text / item_tokens rows); padding is id 0.
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
    targets = batch["decoder_target_tokens"]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    # Row weights: the array driver's "weights", else 1 on rows with a target (not padding).
    w = batch["weights"] if "weights" in batch else jnp.max(batch["decoder_loss_weights"], axis=1)
    w = w.astype(jnp.float32)
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

  batch_fields = ("text", "decoder_target_tokens", "weights", "sign")
  loss_fn = MenderEmb.loss_fn  # same signed objective: uses only logits and negative_weight

  @property
  def encoder_length(self) -> int:
    return self.text_length

  task_feature_lengths = MenderEmb.task_feature_lengths

  def feature_converter(self, pack: bool = False, seed: int = 0):
    """A preference task's rows; "text" indexes the task's preference texts."""
    del pack, seed
    from recjax.data.converters import PreferenceConverter
    return PreferenceConverter(max_items=self.max_items, num_preferences=self.num_preferences,
                               input_unit=self.id_length, start_token=tiger.START_TOKEN)

  eval_feature_converter = feature_converter

  def frozen_input_specs(self) -> dict:
    """The frozen encoder's token states of every preference text of the task (cached)."""
    return {"tok": base.StringStates("preference_texts", encoder=self.text_encoder, length=self.text_length,
                                     cache_dir=self.text_cache_dir)}

  def finish_frozen(self, arrays: dict) -> dict:
    states, mask = arrays["tok"], arrays["tok_mask"]
    self.text_dim = int(states.shape[-1])
    return self.frozen_tables(states, mask)

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
