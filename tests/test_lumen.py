"""LUMEN on the model contract: one LM that recommends (item softmax at the ID slot) and
then writes a narrative conditioned on the item it chose; its packed prefix-LM rows; and
the gin path (train, resume, several processes, a sharded mesh, evaluate, infer, a
pretrained Gemma start)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from recjax.models import lumen
from recjax.models.text import gemma
from test_train import REPO, _sigkill_then_resume_matches_uninterrupted, checkpoint_params, recjax

PLACEHOLDER, ID_TOKEN, COLON = 3, 4, 5
NUM_ITEMS = 10  # items 2..9


def _toy_model(**kw):
  kw.setdefault("vocab_multiple", 1)
  return lumen.Lumen(vocab_size=48, num_items=NUM_ITEMS, placeholder_id=PLACEHOLDER, hidden_size=32, num_layers=2,
                     num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64, **kw)


def _toy_sequence(rng):
  """Prompt: a cue c in {0..3} -> the item is 2 + 2c or 3 + 2c (a coin flip), so the
  prompt alone cannot tell which; the narrative names the item (tokens 20 + k, 30 + k)."""
  cue = int(rng.integers(4))
  item = 2 + 2 * cue + int(rng.integers(2))
  prompt = [6, 10 + cue, 7, PLACEHOLDER, 1]  # one history item (item 9 always), then EOS
  target = [ID_TOKEN, COLON, PLACEHOLDER, 20 + item, 30 + item, 1]
  items = [0, 0, 0, 9, 0] + [0, 0, item, 0, 0, 0]
  return prompt, target, items


def _rows(sequences, length, pack):
  """Prefix-LM rows as PrefixLMConverter lays them out (packed greedily in order, or one per row)."""
  rows, cur = [], None
  for prompt, target, items in sequences:
    x, it = np.array(prompt + target), np.array(items)
    n, p = len(x), len(prompt)
    if cur is None or not pack or cur["used"] + n > length:
      cur = {k: np.zeros(length, np.float32 if k == "decoder_loss_weights" else np.int32)
             for k in ("decoder_target_tokens", "decoder_input_tokens", "decoder_input_item_ids",
                       "decoder_target_item_ids", "decoder_loss_weights", "decoder_segment_ids", "decoder_positions")}
      cur["used"], cur["segments"] = 0, 0
      rows.append(cur)
    s, cur["segments"] = slice(cur["used"], cur["used"] + n), cur["segments"] + 1
    in_target = np.arange(n) >= p
    cur["decoder_target_tokens"][s] = x
    cur["decoder_input_tokens"][s] = np.concatenate([[0], x[:-1]])
    cur["decoder_input_item_ids"][s] = np.concatenate([[0], it[:-1]])
    cur["decoder_target_item_ids"][s] = np.where(in_target, it, 0)
    cur["decoder_loss_weights"][s] = in_target & (it == 0)
    cur["decoder_segment_ids"][s] = cur["segments"]
    cur["decoder_positions"][s] = np.arange(n)
    cur["used"] += n
  return {k: np.stack([r[k] for r in rows]) for k in rows[0] if k not in ("used", "segments")}


def _train(model, batches, steps, lr=3e-3):
  net = model.network(nnx.Rngs(0))
  graphdef, params = nnx.split(net, nnx.Param)
  tx = optax.adam(lr)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, batch):
    loss_fn = lambda p: model.loss_fn(nnx.merge(graphdef, p), batch, None)[0]
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  for i in range(steps):
    params, opt, loss = step(params, opt, batches[i % len(batches)])
  return nnx.merge(graphdef, params), float(loss)


def test_lumen_recommends_then_writes_about_the_item_it_chose():
  model = _toy_model()
  rng = np.random.default_rng(0)
  batches = [_rows([_toy_sequence(rng) for _ in range(32)], 22, pack=True) for _ in range(8)]
  net, loss = _train(model, batches, 300)
  assert loss < 0.5 * np.log(2) + 0.2  # what is left: the coin flip
  # Generation rows: [0] + prompt + "ID:" left-padded (PrefixLMEvalConverter's layout).
  prompts = [[0, 6, 10 + c, 7, PLACEHOLDER, 1, ID_TOKEN, COLON] for c in range(4)]
  batch = {"prompt_tokens": jnp.array(prompts), "prompt_item_ids": jnp.array([[0, 0, 0, 0, 9, 0, 0, 0]] * 4),
           "prompt_mask": jnp.ones((4, 8), jnp.int32), "item_target": jnp.array([2, 4, 6, 8])}
  out = model.predict_batch(net, batch, num_items=3, max_new_tokens=4, recommend=True)
  for c in range(4):
    top = int(out["items"][c, 0])
    assert top in (2 + 2 * c, 3 + 2 * c)  # one of the cue's two items
    # ...and the narrative names the item it chose, not merely one the cue allows.
    assert out["text"][c].tolist()[:3] == [20 + top, 30 + top, 1]
    assert int(out["target_rank"][c]) in (0, 1)
  assert not np.isin(np.asarray(out["items"]), [0, 1]).any()  # PAD / MASK never recommended
  padded = _toy_model(vocab_multiple=16)  # table rows 16: ids 10..15 pad the catalogue
  net = padded.network(nnx.Rngs(0))
  assert net.items.embedding.shape[0] == 16 and net.lm.embedder.embedding.shape[0] == 48
  out = padded.predict_batch(net, batch, num_items=8, max_new_tokens=1, recommend=True)
  assert np.asarray(out["items"]).max() < NUM_ITEMS and np.asarray(out["items"]).min() >= 2


def test_packed_rows_give_the_losses_of_padded_rows():
  """Segment-aware attention + per-example positions: packing changes no example's loss."""
  model = _toy_model(item_loss_weight=1.0)
  net = model.network(nnx.Rngs(1))
  rng = np.random.default_rng(1)
  seqs = [_toy_sequence(rng) for _ in range(6)]
  packed, padded = _rows(seqs, 33, pack=True), _rows(seqs, 33, pack=False)
  assert len(packed["decoder_segment_ids"]) == 2 and len(padded["decoder_segment_ids"]) == 6
  _, a = model.loss_fn(net, packed, None)
  _, b = model.loss_fn(net, padded, None)
  for k in ("loss_sum", "targets", "accuracy_sum", "items"):
    assert np.isfinite(float(a[k])), k
    np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=1e-5, err_msg=k)
  assert float(a["items"]) == 6 and float(a["dropped_targets"]) == 0


