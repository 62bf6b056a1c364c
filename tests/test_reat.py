"""ReAT (recjax/models/reat.py): parsing beams back to items, AUC-ROC, a tiny model that
learns a toy retrieval task, loading a T5 checkpoint (vocabulary check, grown embedding)
and `recjax reat` end to end on the small synthetic dataset."""

import dataclasses
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from recjax.models import reat
from recjax.models.text import t5_seq2seq as s2s

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SHORT_IDS = np.array(["", "", "I3", "I7", "I12", "I25"], object)  # items 2..5


def test_beam_texts_parse_to_items_invalid_and_duplicates_skipped():
  index = reat.item_index(SHORT_IDS)
  assert index == {"I3": 2, "I7": 3, "I12": 4, "I25": 5}
  assert reat.parse_item(" I12 ", index) == 4
  assert reat.parse_item("I99", index) == 0 and reat.parse_item("I1 2", index) == 0
  assert reat.parse_item("", index) == 0
  texts = [["I99", "I7", "I7", "I12"],  # invalid, then 7, a repeat, then the target: rank 1
           ["I3", "x", "I25", "I7"],  # target 3 first
           ["I3", "I7", "", "I25"]]  # the target (12) never named: a miss
  ranks, counts = reat.beam_ranks(texts, [4, 2, 4], index)
  assert ranks.tolist() == [1, 0, reat.MISS]
  assert counts["invalid_fraction"] == pytest.approx(3 / 12)
  assert counts["duplicate_fraction"] == pytest.approx(1 / 12)
  assert counts["top1_invalid_fraction"] == pytest.approx(1 / 3)
  # Ranking: an existing item outside the row's candidates is invalid too.
  ranks, counts = reat.beam_ranks([["I3", "I25", "I7"]], [3], index, candidates=np.array([[3, 5, 0]]))
  assert ranks.tolist() == [1] and counts["invalid_fraction"] == pytest.approx(1 / 3)
  m = reat.hit_metrics(np.array([0, 1, reat.MISS, 7]))
  assert m["hr@1"] == 0.25 and m["hr@5"] == 0.5 and m["hr@10"] == 0.75 and m["hr@20"] == 0.75
  assert m["ndcg@5"] == pytest.approx((1 + 1 / np.log2(3)) / 4)


def test_auc_roc_by_hand():
  # Pairs (positive, negative): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, *) two wins -> 3/4.
  assert reat.auc_roc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
  # Ties count half: (1 vs 1) 0.5, (2 vs 1) 1 -> 0.75.
  assert reat.auc_roc([1.0, 1.0, 2.0], [0, 1, 1]) == pytest.approx(0.75)
  assert reat.auc_roc([0.0, 1.0], [0, 1]) == 1.0 and reat.auc_roc([1.0, 0.0], [0, 1]) == 0.0
  assert np.isnan(reat.auc_roc([0.3, 0.2], [1, 1]))


class _DigitVocab:
  """Token 2 + d = digit d, 12 = "I"; 13.. are the toy prompt's key tokens."""

  vocab_size = 24

  def encode(self, text):
    return [12 if c == "I" else 2 + int(c) for c in text]

  def decode(self, ids):
    return "".join("I" if t == 12 else str(t - 2) if 2 <= t < 12 else "?" for t in ids)


def test_tiny_model_learns_toy_retrieval_and_beams_name_the_item():
  """The prompt's key token decides the next item; beam search must put it first."""
  vocab = _DigitVocab()
  rng = np.random.default_rng(0)
  n, li, lt = 256, 6, 4
  items = rng.integers(2, 6, n)
  enc = np.zeros((n, li), np.int32)
  enc[:, 0] = 13 + items  # the key
  enc[:, 1:4] = rng.integers(17, 24, (n, 3))  # noise
  enc[:, 4] = 1  # EOS
  tgt = np.zeros((n, lt), np.int32)
  for r, i in enumerate(items):
    ids = vocab.encode(SHORT_IDS[i]) + [1]
    tgt[r, :len(ids)] = ids
  examples = {"encoder_tokens": enc, "encoder_mask": (enc > 0).astype(np.int32), "targets": tgt,
              "target_mask": (tgt > 0).astype(np.int32), "weights": np.ones(n, np.float32),
              "target_item": items, "candidates": np.zeros((n, 1), np.int32), "label": np.zeros(n, np.int32)}
  model = reat.Reat(vocab_size=vocab.vocab_size, inputs_length=li, targets_length=lt, d_model=32, d_kv=8,
                    d_ff=64, num_heads=4, num_layers=1, num_decoder_layers=1)
  trainer, state, history = reat.train_reat(model, examples, steps=150, batch_size=32, learning_rate=1e-2,
                                            warmup_steps=10, log_every=50)
  assert history[-1]["loss"] < 0.2 * history[0]["loss"], history
  test = reat.select(examples, np.arange(32))
  scores = reat.evaluate(trainer.network(state.params), {"retrieval": test}, vocab, SHORT_IDS, num_beams=4,
                         batch_size=16)["retrieval"]
  assert scores["hr@1"] > 0.9, scores
  assert scores["count"] == 32 and scores["samples"][0]["beams"][0] == SHORT_IDS[items[0]]


