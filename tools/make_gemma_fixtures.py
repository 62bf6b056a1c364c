"""Writes the reference fixtures of tests/test_gemma.py with PyTorch + transformers.

Run it in a separate environment (recjax itself needs neither torch nor transformers):

  python -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch transformers safetensors numpy sentencepiece protobuf
  /tmp/refvenv/bin/python tools/make_gemma_fixtures.py

Writes, under tests/fixtures/:
  tiny_gemma/               a random GemmaForCausalLM, multi-query (1 KV head) like Gemma 2B,
                            float32, + a tiny Gemma-style SentencePiece model (BPE, byte
                            fallback, no dummy prefix; pad 0, eos 1, bos 2, unk 3)
  tiny_gemma_gqa/           a random grouped-query model (4 heads, 2 KV heads, head_dim 12 !=
                            hidden / heads, like Gemma 7B), bfloat16, sharded, no tokenizer
  tiny_gemma_reference.npz  logits of fixed right- and left-padded batches (the left-padded
                            one with positions cumsum(mask) - 1, as `generate` uses), greedy
                            `generate` tokens with the config EOS and with an EOS that fires
                            early, tokenizer ids of some strings
"""

from __future__ import annotations

import argparse
import io
import pathlib
import shutil

import numpy as np
import torch
import transformers

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"

SPM_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "moisturizing cream for dry and sensitive skin",
    "waterproof mascara in jet black",
    "a floral perfume with jasmine and vanilla",
    "shampoo and conditioner for curly hair",
    "nail polish remover without acetone",
    "red lipstick with a matte finish",
    "sunscreen lotion with spf fifty",
    "the user bought item 42 then item 7",
] * 4
TOKENIZER_STRINGS = [
    "moisturizing cream for dry skin",
    "red mascara",
    "  two leading spaces and  a double space ",
    "Héllo Wörld 💄 北京 1,000 $12.99",
    "zebra",
    "",
]
NEW_TOKENS = 8


def train_spm(out_dir: pathlib.Path) -> pathlib.Path:
  import sentencepiece as spm
  model = io.BytesIO()  # not a model_prefix: the spec would record a temporary path
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(SPM_CORPUS), model_writer=model, vocab_size=340, model_type="bpe",
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
      unk_piece="<unk>", byte_fallback=True, add_dummy_prefix=False,
      remove_extra_whitespaces=False, split_digits=True, hard_vocab_limit=False, character_coverage=1.0,
      num_threads=1, normalization_rule_name="identity", minloglevel=2)
  (out_dir / "tokenizer.model").write_bytes(model.getvalue())
  return out_dir / "tokenizer.model"


def _randomize_norms(model: torch.nn.Module, gen: torch.Generator) -> None:
  # Hugging Face inits Gemma norm weights to 0 (scale 1 + w): make them random so a missed
  # load shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(0.3 * torch.randn(p.shape, generator=gen))


def _positions(mask: torch.Tensor) -> torch.Tensor:
  return (mask.cumsum(-1) - 1).clamp(min=0)


def _generate(model, ids, mask, eos: int) -> tuple[np.ndarray, float]:
  """Greedy tokens [B, NEW_TOKENS] (pad after EOS and after an early stop), smallest top-2 gap."""
  with torch.no_grad():
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                         eos_token_id=eos, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
  new = out.sequences[:, ids.shape[1]:].numpy().astype(np.int32)
  tokens = np.zeros((ids.shape[0], NEW_TOKENS), np.int32)
  tokens[:, :new.shape[1]] = new
  gap = min(float((s.topk(2).values[:, 0] - s.topk(2).values[:, 1]).min()) for s in out.scores)
  return tokens, gap