def test_chunked_text_loss_equals_the_dense_one_with_its_gradients():
  """text_loss_chunk streams the text softmax over vocabulary chunks (the last one shifted,
  48 rows in chunks of 20): the same loss, metrics and parameter gradients as dense logits."""
  rng = np.random.default_rng(4)
  rows = _rows([_toy_sequence(rng) for _ in range(6)], 33, pack=True)
  net = _toy_model().network(nnx.Rngs(4))
  graphdef, params = nnx.split(net, nnx.Param)
  results = []
  for model in (_toy_model(), _toy_model(text_loss_chunk=20)):
    fn = lambda p, model=model: model.loss_fn(nnx.merge(graphdef, p), rows, None)
    (loss, metrics), grads = jax.value_and_grad(fn, has_aux=True)(params)
    results.append((loss, metrics, grads))
  (dense, dm, dg), (chunked, cm, cg) = results
  np.testing.assert_allclose(float(chunked), float(dense), rtol=1e-5)
  for k in ("loss_sum", "targets", "accuracy_sum"):
    np.testing.assert_allclose(float(cm[k]), float(dm[k]), rtol=1e-5, err_msg=k)
  flat_d, flat_c = jax.tree_util.tree_leaves(dg), jax.tree_util.tree_leaves(cg)
  assert len(flat_d) == len(flat_c) and any(float(jnp.abs(g).max()) > 0 for g in flat_d)
  for a, b in zip(flat_d, flat_c):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_item_slots_beyond_capacity_are_counted_as_dropped():
  model = _toy_model(item_slots=2)
  net = model.network(nnx.Rngs(2))
  rng = np.random.default_rng(2)
  rows = _rows([_toy_sequence(rng) for _ in range(3)], 33, pack=True)
  assert len(rows["decoder_segment_ids"]) == 1
  _, m = model.loss_fn(net, rows, None)
  assert float(m["dropped_targets"]) == 1  # three ID slots, two read


