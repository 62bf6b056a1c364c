"""The trainer end to end: gin files, sharding, multi-process, resume, preemption, export.

Most tests run `recjax` in subprocesses (as users and launchers do), so that device counts,
jax.distributed and signals are real. Models are tiny; the data is the small synthetic set.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from conftest import copy_with_random_ids

REPO = pathlib.Path(__file__).resolve().parents[1]
GIN_FILES = sorted((REPO / "gin").rglob("*.gin"))

# A tiny, fast Bert4Rec run on the synthetic items task; tests add their own bindings.
TINY = [
    "--gin_file=experiments/quickstart.gin",
    "--gin.MIXTURE_OR_TASK_NAME='tsyn_items'",
    "--gin.TASK_FEATURE_LENGTHS={'items': 20}",
    "--gin.BATCH_SIZE=8",
    "--gin.bert4rec.Bert4Rec.max_length=20",
    "--gin.bert4rec.Bert4Rec.dim=16",
    "--gin.bert4rec.Bert4Rec.mlp_dim=32",
    "--gin.loop.train.log_every=5",
    "--gin.loop.make_optimizer.schedule='constant'",
    "--gin.loop.make_optimizer.warmup_steps=0",
]


def recjax(*args, env=None, timeout=600, dataset=None):
  cmd = [sys.executable, "-m", "recjax.main", *map(str, args)]
  if dataset is not None:
    cmd += ["--dataset", f"tsyn={dataset}"]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                        env=dict(os.environ, **(env or {})))


def param_key(path) -> str:
  """'blocks/0/attention/key/kernel' from a key path (the Param's trailing 'value' dropped)."""
  names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
  return "/".join(names[:-1] if names[-1] == "value" else names)


def checkpoint_params(model_dir, step=None):
  """{path: array} of the params stored in a checkpoint (read without model code)."""
  import orbax.checkpoint as ocp
  root = pathlib.Path(model_dir) / "checkpoints"
  step = step if step is not None else max(int(p.name) for p in root.iterdir() if p.name.isdigit())
  import jax
  checkpointer = ocp.StandardCheckpointer()
  path = root / str(step) / "state"
  # Restore onto this process's first device, whatever topology wrote the checkpoint.
  meta = checkpointer.metadata(path)
  meta = getattr(meta, "item_metadata", meta)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), meta,
                        is_leaf=lambda m: hasattr(m, "shape") and hasattr(m, "dtype"))
  tree = checkpointer.restore(path, target)
  leaves = jax.tree_util.tree_flatten_with_path(tree["params"])[0]
  return step, {param_key(k): np.asarray(v) for k, v in leaves}


@pytest.fixture(scope="module")
def tsyn(synthetic_prepared):
  return synthetic_prepared["synthetic"]


# --- gin ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", GIN_FILES, ids=lambda p: str(p.relative_to(REPO / "gin")))
def test_every_gin_file_parses(path):
  import gin
  from recjax import gin_cli
  import recjax.tasks  # noqa: F401
  files = [str(path)]
  if "models" not in path.parts and "experiments" not in path.parts:
    files.insert(0, str(REPO / "gin" / "models" / "bert4rec.gin"))  # run files need a MODEL
  required = ["MIXTURE_OR_TASK_NAME = 'x'", "TASK_FEATURE_LENGTHS = {'items': 8}",
              "TRAIN_STEPS = 1", "MODEL_DIR = '/tmp/x'", "EXPORT_DIR = '/tmp/y'"]
  gin_cli._plain_files_only()
  gin.clear_config()
  for p in (REPO / "gin", REPO):
    gin.add_config_file_search_path(str(p))
  gin.parse_config_files_and_bindings(files, required, finalize_config=True)
  gin.clear_config()


def test_missing_binding_is_one_sentence(tsyn):
  out = recjax("train", "--gin_file=experiments/quickstart.gin", "--gin.MODEL_DIR=%gin.REQUIRED",
               dataset=tsyn)
  assert out.returncode == 2
  assert "missing gin binding MODEL_DIR" in out.stderr and "Traceback" not in out.stderr


# --- end to end: train, evaluate, export, evaluate the export --------------------------