def make_tiny_gemma(out: pathlib.Path) -> None:
  import sentencepiece as spm
  mq_dir, gqa_dir = out / "tiny_gemma", out / "tiny_gemma_gqa"
  for d in (mq_dir, gqa_dir):
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
  sp = spm.SentencePieceProcessor(model_file=str(train_spm(mq_dir)))
  vocab = sp.get_piece_size()
  torch.manual_seed(0)
  gen = torch.Generator().manual_seed(0)

  common = dict(vocab_size=vocab, max_position_embeddings=64, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1,
                bos_token_id=2, attn_implementation="eager",
                # A larger init than 0.02, so the blocks outweigh the (tied) token embedding and
                # greedy decoding does more than repeat the last token.
                initializer_range=0.2)
  mq_cfg = transformers.GemmaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
  mq = transformers.GemmaForCausalLM(mq_cfg).eval()
  _randomize_norms(mq, gen)
  mq.save_pretrained(mq_dir)

  gqa_cfg = transformers.GemmaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                     rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **common)
  gqa = transformers.GemmaForCausalLM(gqa_cfg).eval()
  _randomize_norms(gqa, gen)
  # bfloat16 + small shards, like public checkpoints; the reference runs the same (rounded)
  # weights in float32.
  gqa.to(torch.bfloat16).save_pretrained(gqa_dir, max_shard_size="20KB")
  gqa = transformers.GemmaForCausalLM.from_pretrained(gqa_dir, dtype=torch.float32,
                                                      attn_implementation="eager").eval()

  ids = torch.randint(4, vocab, (4, 12), generator=gen)
  lengths = (12, 9, 4, 1)
  right = torch.zeros_like(ids)
  left = torch.zeros_like(ids)
  for row, n in enumerate(lengths):
    right[row, :n] = 1
    left[row, 12 - n:] = 1
  right_ids = ids * right  # pad id 0
  left_ids = ids * left
  ref = {"right_ids": right_ids.numpy().astype(np.int32), "right_mask": right.numpy().astype(np.int32),
         "left_ids": left_ids.numpy().astype(np.int32), "left_mask": left.numpy().astype(np.int32)}
  with torch.no_grad():
    for name, model in (("mq", mq), ("gqa", gqa)):
      # Right padding: Hugging Face's default positions 0..T-1 are the real ones.
      ref[f"{name}_right_logits"] = model(input_ids=right_ids, attention_mask=right).logits.numpy()
      ref[f"{name}_left_logits"] = model(input_ids=left_ids, attention_mask=left,
                                         position_ids=_positions(left)).logits.numpy()
      tokens, gap = _generate(model, left_ids, left, eos=1)
      ref[f"{name}_greedy"] = tokens
      # An EOS that fires early (the 3rd token of row 0) exercises the stop and the padding.
      early_eos = int(tokens[0, 2])
      ref[f"{name}_early_eos"] = np.int32(early_eos)
      ref[f"{name}_greedy_early"], gap2 = _generate(model, left_ids, left, eos=early_eos)
      print(f"{name}: greedy {tokens.tolist()}\n  early eos {early_eos}: {ref[f'{name}_greedy_early'].tolist()}"
            f"\n  smallest top-2 logit gap {min(gap, gap2):.2e}")

  # Released Gemma checkpoints set add_bos_token in tokenizer_config.json; without it the
  # converted tokenizer adds no BOS.
  tokenizer = transformers.AutoTokenizer.from_pretrained(mq_dir, add_bos_token=True)
  hf_ids = [tokenizer(s)["input_ids"] for s in TOKENIZER_STRINGS]
  for s, row in zip(TOKENIZER_STRINGS, hf_ids):
    sp_ids = [2] + sp.encode(s)
    if row != sp_ids:
      print(f"note: Hugging Face GemmaTokenizer and sentencepiece differ on {s!r}:\n  {row}\n  {sp_ids}")
  ref["tokenizer_strings"] = np.array(TOKENIZER_STRINGS)
  ref["token_lengths"] = np.array([len(i) for i in hf_ids], np.int32)
  ref["token_ids_flat"] = np.concatenate([np.array(i, np.int32) for i in hf_ids])
  batch = tokenizer(TOKENIZER_STRINGS, padding="max_length", max_length=8, truncation=True, return_tensors="np")
  ref["batch_ids"] = batch["input_ids"].astype(np.int32)  # Gemma pads on the left
  ref["batch_mask"] = batch["attention_mask"].astype(np.int32)
  ref["versions"] = np.array([f"torch {torch.__version__}", f"transformers {transformers.__version__}"])
  np.savez_compressed(out / "tiny_gemma_reference.npz", **ref)


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  torch.set_num_threads(1)
  make_tiny_gemma(args.out)
  for p in sorted(args.out.rglob("*gemma*")):
    if p.is_file():
      print(f"{p.stat().st_size:>9,d}  {p.relative_to(args.out)}")


if __name__ == "__main__":
  main()
