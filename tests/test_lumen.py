"""LUMEN: one LM that recommends (item softmax at the ID position) and then writes a
narrative conditioned on the item it chose; and the `recjax lumen` command."""

import json

import numpy as np
import pytest

from recjax.models import lumen, tiger
from recjax.train.arrays import train_arrays

PLACEHOLDER, ID_TOKEN, COLON = 3, 4, 5
NUM_ITEMS = 10  # items 2..9


class _Vocab:
  def decode(self, ids):
    return " ".join(f"t{i}" for i in ids)


def _toy_examples(n, seed):
  """Prompt: a cue c in {0..3} -> the item is 2 + 2c or 3 + 2c (a coin flip), so the
  prompt alone cannot tell which; the narrative names the item (tokens 20 + k, 30 + k)."""
  rng = np.random.default_rng(seed)
  model = _toy_model()
  li, lt = model.inputs_length, model.targets_length
  rows = {k: [] for k in ("tokens", "item_ids", "mask", "text_weights", "item_targets", "weights")}
  rows["soft_items"] = rows["soft_rows"] = [np.zeros(1, np.int32)] * n  # no soft prompt
  for _ in range(n):
    cue = rng.integers(4)
    item = 2 + 2 * cue + rng.integers(2)
    prompt = [6, 10 + cue, 7, PLACEHOLDER, 1]  # one history item (item 9 always), then EOS
    target = [ID_TOKEN, COLON, PLACEHOLDER, 20 + item, 30 + item, 1]
    tokens = np.zeros(li + lt, np.int32)
    tokens[li - len(prompt):li] = prompt
    tokens[li:li + len(target)] = target
    items = np.zeros(li + lt, np.int32)
    items[li - 2] = 9
    items[li + 2] = item
    mask = (tokens > 0).astype(np.int32)
    text_w = mask.copy()
    text_w[:li] = 0
    text_w[li + 2] = 0
    for k, v in (("tokens", tokens), ("item_ids", items), ("mask", mask), ("text_weights", text_w),
                 ("item_targets", item), ("weights", 1.0)):
      rows[k].append(v)
  out = {k: np.asarray(v) for k, v in rows.items()}
  out["weights"] = out["weights"].astype(np.float32)
  out["item_targets"] = out["item_targets"].astype(np.int32)
  out["task"] = np.array(["toy_lumen_x"] * n)
  out["reference"] = np.array([f"t{20 + k} t{30 + k}" for k in out["item_targets"]])
  return out


def _toy_model():
  return lumen.Lumen(vocab_size=48, num_items=NUM_ITEMS, inputs_length=8, targets_length=8, id_position=2,
                     hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)


def test_lumen_recommends_then_writes_about_the_item_it_chose():
  model = _toy_model()
  trainer, state, history = train_arrays(model, _toy_examples(2048, 0), steps=300, batch_size=64,
                                              learning_rate=3e-3, warmup_steps=20, log_every=100)
  assert history[-1]["loss"] < history[0]["loss"]
  net = trainer.network(state.params)
  test = _toy_examples(128, 1)
  out = lumen.evaluate(model, net, test, _Vocab(), ks=(1, 2), batch_size=32, return_outputs=True)
  # The two items a cue allows take the top 2 places; the coin flip caps recall@1 near 0.5.
  assert out["items"]["recall@2"] > 0.95
  assert 0.3 < out["items"]["recall@1"] < 0.7
  assert not np.isin(out["top_items"], [0, 1]).any()  # reserved ids are never recommended
  # The narrative follows the item the model chose, not the true one.
  chosen = out["top_items"][:, 0]
  follows = [g == f"t{20 + k} t{30 + k}" for g, k in zip(out["generated"], chosen)]
  assert np.mean(follows) > 0.9
  assert out["narratives"]["toy_lumen_x"]["count"] == 128