def test_main_job_tiny(tmp_path):
  out = recjax("main", "--workdir", tmp_path, "--num_users", 300, "--num_items", 120,
               "--gin.TRAIN_STEPS=40", "--gin.BATCH_SIZE=16", "--flare_steps", 30, "--flare_batch_size", 16,
               "--lumen_steps", 20, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "metrics identical" in out.stdout
  # The FLARE part: trained on the critique mixture, critiquing evaluated, one user shown.
  crit = json.loads((tmp_path / "flare" / "critique_step_30.json").read_text())
  counts = {g: crit["in_sequence"][g]["count"] for g in ("precise", "broad", "none")}
  assert counts["precise"] == counts["broad"] == counts["none"] > 200
  for level in ("level_4", "level_3", "level_2"):
    m = crit["out_of_sequence"][level]
    assert m["count"] + m["skipped"] == counts["precise"]
    assert 0.0 <= m["cat_ndcg@10"] <= m["cat_ndcg@10_candidates"] <= 1.0
  assert "out-of-sequence critiques" in out.stdout and "Cat-nDCG@10" in out.stdout
  assert "user 0 (test split)" in out.stdout and "top 5 with critique" in out.stdout
  assert "one conversation:" in out.stdout and "LUMEN test items (200 users): Recall@10" in out.stdout
  assert "flare.Flare" in (tmp_path / "flare" / "config.gin").read_text()
  result = json.loads((tmp_path / "model" / "eval_step_40.json").read_text())
  assert result["results"]["test/model"]["count"] == result["results"]["test/popularity"]["count"] > 200
  assert (tmp_path / "model" / "tensorboard").is_dir()
  assert list((tmp_path / "model" / "tensorboard").iterdir())
  assert "bert4rec.Bert4Rec" in (tmp_path / "model" / "config.gin").read_text()
  for name in ("params.npz", "recommend.jaxexport", "queries.jaxexport", "metadata.json", "items.tsv"):
    assert (tmp_path / "export" / name).is_file(), name


def test_checkpoint_from_another_model_is_refused(tsyn, tmp_path):
  out = recjax("train", *TINY, f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=5", dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  out = recjax("train", *TINY, f"--gin.MODEL_DIR={tmp_path}", "--gin.TRAIN_STEPS=10",
               "--gin.bert4rec.Bert4Rec.dim=24", dataset=tsyn)
  assert out.returncode == 2
  assert "was written by a different model" in out.stderr and "Traceback" not in out.stderr


# --- resume and preemption ----------------------------------------------------------


def _wait_for_checkpoint(model_dir, step, proc, timeout=300):
  path = pathlib.Path(model_dir) / "checkpoints" / str(step)
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.is_dir() and (path / "state").is_dir():
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended before checkpoint {step}: {proc.stdout.read()[-2000:]}")
    time.sleep(0.05)
  raise AssertionError(f"no checkpoint {step} after {timeout}s")


def _popen(args, tsyn):
  cmd = [sys.executable, "-m", "recjax.main", *args, "--dataset", f"tsyn={tsyn}"]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _saved_config(model_dir, step) -> dict:
  return json.loads((pathlib.Path(model_dir) / "checkpoints" / str(step) / "config" / "metadata").read_text())


def _sigkill_then_resume_matches_uninterrupted(run, data_dir, tmp_path, steps, kill_after):
  """A run SIGKILLed once checkpoint `kill_after` exists, then resumed, ends with the
  parameters of an uninterrupted run, bit for bit (and, validating during training, with
  the same best checkpoint and early-stopping state)."""
  run = [*run, f"--gin.TRAIN_STEPS={steps}"]
  full = recjax("train", *run, f"--gin.MODEL_DIR={tmp_path / 'full'}", dataset=data_dir)
  assert full.returncode == 0, full.stderr[-2000:]

  killed = tmp_path / "killed"
  proc = _popen(["train", *run, f"--gin.MODEL_DIR={killed}"], data_dir)
  _wait_for_checkpoint(killed, kill_after, proc)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
  assert saved and saved[-1] < steps, saved  # really interrupted
  resumed = recjax("train", *run, f"--gin.MODEL_DIR={killed}", dataset=data_dir)
  assert resumed.returncode == 0, resumed.stderr[-2000:]

  step_a, a = checkpoint_params(tmp_path / "full")
  step_b, b = checkpoint_params(killed)
  assert step_a == step_b == steps
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  if (tmp_path / "full" / "best").is_dir():
    state = _saved_config(tmp_path / "full", steps)["early_stopping"]
    assert state == _saved_config(killed, steps)["early_stopping"]
    best_a, a = checkpoint_params(tmp_path / "full" / "best")
    best_b, b = checkpoint_params(killed / "best")
    assert best_a == best_b == state["best_step"]
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    return state


# Validation every 20 steps; patience too large to stop, so the counter must survive the kill.
VALIDATED = ["--gin_file=runs/validation.gin", "--gin.EVAL_EVERY=20", "--gin.loop.EarlyStopping.patience=100",
             "--gin.EVAL_BATCH_SIZE=64"]


def test_sigkill_then_resume_matches_uninterrupted(tsyn, tmp_path):
  """...with the validation evaluator: the best checkpoint and patience counter survive."""
  state = _sigkill_then_resume_matches_uninterrupted(
      [*TINY, *VALIDATED, "--gin.loop.train.checkpoint_every=20"], tsyn, tmp_path, steps=120, kill_after=40)
  assert state["best_step"] in (20, 40, 60, 80, 100, 120) and not state["stopped"]
  assert state["bad_evals"] == (120 - state["best_step"]) // 20


def test_early_stopping_keeps_the_best_checkpoint_and_a_sweep_reports_mean_and_std(tsyn, tmp_path):
  """Two seeds, each stopped early (patience 1): the best checkpoint is what evaluate
  reads with CHECKPOINT = 'best', a finished run is not trained again, and the sweep's
  mean and std are those of the seeds' evaluations."""
  run = [*TINY, *VALIDATED, "--gin.EVAL_EVERY=10", "--gin.loop.EarlyStopping.patience=1",
         "--gin.TRAIN_STEPS=400", f"--gin.MODEL_DIR={tmp_path}"]
  out = recjax("sweep", *run, "--seeds", "3,4", dataset=tsyn, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  sweep = json.loads((tmp_path / "sweep.json").read_text())
  assert [r["seed"] for r in sweep["runs"]] == [3, 4]
  for r in sweep["runs"]:
    model_dir = pathlib.Path(r["model_dir"])
    steps = sorted(int(p.name) for p in (model_dir / "checkpoints").iterdir() if p.name.isdigit())
    state = _saved_config(model_dir, steps[-1])["early_stopping"]
    assert state["stopped"] and steps[-1] < 400 and state["bad_evals"] == 1
    assert r["step"] == state["best_step"] == checkpoint_params(model_dir / "best")[0]
    assert r["source"] == "best checkpoint"
    evaluated = json.loads((model_dir / f"eval_best_step_{r['step']}.json").read_text())["results"]
    assert evaluated["validation/model"]["ndcg@10"] == pytest.approx(state["best_value"], abs=1e-6)
    logged = [json.loads(l) for l in (model_dir / "train_log.jsonl").read_text().splitlines()]
    validations = [l for l in logged if "validation" in l]
    assert [l["step"] for l in validations] == list(range(10, steps[-1] + 1, 10))
    assert max(l["validation"]["ndcg@10"] for l in validations) == pytest.approx(state["best_value"])
  values = [r["results"]["test/model"]["ndcg@10"] for r in sweep["runs"]]
  summary = sweep["mean_std"]["test/model"]["ndcg@10"]
  assert summary["mean"] == pytest.approx(np.mean(values)) and summary["std"] == pytest.approx(np.std(values, ddof=1))
  assert "± " in out.stdout and "2 seeds (3, 4)" in out.stdout
  # A run that stopped early is over: training again does no step.
  again = recjax("train", *run, "--gin.SEED=3", f"--gin.MODEL_DIR={tmp_path / 'seed_3'}", dataset=tsyn)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "early stopping ended this run" in again.stdout


def _sigterm_checkpoints_at_the_stop_step(run, data_dir, model_dir) -> int:
  """SIGTERM after checkpoint 10: the run exits 0 with a checkpoint at the step it stopped
  at, which it prints; returns that step."""
  proc = _popen(["train", *run], data_dir)
  _wait_for_checkpoint(model_dir, 10, proc)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-2000:]
  line = [l for l in output.splitlines() if l.startswith("preempted: checkpoint saved at step")]
  assert line, output[-2000:]
  stopped = int(line[-1].rsplit(" ", 1)[1])
  assert 10 <= stopped < 100000
  assert checkpoint_params(model_dir)[0] == stopped
  return stopped


def test_sigterm_leaves_a_checkpoint_at_the_stop_step(tsyn, tmp_path):
  run = [*TINY, "--gin.TRAIN_STEPS=100000", "--gin.loop.train.checkpoint_every=10",
         f"--gin.MODEL_DIR={tmp_path}"]
  _sigterm_checkpoints_at_the_stop_step(run, tsyn, tmp_path)


def test_sigterm_stops_a_sweep_without_evaluating_the_preempted_seed(tsyn, tmp_path):
  """A preempted seed is not a result: the sweep stops after its checkpoint, evaluates
  nothing, starts no other seed and writes no sweep.json; running it again resumes."""
  run = [*TINY, "--gin.TRAIN_STEPS=100000", "--gin.loop.train.checkpoint_every=10", f"--gin.MODEL_DIR={tmp_path}"]
  proc = _popen(["sweep", *run, "--seeds", "0,1"], tsyn)
  _wait_for_checkpoint(tmp_path / "seed_0", 10, proc)
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, output[-2000:]
  assert "recjax sweep: stopped: training was preempted at step" in output, output[-2000:]
  assert not (tmp_path / "sweep.json").exists() and not (tmp_path / "seed_1").exists()
  assert not list((tmp_path / "seed_0").glob("eval_*.json"))


# --- sharding ------------------------------------------------------------------------

_SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from recjax.train import loop, mesh as mesh_lib
    from recjax.models import bert4rec
    from recjax.data import pipeline
    import recjax.tasks as tasks
    tasks.register_dataset_tasks("tsyn", sys.argv[1])
    model = bert4rec.Bert4Rec(vocab_size=loop.item_vocab_size("tsyn_items"), max_length=20, dim=16,
                              mlp_dim=32, num_heads=2, dropout=0.1, attention_dropout=0.1)
    it = pipeline.DataIterator("tsyn_items", split="train", feature_converter=model.feature_converter(),
                               task_feature_lengths={"items": 20}, batch_size=8)
    batches = [next(it) for _ in range(6)]
    out = {}
    for name, degrees in (("one", None), ("mesh222", (2, 2, 2))):
      if degrees is None:
        mesh = mesh_lib.create_mesh(1, 1, 1, devices=jax.devices()[:1])
      else:
        mesh = mesh_lib.create_mesh(*degrees)
      trainer = loop.Trainer(model, mesh, mesh_lib.DEFAULT_RULES, seed=0, total_steps=6)
      with jax.set_mesh(mesh):
        state, step = trainer.init_state(), trainer.make_train_step()
        losses = []
        for b in batches:
          state, metrics = step(state, trainer.to_global(b))
          losses.append(float(metrics["loss"]))
      table = state.params["items"]["embedding"][...]
      out[name] = {"losses": losses, "table_spec": str(table.sharding.spec),
                   "table_shard_shape": list(table.addressable_shards[0].data.shape),
                   "table_shape": list(table.shape), "devices": len(mesh.devices.flat)}
    print("RESULT " + json.dumps(out))
""")


def test_one_device_and_2x2x2_mesh_give_the_same_losses(tsyn, tmp_path):
  script = tmp_path / "shard.py"
  script.write_text(_SHARDING_SCRIPT)
  out = subprocess.run([sys.executable, str(script), str(tsyn)], capture_output=True, text=True,
                       timeout=600, cwd=REPO,
                       env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.split("RESULT ", 1)[1])
  one, sharded = result["one"], result["mesh222"]
  assert one["devices"] == 1 and sharded["devices"] == 8
  # float32 on CPU; different partitioning only reorders reductions. Tolerance: 1e-4 relative.
  np.testing.assert_allclose(one["losses"], sharded["losses"], rtol=1e-4)
  assert one["losses"][0] != one["losses"][-1]
  # The item table is split over 'model' (rows) and 'fsdp' (embedding dim).
  assert "model" in sharded["table_spec"]
  rows, dim = sharded["table_shape"]
  assert sharded["table_shard_shape"] == [rows // 2, dim // 2]


# --- multi-process ---------------------------------------------------------------------

_REFERENCE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np, seqio
    from recjax.train import loop, mesh as mesh_lib
    from recjax.models import bert4rec
    from recjax.data import pipeline
    import recjax.tasks as tasks
    tasks.register_dataset_tasks("tsyn", sys.argv[1])
    steps = int(sys.argv[2])
    model = bert4rec.Bert4Rec(vocab_size=loop.item_vocab_size("tsyn_items"), max_length=20, dim=16,
                              mlp_dim=32, num_heads=2, dropout=0.1, attention_dropout=0.1)
    # What two processes feed: each its own shard; the global batch is their concatenation.
    shards = [pipeline.DataIterator("tsyn_items", split="train", feature_converter=model.feature_converter(),
                                    task_feature_lengths={"items": 20}, batch_size=8, shuffle=True, seed=0,
                                    shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
    mesh = mesh_lib.create_mesh()
    import functools
    opt = functools.partial(loop.make_optimizer, learning_rate=3e-3, schedule="constant", warmup_steps=0)
    trainer = loop.Trainer(model, mesh, mesh_lib.DEFAULT_RULES, seed=0, total_steps=steps, optimizer_fn=opt)
    with jax.set_mesh(mesh):
      state, step = trainer.init_state(), trainer.make_train_step()
      for _ in range(steps):
        parts = [next(s) for s in shards]
        batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        state, _ = step(state, trainer.to_global(batch))
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    def names(path):
      parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
      return "/".join(parts[:-1] if parts[-1] == "value" else parts)
    np.savez(sys.argv[3], **{names(k): np.asarray(v) for k, v in leaves})
""")


