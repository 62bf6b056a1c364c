"""Narrative metrics (REGEN Tables 4 and 5): BLEU, ROUGE and semantic similarity.

  scores = narrative_metrics(generated, references, encoder=load_text_encoder("minilm"))
  # {"bleu": ..., "rouge1": ..., "rouge2": ..., "rougeL": ..., "similarity": ..., "count": N}

* BLEU: sacrebleu's corpus BLEU (13a tokenisation, one reference per text), 0-100.
* ROUGE: rouge-score F-measures with the Porter stemmer, averaged over texts, 0-100.
* similarity: mean cosine of the sentence encoder's embeddings of each (generated,
  reference) pair (the bundled all-MiniLM-L6-v2 by default), in [-1, 1].

Empty generations count (they score 0 BLEU / ROUGE); a length mismatch is an error, so
no text is silently dropped.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def bleu(generated: Sequence[str], references: Sequence[str]) -> float:
  import sacrebleu  # imported here: only the narrative evaluations need it
  _check(generated, references)
  return float(sacrebleu.corpus_bleu(list(generated), [list(references)]).score)


def rouge(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  from rouge_score import rouge_scorer
  _check(generated, references)
  scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
  totals = dict.fromkeys(ROUGE_TYPES, 0.0)
  for g, r in zip(generated, references):
    for name, score in scorer.score(r, g).items():  # score(target, prediction)
      totals[name] += score.fmeasure
  return {k: 100.0 * v / max(len(generated), 1) for k, v in totals.items()}


def similarity(generated: Sequence[str], references: Sequence[str], encoder) -> float:
  """Mean cosine between paired sentence embeddings (`encoder.embed_sentences`)."""
  _check(generated, references)
  if not len(generated):
    return 0.0
  a = _unit(encoder.embed_sentences(list(generated)))
  b = _unit(encoder.embed_sentences(list(references)))
  return float(np.mean(np.sum(a * b, axis=-1)))


def narrative_metrics(generated: Sequence[str], references: Sequence[str], *, encoder=None) -> dict:
  """BLEU, ROUGE-1/2/L and (with an encoder) semantic similarity of paired texts."""
  out = {"count": len(generated), "bleu": bleu(generated, references), **rouge(generated, references)}
  if encoder is not None:
    out["similarity"] = similarity(generated, references, encoder)
  return out


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _check(generated, references) -> None:
  if len(generated) != len(references):
    raise ValueError(f"{len(generated)} generated texts for {len(references)} references: "
                     "they must pair up one to one")