def test_item_loss_weight_scales_only_the_item_term():
  rng = np.random.default_rng(3)
  rows = _rows([_toy_sequence(rng) for _ in range(4)], 11, pack=False)
  net = _toy_model().network(nnx.Rngs(3))
  base_loss, m = _toy_model().loss_fn(net, rows, None)
  heavy_loss, m2 = _toy_model(item_loss_weight=3.0).loss_fn(net, rows, None)
  assert np.isfinite(float(m["loss_sum"]))
  assert float(m["loss_sum"]) == pytest.approx(float(m2["loss_sum"]))  # the reported sum is unweighted
  items = rows["decoder_target_item_ids"] > 0
  assert float(m["targets"]) == rows["decoder_loss_weights"].sum() + items.sum()
  assert float(heavy_loss) > float(base_loss)


# --- real rows: the converter on the synthetic REGEN tasks ----------------------------------


@pytest.fixture(scope="module")
def regen(synthetic_prepared):
  import recjax.tasks as tasks
  tasks.register_dataset_tasks("tsyn", synthetic_prepared["synthetic_regen"])
  return synthetic_prepared["synthetic_regen"]


def _epoch_rows(task, pack, lengths):
  import seqio
  from recjax.data import converters
  provider = seqio.get_mixture_or_task(task)
  ph = provider.output_features["inputs"].vocabulary.item_placeholder_id
  ds = provider.get_dataset(lengths, split="validation", shuffle=False, trim_output_features=False)
  ds = converters.PrefixLMConverter(placeholder_id=ph, pack=pack)(ds, lengths)
  return {k: np.stack([r[k] for r in ds.as_numpy_iterator()]) for k in ds.element_spec}, ph


def test_converter_packs_real_examples_without_changing_a_loss(regen):
  lengths = {"inputs": 96, "targets": 40}
  packed, ph = _epoch_rows("tsyn_lumen_endorsement", True, lengths)
  padded, _ = _epoch_rows("tsyn_lumen_endorsement", False, lengths)
  n = len(padded["decoder_segment_ids"])
  assert packed["decoder_segment_ids"].max(1).sum() == n  # every example, once
  fill = lambda r: (r["decoder_segment_ids"] > 0).mean()
  assert fill(packed) > fill(padded) and len(packed["decoder_segment_ids"]) < n
  # Every example has exactly one target item (the ID slot), and the item read at the next
  # slot's input is that item.
  assert (padded["decoder_target_item_ids"] > 0).sum() == n
  t = np.argwhere(padded["decoder_target_item_ids"] > 0)
  np.testing.assert_array_equal(padded["decoder_input_item_ids"][t[:, 0], t[:, 1] + 1],
                                padded["decoder_target_item_ids"][t[:, 0], t[:, 1]])
  assert (padded["decoder_target_tokens"][t[:, 0], t[:, 1]] == ph).all()
  import seqio
  provider = seqio.get_mixture_or_task("tsyn_lumen_endorsement")
  model = lumen.Lumen(vocab_size=provider.output_features["targets"].vocabulary.vocab_size,
                      num_items=provider.output_features["inputs_item_ids"].vocabulary.vocab_size,
                      placeholder_id=ph, hidden_size=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64)
  net = model.network(nnx.Rngs(0))
  sums = lambda rows: model.loss_fn(net, rows, None)[1]
  a, b = sums(packed), sums(padded)
  for k in ("loss_sum", "targets", "items"):
    assert np.isfinite(float(a[k])), k
    np.testing.assert_allclose(float(a[k]), float(b[k]), rtol=2e-5, err_msg=k)


def test_a_placeholder_without_its_item_is_an_error():
  import tensorflow as tf
  from recjax.data import converters
  ds = tf.data.Dataset.from_tensors({"inputs": tf.constant([6, PLACEHOLDER, 1]), "targets": tf.constant([4, 1]),
                                     "inputs_item_ids": tf.constant([], tf.int32)})
  conv = converters.PrefixLMConverter(placeholder_id=PLACEHOLDER, pack=False)
  with pytest.raises(tf.errors.InvalidArgumentError, match="placeholder"):
    list(conv(ds, {"inputs": 8, "targets": 4}).as_numpy_iterator())


# --- the gin path -----------------------------------------------------------------------------

LUMEN = [
    "--gin_file=experiments/lumen_synthetic.gin",
    "--gin.MIXTURE_OR_TASK_NAME='tsyn_lumen'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 96, 'targets': 40}",
    "--gin.BATCH_SIZE=8", "--gin.EVAL_BATCH_SIZE=32",
    "--gin.lumen.Lumen.hidden_size=32", "--gin.lumen.Lumen.num_layers=1", "--gin.lumen.Lumen.num_heads=2",
    "--gin.lumen.Lumen.head_dim=16", "--gin.lumen.Lumen.mlp_dim=64",
    "--gin.loop.train.log_every=5",
    "--gin.loop.make_optimizer.schedule='constant'", "--gin.loop.make_optimizer.warmup_steps=0",
    "--gin.evaluators.lumen.sentence_encoder=None", "--gin.evaluators.lumen.max_rows=20",
]