def test_two_processes_match_one_process_and_share_a_checkpoint(tsyn, tmp_path):
  model_dir = tmp_path / "mp"
  common = [*TINY, "--gin.TRAIN_STEPS=12", f"--gin.MODEL_DIR={model_dir}",
            "--gin.loop.make_optimizer.learning_rate=3e-3", "--gin.loop.train.checkpoint_every=6"]

  def launch(*extra, command="train"):
    cmd = [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes", "2", "--",
           sys.executable, "-m", "recjax.main", command, *common, *extra, "--dataset", f"tsyn={tsyn}"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                           env=dict(os.environ, JAX_PLATFORMS="cpu"))

  # Phase 1 stops after 6 of 12 steps (checkpoint written by both processes); phase 2
  # restores it in both processes and finishes.
  first = launch("--gin.loop.train.stop_after_steps=6")
  assert first.returncode == 0, first.stdout[-3000:]
  assert (model_dir / "checkpoints" / "6").is_dir()
  second = launch()
  assert second.returncode == 0, second.stdout[-3000:]
  assert "[1]" in second.stdout  # both processes ran

  script = tmp_path / "reference.py"
  script.write_text(_REFERENCE_SCRIPT)
  ref_path = tmp_path / "reference.npz"
  ref = subprocess.run([sys.executable, str(script), str(tsyn), "12", str(ref_path)], capture_output=True,
                       text=True, timeout=600, cwd=REPO)
  assert ref.returncode == 0, ref.stderr[-3000:]
  step, got = checkpoint_params(model_dir)
  assert step == 12
  want = dict(np.load(ref_path))
  assert set(want) == set(got)
  for k in want:
    # float32; the 2-device run reduces gradients in another order, and Adam amplifies the
    # last bits of near-zero second moments: observed max |diff| ~5e-6 after 12 steps.
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)

  # Evaluation in two processes (each ranking its own half of the users) reports the
  # metrics of all users, as one process does.
  two = launch(command="evaluate")
  assert two.returncode == 0, two.stdout[-3000:]
  two = json.loads((model_dir / "eval_step_12.json").read_text())["results"]
  one = recjax("evaluate", *common, dataset=tsyn)
  assert one.returncode == 0, one.stderr[-3000:]
  one = json.loads((model_dir / "eval_step_12.json").read_text())["results"]
  assert set(one) == set(two)
  for key in one:
    assert one[key]["count"] == two[key]["count"] > 250, key  # every test user, not one shard
    for metric, value in one[key].items():
      # Per-batch float32 sums group the users differently in the two layouts.
      assert two[key][metric] == pytest.approx(value, rel=1e-6, abs=1e-9), (key, metric)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tsyn, tmp_path):
  run = [*TINY, "--gin.TRAIN_STEPS=40", "--gin.loop.train.checkpoint_every=5", f"--gin.MODEL_DIR={tmp_path}"]
  good = recjax("train", *run, "--gin.loop.train.stop_after_steps=5", dataset=tsyn)
  assert good.returncode == 0, good.stderr[-2000:]
  # An absurd learning rate sends the parameters to inf within a step (Adam's step size is
  # the learning rate, whatever the clipped gradient norm).
  bad = recjax("train", *run, "--gin.loop.make_optimizer.learning_rate=1e30", dataset=tsyn)
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert "loss became nan" in bad.stderr and "last good checkpoint is step 5" in bad.stderr
  assert "Traceback" not in bad.stderr
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [5]


