"""FLARE: Bert4Rec fused with a frozen language encoder (Hebert et al. 2024), as a recjax model.

Each position k of a (packed) item sequence gets

    c_k = e_k + Linear(flatten(Perceiver([LLM(T_k) + theta_T ; LLM(S_k) + theta_S])))

where e_k is the item-ID embedding, T_k the item's text and S_k the critique given with
that step (category path or REGEN request; absent for plain item tasks). The Perceiver
resampler's learned latents cross-attend to the frozen encoder's token states (padded
tokens masked) and are flattened and projected to the model width. At masked positions
the ID and the item text are replaced by mask embeddings; the critique stays visible, so
at evaluation the target's critique steers the prediction at the [MASK].

Loss = alpha * cloze + (1 - alpha) * InfoNCE(ID embedding, fused text vector) over
in-batch items (cosine, temperature, additive margin on positives, duplicates masked),
in float32.

The encoder is frozen, so its token states for every item text and critique string are
computed once and cached on disk (recjax.models.text.cache); `frozen_inputs` hands them
to the trainer, which places them on the devices once and gathers rows by id inside the
step. Nothing of the encoder runs in the step.

Efficiency: the first cross-attention's queries are the learned latents, the same for
every position, so q.W_k is folded into a [latents*heads, D_text] matrix and the keys and
values are never materialised per position: logits = X.(W_k q) and the output is
(softmax.X).W_v. This is exact (key biases cancel in the softmax; value biases add after
the weighted sum) and is ~6x fewer FLOPs than projecting every token of every position.

Ablations (gin): use_text=False (Flare ID: a tuned Bert4Rec), use_perceiver=False (mean
pooled encoder output), alpha=1.0 (no contrastive loss), causal=True (no bidirectional
attention). `FlareSASRec` is the same fusion trained as SASRec+ (next item at every position).
"""

from __future__ import annotations

import dataclasses
import math
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models import base
from recjax.models import bert4rec
from recjax.models import layers
from recjax.models import sasrec

MASK_ID = bert4rec.MASK_ID
# Items per step of `Flare.inference_frozen` (bounds its gathered token states: at 24 x 384
# float32, 4,096 items are 151 MB).
CONTEXT_CHUNK = 4096


class Rows(typing.NamedTuple):
  """Token states gathered by id: table [V, T, Dt], ids [B, L] -> [B, L, T, Dt]."""

  table: jax.Array
  ids: jax.Array

  def gather(self, dtype):
    return self.table[self.ids].astype(dtype)


def _project_rows(part: Rows, mode: str, max_rows: int) -> bool:
  """Whether to project the whole table through the folded keys / values and gather the
  (much narrower) results, instead of gathering [B, L, T, Dt] states: worth it for small
  tables (small catalogues, critique tables), whose projection costs less than moving the
  gathered states, the largest tensor of the step. Decided on the table alone, never on
  the batch, so training, evaluation and an export (symbolic batch) compute alike."""
  if mode not in ("auto", "always", "never"):
    raise ValueError(f"project_tables must be 'auto', 'always' or 'never', got {mode!r}")
  return mode == "always" or (mode == "auto" and part.table.shape[0] <= max_rows)