def test_lumen_trains_evaluates_and_infers_from_gin(regen, tmp_path):
  run = [*LUMEN, "--gin.TRAIN_STEPS=20", f"--gin.MODEL_DIR={tmp_path}"]
  out = recjax("train", *run, dataset=regen)
  assert out.returncode == 0, out.stderr[-3000:]
  log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
  assert log[-1]["step"] == 20 and np.isfinite(log[-1]["loss"])
  out = recjax("evaluate", *run, dataset=regen)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads((tmp_path / "eval_step_20.json").read_text())
  assert result["evaluator"] == "lumen"
  res = result["results"]
  for n in ("endorsement", "purchase_reason", "explanation", "brief_summary"):
    assert res[f"test/tsyn_lumen_{n}/items"]["count"] == 20
    assert 0 <= res[f"test/tsyn_lumen_{n}/narrative"]["bleu"] <= 100
  assert res["test/items"]["count"] == 80
  out = recjax("infer", *run, "--gin.infer_lib.infer.max_rows=4", "--gin.infer_lib.infer.top_k=5", dataset=regen)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in (tmp_path / "infer_test_step_20.jsonl").read_text().splitlines()]
  assert len(rows) == 16 and {r["task"] for r in rows} == {f"tsyn_lumen_{n}" for n in
                                                              ("endorsement", "purchase_reason", "explanation",
                                                               "brief_summary")}
  assert all(len(r["items"]) == 5 and r["prompt"].endswith("ID:") and "reference" in r for r in rows)


def test_lumen_sigkill_then_resume_matches_uninterrupted(regen, tmp_path):
  _sigkill_then_resume_matches_uninterrupted([*LUMEN, "--gin.loop.train.checkpoint_every=10"], regen, tmp_path,
                                             steps=30, kill_after=10)


_LUMEN_REFERENCE = textwrap.dedent("""
    import functools, json, sys
    import jax, numpy as np, seqio
    from recjax.train import loop, mesh as mesh_lib
    from recjax.models import lumen
    from recjax.data import pipeline
    import recjax.tasks as tasks
    data_dir, steps, out, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    tasks.register_dataset_tasks("tsyn", data_dir)
    task = "tsyn_lumen_endorsement"
    model = lumen.Lumen(**loop.task_fields(lumen.Lumen, task), vocab_size=loop.item_vocab_size(task, "targets"),
                        hidden_size=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64)
    lengths = {"inputs": 96, "targets": 40}
    opt = functools.partial(loop.make_optimizer, learning_rate=3e-3, schedule="constant", warmup_steps=0)
    if mode == "two_shards":  # the global batches two processes see, on one device
      shards = [pipeline.DataIterator(task, split="train", feature_converter=model.feature_converter(),
                                      task_feature_lengths=lengths, batch_size=8, shuffle=True, seed=0,
                                      shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
      batches = [(lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]})(
          [next(s) for s in shards]) for _ in range(steps)]
      meshes = {"one": mesh_lib.create_mesh()}
    else:  # one device vs a (2, 2, 2) mesh of 8
      it = pipeline.DataIterator(task, split="train", feature_converter=model.feature_converter(),
                                 task_feature_lengths=lengths, batch_size=8, shuffle=True, seed=0)
      batches = [next(it) for _ in range(steps)]
      meshes = {"one": mesh_lib.create_mesh(1, 1, 1, devices=jax.devices()[:1]),
                "mesh222": mesh_lib.create_mesh(2, 2, 2)}
    result = {}
    for name, mesh in meshes.items():
      trainer = loop.Trainer(model, mesh, mesh_lib.DEFAULT_RULES, seed=0, total_steps=steps, optimizer_fn=opt)
      with jax.set_mesh(mesh):
        state, step = trainer.init_state(), trainer.make_train_step()
        losses = []
        for b in batches:
          state, metrics = step(state, trainer.to_global(b))
          losses.append(float(metrics["loss"]))
      p = state.params
      specs = {"embedder": p["lm"]["embedder"]["embedding"][...], "mlp_up": p["lm"]["blocks"][0]["mlp"]["up"]["kernel"][...],
               "items": p["items"]["embedding"][...]}
      result[name] = {"losses": losses, "devices": len(mesh.devices.flat),
                      **{k: {"spec": str(v.sharding.spec), "shape": list(v.shape),
                             "shard": list(v.addressable_shards[0].data.shape)} for k, v in specs.items()}}
      if mode == "two_shards":
        leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
        def names(path):
          parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
          return "/".join(parts[:-1] if parts[-1] == "value" else parts)
        np.savez(out, **{names(k): np.asarray(v) for k, v in leaves})
    print("RESULT " + json.dumps(result))
""")