# --- TIGER (semantic IDs) through the same trainer ------------------------------------

TIGER = [
    "--gin_file=experiments/quickstart_tiger.gin",
    "--gin.MIXTURE_OR_TASK_NAME='tsyn_sid_rand'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 12, 'targets': 4}",
    "--gin.MAX_ITEMS=3",
    "--gin.BATCH_SIZE=16",
    "--gin.tiger.Tiger.d_model=16", "--gin.tiger.Tiger.d_kv=8", "--gin.tiger.Tiger.num_heads=2",
    "--gin.tiger.Tiger.d_ff=32", "--gin.tiger.Tiger.num_layers=1",
    "--gin.loop.train.log_every=5",
    "--gin.loop.make_optimizer.schedule='constant'",
    "--gin.loop.make_optimizer.warmup_steps=0",
    "--gin.NUM_BEAMS=10",
    "--gin.EVAL_BATCH_SIZE=64",
]


@pytest.fixture(scope="module")
def tsid(synthetic_prepared, tmp_path_factory):
  return copy_with_random_ids(synthetic_prepared["synthetic"], tmp_path_factory.mktemp("tsid") / "synthetic")


def test_tiger_trains_evaluates_and_its_export_reevaluates_identically(tsid, tmp_path):
  run = [*TIGER, "--gin.TRAIN_STEPS=30", f"--gin.MODEL_DIR={tmp_path / 'm'}", f"--gin.EXPORT_DIR={tmp_path / 'e'}"]
  for command in ("train", "evaluate", "export"):
    out = recjax(command, *run, dataset=tsid)
    assert out.returncode == 0, (command, out.stderr[-3000:])
  out = recjax("evaluate", *run, "--exported", tmp_path / "e", dataset=tsid)
  assert out.returncode == 0, out.stderr[-3000:]
  ckpt = json.loads((tmp_path / "m" / "eval_step_30.json").read_text())
  exp = json.loads((tmp_path / "e" / "eval_export.json").read_text())
  assert ckpt["evaluator"] == exp["evaluator"] == "generative_retrieval"
  assert ckpt["results"] == exp["results"]  # the export alone decodes the same beams
  test = ckpt["results"]["test/model"]
  assert test["count"] == 300 and test["invalid_id_fraction"] == 0.0
  assert 0 <= test["ndcg@10"] <= test["recall@10"] <= 1
  assert {p.name for p in (tmp_path / "e").iterdir()} >= {"params.npz", "trie.npz", "generate.jaxexport",
                                                          "metadata.json", "config.gin"}
  # A TASK_FEATURE_LENGTHS that does not fit the model is one sentence naming both.
  bad = recjax("train", *run, "--gin.TASK_FEATURE_LENGTHS={'inputs': 40, 'targets': 4}", dataset=tsid)
  assert bad.returncode != 0 and "'inputs' is 40 but the model reads 12" in bad.stderr


