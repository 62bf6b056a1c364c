"""ReAT ("Aligning Large Language Models with Recommendation Knowledge", Cao et al. 2024):
a T5-family encoder-decoder fine-tuned text-to-text on recommendation tasks.

The tasks and mixtures are the SeqIO ones of `recjax.tasks.text` (DS_reat_retrieval,
_ranking, _rating, _mim, _mlm, _bpr; mixtures DS_reat, DS_raat, DS_rpat, DS_ut, DS_ut_at).
The backbone is `t5_seq2seq.T5EncoderDecoder`: T5 v1.1-style (gated-GELU, untied head)
from scratch at the sizes given here, or a Hugging Face T5 / Flan-T5 checkpoint
(`pretrained`). A checkpoint brings its own SentencePiece model: the tasks must then be
registered with it (gin: `text_vocabulary_options.spm_model = 'CKPT/spiece.model'`); a
different one is an error. Extra ids the checkpoint lacks (seqio adds 100 sentinels) get
freshly initialised embedding rows.

The model contract (recjax/models/base.py): trains through `recjax train` on packed rows of
seqio's `EncDecFeatureConverter` (the network keeps packed examples apart: segment-masked
attention, per-segment relative positions); evaluated by the `reat` evaluator
(recjax/evaluation/reat.py: beams parsed back to items for retrieval / ranking, AUC-ROC of
log p(yes) - log p(no) for rating) on `TextEvalConverter` rows. gin: gin/models/reat.gin,
gin/experiments/reat_synthetic.gin, reat_beauty.gin.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models.text import checkpoint as ckpt
from recjax.models.text import t5_seq2seq as s2s

log = logging.getLogger("recjax.reat")

LIKE, DISLIKE = "yes", "no"  # the rating targets (preprocessors.LIKE / DISLIKE; no TensorFlow here)
RANKING_CANDIDATES = 100  # a ranking row's candidates: preprocessors.NUM_NEGATIVES + 1


@functools.lru_cache(maxsize=4)
def _checkpoint(path: str):
  """(config, numpy Param state) of a checkpoint. Eager even when first asked for inside a
  trace (the trainer builds the network under eval_shape / jit): nothing traced is cached."""
  with jax.ensure_compile_time_eval():
    model = s2s.load_t5(path).model
    return model.config, jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@dataclasses.dataclass
class Reat:
  """ReAT hyper-parameters and the model contract."""

  vocab_size: int = 0  # the tasks' vocabulary (SentencePiece + extra ids)
  spm_model: str = ""  # the tasks' SentencePiece file: checked against a checkpoint's
  # From scratch: T5 v1.1 layout (gated-GELU FFN, untied head, no output rescale).
  d_model: int = 128
  d_kv: int = 32
  d_ff: int = 256
  num_heads: int = 4
  num_layers: int = 2
  num_decoder_layers: int = 2
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  # A Hugging Face T5 / Flan-T5 / mT5 checkpoint directory; its config replaces the sizes.
  pretrained: str = ""
  z_loss: float = 0.0

  VOCAB_FEATURE = "targets"
  TASK_FIELDS = {"spm_model": ("targets", "sentencepiece_model_file")}
  EVALUATOR = "reat"

  def config(self) -> s2s.T5Seq2SeqConfig:
    if self.vocab_size <= 2:
      raise ValueError(f"Reat needs vocab_size from the tasks' vocabulary, got {self.vocab_size}")
    if not self.pretrained:
      return s2s.T5Seq2SeqConfig(
          vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
          num_layers=self.num_layers, num_decoder_layers=self.num_decoder_layers, num_heads=self.num_heads,
          relative_attention_num_buckets=self.relative_attention_num_buckets,
          relative_attention_max_distance=self.relative_attention_max_distance,
          feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
    self.check_vocabulary()
    cfg = _checkpoint(str(self.pretrained))[0]
    # T5 pads its embedding (32128 >= 32000 pieces + 100 sentinels); grow it only when needed.
    return dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, self.vocab_size))

  def check_vocabulary(self) -> None:
    """A checkpoint's token ids mean its own SentencePiece pieces: refuse any other model."""
    ckpt.check_tokenizer(self.pretrained, "spiece.model", self.spm_model, "reat.Reat.pretrained")

  def network(self, rngs: nnx.Rngs) -> s2s.T5EncoderDecoder:
    return s2s.T5EncoderDecoder(self.config(), rngs=rngs)

  def initial_params(self, fresh):
    """The checkpoint's parameters (`pretrained`) in the layout of `fresh`, the freshly
    initialised Param state (rows / columns beyond the checkpoint's vocabulary keep their
    fresh values); `fresh` itself without a checkpoint."""
    if not self.pretrained:
      return fresh
    return jax.tree.map(ckpt.fit_loaded, fresh, _checkpoint(str(self.pretrained))[1])

  # -- data ----------------------------------------------------------------------------

  def feature_converter(self, pack: bool = True, seed: int = 0):
    """seqio's EncDecFeatureConverter: packed rows carry segment ids and positions, which
    the network honours. Deterministic (`seed` unused)."""
    del seed
    import seqio
    return seqio.EncDecFeatureConverter(pack=pack)

  def eval_feature_converter(self):
    """One example per row, unpacked, with the target item and a ranking row's candidates."""
    from recjax.data.converters import TextEvalConverter
    return TextEvalConverter(num_candidates=RANKING_CANDIDATES)

  # -- training ------------------------------------------------------------------------

  def logits(self, net: s2s.T5EncoderDecoder, batch):
    """Teacher-forced logits [B, L, V] (float32) of a converter batch (packed or not)."""
    tokens = batch["encoder_input_tokens"]
    return net(tokens, (tokens > 0).astype(jnp.int32), batch["decoder_input_tokens"], s2s.Packing.of(batch))

  def loss_fn(self, net: s2s.T5EncoderDecoder, batch, rng):
    """Mean target-token cross-entropy over positions with loss weight > 0 (padding has 0).
    No dropout: `rng` unused."""
    del rng
    weights = batch["decoder_loss_weights"]
    loss, m = s2s.cross_entropy(self.logits(net, batch), batch["decoder_target_tokens"], weights,
                                z_loss=self.z_loss)
    if "decoder_segment_ids" in batch:  # examples = segments (numbered 1.. along each row)
      examples = jnp.sum(jnp.max(batch["decoder_segment_ids"], axis=1))
    else:
      examples = jnp.sum(jnp.max(weights, axis=1) > 0)
    return loss, {"loss_sum": m["loss_sum"], "targets": m["targets"], "accuracy_sum": m["accuracy_sum"],
                  "dropped_targets": jnp.zeros((), jnp.float32), "items": examples.astype(jnp.float32)}

  # -- inference -----------------------------------------------------------------------

  def predict_batch(self, net: s2s.T5EncoderDecoder, batch, tables=None, *, num_beams: int,
                    max_new_tokens: int = 8):
    """Beam search from each row's prompt: (tokens [B, K, max_new_tokens] (EOS, then 0),
    scores [B, K] = log p(sequence)), best first. Beams are ranked by p(text), with no
    length bonus. Text, not items: the evaluator parses them back to items through the
    catalogue's short ids (`tables` unused)."""
    del tables
    tokens = batch["encoder_input_tokens"]
    out = s2s.generate(net, tokens, (tokens > 0).astype(jnp.int32), max_new_tokens=max_new_tokens,
                       num_beams=num_beams, length_penalty=0.0)
    return out.sequences, out.scores

  def answer_gap(self, net: s2s.T5EncoderDecoder, batch, answers):
    """float32 [B]: log p(answers[0]) - log p(answers[1]) given each row's prompt;
    answers int32 [2, W] end with EOS, 0-padded (rating: "yes", "no")."""
    tokens = batch["encoder_input_tokens"]
    mask = (tokens > 0).astype(jnp.int32)
    memory = net.encode(tokens, mask)
    out = []
    for a in answers:  # two short teacher-forced passes
      tgt = jnp.broadcast_to(a, (tokens.shape[0], answers.shape[1]))
      logp = jax.nn.log_softmax(net.decode(s2s.shift_right(tgt), memory, mask), -1)
      tok = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
      out.append(jnp.sum(jnp.where(tgt > 0, tok, 0.0), -1))
    return out[0] - out[1]


__all__ = ["Reat", "LIKE", "DISLIKE", "RANKING_CANDIDATES"]