class PerceiverLayer(nnx.Module):
  """Pre-LN latent cross-attention to frozen token states + MLP, in the folded form."""

  def __init__(self, dim: int, text_dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype, dropout: float):
    if dim % num_heads:
      raise ValueError(f"perceiver_dim {dim} is not divisible by perceiver_heads {num_heads}")
    self.num_heads, self.head_dim, self.dtype = num_heads, dim // num_heads, dtype
    init = nnx.initializers.truncated_normal(0.02)
    self.norm = layers.layer_norm(dim, rngs=rngs, eps=1e-6)
    self.query = layers.dense(dim, dim, ("latents_embed", "heads"), rngs=rngs, dtype=dtype, use_bias=False)
    self.key = nnx.Param(layers.param_init(init, "text_embed", "heads")(rngs.params(), (text_dim, dim)))
    self.value = nnx.Param(layers.param_init(init, "text_embed", "heads")(rngs.params(), (text_dim, dim)))
    self.value_bias = nnx.Param(layers.param_init(nnx.initializers.zeros_init(), "heads")(rngs.params(), (dim,)))
    self.out = layers.dense(dim, dim, ("heads", "latents_embed"), rngs=rngs, dtype=dtype)
    self.mlp_norm = layers.layer_norm(dim, rngs=rngs, eps=1e-6)
    self.mlp = layers.MLP(dim, 2 * dim, rngs=rngs, dtype=dtype, dropout=dropout)
    self.dropout = nnx.Dropout(dropout)

  def __call__(self, latents, parts, *, deterministic: bool, rngs=None, project_tables: str = "auto",
               project_max_rows: int = 4096):
    """Latents attend to the tokens of all `parts` together (one softmax).

    latents: [n, Dp] (the learned latents, the same at every position) or [B, L, n, Dp].
    parts: a list of (states, mask, theta): states [B, L, T, Dt] frozen token states,
      [T, Dt] tokens shared by every position, or `Rows(table, ids)` (gathered by id);
      mask [B, L, T] (False = absent); theta [Dt] the part's type embedding, added to each
      of its tokens. The sum states + theta is never formed: theta's logit term is
      q.W_k.theta and its value term is the attention mass on the part times theta.W_v.
    project_tables, project_max_rows: for `Rows` parts under shared latents, "always",
      "never", or "auto" (tables of at most project_max_rows rows) compute table.(W_k q)
      [V, h, n, T] and table.W_v [V, T, h, hd] once and gather those (see
      `_project_rows`); exact either way.
    Returns [B, L, n, Dp].
    """
    h, hd, dt = self.num_heads, self.head_dim, self.dtype
    b, l = parts[0][1].shape[:2]
    q = self.query(self.norm(latents)).reshape(*latents.shape[:-1], h, hd)
    wk = self.key[...].astype(dt).reshape(-1, h, hd)
    wv = self.value[...].astype(dt).reshape(-1, h, hd)
    # Fold W_k into the queries: [h, n, Dt] (shared latents) or [B, L, h, n, Dt].
    qk = jnp.einsum("...nhd,Dhd->...hnD", q, wk)
    # Rows parts: projected tables (values kept per part) or gathered states.
    projected = {}
    resolved = []
    for i, (states, mask, theta) in enumerate(parts):
      if isinstance(states, Rows):
        if qk.ndim == 3 and _project_rows(states, project_tables, project_max_rows):
          table = states.table.astype(dt)
          projected[i] = (jnp.einsum("vtD,hnD->vhnt", table, qk)[states.ids],
                          jnp.einsum("vtD,Dhd->vthd", table, wv)[states.ids])
        else:
          states = states.gather(dt)
      resolved.append((states, mask, theta))
    parts = resolved
    logits = []
    for i, (states, mask, theta) in enumerate(parts):
      if i in projected:
        lg = projected[i][0]
      elif states.ndim == 2:
        lg = jnp.einsum("tD,...hnD->...hnt", states.astype(dt), qk)
      elif qk.ndim == 3:
        lg = jnp.einsum("bltD,hnD->blhnt", states, qk)
      else:
        lg = jnp.einsum("bltD,blhnD->blhnt", states, qk)
      lg = lg + jnp.einsum("D,...hnD->...hn", theta.astype(dt), qk)[..., None]
      lg = jnp.broadcast_to(lg, (b, l, h, lg.shape[-2], lg.shape[-1])).astype(jnp.float32)
      logits.append(jnp.where(mask[:, :, None, None, :], lg, jnp.finfo(jnp.float32).min))
    logits = jnp.concatenate(logits, axis=-1) / math.sqrt(hd)
    present = jnp.concatenate([m for _, m, _ in parts], axis=-1)[:, :, None, None, :]
    # A position with no tokens at all (padding) attends to nothing and gets zeros.
    probs = jnp.where(present.any(-1, keepdims=True), jax.nn.softmax(logits, axis=-1), 0.0)
    probs = self.dropout(probs, deterministic=deterministic, rngs=rngs).astype(dt)
    pooled, attended, start = 0.0, 0.0, 0
    for i, (states, mask, theta) in enumerate(parts):
      p = probs[..., start:start + mask.shape[-1]]
      start += mask.shape[-1]
      if i in projected:  # values already through W_v
        attended += jnp.einsum("blhnt,blthd->blnhd", p, projected[i][1])
      elif states.ndim == 2:
        pooled += jnp.einsum("blhnt,tD->blhnD", p, states.astype(dt))
      else:
        pooled += jnp.einsum("blhnt,bltD->blhnD", p, states)
      pooled += p.sum(-1)[..., None] * theta.astype(dt)
    attended += jnp.einsum("blhnD,Dhd->blnhd", pooled, wv)
    # The value bias, weighted by the total attention mass (0 where nothing was attended).
    attended += jnp.einsum("blhn,hd->blnhd", probs.sum(-1), self.value_bias[...].astype(dt).reshape(h, hd))
    x = latents if latents.ndim == 4 else jnp.broadcast_to(latents, (b, l, *latents.shape)).astype(dt)
    x = x + self.dropout(self.out(attended.reshape(b, l, -1, h * hd)), deterministic=deterministic, rngs=rngs)
    return x + self.mlp(self.mlp_norm(x).astype(dt), deterministic=deterministic, rngs=rngs)


