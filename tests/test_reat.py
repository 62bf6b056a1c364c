"""ReAT (recjax/models/reat.py, the `reat` evaluator in recjax/evaluation/reat.py): parsing
beams back to items, AUC-ROC, popularity ranks, packed rows computing what unpacked ones
do, a pretrained start through gin, and `recjax train / evaluate / infer` on the small
synthetic REGEN data (resume after SIGKILL, two processes)."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from recjax.evaluation import reat as reat_eval
from recjax.models import reat
from recjax.models.text import t5_seq2seq as s2s
from test_train import _sigkill_then_resume_matches_uninterrupted, checkpoint_params, recjax

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SHORT_IDS = np.array(["", "", "I3", "I7", "I12", "I25"], object)  # items 2..5

# A tiny ReAT on the synthetic REGEN data (registered as "tsyn" by test_train.recjax).
TINY = [
    "--gin_file=experiments/reat_synthetic.gin",
    "--gin.MIXTURE_OR_TASK_NAME='tsyn_reat'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 64, 'targets': 8}",
    "--gin.BATCH_SIZE=8",
    "--gin.reat.Reat.d_model=16", "--gin.reat.Reat.d_kv=4", "--gin.reat.Reat.d_ff=32",
    "--gin.reat.Reat.num_layers=1", "--gin.reat.Reat.num_decoder_layers=1",
    "--gin.loop.train.log_every=1",
    "--gin.loop.make_optimizer.warmup_steps=2",
    "--gin.EVAL_BATCH_SIZE=8", "--gin.EVAL_ROWS=8", "--gin.NUM_BEAMS=5",
    "--gin.eval_lib.evaluate.ks=(1, 5)",
]


def test_beam_texts_parse_to_items_invalid_and_duplicates_skipped():
  index = reat_eval.item_index(SHORT_IDS)
  assert index == {"I3": 2, "I7": 3, "I12": 4, "I25": 5}
  assert reat_eval.parse_item(" I12 ", index) == 4
  assert reat_eval.parse_item("I99", index) == 0 and reat_eval.parse_item("I1 2", index) == 0
  assert reat_eval.parse_item("", index) == 0
  texts = [["I99", "I7", "I7", "I12"],  # invalid, then 7, a repeat, then the target: rank 1
           ["I3", "x", "I25", "I7"],  # target 3 first
           ["I3", "I7", "", "I25"]]  # the target (12) never named: a miss
  ranks, counts = reat_eval.beam_ranks(texts, [4, 2, 4], index)
  assert ranks.tolist() == [1, 0, reat_eval.MISS]
  assert counts["invalid_fraction"] == pytest.approx(3 / 12)
  assert counts["duplicate_fraction"] == pytest.approx(1 / 12)
  assert counts["top1_invalid_fraction"] == pytest.approx(1 / 3)
  # Ranking: an existing item outside the row's candidates is invalid too.
  ranks, counts = reat_eval.beam_ranks([["I3", "I25", "I7"]], [3], index, candidates=np.array([[3, 5, 0]]))
  assert ranks.tolist() == [1] and counts["invalid_fraction"] == pytest.approx(1 / 3)
  m = reat_eval.hit_metrics(np.array([0, 1, reat_eval.MISS, 7]))
  assert m["hr@1"] == 0.25 and m["hr@5"] == 0.5 and m["hr@10"] == 0.75 and m["hr@20"] == 0.75
  assert m["ndcg@5"] == pytest.approx((1 + 1 / np.log2(3)) / 4)


def test_auc_roc_by_hand():
  # Pairs (positive, negative): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, *) two wins -> 3/4.
  assert reat_eval.auc_roc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
  # Ties count half: (1 vs 1) 0.5, (2 vs 1) 1 -> 0.75.
  assert reat_eval.auc_roc([1.0, 1.0, 2.0], [0, 1, 1]) == pytest.approx(0.75)
  assert reat_eval.auc_roc([0.0, 1.0], [0, 1]) == 1.0 and reat_eval.auc_roc([1.0, 0.0], [0, 1]) == 0.0
  assert np.isnan(reat_eval.auc_roc([0.3, 0.2], [1, 1]))


def test_popularity_ranks_by_hand():
  counts = np.array([0, 0, 5, 9, 5, 1])  # items 2..5; 3 is the most popular, 2 and 4 tie
  assert reat_eval.popularity_ranks(counts, [3, 2, 4, 5]).tolist() == [0, 1, 2, 3]
  cands = np.array([[5, 4, 0], [5, 4, 0], [2, 5, 0]])
  assert reat_eval.popularity_ranks(counts, [5, 4, 3], cands).tolist() == [1, 0, reat_eval.MISS]


def test_constants_match_the_tasks():
  from recjax.data import preprocessors as P
  assert (reat.LIKE, reat.DISLIKE) == (P.LIKE, P.DISLIKE)
  assert reat.RANKING_CANDIDATES == P.NUM_NEGATIVES + 1


def test_packed_row_gives_the_unpacked_per_token_loss():
  """seqio's packing of two examples into one row: every target token's loss is the one
  it has alone in its own row (no attention across examples, positions restart)."""
  import seqio
  import tensorflow as tf
  examples = [{"inputs": [7, 8, 5, 9, 1], "targets": [3, 9, 1]},
              {"inputs": [8, 4, 9, 3, 6, 2, 1], "targets": [4, 6, 5, 1]}]
  lengths = {"inputs": 16, "targets": 8}
  ds = lambda: tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                                                "targets": tf.TensorSpec([None], tf.int32)})
  model = reat.Reat()
  (packed,) = list(model.feature_converter(pack=True)(ds(), lengths).as_numpy_iterator())
  single = list(model.feature_converter(pack=False)(ds(), lengths).as_numpy_iterator())
  assert packed["decoder_segment_ids"].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
  model = reat.Reat(vocab_size=12, d_model=16, d_kv=4, d_ff=32, num_heads=4, num_layers=2,
                    num_decoder_layers=2, relative_attention_num_buckets=8, relative_attention_max_distance=8)
  net = model.network(nnx.Rngs(0))

  def token_nll(batch):
    batch = {k: jnp.asarray(v)[None] for k, v in batch.items()}
    logits = model.logits(net, batch)[0]
    target = batch["decoder_target_tokens"][0]
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, target[:, None], -1)[:, 0]
    return np.asarray(nll)[np.asarray(batch["decoder_loss_weights"][0]) > 0]

  want = np.concatenate([token_nll(b) for b in single])
  np.testing.assert_allclose(token_nll(packed), want, rtol=1e-5, atol=1e-6)
  # Without its segments the row is one long example: the second example's losses change.
  merged = {k: v for k, v in packed.items() if k not in s2s.Packing.KEYS}
  assert np.max(np.abs(token_nll(merged) - want)) > 1e-3
  # The loss sums count examples (segments) and target tokens.
  _, m = model.loss_fn(net, {k: jnp.asarray(v)[None] for k, v in packed.items()}, None)
  assert float(m["items"]) == 2 and float(m["targets"]) == 7
  assert float(m["loss_sum"]) == pytest.approx(float(np.sum(want)), rel=1e-5)


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
  fresh = nnx.state(model.network(nnx.Rngs(0)), nnx.Param)
  net = nnx.merge(nnx.graphdef(model.network(nnx.Rngs(1))), model.initial_params(fresh))
  assert net.embed.embedding.shape == (164, cfg.d_model)
  np.testing.assert_array_equal(net.embed.embedding[...][64:], fresh["encoder"]["embed"]["embedding"][...][64:])
  ids = jnp.array([[5, 9, 7, 1]], jnp.int32)
  dec = jnp.array([[0, 4, 6]], jnp.int32)
  mask = jnp.ones_like(ids)
  np.testing.assert_allclose(net(ids, mask, dec)[..., :64], loaded(ids, mask, dec), atol=1e-5)
  assert reat.Reat(vocab_size=164).initial_params(fresh) is fresh  # no checkpoint: the fresh start


@pytest.fixture(scope="module")
def tsyn(synthetic_prepared):
  return synthetic_prepared["synthetic_regen"]


def test_train_sigkill_resume_evaluate_and_infer(tsyn, tmp_path):
  """`recjax train` on a packed mixture, SIGKILLed and resumed: bit-identical parameters;
  then `recjax evaluate` on the UT tasks (retrieval, ranking, rating) and `recjax infer`."""
  run = [*TINY, "--gin.loop.train.checkpoint_every=4"]
  _sigkill_then_resume_matches_uninterrupted(run, tsyn, tmp_path, steps=12, kill_after=4)
  model_dir = tmp_path / "full"
  logged = [json.loads(l) for l in (model_dir / "train_log.jsonl").read_text().splitlines()]
  assert logged[-1]["loss"] < logged[0]["loss"]
  ut = [*run, f"--gin.MODEL_DIR={model_dir}", "--gin.MIXTURE_OR_TASK_NAME='tsyn_ut'"]
  out = recjax("evaluate", *ut, dataset=tsyn)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads((model_dir / "eval_step_12.json").read_text())
  assert got["evaluator"] == "reat"
  res = got["results"]
  assert set(res) == {f"test/tsyn_reat_{f}/{s}" for f in ("retrieval", "ranking", "rating")
                      for s in ("model", "popularity")}
  for fam in ("retrieval", "ranking"):
    m = res[f"test/tsyn_reat_{fam}/model"]
    assert m["count"] == 8 and 0 <= m["invalid_fraction"] <= 1 and 0 <= m["ndcg@5"] <= m["hr@5"] <= 1
    assert res[f"test/tsyn_reat_{fam}/popularity"]["count"] == 8
  rating = res["test/tsyn_reat_rating/model"]
  assert rating["count"] == 8 and (0 <= rating["auc"] <= 1 or np.isnan(rating["auc"]))
  assert 0 < rating["positive_fraction"] < 1  # both labels among the rows: the AUC is defined
  # The reat mixture evaluates its retrieval task only (MIM and MLM have no metric here).
  out = recjax("evaluate", *run, f"--gin.MODEL_DIR={model_dir}", dataset=tsyn)
  assert out.returncode == 0, out.stderr[-3000:]
  res = json.loads((model_dir / "eval_step_12.json").read_text())["results"]
  assert set(res) == {"test/tsyn_reat_retrieval/model", "test/tsyn_reat_retrieval/popularity"}
  out = recjax("infer", *ut, "--gin.infer_lib.infer.top_k=3", "--gin.infer_lib.infer.batch_size=64", dataset=tsyn)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(l) for l in (model_dir / "infer_test_step_12.jsonl").read_text().splitlines()]
  assert {r["task"] for r in rows} == {"tsyn_reat_retrieval", "tsyn_reat_ranking"}
  assert all(len(r["beams"]) == 3 and len(r["items"]) <= 3 for r in rows)


# One process fed what two processes feed (each its own shard; the global batch is their
# concatenation): argv = dataset dir, steps, out.npz.
_REFERENCE = textwrap.dedent("""
    import functools, sys
    import jax, numpy as np, seqio
    from recjax.train import loop, mesh as mesh_lib
    from recjax.models import reat
    from recjax.data import pipeline
    import recjax.tasks as tasks
    data_dir, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    tasks.register_dataset_tasks("tsyn", data_dir)
    model = reat.Reat(vocab_size=loop.item_vocab_size("tsyn_reat", "targets"), **loop.task_fields(reat.Reat, "tsyn_reat"),
                      d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1)
    shards = [pipeline.DataIterator("tsyn_reat", split="train", feature_converter=model.feature_converter(),
                                    task_feature_lengths={"inputs": 64, "targets": 8}, batch_size=8,
                                    shuffle=True, seed=0, shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
    mesh = mesh_lib.create_mesh()
    opt = functools.partial(loop.make_optimizer, learning_rate=2e-3, schedule="cosine", warmup_steps=2)
    trainer = loop.Trainer(model, mesh, mesh_lib.DEFAULT_RULES, seed=0, total_steps=steps, optimizer_fn=opt)
    losses = []
    with jax.set_mesh(mesh):
      state, step = trainer.init_state(), trainer.make_train_step()
      for _ in range(steps):
        parts = [next(s) for s in shards]
        state, m = step(state, trainer.to_global({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}))
        losses.append(float(m["loss_sum"]) / float(m["targets"]))
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    def names(path):
      parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
      return "/".join(parts[:-1] if parts[-1] == "value" else parts)
    np.savez(out, losses=np.array(losses), **{names(k): np.asarray(v) for k, v in leaves})
""")


def test_two_processes_match_one_process(tsyn, tmp_path):
  model_dir = tmp_path / "mp"
  cmd = [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes", "2", "--",
         sys.executable, "-m", "recjax.main", "train", *TINY, "--gin.TRAIN_STEPS=6",
         f"--gin.MODEL_DIR={model_dir}", "--dataset", f"tsyn={tsyn}"]
  two = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert two.returncode == 0, two.stdout[-3000:]
  assert "[1]" in two.stdout  # both processes ran
  script = tmp_path / "reference.py"
  script.write_text(_REFERENCE)
  ref = subprocess.run([sys.executable, str(script), str(tsyn), "6", str(tmp_path / "ref.npz")],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert ref.returncode == 0, ref.stderr[-3000:]
  want = dict(np.load(tmp_path / "ref.npz"))
  losses = want.pop("losses")
  logged = [json.loads(l) for l in (model_dir / "train_log.jsonl").read_text().splitlines()]
  np.testing.assert_allclose([l["loss"] for l in logged], losses, rtol=1e-5)
  step, got = checkpoint_params(model_dir)
  assert step == 6 and set(want) == set(got)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)


def test_pretrained_start_through_gin(tsyn, tmp_path):
  """A Hugging Face checkpoint (the fixture, its embedding padded to the tasks' 164 ids so
  nothing is grown) named in gin: the first step's loss is the loaded model's loss on the
  first batch."""
  from safetensors.numpy import load_file, save_file
  import seqio
  import recjax.tasks as tasks
  from recjax.data import pipeline
  from recjax.tasks import text
  src, ckpt = FIXTURES / "tiny_t5_gated_seq2seq", tmp_path / "t5"
  ckpt.mkdir()
  shutil.copy(src / "spiece.model", ckpt / "spiece.model")
  config = json.loads((src / "config.json").read_text())
  vocab = 164  # 64 pieces + seqio's 100 extra ids
  (ckpt / "config.json").write_text(json.dumps(dict(config, vocab_size=vocab)))
  tensors = load_file(src / "model.safetensors")
  rng = np.random.default_rng(0)
  for name in ("shared.weight", "lm_head.weight"):
    t = tensors[name]
    tensors[name] = np.concatenate([t, rng.normal(0, 1, (vocab - len(t), t.shape[1])).astype(t.dtype)])
  save_file(tensors, str(ckpt / "model.safetensors"))

  model_dir = tmp_path / "m"
  args = [*TINY, "--gin.MIXTURE_OR_TASK_NAME='tsyn_reat_retrieval'", "--gin.TRAIN_STEPS=1",
          f"--gin.reat.Reat.pretrained='{ckpt}'", f"--gin.text_vocabulary_options.spm_model='{ckpt / 'spiece.model'}'",
          f"--gin.MODEL_DIR={model_dir}"]
  out = recjax("train", *args, dataset=tsyn)
  assert out.returncode == 0, out.stderr[-3000:]
  (first,) = [json.loads(l) for l in (model_dir / "train_log.jsonl").read_text().splitlines()]

  names = text.register("tpre", tsyn, spm_model=str(ckpt / "spiece.model"))
  try:
    task = seqio.get_mixture_or_task("tpre_reat_retrieval")
    assert task.output_features["targets"].vocabulary.vocab_size == vocab
    model = reat.Reat(vocab_size=vocab)
    batch = next(pipeline.DataIterator(task, split="train", feature_converter=model.feature_converter(),
                                       task_feature_lengths={"inputs": 64, "targets": 8}, batch_size=8, seed=0))
  finally:
    text.unregister(names)
  loaded = s2s.load_t5(ckpt).model
  loss, _ = model.loss_fn(loaded, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  assert first["step"] == 1 and first["loss"] == pytest.approx(float(loss), rel=1e-5)
  # The tasks' vocabulary must be the checkpoint's: without the binding, one clear error.
  bad = recjax("train", *[a for a in args if "text_vocabulary_options" not in a],
               f"--gin.MODEL_DIR={tmp_path / 'bad'}", dataset=tsyn)
  assert bad.returncode != 0 and "text_vocabulary_options.spm_model" in bad.stderr
