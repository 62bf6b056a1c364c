"""Writes the reference fixtures of tests/test_t5_seq2seq.py with PyTorch + transformers.

Run it in the reference environment of tools/make_text_fixtures.py (recjax needs neither
torch nor transformers), after that script (it reads tests/fixtures/tiny_t5_relu):

  /tmp/refvenv/bin/python tools/make_t5_seq2seq_fixtures.py

Writes, under tests/fixtures/:
  tiny_t5_gated_seq2seq/        a random T5 v1.1 / Flan-T5-style seq2seq model: gated-GELU,
                                untied lm_head (config.json says tie_word_embeddings=false,
                                as the published v1.1 / Flan-T5 configs do), 2 decoder layers
  tiny_t5_seq2seq_reference.npz for both that model ("gated_*") and tiny_t5_relu ("relu_*",
                                tied embeddings with the d_model**-0.5 rescale, bfloat16 weights
                                run in float32): T5ForConditionalGeneration teacher-forced
                                logits of fixed encoder/decoder ids, greedy `generate` and beam
                                search outputs (sequences + sequences_scores)

Generation settings (recjax.models.text.generate matches these semantics exactly):
  greedy: num_beams=1, do_sample=False, max_new_tokens=8; after EOS rows are padded with 0.
  beam:   num_beams=4, num_return_sequences=4, max_new_tokens=6, do_sample=False, for
          (length_penalty, early_stopping) in BEAM_SETTINGS; the score of a finished
          hypothesis is sum(log p) / generated_length**length_penalty.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
GREEDY_NEW_TOKENS = 8
BEAM_NEW_TOKENS = 6
NUM_BEAMS = 4
# early_stopping: "never" (canonical: stop only when no running beam can win), False (HF's
# default heuristic) and True (stop once NUM_BEAMS hypotheses are finished).
BEAM_SETTINGS = [(1.0, "never"), (1.0, False), (1.0, True), (0.6, "never"), (2.0, False)]


def setting_name(length_penalty, early_stopping) -> str:
  return f"lp{length_penalty:g}_{str(early_stopping).lower()}"


def make_gated(out_dir: pathlib.Path, vocab: int, gen: torch.Generator) -> None:
  """A random untied gated-GELU seq2seq checkpoint written by hand: transformers 5 ties
  lm_head to `shared` on construction, so the state dict is saved with its own lm_head."""
  shutil.rmtree(out_dir, ignore_errors=True)
  out_dir.mkdir(parents=True)
  cfg = transformers.T5Config(
      vocab_size=vocab, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
      relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
  model = transformers.T5ForConditionalGeneration(cfg).eval()
  tensors = {}
  for name, p in model.state_dict().items():
    if name in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight"):
      continue
    t = torch.randn(p.shape, generator=gen) * p.float().std().clamp(min=0.05)
    if "layer_norm" in name:  # random scales so a missed or swapped norm shows
      t = 1.0 + 0.2 * torch.randn(p.shape, generator=gen)
    tensors[name] = t.contiguous()
  head = torch.randn((vocab, cfg.d_model), generator=gen) * cfg.d_model ** -0.5
  head[1] *= 4.0  # EOS wins now and then, so generation exercises finishing
  tensors["lm_head.weight"] = head.contiguous()
  save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  config = cfg.to_dict()
  config.pop("scale_decoder_outputs", None)  # as the published v1.1 / Flan-T5 configs
  config.update(tie_word_embeddings=False, architectures=["T5ForConditionalGeneration"])
  (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
  shutil.copy(FIXTURES / "tiny_t5" / "spiece.model", out_dir / "spiece.model")


def load(path: pathlib.Path):
  model = transformers.T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
  return model


def reference(model, prefix: str, enc_ids, enc_mask, dec_ids) -> dict:
  out = {}
  with torch.no_grad():
    out[prefix + "logits"] = model(input_ids=enc_ids, attention_mask=enc_mask,
                                   decoder_input_ids=dec_ids).logits.numpy().astype(np.float32)
    greedy = model.generate(input_ids=enc_ids, attention_mask=enc_mask, max_new_tokens=GREEDY_NEW_TOKENS,
                            num_beams=1, do_sample=False)
    g = np.zeros((len(enc_ids), GREEDY_NEW_TOKENS + 1), np.int32)
    g[:, :greedy.shape[1]] = greedy.numpy()
    out[prefix + "greedy"] = g
    for lp, early in BEAM_SETTINGS:
      beam = model.generate(input_ids=enc_ids, attention_mask=enc_mask, max_new_tokens=BEAM_NEW_TOKENS,
                            num_beams=NUM_BEAMS, num_return_sequences=NUM_BEAMS, do_sample=False,
                            length_penalty=lp, early_stopping=early, return_dict_in_generate=True,
                            output_scores=True)
      seqs = beam.sequences.numpy().reshape(len(enc_ids), NUM_BEAMS, -1)
      s = np.full((len(enc_ids), NUM_BEAMS, BEAM_NEW_TOKENS + 1), -1, np.int32)  # -1: not generated
      s[:, :, :seqs.shape[2]] = seqs
      name = prefix + "beam_" + setting_name(lp, early)
      out[name + "_sequences"] = s
      out[name + "_scores"] = beam.sequences_scores.numpy().reshape(len(enc_ids), NUM_BEAMS).astype(np.float32)
  eos = (out[prefix + "greedy"][:, 1:] == 1).any(1).sum()
  print(f"{prefix}: greedy rows ending in EOS {eos}/{len(enc_ids)}")
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", type=pathlib.Path, default=FIXTURES)
  args = parser.parse_args()
  torch.set_num_threads(1)
  gen = torch.Generator().manual_seed(1)
  relu = load(args.out / "tiny_t5_relu")
  vocab = relu.config.vocab_size
  make_gated(args.out / "tiny_t5_gated_seq2seq", vocab, gen)
  gated = load(args.out / "tiny_t5_gated_seq2seq")
  assert not gated.config.scale_decoder_outputs and relu.config.scale_decoder_outputs
  assert not torch.equal(gated.lm_head.weight, gated.shared.weight), "lm_head was tied on load"
  assert torch.equal(relu.lm_head.weight, relu.shared.weight)

  # Encoder rows of 12, 7 and 3 tokens (pad 0 after), long enough to use the log buckets
  # (max_distance 16 > the exact range 2); decoder ids start with the start token 0.
  enc_ids = torch.randint(3, vocab, (3, 12), generator=gen)
  enc_mask = torch.zeros_like(enc_ids)
  for row, n in enumerate((12, 7, 3)):
    enc_mask[row, :n] = 1
  enc_ids = enc_ids * enc_mask
  dec_ids = torch.randint(1, vocab, (3, 9), generator=gen)
  dec_ids[:, 0] = 0
  ref = {"enc_ids": enc_ids.numpy().astype(np.int32), "enc_mask": enc_mask.numpy().astype(np.int32),
         "dec_ids": dec_ids.numpy().astype(np.int32), "num_beams": np.int32(NUM_BEAMS),
         "beam_settings": np.array([setting_name(*s) for s in BEAM_SETTINGS]),
         "versions": np.array([f"torch {torch.__version__}", f"transformers {transformers.__version__}"])}
  ref.update(reference(relu, "relu_", enc_ids, enc_mask, dec_ids))
  ref.update(reference(gated, "gated_", enc_ids, enc_mask, dec_ids))
  np.savez_compressed(args.out / "tiny_t5_seq2seq_reference.npz", **ref)
  for p in sorted((args.out / "tiny_t5_gated_seq2seq").iterdir()) + [args.out / "tiny_t5_seq2seq_reference.npz"]:
    print(f"{p.stat().st_size:>9,d}  {p.relative_to(args.out)}")


if __name__ == "__main__":
  main()