def test_item_loss_weight_scales_only_the_item_term():
  import jax
  from flax import nnx
  model = _toy_model()
  net = model.network(nnx.Rngs(0))
  batch = {k: v[:8] for k, v in _toy_examples(8, 2).items() if k in model.batch_fields}
  loss1, m1 = model.loss_fn(net, batch, None)
  loss0, m0 = lumen.Lumen(**{**vars(model), "item_loss_weight": 0.0}).loss_fn(net, batch, None)
  text_only, _ = lumen.Lumen(**{**vars(model), "id_position": 0}).loss_fn(net, batch, None)
  # 8 rows x 5 text tokens ("ID", ":", two words, EOS) + 8 ID slots scored by the item softmax.
  assert float(m1["targets"]) == 8 * 5 + 8 and float(m0["targets"]) == 8 * 5 + 8
  item_sum = float(m1["loss_sum"]) - float(text_only) * 40
  assert float(loss1) * 48 == pytest.approx(float(m1["loss_sum"]), rel=1e-5)
  assert float(loss0) * 48 == pytest.approx(float(m1["loss_sum"]) - item_sum, rel=1e-4)
  assert item_sum > 0 and jax.numpy.isfinite(loss1)


def _fusion_examples(model, n, seed):
  """The prompt is the same for every row; the narrative names the (one) history item,
  which only the soft token carries (item_embeddings=False keeps placeholders plain)."""
  rng = np.random.default_rng(seed)
  s0, li, lt = model.prefix, model.targets_start, model.targets_length
  width = li + lt
  rows = {k: [] for k in lumen.Lumen.batch_fields}
  for _ in range(n):
    item = int(rng.integers(2, NUM_ITEMS))
    tokens = np.zeros(width, np.int32)
    tokens[li - 3:li] = [6, PLACEHOLDER, 1]
    tokens[li:li + 3] = [20 + item, 30 + item, 1]
    mask = (tokens > 0).astype(np.int32)
    mask[:s0] = 1
    text_w = np.zeros(width, np.int32)
    text_w[li:li + 3] = 1
    items = np.zeros(width, np.int32)
    items[li - 2] = item
    for k, v in (("tokens", tokens), ("item_ids", items), ("mask", mask), ("text_weights", text_w),
                 ("item_targets", 0), ("weights", 1.0), ("soft_items", np.full(max(s0, 1), item * (s0 > 0))),
                 ("soft_rows", np.zeros(max(s0, 1), np.int32))):
      rows[k].append(v)
  out = {k: np.asarray(v) for k, v in rows.items()}
  out["weights"] = out["weights"].astype(np.float32)
  out["item_targets"] = out["item_targets"].astype(np.int32)
  out["task"] = np.array(["toy_narrative_x"] * n)
  out["truth"] = out["item_ids"][:, li - 2]
  out["reference"] = np.array([f"t{20 + k} t{30 + k}" for k in out["truth"]])
  return out


def test_soft_prompts_carry_the_collaborative_signal():
  rng = np.random.default_rng(0)
  cf = rng.normal(size=(NUM_ITEMS, 8)).astype(np.float32)
  frozen = {"cf": (cf, ("item", None)), "content": (np.zeros((1, 4), np.float32), (None, None))}
  base = dict(vocab_size=48, num_items=NUM_ITEMS, inputs_length=6, targets_length=4, hidden_size=32,
              num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, item_embeddings=False,
              soft_tokens=1, cf_dim=8, content_dim=4)
  scores = {}
  for name, kw in (("text", {"soft_prompt": ""}), ("cf", {"soft_prompt": "cf+content", "adapter": "linear"})):
    model = lumen.Lumen(**base, **kw)
    train = _fusion_examples(model, 1024, 0)
    used = {k: frozen[k] for k in model.soft_parts}
    trainer, state, _ = train_arrays(model, train, steps=150, batch_size=64, learning_rate=3e-3,
                                          warmup_steps=10, log_every=150, frozen_inputs=used)
    net = trainer.network(state.params)
    test = _fusion_examples(model, 64, 1)
    out = lumen.evaluate(model, net, test, _Vocab(), batch_size=32, return_outputs=True, frozen=trainer.frozen)
    scores[name] = np.mean(np.array(out["generated"]) == test["reference"])
    if model.soft_parts:
      split = lumen.adapter_norm_split(model, net, test, {k: v[0] for k, v in used.items()})
      # The content table is all zeros here: the whole soft token comes from the CF columns.
      assert split["cf_share"] == pytest.approx(1.0) and split["content_norm"] == 0.0
      assert split["slots"] == 64
  # Without soft tokens the prompt says nothing about the item: about one guess in 8 is right.
  assert scores["cf"] > 0.9 and scores["text"] < 0.4