class FlareNetwork(bert4rec.Bert4RecNetwork):
  """Bert4Rec plus the text/critique fusion (absent when use_text=False)."""

  def __init__(self, *, text_dim: int, use_text: bool, use_perceiver: bool, num_latents: int,
               perceiver_layers: int, perceiver_heads: int, perceiver_dim: int, rngs: nnx.Rngs,
               project_tables: str = "auto", project_max_rows: int = 4096, output_text: bool = False,
               fuse_init_std: float = 0.02, **kwargs):
    super().__init__(rngs=rngs, **kwargs)
    self.use_text, self.use_perceiver = use_text, use_perceiver
    self.project_tables, self.project_max_rows = project_tables, project_max_rows
    if not use_text:
      return
    dim, dtype = kwargs["dim"], kwargs["dtype"]
    # output_text: the output table adds a projection of each item's sentence embedding to
    # its ID embedding, so a query can reach items by what their text says (a critique's
    # category) and not only through the IDs the history co-occurred with.
    self.text_out = layers.dense(text_dim, dim, ("text_embed", "embed"), rngs=rngs, dtype=jnp.float32,
                                 use_bias=False) if output_text else None
    init = nnx.initializers.truncated_normal(0.02)
    # theta_T, theta_S: the item-text and critique type embeddings; and the learned token
    # that stands in for the item text at masked positions.
    self.text_types = nnx.Param(layers.param_init(init, None, "text_embed")(rngs.params(), (2, text_dim)))
    self.text_mask_token = nnx.Param(layers.param_init(init, "text_embed")(rngs.params(), (text_dim,)))
    if use_perceiver:
      self.latents = nnx.Param(layers.param_init(init, "latents", "latents_embed")(
          rngs.params(), (num_latents, perceiver_dim)))
      self.perceiver = nnx.List([
          PerceiverLayer(perceiver_dim, text_dim, perceiver_heads, rngs=rngs, dtype=dtype,
                         dropout=kwargs["attention_dropout"]) for _ in range(perceiver_layers)])
      self.perceiver_norm = layers.layer_norm(perceiver_dim, rngs=rngs, eps=1e-6)
      self.fuse = layers.dense(num_latents * perceiver_dim, dim, ("latents_embed", "embed"), rngs=rngs, dtype=dtype,
                               std=fuse_init_std)
    else:
      self.fuse = layers.dense(text_dim, dim, ("text_embed", "embed"), rngs=rngs, dtype=dtype, std=fuse_init_std)

  def text_context(self, inputs, critiques, frozen, *, deterministic: bool, rngs=None):
    """The fused text vector [B, L, D] of every position (before adding e_k)."""
    dt = self.dtype
    if not self.use_perceiver:  # ablation: the mean of the (typed) token states
      return self.fuse(pooled_text(inputs, critiques, frozen, self.text_mask_token[...], self.text_types[...], dt))
    is_mask = inputs == MASK_ID
    # Rows PAD and MASK of the item-text table are empty; a masked position sees one
    # learned token in place of its item's text.
    parts = [(Rows(frozen["item_text"], inputs), frozen["item_text_mask"][inputs], self.text_types[0]),
             (self.text_mask_token[...][None], is_mask[..., None], self.text_types[0])]
    if critiques is not None and "critique_text" in frozen:
      crit_mask = frozen["critique_text_mask"][critiques] & (critiques > 0)[..., None]
      parts.append((Rows(frozen["critique_text"], critiques), crit_mask, self.text_types[1]))
    x = self.latents[...].astype(dt)
    for layer in self.perceiver:
      x = layer(x, parts, deterministic=deterministic, rngs=rngs, project_tables=self.project_tables,
                project_max_rows=self.project_max_rows)
    x = self.perceiver_norm(x).astype(dt)
    return self.fuse(x.reshape(*x.shape[:2], -1))