def test_lumen_one_device_and_2x2x2_mesh_give_the_same_losses(regen, tmp_path):
  script = tmp_path / "shard.py"
  script.write_text(_LUMEN_REFERENCE)
  out = subprocess.run([sys.executable, str(script), str(regen), "4", str(tmp_path / "x.npz"), "mesh"],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT ", 1)[1])
  one, sharded = result["one"], result["mesh222"]
  assert one["devices"] == 1 and sharded["devices"] == 8
  np.testing.assert_allclose(one["losses"], sharded["losses"], rtol=1e-4)
  assert one["losses"][0] != one["losses"][-1]
  # The rules: vocab / item rows and MLP width on 'model', the embedding width on 'fsdp'.
  for name in ("embedder", "items"):
    rows, dim = sharded[name]["shape"]
    assert sharded[name]["spec"].endswith("('model', 'fsdp')"), sharded[name]
    assert sharded[name]["shard"] == [rows // 2, dim // 2]
  d, m = sharded["mlp_up"]["shape"]
  assert sharded["mlp_up"]["spec"].endswith("('fsdp', 'model')") and sharded["mlp_up"]["shard"] == [d // 2, m // 2]


def test_lumen_two_processes_match_one_process(regen, tmp_path):
  model_dir = tmp_path / "mp"
  run = [*LUMEN, "--gin.MIXTURE_OR_TASK_NAME='tsyn_lumen_endorsement'", "--gin.TRAIN_STEPS=6",
         f"--gin.MODEL_DIR={model_dir}", "--dataset", f"tsyn={regen}"]
  cmd = [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes", "2", "--",
         sys.executable, "-m", "recjax.main", "train", *run]
  two = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert two.returncode == 0, two.stdout[-3000:]
  assert "[1]" in two.stdout
  script = tmp_path / "reference.py"
  script.write_text(_LUMEN_REFERENCE)
  ref = subprocess.run([sys.executable, str(script), str(regen), "6", str(tmp_path / "ref.npz"), "two_shards"],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert ref.returncode == 0, ref.stderr[-3000:]
  step, got = checkpoint_params(model_dir)
  want = dict(np.load(tmp_path / "ref.npz"))
  assert step == 6 and set(want) == set(got)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)


# --- soft-prompt fusion ("Beyond Retrieval") on the same path ---------------------------------


@pytest.fixture(scope="module")
def fused(synthetic_prepared, tmp_path_factory):
  """A copy of the synthetic REGEN set with the fusion tables' artifacts (WALS, MiniLM)."""
  import shutil
  from recjax.artifacts import text_embeddings, wals
  data = tmp_path_factory.mktemp("fused") / "regen"
  shutil.copytree(synthetic_prepared["synthetic_regen"], data)
  if not (data / "artifacts" / "text_embeddings" / "minilm").is_dir():
    text_embeddings.fit(data, "minilm")
  wals.fit(data, "wals")
  return data


def test_soft_slots_name_the_windows_newest_interactions(fused):
  import seqio
  import recjax.tasks as tasks
  from recjax.artifacts import fusion
  from recjax.data import converters, pipeline
  tasks.register_dataset_tasks("tfus", fused)
  offsets, flat = fusion.interaction_index(fused)
  ph = seqio.get_mixture_or_task("tfus_narrative").output_features["inputs"].vocabulary.item_placeholder_id
  conv = converters.PrefixLMConverter(placeholder_id=ph, soft_tokens=5)
  it = pipeline.DataIterator("tfus_narrative", split="train", feature_converter=conv,
                             task_feature_lengths={"inputs": 96, "targets": 40}, batch_size=8)
  b = next(it)
  assert b["decoder_target_tokens"].shape == (8, 5 + 96 + 40)
  soft = b["decoder_input_soft_items"] > 0
  assert soft.any()
  rows = offsets[b["decoder_input_soft_users"][soft]] + b["decoder_input_soft_positions"][soft]
  np.testing.assert_array_equal(flat[rows], b["decoder_input_soft_items"][soft])
  # Each example's soft slots come first: at most 5, right after its start, never trained on.
  starts = np.argwhere((b["decoder_positions"] == 0) & (b["decoder_segment_ids"] > 0))
  for r, c in starts:
    run = soft[r, c + 1:c + 6]
    assert run[:run.sum()].all() and (b["decoder_loss_weights"][r, c:c + run.sum() + 1] == 0).all()


FUSION = [a.replace("lumen_synthetic", "fusion_synthetic") for a in LUMEN
          if "MIXTURE_OR_TASK_NAME" not in a] + ["--gin.MIXTURE_OR_TASK_NAME='tsyn_narrative_endorsement'",
                                                 "--gin.lumen.Lumen.soft_tokens=5"]


@pytest.mark.parametrize("soft", ["cf+content"])
def test_fusion_trains_and_evaluates_from_gin(fused, tmp_path, soft):
  """...and its export (the fusion tables travel with it) re-evaluates identically."""
  model_dir, export_dir = tmp_path / "m", tmp_path / "e"
  run = [*FUSION, f"--gin.SOFT_PROMPT='{soft}'", "--gin.ADAPTER='linear'", "--gin.TRAIN_STEPS=10",
         "--gin.EVAL_BATCH_SIZE=8", f"--gin.MODEL_DIR={model_dir}", f"--gin.EXPORT_DIR={export_dir}"]
  for command in ("train", "evaluate", "export"):
    out = recjax(command, *run, dataset=fused)
    assert out.returncode == 0, (command, out.stderr[-3000:])
  _, params = checkpoint_params(model_dir)
  kernel = params["adapter/0/kernel"]
  assert kernel.shape == (64 + 384, 32)  # WALS 64 + MiniLM 384 -> hidden
  res = json.loads((model_dir / "eval_step_10.json").read_text())["results"]
  assert res["test/tsyn_narrative_endorsement/narrative"]["count"] == 20
  assert "test/tsyn_narrative_endorsement/items" not in res  # narrative rows name no item to rank
  out = recjax("evaluate", *run, "--exported", export_dir, dataset=fused)
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads((export_dir / "eval_export.json").read_text())["results"] == res
  assert (export_dir / "frozen.npz").is_file()


def test_lumen_export_generates_and_reevaluates_like_the_checkpoint(regen, tmp_path):
  """`recjax export` of LUMEN: the serialized generation (params as arguments, no model code
  when loaded) gives the checkpoint's items, ranks and text ids, and `recjax evaluate
  --exported` its metrics."""
  import functools
  import seqio
  from recjax.evaluation import evaluate as eval_lib
  from recjax.evaluation import evaluators, exported, text_generation
  from recjax.train import mesh as mesh_lib
  task, lengths = "tsyn_lumen_endorsement", {"inputs": 96, "targets": 40}
  model_dir, export_dir = tmp_path / "m", tmp_path / "e"
  run = [*LUMEN, f"--gin.MIXTURE_OR_TASK_NAME='{task}'", "--gin.TRAIN_STEPS=10", "--gin.EVAL_BATCH_SIZE=8",
         "--gin.evaluators.lumen.max_rows=12", f"--gin.MODEL_DIR={model_dir}", f"--gin.EXPORT_DIR={export_dir}"]
  for command in ("train", "evaluate", "export"):
    out = recjax(command, *run, dataset=regen)
    assert out.returncode == 0, (command, out.stderr[-3000:])
  out = recjax("evaluate", *run, "--exported", export_dir, dataset=regen)
  assert out.returncode == 0, out.stderr[-3000:]
  ckpt = json.loads((model_dir / "eval_step_10.json").read_text())
  exp = json.loads((export_dir / "eval_export.json").read_text())
  assert ckpt["evaluator"] == exp["evaluator"] == "lumen" and exp["source"] == "export"
  assert ckpt["results"] == exp["results"]  # the export alone writes the same texts and ranks
  assert ckpt["results"][f"test/{task}/items"]["count"] == 12
  assert {p.name for p in export_dir.iterdir()} >= {"params.npz", "generate_recommend.jaxexport",
                                                     "generate_text.jaxexport", "vocabulary.model",
                                                     "metadata.json", "config.gin", "checksums.json"}
  generate = exported.load_text_generator(export_dir)
  meta = generate.metadata
  assert (meta["kind"], meta["num_items"], meta["max_new_tokens"], meta["batch_size"]) == ("text_generation", 20,
                                                                                           40, 8)
  converter = exported.load_eval_converter(export_dir)
  provider = seqio.get_mixture_or_task(task)
  assert converter.placeholder_id == provider.output_features["inputs"].vocabulary.item_placeholder_id
  # The checkpoint's own generation (what the evaluator runs) on the first eval batch.
  factory = functools.partial(lumen.Lumen, hidden_size=32, num_layers=1, num_heads=2, head_dim=16, mlp_dim=64)
  factory.VOCAB_FEATURE, factory.TASK_FIELDS = lumen.Lumen.VOCAB_FEATURE, lumen.Lumen.TASK_FIELDS
  source = evaluators.Source.from_checkpoint(factory, task, model_dir, mesh_lib.create_mesh(),
                                             mesh_lib.DEFAULT_RULES, task_feature_lengths=lengths)
  reference = text_generation.checkpoint_generator(source.model, source.trainer, source.params, num_items=20,
                                                   max_new_tokens=40)
  batch = next(eval_lib.eval_batches(task, "test", converter, lengths, 8))
  features = {k: batch[k] for k in text_generation.FEATURES if k in batch}
  for recommend in (True, False):
    want = jax.device_get(reference({k: source.put(v) for k, v in features.items()}, recommend))
    got = jax.device_get(generate(features, recommend))
    assert set(got) == set(want) == ({"items", "item_scores", "target_rank", "text"} if recommend else {"text"})
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} recommend={recommend}")
    # Fewer rows than the export's batch are padded: the same rows' outputs.
    few = jax.device_get(generate({k: v[:3] for k, v in features.items()}, recommend))
    for k in want:
      np.testing.assert_array_equal(few[k], want[k][:3], err_msg=k)
    if recommend:
      want_recommend = want
  # The texts decode without the task registry (the export's SentencePiece model).
  vocabulary = exported.load_vocabulary(export_dir)
  task_vocabulary = provider.output_features["targets"].vocabulary
  for ids in got["text"]:
    assert (text_generation.decode_text(vocabulary, ids, after_item=False)
            == text_generation.decode_text(task_vocabulary, ids, after_item=False))
  # More rows than the export's batch run in chunks of it.
  twice = jax.device_get(generate({k: np.concatenate([v, v[:5]]) for k, v in features.items()}, True))
  for k in ("items", "target_rank", "text"):
    np.testing.assert_array_equal(twice[k], np.concatenate([want_recommend[k], want_recommend[k][:5]]), err_msg=k)
  with pytest.raises(ValueError, match="width"):
    generate({**features, "prompt_tokens": features["prompt_tokens"][:, 1:]}, True)


# --- a pretrained Gemma start -----------------------------------------------------------------

GEMMA = REPO / "tests" / "fixtures" / "tiny_gemma"  # 340 SentencePiece pieces, no "<item>" piece


def test_pretrained_gemma_sizes_vocabulary_check_and_grown_rows(tmp_path):
  loaded = gemma.load_gemma(GEMMA)
  spm = str(GEMMA / "tokenizer.model")
  other = tmp_path / "dataset.model"  # any other SentencePiece file (compared by content)
  other.write_bytes(b"not the checkpoint's model")
  for bad in (str(other), ""):
    with pytest.raises(ValueError, match="text_vocabulary_options.spm_model"):
      lumen.Lumen(vocab_size=440, num_items=20, spm_model=bad, pretrained=str(GEMMA)).gemma_config()
  # The fixture's 340 pieces + seqio's 100 extra ids = 440 task ids: 512 rows (a multiple of 128).
  model = lumen.Lumen(vocab_size=440, num_items=20, placeholder_id=340, spm_model=spm, pretrained=str(GEMMA),
                      hidden_size=8, num_layers=7)  # ignored: the checkpoint's sizes
  cfg = model.gemma_config()
  assert cfg == dataclasses.replace(loaded.config, vocab_size=512)
  fresh = nnx.state(model.network(nnx.Rngs(0)), nnx.Param)
  net = nnx.merge(nnx.graphdef(model.network(nnx.Rngs(1))), model.initial_params(fresh))
  emb = net.lm.embedder.embedding[...]
  assert emb.shape == (512, cfg.hidden_size)
  np.testing.assert_array_equal(emb[:340], loaded.model.embedder.embedding[...])
  np.testing.assert_array_equal(emb[340:], fresh["lm"]["embedder"]["embedding"][...][340:])
  np.testing.assert_array_equal(net.items.embedding[...], fresh["items"]["embedding"][...])  # items: fresh
  ids = jnp.array([[2, 17, 5, 300, 99, 1]], jnp.int32)
  np.testing.assert_allclose(net.lm(ids)[..., :340], loaded.model(ids), atol=1e-5)
  assert lumen.Lumen(vocab_size=440, num_items=20).initial_params(fresh) is fresh  # no checkpoint


def test_lumen_pretrained_gemma_start_through_gin(regen, tmp_path):
  """`--gin.lumen.Lumen.pretrained=tests/fixtures/tiny_gemma` with the tasks tokenized by the
  fixture's tokenizer.model (`text_vocabulary_options.spm_model`): the first step's loss is
  the loss of the loaded model's weights on the first batch.

  The fixture tokenizer (340 byte-fallback BPE pieces) is honest enough for the REGEN
  tasks as they are: it has no `<item>` piece, so the tasks' placeholder is seqio's last
  extra id (`<extra_id_99>` = 340, as with T5's model), and its 340 pieces + seqio's 100
  extra ids make 440 task ids, so the embedding grows to 512 rows (the padding multiple):
  rows 340.. and the item table keep the trainer's fresh values (seed 0), which the
  reference therefore takes from a fresh network too."""
  import seqio
  import recjax.tasks as tasks  # noqa: F401
  from recjax.data import pipeline
  from recjax.tasks import text
  from recjax.train import loop
  spm = GEMMA / "tokenizer.model"
  task_args = ["--gin.MIXTURE_OR_TASK_NAME='tsyn_lumen_endorsement'", "--gin.TRAIN_STEPS=1",
               "--gin.loop.train.log_every=1", f"--gin.lumen.Lumen.pretrained='{GEMMA}'"]
  model_dir = tmp_path / "m"
  out = recjax("train", *LUMEN, *task_args, f"--gin.text_vocabulary_options.spm_model='{spm}'",
               f"--gin.MODEL_DIR={model_dir}", dataset=regen)
  assert out.returncode == 0, out.stderr[-3000:]
  (first,) = [json.loads(l) for l in (model_dir / "train_log.jsonl").read_text().splitlines()]

  names = text.register("tgem", regen, spm_model=str(spm))
  try:
    task = "tgem_lumen_endorsement"
    fields = loop.task_fields(lumen.Lumen, task)
    assert fields["placeholder_id"] == 340 and fields["spm_model"] == str(spm)
    model = lumen.Lumen(vocab_size=loop.item_vocab_size(task, "targets"), **fields, pretrained=str(GEMMA))
    assert model.vocab_size == 440
    batch = next(pipeline.DataIterator(task, split="train", feature_converter=model.feature_converter(),
                                       task_feature_lengths={"inputs": 96, "targets": 40}, batch_size=8,
                                       shuffle=True, seed=0))
  finally:
    text.unregister(names)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  net = model.network(nnx.Rngs(0))  # the trainer's fresh start (seed 0)
  fresh_loss, _ = model.loss_fn(net, batch, None)
  loaded = gemma.load_gemma(GEMMA).model
  grown = net.lm.embedder.embedding[...].at[:340].set(loaded.embedder.embedding[...])
  nnx.update(net.lm, nnx.state(loaded, nnx.Param))
  net.lm.embedder.embedding.set_value(grown)
  loss, _ = model.loss_fn(net, batch, None)
  assert first["step"] == 1 and first["loss"] == pytest.approx(float(loss), rel=1e-5)
  assert float(fresh_loss) != pytest.approx(float(loss), rel=1e-3)  # the checkpoint made the difference
  # Tasks tokenized by another SentencePiece model (the dataset's own): one clear error.
  bad = recjax("train", *LUMEN, *task_args, f"--gin.MODEL_DIR={tmp_path / 'bad'}", dataset=regen)
  assert bad.returncode != 0 and "text_vocabulary_options.spm_model" in bad.stderr, bad.stderr[-3000:]