def test_tiger_sigkill_then_resume_matches_uninterrupted(tsid, tmp_path):
  _sigkill_then_resume_matches_uninterrupted([*TIGER, "--gin.loop.train.checkpoint_every=10"], tsid, tmp_path,
                                             steps=60, kill_after=20)


# One process feeding what two processes feed (each its own shard; the global batch is their
# concatenation), for a semantic-ID model: argv = dataset dir, steps, out.npz, task, model.
_SEQ2SEQ_REFERENCE = textwrap.dedent("""
    import functools, sys
    import jax, numpy as np, seqio
    from recjax.train import loop, mesh as mesh_lib
    from recjax.models import mender, tiger
    from recjax.data import pipeline
    import recjax.tasks as tasks
    data_dir, steps, out, task, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    tasks.register_dataset_tasks(task.split("_")[0], data_dir)
    sizes = dict(vocab_size=loop.item_vocab_size(task, "targets"), max_items=3, d_model=16, d_kv=8, num_heads=2,
                 d_ff=32, num_layers=1)
    model = (tiger.Tiger(user_buckets=0, **sizes) if kind == "tiger"
             else mender.MenderEmb(num_preferences=2, **sizes))
    shards = [pipeline.DataIterator(task, split="train", feature_converter=model.feature_converter(),
                                    task_feature_lengths={"inputs": 12, "targets": 4}, batch_size=16,
                                    shuffle=True, seed=0, shard_info=seqio.ShardInfo(i, 2)) for i in range(2)]
    mesh = mesh_lib.create_mesh()
    opt = functools.partial(loop.make_optimizer, learning_rate=1e-3, schedule="constant", warmup_steps=0)
    trainer = loop.Trainer(model, mesh, mesh_lib.DEFAULT_RULES, seed=0, total_steps=steps, optimizer_fn=opt,
                           frozen_inputs=loop.frozen_inputs(model, task))
    with jax.set_mesh(mesh):
      state, step = trainer.init_state(), trainer.make_train_step()
      for _ in range(steps):
        parts = [next(s) for s in shards]
        state, _ = step(state, trainer.to_global({k: np.concatenate([p[k] for p in parts]) for k in parts[0]}))
    leaves = jax.tree_util.tree_flatten_with_path(state.params)[0]
    def names(path):
      parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
      return "/".join(parts[:-1] if parts[-1] == "value" else parts)
    np.savez(out, **{names(k): np.asarray(v) for k, v in leaves})
""")