def test_build_examples_and_the_command(synthetic_prepared, tmp_path, capsys):
  import seqio
  from recjax.data import preprocessors as P
  from recjax.main import main
  from recjax.tasks import text
  data = synthetic_prepared["synthetic_regen"]
  name = "lumen_t"
  text.register(name, data)
  vocabulary = P.text_vocabulary(str(data))
  placeholder = P.item_placeholder_id(vocabulary)
  task = f"{name}_lumen_endorsement"
  model = lumen.Lumen(vocab_size=vocabulary.vocab_size, num_items=NUM_ITEMS, inputs_length=128, targets_length=48,
                      id_position=lumen.id_position(task, vocabulary, placeholder))
  ex = lumen.build_examples([task], "test", model, placeholder_id=placeholder, limit=20)
  li, p = model.inputs_length, model.id_position
  assert p > 0 and (ex["tokens"][:, li + p] == placeholder).all()
  assert (ex["item_ids"][:, li + p] == ex["item_targets"]).all() and (ex["item_targets"] > 1).all()
  # Every placeholder slot carries an item; no other slot does.
  assert ((ex["tokens"] == placeholder) == (ex["item_ids"] > 0)).all()
  assert (ex["text_weights"][:, :li] == 0).all() and (ex["text_weights"][:, li + p] == 0).all()
  assert (ex["mask"] >= ex["text_weights"]).all()
  raw = list(seqio.get_mixture_or_task(task).get_dataset({"inputs": 128, "targets": 4096}, split="test",
                                                         shuffle=False, seed=0).take(20).as_numpy_iterator())
  assert list(ex["reference"]) == [r["targets_pretokenized"].decode().split(" Text: ", 1)[1] for r in raw]
  narrative = lumen.build_examples([f"{name}_narrative_endorsement"], "test",
                                   lumen.Lumen(**{**vars(model), "id_position": 0}), placeholder_id=placeholder,
                                   limit=20)
  assert (narrative["item_targets"] == 0).all() and (narrative["text_weights"][:, :li] == 0).all()

  log = tmp_path / "lumen.jsonl"
  flags = ["--steps", "3", "--batch_size", "4", "--hidden_size", "16", "--num_layers", "1", "--num_heads", "2",
           "--head_dim", "8", "--mlp_dim", "32"]
  examples = tmp_path / "examples"
  assert main(["lumen", "--data", str(data), "--dataset", "lumen_c", "--narratives", "endorsement",
               "--settings", "lumen,narrative", "--eval_limit", "8", "--inputs_length", "96",
               "--targets_length", "48", "--examples_dir", str(examples), "--log", str(log), *flags]) == 0
  table = capsys.readouterr().out
  assert "lumen " in table and "narrative " in table and "endorsement" in table
  rows = [json.loads(line) for line in log.read_text().splitlines()]
  assert [r["setting"] for r in rows] == ["lumen", "narrative"]
  assert rows[0]["items"]["count"] == 8 and "items" not in rows[1]
  assert set(rows[0]["narratives"]["lumen_c_lumen_endorsement"]) >= {"bleu", "rouge1", "rougeL", "similarity"}
  assert len(rows[0]["outputs"]) == 8
  # Train + generate from the prepared examples alone (no SeqIO), score afterwards.
  raw, scored = tmp_path / "raw.jsonl", tmp_path / "scored.jsonl"
  assert main(["lumen", "--examples_dir", str(examples), "--settings", "narrative", "--no-text_metrics",
               "--log", str(raw), *flags]) == 0
  kept = json.loads(raw.read_text())
  assert "narratives" not in kept and len(kept["outputs"]) == 8
  assert main(["lumen", "--score", str(raw), "--log", str(scored)]) == 0
  again = json.loads(scored.read_text())
  assert again["narratives"]["lumen_c_narrative_endorsement"]["count"] == 8
  # Sizes may change between prepare and run; shapes of the prepared data may not.
  assert main(["lumen", "--examples_dir", str(examples), "--settings", "lumen", "--inputs_length", "64",
               *flags]) == 2
  assert main(["lumen", "--examples_dir", str(examples), "--settings", "fusion_cf", *flags]) == 2
  assert main(["lumen", "--data", str(data), "--settings", "lumen,bogus"]) == 2