def test_pretrained_checkpoint_vocabulary_checked_and_grown(tmp_path):
  directory = FIXTURES / "tiny_t5_gated_seq2seq"
  loaded = s2s.load_t5(directory).model
  other = tmp_path / "dataset.model"  # any other SentencePiece file (compared by content)
  other.write_bytes(b"not the checkpoint's model")
  with pytest.raises(ValueError, match="is not the checkpoint's"):
    reat.Reat(vocab_size=164, spm_model=str(other), pretrained=str(directory)).config()
  with pytest.raises(ValueError, match="is not the checkpoint's"):
    reat.Reat(vocab_size=164, pretrained=str(directory)).config()
  # Its own spiece.model + seqio's 100 extra ids: 164 > 64 rows, grown with fresh rows.
  model = reat.Reat(vocab_size=164, spm_model=str(directory / "spiece.model"), pretrained=str(directory))
  cfg = model.config()
  assert cfg.vocab_size == 164 and cfg.d_model == loaded.config.d_model and not cfg.tie_word_embeddings
  # Through the trainer (one step at a negligible learning rate): it starts from the checkpoint.
  model = dataclasses.replace(model, inputs_length=4, targets_length=3)
  rows = {"encoder_tokens": np.full((8, 4), 5, np.int32), "encoder_mask": np.ones((8, 4), np.int32),
          "targets": np.full((8, 3), 6, np.int32), "target_mask": np.ones((8, 3), np.int32),
          "weights": np.ones(8, np.float32)}
  trainer, state, _ = reat.train_reat(model, rows, steps=1, batch_size=8, learning_rate=1e-9, warmup_steps=0)
  net = trainer.network(state.params)
  assert net.embed.embedding.shape == (164, cfg.d_model)
  ids = jnp.array([[5, 9, 7, 1]], jnp.int32)
  dec = jnp.array([[0, 4, 6]], jnp.int32)
  mask = jnp.ones_like(ids)
  np.testing.assert_allclose(net(ids, mask, dec)[..., :64], loaded(ids, mask, dec), atol=1e-5)


def test_reat_command_end_to_end(synthetic_prepared, tmp_path, capsys):
  from recjax import main as cli
  log = tmp_path / "reat.jsonl"
  rc = cli.main(["reat", "--data", str(synthetic_prepared["synthetic"]), "--dataset", "tiny_reat",
                 "--mixtures", "retrieval+rating", "--steps", "3", "--batch_size", "8", "--train_limit", "24",
                 "--eval_limit", "6", "--inputs_length", "96", "--targets_length", "12", "--d_model", "16",
                 "--d_kv", "4", "--d_ff", "32", "--num_layers", "1", "--num_decoder_layers", "1",
                 "--log", str(log)])
  assert rc == 0
  out = capsys.readouterr().out
  assert "retrieval+rating" in out and "AUC" in out
  (row,) = [json.loads(line) for line in log.read_text().splitlines()]
  assert row["mixture"] == "retrieval+rating" and row["train_rows"] == 48
  assert row["tasks"] == ["tiny_reat_reat_retrieval", "tiny_reat_reat_rating"]
  scores = row["scores"]
  assert set(scores) == {"retrieval", "ranking", "rating"}
  for fam in ("retrieval", "ranking"):
    assert scores[fam]["count"] == 6 and 0.0 <= scores[fam]["invalid_fraction"] <= 1.0
    assert len(scores[fam]["samples"][0]["beams"]) == 5
  assert 0.0 <= scores["rating"]["auc"] <= 1.0 or np.isnan(scores["rating"]["auc"])
  # Mixtures expand to their tasks; unknown families fail before any work.
  assert sorted(reat.spec_tasks("tiny_reat", "ut")) == [f"tiny_reat_reat_{f}" for f in ("ranking", "rating", "retrieval")]
  rc = cli.main(["reat", "--data", str(synthetic_prepared["synthetic"]), "--dataset", "tiny_reat",
                 "--mixtures", "retrieval+nope"])
  assert rc == 2 and "no task tiny_reat_reat_nope" in capsys.readouterr().err


def test_rating_answers_match_the_tasks():
  from recjax.data import preprocessors as P
  assert (reat.LIKE, reat.DISLIKE) == (P.LIKE, P.DISLIKE)