def _two_processes_match_one(args, data_dir, dataset, task, kind, tmp_path):
  """Trains 12 steps in two processes (launch/local.py, gloo) and checks the parameters
  against one process fed the same global batches; returns the model dir."""
  model_dir = tmp_path / "mp"
  cmd = [sys.executable, str(REPO / "launch" / "local.py"), "--num_processes", "2", "--",
         sys.executable, "-m", "recjax.main", "train", *args, "--gin.TRAIN_STEPS=12",
         f"--gin.MODEL_DIR={model_dir}", "--dataset", f"{dataset}={data_dir}"]
  two = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert two.returncode == 0, two.stdout[-3000:]
  assert "[1]" in two.stdout  # both processes ran
  script = tmp_path / "reference.py"
  script.write_text(_SEQ2SEQ_REFERENCE)
  ref = subprocess.run([sys.executable, str(script), str(data_dir), "12", str(tmp_path / "ref.npz"), task, kind],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
  assert ref.returncode == 0, ref.stderr[-3000:]
  step, got = checkpoint_params(model_dir)
  want = dict(np.load(tmp_path / "ref.npz"))
  assert step == 12 and set(want) == set(got)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-4, atol=2e-5, err_msg=k)
  return model_dir



def test_tiger_two_processes_match_one_process(tsid, tmp_path):
  _two_processes_match_one(TIGER, tsid, "tsyn", "tsyn_sid_rand", "tiger", tmp_path)


# --- Mender_Emb (preference-conditioned) through the same trainer ------------------------

MENDER = [
    "--gin_file=experiments/mender_emb_synthetic.gin",
    "--gin.MIXTURE_OR_TASK_NAME='treg_pref_sid_rand_mix'",
    "--gin.TASK_FEATURE_LENGTHS={'inputs': 12, 'targets': 4}",
    "--gin.MAX_ITEMS=3", "--gin.NUM_PREFERENCES=2",
    "--gin.BATCH_SIZE=16", "--gin.D_MODEL=16",
    "--gin.mender.MenderEmb.d_kv=8", "--gin.mender.MenderEmb.num_heads=2",
    "--gin.mender.MenderEmb.d_ff=32", "--gin.mender.MenderEmb.num_layers=1",
    "--gin.loop.train.log_every=5",
    "--gin.loop.make_optimizer.schedule='constant'",
    "--gin.loop.make_optimizer.warmup_steps=0",
    "--gin.NUM_BEAMS=10", "--gin.EVAL_BATCH_SIZE=64",
]


@pytest.fixture(scope="module")
def treg(synthetic_prepared, tmp_path_factory):
  """The synthetic REGEN set with random semantic IDs "rand" and its preference benchmark."""
  from recjax.artifacts import preference_benchmark, text_embeddings
  data = copy_with_random_ids(synthetic_prepared["synthetic_regen"], tmp_path_factory.mktemp("treg") / "regen")
  if not (data / "artifacts" / "text_embeddings" / "minilm").is_dir():  # the copy may hold it already
    text_embeddings.fit(data, "minilm")
  preference_benchmark.fit(data, "ground_truth", max_items=5, num_preferences=3)
  return data




def test_mender_emb_two_processes_match_one_process_and_evaluates_every_axis(treg, tmp_path):
  model_dir = _two_processes_match_one(MENDER, treg, "treg", "treg_pref_sid_rand_mix", "mender_emb", tmp_path)
  out = subprocess.run([sys.executable, "-m", "recjax.main", "evaluate", *MENDER, f"--gin.MODEL_DIR={model_dir}",
                        "--dataset", f"treg={treg}"], capture_output=True, text=True, timeout=600, cwd=REPO)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.loads((model_dir / "eval_step_12.json").read_text())
  assert got["evaluator"] == "preference_axes"
  res = got["results"]
  assert set(res) == {"test/recommendation", "test/fine_steering", "test/coarse_steering", "test/consolidation",
                      "test/sentiment"}
  assert res["test/recommendation"]["count"] == 300 and res["test/sentiment"]["count"] > 0
  assert 0 <= res["test/sentiment"]["m@10"] <= res["test/sentiment"]["hit_positive@10"] <= 1


def test_tiger_sigterm_checkpoints_at_the_stop_step_and_infer_writes_beams(tsid, tmp_path):
  run = [*TIGER, "--gin.TRAIN_STEPS=100000", "--gin.loop.train.checkpoint_every=10", f"--gin.MODEL_DIR={tmp_path}"]
  stopped = _sigterm_checkpoints_at_the_stop_step(run, tsid, tmp_path)
  out = recjax("infer", *run, "--gin.infer_lib.infer.top_k=5", dataset=tsid)
  assert out.returncode == 0, out.stderr[-2000:]
  rows = [json.loads(l) for l in (tmp_path / f"infer_test_step_{stopped}.jsonl").read_text().splitlines()]
  assert len(rows) == 300 and all(1 <= len(r["items"]) <= 5 for r in rows)
  assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in rows)
  # max_rows: the split's first users only, the same rows as the full run's first ones.
  first = tmp_path / "first.jsonl"
  out = recjax("infer", *run, "--gin.infer_lib.infer.top_k=5", "--gin.infer_lib.infer.max_rows=7",
               f"--gin.infer_lib.infer.output='{first}'", dataset=tsid)
  assert out.returncode == 0, out.stderr[-2000:]
  assert [json.loads(l) for l in first.read_text().splitlines()] == rows[:7]