@dataclasses.dataclass
class Flare(bert4rec.Bert4Rec):
  """FLARE hyper-parameters; everything not listed is Bert4Rec's (bert4rec.Bert4Rec)."""

  use_text: bool = True
  use_perceiver: bool = True
  text_encoder: str = "minilm"  # "minilm" (bundled) or a Hugging Face BERT / T5 checkpoint directory
  item_text_length: int = 24  # tokens of item text kept per item
  # Which item fields make the text, in order (recjax.models.text.cache.item_texts): title,
  # brand, categories, description (FLARE's own text has the description too).
  item_text_fields: tuple[str, ...] = ("title", "brand", "categories")
  critique_length: int = 32  # tokens kept per critique string (category paths: up to ~29)
  text_cache_dir: str | None = None  # default: <prepared dataset>/text_cache
  num_latents: int = 4
  perceiver_layers: int = 1
  perceiver_heads: int = 2
  perceiver_dim: int = 64
  alpha: float = 0.5  # weight of the cloze loss; 1 - alpha on the ID-text InfoNCE
  temperature: float = 0.3
  margin: float = 0.2
  contrastive_positions: int = 512  # in-batch positions sampled for the InfoNCE
  text_dim: int = 0  # set from the encoder by frozen_inputs (0 when use_text=False)
  # Text tables of at most project_max_rows rows go through the folded keys / values once
  # per step instead of being gathered per position ("auto"); "always" / "never".
  project_tables: str = "auto"
  project_max_rows: int = 4096
  # Score against e_k + W s_k (s_k: the item text's mean-pooled, normalised encoder states)
  # instead of e_k alone; the ID-text InfoNCE still aligns e_k itself.
  output_text: bool = False
  # Initial std of the fusion's output projection. At 0.02 the fused text vector starts
  # ~14x the item-ID embedding (RMS 0.25 vs 0.018 per dim) and swamps it in the input's
  # layer norm; 0.0 starts the network as its ID-only counterpart and lets the text grow in.
  fuse_init_std: float = 0.02

  def __post_init__(self):
    super().__post_init__()
    if self.fuse_init_std < 0:
      raise ValueError(f"Flare.fuse_init_std must be >= 0, got {self.fuse_init_std}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"Flare.alpha must be in [0, 1], got {self.alpha}")
    if self.temperature <= 0:
      raise ValueError(f"Flare.temperature must be positive, got {self.temperature}")
    if self.project_tables not in ("auto", "always", "never"):
      raise ValueError(f"Flare.project_tables must be 'auto', 'always' or 'never', got {self.project_tables!r}")
    if self.output_text and not self.use_text:
      raise ValueError("Flare.output_text needs the item text: set use_text=True or output_text=False")

  def network(self, rngs: nnx.Rngs) -> FlareNetwork:
    if self.use_text and self.text_dim <= 0:
      raise ValueError("Flare.text_dim is unset: fetch its frozen inputs first (recjax.train.frozen sets it; "
                       "the trainer does), or pass text_dim")
    return FlareNetwork(**self.network_kwargs(), text_dim=self.text_dim, use_text=self.use_text,
                        use_perceiver=self.use_perceiver, num_latents=self.num_latents,
                        perceiver_layers=self.perceiver_layers, perceiver_heads=self.perceiver_heads,
                        perceiver_dim=self.perceiver_dim, project_tables=self.project_tables,
                        project_max_rows=self.project_max_rows, output_text=self.output_text,
                        fuse_init_std=self.fuse_init_std, rngs=rngs)

  # -- frozen text states ---------------------------------------------------------------

  def frozen_input_specs(self) -> dict:
    """The cached token states of every item text (and critique string, for critique tasks),
    and Bert4Rec's (a sampled loss's item counts)."""
    specs = super().frozen_input_specs()
    if self.use_text:
      specs["item_text"] = base.ItemTextStates(encoder=self.text_encoder, item_length=self.item_text_length,
                                               critique_length=self.critique_length, rows=self.padded_vocab_size,
                                               cache_dir=self.text_cache_dir,
                                               item_fields=tuple(self.item_text_fields))
    return specs

  def finish_frozen(self, arrays: dict) -> dict:
    """{name: (array, axes)}: sets `text_dim` from the states; adds the item sentences."""
    arrays = dict(arrays)
    popularity = super().finish_frozen({k: arrays.pop(k) for k in ("item_counts",) if k in arrays})
    if not self.use_text:
      return popularity
    return {**popularity, **self._finish_text(arrays)}

  def _finish_text(self, arrays: dict) -> dict:
    self.text_dim = int(arrays["item_text"].shape[-1])
    arrays = dict(arrays)
    arrays["item_text"][:bert4rec.NUM_RESERVED] = 0.0  # PAD and MASK have no text
    arrays["item_text_mask"][:bert4rec.NUM_RESERVED] = False
    if self.output_text:
      arrays["item_sentence"] = sentence_table(arrays["item_text"], arrays["item_text_mask"])
    if not self.use_perceiver:
      # The pooled fusion reads per-row token sums only (pooled_text): the [V, T, Dt]
      # token states never reach the device, and a step gathers T times less.
      for name in ("item_text", "critique_text"):
        if name in arrays:
          arrays[f"{name}_sum"], arrays[f"{name}_count"] = token_sums(arrays.pop(name), arrays.pop(f"{name}_mask"))
    axes = {"item_text": ("item", None, None), "item_text_mask": ("item", None),
            "critique_text": (None, None, None), "critique_text_mask": (None, None),
            "item_text_sum": ("item", None), "item_text_count": ("item",),
            "critique_text_sum": (None, None), "critique_text_count": (None,),
            "item_sentence": ("item", None)}
    return {k: (v, axes[k]) for k, v in arrays.items()}

  # -- model protocol --------------------------------------------------------------------

  def output_table(self, net: FlareNetwork, frozen=None):
    table, bias = net.item_table()
    if not self.output_text:
      return table, bias
    if not frozen or "item_sentence" not in frozen:
      raise ValueError("Flare.output_text scores against the item sentences: pass the frozen inputs "
                       "(Flare.finish_frozen builds 'item_sentence')")
    return table + net.text_out(frozen["item_sentence"].astype(jnp.float32)), bias

  def inference_frozen(self, net: FlareNetwork, frozen: dict) -> dict:
    """{"item_context": [V, D]}: every item's fused text vector, computed once per parameter
    set. Without critiques and dropout a position's text vector depends on its item id
    alone, so ranking gathers rows of this table instead of running the Perceiver at
    every position: 376K items instead of 1.2M users x 50 positions at Clothing scale."""
    if not self.use_text:
      return {}
    rows = frozen["item_text" if self.use_perceiver else "item_text_sum"].shape[0]
    chunk = min(CONTEXT_CHUNK, rows)
    ids = jnp.arange(-(-rows // chunk) * chunk, dtype=jnp.int32) % rows  # wrapped ids pad the last chunk
    context = jax.lax.map(lambda c: net.text_context(c[:, None], None, frozen, deterministic=True)[:, 0],
                          ids.reshape(-1, chunk))
    return {"item_context": context.reshape(-1, context.shape[-1])[:rows]}

  def _context(self, net: FlareNetwork, batch, *, deterministic: bool, rngs=None):
    if not self.use_text:
      return None
    critiques = batch.get("critiques")
    if deterministic and critiques is None and "item_context" in batch["frozen"]:
      return batch["frozen"]["item_context"][batch["inputs"]]
    return net.text_context(batch["inputs"], critiques, batch["frozen"], deterministic=deterministic, rngs=rngs)

  def hidden(self, net, batch, *, deterministic: bool, rngs=None):
    context = self._context(net, batch, deterministic=deterministic, rngs=rngs)
    return net.encode(batch["inputs"], batch["segment_ids"], self.positions(batch),
                      deterministic=deterministic, rngs=rngs, extra=context, item_rows=batch.get("item_rows"))

  def item_ids(self, batch, rng):
    """Bert4Rec's (inputs cover the InfoNCE's ID embeddings), with the negatives of
    `loss_fn`'s stream; None with `output_text`, whose output table mixes every item's
    sentence into the IDs (the whole table is read)."""
    if rng is None or self.train_loss != "sampled" or self.output_text:
      return None
    return self._item_ids(batch, _negatives_rng(rng))

  def loss_fn(self, net: FlareNetwork, batch, rng):
    deterministic = rng is None
    rngs = None if deterministic else nnx.Rngs(dropout=rng)
    context = self._context(net, batch, deterministic=deterministic, rngs=rngs)
    hidden = net.encode(batch["inputs"], batch["segment_ids"], self.positions(batch),
                        deterministic=deterministic, rngs=rngs, extra=context, item_rows=batch.get("item_rows"))
    # A sampled loss draws its negatives from a stream of its own.
    neg_rng = None if deterministic else _negatives_rng(rng)
    cloze, metrics = self.cloze_loss(net, hidden, batch, neg_rng)
    if context is None or self.alpha == 1.0:
      return cloze, metrics
    nce, count = self.contrastive_loss(net, context, batch, rng)
    metrics = dict(metrics, contrastive_sum=nce * count, contrastive_count=count)
    return self.alpha * cloze + (1.0 - self.alpha) * nce, metrics

  def contrastive_loss(self, net: FlareNetwork, context, batch, rng):
    """Symmetric InfoNCE between the ID embedding and the fused text vector of in-batch
    items at unmasked positions; cosine / temperature, margin subtracted from positives,
    other occurrences of the same item never serve as negatives. Float32."""
    inputs = batch["inputs"].reshape(-1)
    eligible = (batch["segment_ids"].reshape(-1) > 0) & (inputs != MASK_ID)
    n = min(self.contrastive_positions, inputs.shape[0])
    # A random subset of the eligible positions (a fixed one at evaluation).
    noise = jax.random.uniform(rng, inputs.shape) if rng is not None else jnp.zeros(inputs.shape)
    _, index = jax.lax.top_k(jnp.where(eligible, noise, -1.0), n)
    valid = eligible[index]
    ids = inputs[index]
    table, _ = net.item_table(batch.get("item_rows"))
    a = _normalize(table[ids].astype(jnp.float32))
    b = _normalize(context.reshape(-1, context.shape[-1])[index].astype(jnp.float32))
    cos = a @ b.T
    same = ids[:, None] == ids[None, :]
    diag = jnp.eye(n, dtype=bool)
    logits = (cos - self.margin * diag) / self.temperature
    keep = (~same | diag) & valid[:, None] & valid[None, :]
    logits = jnp.where(keep, logits, -1e9)
    rows = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
    cols = jax.nn.logsumexp(logits, axis=0) - jnp.diagonal(logits)
    w = valid.astype(jnp.float32)
    count = jnp.maximum(w.sum(), 1.0)
    return 0.5 * jnp.sum((rows + cols) * w) / count, w.sum()


@dataclasses.dataclass
class FlareSASRec(sasrec.SASRec, Flare):
  """FLARE's text fusion under SASRec+'s objective: causal attention, the next item as the
  target at every position, full-catalogue cross-entropy plus FLARE's ID-text InfoNCE.

  Each input position carries its own item's ID and fused text vector (there are no
  masked inputs), so the text reaches every prefix of every sequence in one pass, where
  the cloze model sees it through ~20% of the positions. Everything else is Flare's
  (text tables, Perceiver, contrastive loss, per-item vectors at evaluation) or SASRec's
  (converter, query at the last history item). use_text=False is SASRec+ itself.
  """

  def _context(self, net: FlareNetwork, batch, *, deterministic: bool, rngs=None):
    if batch.get("critiques") is not None:
      # The critique given with the target sits at the [MASK], which a causal query at the
      # last history item never reads: the model would be silently unconditioned.
      raise ValueError("FlareSASRec cannot condition on critiques (its causal query never reads the "
                       "target step's critique); train critique tasks with flare.Flare")
    return super()._context(net, batch, deterministic=deterministic, rngs=rngs)


def pooled_text(inputs, critiques, frozen: dict, mask_token, types, dtype):
  """[B, L, Dt]: the mean of every text token a position reads (its item's; the learned
  mask token at a [MASK]; its critique's), each plus its type embedding (theta_T, theta_S).
  It reads the per-row token sums and counts of `token_sums`, so a step gathers [B, L, Dt]
  instead of the [B, L, T, Dt] token states."""
  item_n = frozen["item_text_count"][inputs].astype(dtype)[..., None]
  is_mask = (inputs == MASK_ID).astype(dtype)[..., None]
  count = item_n + is_mask
  total = frozen["item_text_sum"][inputs].astype(dtype) + is_mask * mask_token.astype(dtype) + count * types[0].astype(dtype)
  if critiques is not None and "critique_text_sum" in frozen:
    given = (critiques > 0).astype(dtype)[..., None]
    crit_n = given * frozen["critique_text_count"][critiques].astype(dtype)[..., None]
    total += given * frozen["critique_text_sum"][critiques].astype(dtype) + crit_n * types[1].astype(dtype)
    count += crit_n
  return total / jnp.maximum(count, 1.0)


def token_sums(states: np.ndarray, mask: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
  """([V, Dt], [V]) float32: each row's sum over its real tokens, and their number.
  Chunked: the float32 copy of a memory-mapped [V, T, Dt] cache never exists at once."""
  sums = np.zeros((states.shape[0], states.shape[-1]), np.float32)
  counts = np.zeros(states.shape[0], np.float32)
  for start in range(0, states.shape[0], chunk):
    w = np.asarray(mask[start:start + chunk], np.float32)
    sums[start:start + chunk] = np.einsum("vtd,vt->vd", np.asarray(states[start:start + chunk], np.float32), w)
    counts[start:start + chunk] = w.sum(1)
  return sums, counts


def sentence_table(states: np.ndarray, mask: np.ndarray, chunk: int = 1024) -> np.ndarray:
  """[V, Dt] float32: each row's mean over its real tokens, L2-normalised (the
  sentence-transformers pooling); rows without tokens (PAD, MASK, padding) are zero."""
  sums, counts = token_sums(states, mask, chunk)
  mean = sums / np.maximum(counts[:, None], 1.0)
  norm = np.linalg.norm(mean, axis=-1, keepdims=True)
  return np.where(norm > 0, mean / np.maximum(norm, 1e-12), 0.0).astype(np.float32)


def _negatives_rng(rng):
  return jax.random.fold_in(rng, 0x5A3)


def _normalize(x, eps: float = 1e-6):
  return x / jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)
