"""Narrative metrics: BLEU, ROUGE, sentence-embedding similarity."""

import math

import numpy as np
import pytest

from recjax.evaluation import narratives


def test_identical_texts_score_perfectly():
  refs = ["A floral perfume for summer evenings.", "Sturdy stapler, great for the office."]
  out = narratives.narrative_metrics(refs, refs)
  assert out["count"] == 2
  assert out["bleu"] == pytest.approx(100.0)
  for k in narratives.ROUGE_TYPES:
    assert out[k] == pytest.approx(100.0)


def test_disjoint_texts_score_zero_and_partial_overlap_in_between():
  refs = ["the red stapler works well"]
  assert narratives.bleu(["completely unrelated words here"], refs) == pytest.approx(0.0)
  assert narratives.rouge(["completely unrelated words here"], refs)["rouge1"] == 0.0
  # 3 of 5 reference unigrams in a 4-word generation: P = 3/4, R = 3/5 -> F = 2/3.
  r = narratives.rouge(["the red stapler broke"], refs)
  assert r["rouge1"] == pytest.approx(100 * 2 / 3)
  # Stemming: "works" and "working" share the stem "work".
  assert narratives.rouge(["working"], ["works"])["rouge1"] == pytest.approx(100.0)


def test_bleu_is_corpus_level_brevity_penalised():
  # A prefix of the reference: every n-gram precision is 1, so BLEU is the brevity penalty.
  ref = "one two three four five six seven eight"
  got = narratives.bleu(["one two three four five six"], [ref])
  assert got == pytest.approx(100 * math.exp(1 - 8 / 6), rel=1e-6)


def test_rouge_averages_over_texts():
  r = narratives.rouge(["a b", "x"], ["a b", "y"])
  assert r["rouge1"] == pytest.approx(50.0)


class _BagOfWords:
  """A stand-in sentence encoder: word-count vectors over a fixed vocabulary."""

  vocab = ["red", "stapler", "pen", "blue", "office", "perfume"]

  def embed_sentences(self, texts):
    return np.array([[t.lower().split().count(w) for w in self.vocab] for t in texts], np.float32)


def test_similarity_is_mean_paired_cosine():
  enc = _BagOfWords()
  sim = narratives.similarity(["red stapler", "blue pen"], ["red stapler", "red perfume"], enc)
  assert sim == pytest.approx((1.0 + 0.0) / 2)


def test_similarity_with_the_bundled_sentence_encoder_ranks_paraphrases_higher():
  from recjax.models.text import load_text_encoder
  enc = load_text_encoder("minilm")
  ref = ["This moisturizer keeps dry skin soft all day."]
  close = narratives.similarity(["A cream that keeps dry skin soft all day long."], ref, enc)
  far = narratives.similarity(["A heavy cast iron frying pan."], ref, enc)
  assert close > far + 0.3
  assert narratives.similarity(ref, ref, enc) == pytest.approx(1.0, abs=1e-5)


def test_mismatched_lengths_are_an_error():
  with pytest.raises(ValueError, match="2 generated texts for 1 references"):
    narratives.narrative_metrics(["a", "b"], ["a"])