def test_tiger_refuses_semantic_ids_of_a_re_prepared_dataset(synthetic_raw, synthetic_prepared, tmp_path):
  from recjax.data import prepare
  data = copy_with_random_ids(synthetic_prepared["synthetic"], tmp_path / "syn")
  # Re-prepared in place with other content (a stricter k-core): the IDs no longer describe it.
  prepare.prepare("amazon2018", synthetic_raw / "amazon2018" / "Synthetic.json.gz", data,
                  options=prepare.PrepareOptions(kcore=6))
  out = recjax("train", *TIGER, "--gin.TRAIN_STEPS=2", f"--gin.MODEL_DIR={tmp_path / 'm'}", dataset=data)
  assert out.returncode == 2, out.stderr[-2000:]
  (line,) = [l for l in out.stderr.splitlines() if l.startswith("recjax train: error:")]
  assert "semantic_ids artifact 'rand'" in line and "rebuild it with `recjax fit" in line, line


# --- early stopping ------------------------------------------------------------------


def test_early_stopping_counts_evaluations_without_a_gain():
  from recjax.train import loop
  es = loop.EarlyStopping(metric="ndcg@10", patience=2, min_delta=0.01)
  assert es.update(10, {"ndcg@10": 0.10})
  assert not es.update(20, {"ndcg@10": 0.105})  # within min_delta: no gain
  assert es.update(30, {"ndcg@10": 0.12}) and es.bad_evals == 0
  assert not es.update(40, {"ndcg@10": float("nan")})  # a NaN never wins
  assert not es.stopped
  assert not es.update(50, {"ndcg@10": 0.11}) and es.stopped
  assert (es.best_step, es.best_value) == (30, 0.12)
  low = loop.EarlyStopping(metric="loss", mode="min", patience=0)
  for step, value in ((1, 3.0), (2, 2.0), (3, 2.5), (4, 2.6), (5, 2.7)):
    low.update(step, {"loss": value})
  assert (low.best_step, low.bad_evals, low.stopped) == (2, 3, False)  # patience 0: never stops
  resumed = loop.EarlyStopping(metric="ndcg@10", patience=2, min_delta=0.01)
  resumed.load(es.state())
  assert resumed.state() == es.state()
  with pytest.raises(ValueError, match="tracked max 'ndcg@10'"):
    loop.EarlyStopping(metric="recall@10").load(es.state())
  with pytest.raises(ValueError, match="not among the validator's metrics"):
    loop.EarlyStopping(metric="hr@10").update(1, {"ndcg@10": 0.1})


def test_a_sparse_optimizer_checkpoint_evaluates(tsyn, tmp_path):
  """evaluate restores with the experiment's own optimizer (here the sparse one), whose
  state is shaped unlike the default AdamW's."""
  run = ["--gin_file=experiments/sasrec_beauty_sampled_sparse.gin", "--gin.MIXTURE_OR_TASK_NAME='tsyn_items'",
         "--gin.TASK_FEATURE_LENGTHS={'items': 20}", "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=4",
         "--gin.sasrec.SASRec.max_length=20", "--gin.sasrec.SASRec.dim=16", "--gin.sasrec.SASRec.mlp_dim=32",
         "--gin.sasrec.SASRec.num_negatives=32", "--gin.sasrec.SASRec.in_batch_negatives=8",
         "--gin.sparse.make_optimizer.max_rows=512", f"--gin.MODEL_DIR={tmp_path}"]
  out = recjax("train", *run, dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  out = recjax("evaluate", *run, dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads((tmp_path / "eval_step_4.json").read_text())["results"]["test/model"]["count"] > 250


def _flare_export_ranks_like_the_checkpoint(run, tsyn, export_dir, results):
  """The export ranks with the per-item text vectors it saved (Flare.inference_frozen), as
  the checkpoint's evaluation does: the same metrics."""
  out = recjax("export", *run, f"--gin.EXPORT_DIR='{export_dir}'", dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "frozen/item_context" in np.load(export_dir / "params.npz").files
  out = recjax("evaluate", *run, f"--exported={export_dir}", dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  assert json.loads((export_dir / "eval_export.json").read_text())["results"] == results


def test_flare_catalogue_scale_experiment_trains_and_evaluates(tsyn, tmp_path):
  """experiments/flare_clothing.gin (sampled softmax, lazy row Adam, frozen MiniLM text) on
  a small dataset: the sparse path with the text tables trains, and full ranking evaluates."""
  run = ["--gin_file=experiments/flare_clothing.gin", "--gin.MIXTURE_OR_TASK_NAME='tsyn_items'",
         "--gin.TASK_FEATURE_LENGTHS={'items': 20}", "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=4",
         "--gin.flare.Flare.max_length=20", "--gin.flare.Flare.num_negatives=32",
         "--gin.flare.Flare.in_batch_negatives=8", "--gin.sparse.make_optimizer.max_rows=512",
         f"--gin.flare.Flare.text_cache_dir='{tmp_path / 'cache'}'", f"--gin.MODEL_DIR={tmp_path / 'm'}",
         "--gin.eval_lib.evaluate.splits=('test',)"]
  out = recjax("train", *run, dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  assert list((tmp_path / "cache").glob("text-*/states.npy")), "the token states were cached"
  out = recjax("evaluate", *run, dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  results = json.loads((tmp_path / "m" / "eval_step_4.json").read_text())["results"]
  assert sorted(results) == ["test/model", "test/popularity"] and results["test/model"]["count"] > 250
  _flare_export_ranks_like_the_checkpoint(run, tsyn, tmp_path / "e", results)
  # The first 40 test users only (evaluators.ranking.max_rows), still over the whole catalogue.
  out = recjax("evaluate", *run, "--gin.evaluators.ranking.max_rows=40", dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  first = json.loads((tmp_path / "m" / "eval_step_4.json").read_text())["results"]
  assert first["test/model"]["count"] == first["test/popularity"]["count"] == 40


def test_flare_sasrec_experiment_validates_evaluates_and_exports(tsyn, tmp_path):
  """experiments/flare_sasrec_beauty.gin (FLARE's fusion trained as SASRec+, validation and
  the best checkpoint) on the synthetic data: the export ranks like the checkpoint."""
  run = ["--gin_file=experiments/flare_sasrec_beauty.gin", "--gin.MIXTURE_OR_TASK_NAME='tsyn_items'",
         "--gin.TASK_FEATURE_LENGTHS={'items': 20}", "--gin.BATCH_SIZE=8", "--gin.TRAIN_STEPS=6",
         "--gin.EVAL_EVERY=3", "--gin.flare.FlareSASRec.max_length=20",
         f"--gin.flare.FlareSASRec.text_cache_dir='{tmp_path / 'cache'}'", f"--gin.MODEL_DIR={tmp_path / 'm'}",
         "--gin.eval_lib.evaluate.splits=('test',)"]
  out = recjax("train", *run, dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  log = [json.loads(line) for line in (tmp_path / "m" / "train_log.jsonl").read_text().splitlines()]
  assert [r["step"] for r in log if "validation" in r] == [3, 6]
  assert "flare.FlareSASRec" in (tmp_path / "m" / "config.gin").read_text()
  out = recjax("evaluate", *run, dataset=tsyn)
  assert out.returncode == 0, out.stderr[-2000:]
  (path,) = (tmp_path / "m").glob("eval_*.json")
  results = json.loads(path.read_text())["results"]
  assert results["test/model"]["count"] > 250
  _flare_export_ranks_like_the_checkpoint(run, tsyn, tmp_path / "e", results)


def test_trainer_places_frozen_inputs_once_and_releases_the_host_copies():
  """A catalogue-scale text-state table is GBs: placed without a copy where the device is the
  host (CPU), and not kept alive beside the device copy elsewhere."""
  import jax
  from recjax.models import flare
  from recjax.train import frozen as frozen_lib
  from recjax.train import loop, mesh as mesh_lib
  model = flare.Flare(vocab_size=40, max_length=8, dim=16, num_layers=1, num_heads=2, mlp_dim=32, text_dim=12,
                      num_latents=2, perceiver_dim=8, perceiver_heads=2, vocab_multiple=8)
  rng = np.random.default_rng(0)
  # Padded as fetch pads the text cache's rows: 64-byte aligned.
  states = frozen_lib._pad_rows(rng.normal(size=(30, 6, 12)).astype(np.float16), model.padded_vocab_size)
  assert states.ctypes.data % frozen_lib.ALIGNMENT == 0 and not states[30:].any()
  mask = rng.uniform(size=(model.padded_vocab_size, 6)) < 0.8
  frozen = model.finish_frozen({"item_text": states, "item_text_mask": mask})
  trainer = loop.Trainer(model, mesh_lib.create_mesh(), mesh_lib.DEFAULT_RULES, frozen_inputs=frozen)
  assert isinstance(trainer.frozen_inputs["item_text"][0], np.ndarray)  # host arrays until placed
  placed = trainer.frozen
  np.testing.assert_array_equal(np.asarray(placed["item_text"]), states)
  if jax.default_backend() == "cpu":  # aliased, not copied
    assert placed["item_text"].unsafe_buffer_pointer() == states.ctypes.data
  # The trainer now holds the device arrays only.
  assert trainer.frozen is placed and set(trainer.frozen_inputs) == {"item_text", "item_text_mask"}
  assert trainer.frozen_inputs["item_text"] == (placed["item_text"], ("item", None, None))
  assert not any(isinstance(v, np.ndarray) for v, _ in trainer.frozen_inputs.values())


def test_padded_text_rows_read_from_the_cache_file_equal_the_array(tmp_path):
  """fetch pads the cache's memory-mapped states by reading the file into an aligned table
  (the map's pages never count as resident); the rows equal the array's, also for a slice
  of a map (copied through the map: a slice keeps its parent's file offset)."""
  from recjax.train import frozen as frozen_lib
  states = np.random.default_rng(0).normal(size=(37, 5, 7)).astype(np.float16)
  np.save(tmp_path / "states.npy", states)
  mapped = np.load(tmp_path / "states.npy", mmap_mode="r")
  for x, want in ((mapped, states), (mapped[3:20], states[3:20]), (states, states)):
    out = frozen_lib._pad_rows(x, 48)
    assert out.shape == (48, 5, 7) and out.ctypes.data % frozen_lib.ALIGNMENT == 0
    np.testing.assert_array_equal(out[:len(want)], want)
    assert not out[len(want):].any()
  (tmp_path / "short.npy").write_bytes((tmp_path / "states.npy").read_bytes()[:-10])
  with pytest.raises(ValueError):  # numpy refuses to map a truncated file; either way, an error
    frozen_lib._pad_rows(np.load(tmp_path / "short.npy", mmap_mode="r"), 48)
  with pytest.raises(ValueError, match="text rows for a table of"):
    frozen_lib._pad_rows(states, 30)
