"""Derived artifacts (recjax/artifacts): the manifest, missing / stale refusals, resumable
RQ-VAE and WALS fits, and `recjax fit` end to end on the small synthetic dataset."""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import pytest

from recjax.artifacts import manifest

@pytest.fixture
def data(synthetic_prepared, tmp_path) -> pathlib.Path:
  """A private copy of the small synthetic dataset (artifacts are written into it)."""
  out = tmp_path / "syn"
  shutil.copytree(synthetic_prepared["synthetic"], out, ignore=shutil.ignore_patterns("artifacts"))
  return out


def random_embeddings(data_dir, name: str = "rand16", dim: int = 16) -> np.ndarray:
  """A text_embeddings artifact of clustered random vectors: RQ-VAE fits without a text encoder."""
  from recjax.data.prepared import PreparedDataset
  vocab = PreparedDataset(data_dir).vocab_size
  rng = np.random.default_rng(0)
  emb = np.zeros((vocab, dim), np.float32)
  emb[2:] = rng.normal(size=(8, dim))[rng.integers(0, 8, vocab - 2)] * 3 + 0.1 * rng.normal(size=(vocab - 2, dim))
  with manifest.build(data_dir, "text_embeddings", name, fit="tests.random_embeddings") as b:
    np.save(b.dir / "embeddings.npy", emb)
    b.manifest.update(encoder="random", encoder_name="random", encoder_fingerprint="random", dim=dim)
  return emb


def reprepare_with_other_content(data_dir, synthetic_raw) -> None:
  """Prepares the dataset again into the same directory, with a different k-core: new content."""
  from recjax.data import prepare
  prepare.prepare("amazon2018", synthetic_raw / "amazon2018" / "Synthetic.json.gz", data_dir,
                  options=prepare.PrepareOptions(kcore=6))


def test_manifest_records_the_build_and_is_written_last(data):
  from recjax.data.prepared import PreparedDataset
  with manifest.build(data, "wals", "w", fit="tests.fit", config={"dim": 3}) as b:
    (b.dir / "sub").mkdir()
    np.save(b.dir / "a.npy", np.arange(5))
    (b.dir / "sub" / "b.txt").write_text("hello")
    b.manifest["metrics"] = {"x": 1}
    assert not (manifest.artifact_dir(data, "wals", "w")).exists()  # nothing visible before the commit
  path = manifest.require(data, "wals", "w")
  assert path == data / "artifacts" / "wals" / "w"
  # The build dir was renamed, not copied; only the (empty) lock file stays beside it.
  assert sorted(p.name for p in path.parent.iterdir()) == [".lock-w", "w"]
  meta = manifest.read(path)
  assert meta["kind"] == "wals" and meta["name"] == "w" and meta["fit"] == "tests.fit"
  assert meta["dataset"]["content_hash"] == PreparedDataset(data).content_hash
  assert meta["config"] == {"dim": 3} and meta["metrics"] == {"x": 1} and meta["created"].endswith("+00:00")
  assert set(meta["files"]) == {"a.npy", "sub/b.txt"}
  assert meta["files"]["sub/b.txt"]["sha256"] == manifest.sha256_file(path / "sub" / "b.txt")
  manifest.verify(path)
  (path / "sub" / "b.txt").write_text("changed")
  with pytest.raises(ValueError, match="does not match the sha256"):
    manifest.verify(path)
  # A failing build leaves no artifact (the old one stays) and keeps its build dir for a resume.
  with pytest.raises(RuntimeError):
    with manifest.build(data, "wals", "w", fit="tests.fit", config={"dim": 4}) as b:
      np.save(b.dir / "a.npy", np.arange(7))
      raise RuntimeError("interrupted")
  assert manifest.read(path)["config"] == {"dim": 3} and (b.dir / "a.npy").is_file()
  # The same inputs again resume in that dir; other inputs start afresh.
  again = manifest.Build(data, "wals", "w", "tests.fit", {"dim": 4}, None)
  assert (again.dir / "a.npy").is_file()
  with pytest.raises(RuntimeError, match="another process is building the wals artifact 'w'"):
    manifest.Build(data, "wals", "w", "tests.fit", {"dim": 4}, None)  # one build at a time
  again.release()
  other = manifest.Build(data, "wals", "w", "tests.fit", {"dim": 5}, None)
  assert not (other.dir / "a.npy").exists()
  other.release()
  with pytest.raises(ValueError, match="must be letters"):
    manifest.artifact_dir(data, "wals", "../x")


def test_a_missing_artifact_names_the_command_that_builds_it(data):
  from recjax.artifacts import semantic_ids, wals
  with pytest.raises(manifest.MissingArtifactError) as e:
    semantic_ids.load(data, "rqvae")
  assert str(e.value) == (f"{data} has no semantic_ids artifact 'rqvae'; build it with "
                          f"`recjax fit --gin_file=fits/rqvae.gin --dataset syn={data}`")
  with pytest.raises(FileNotFoundError, match=r"--dataset syn=\S+ --gin.NAME=w2`$"):
    wals.load(data, "w2")


def test_a_stale_artifact_is_refused_naming_both_hashes_and_the_rebuild(data, synthetic_raw):
  from recjax.artifacts import semantic_ids
  from recjax.data.prepared import PreparedDataset
  from recjax.models import rqvae
  n = PreparedDataset(data).vocab_size
  codes = np.full((n, 4), -1, np.int32)
  codes[2:] = rqvae.add_unique_level(np.random.default_rng(0).integers(0, 4, (n - 2, 3)), 64)
  semantic_ids.save(data, "rand", codes, [4, 4, 4, 64])
  built = PreparedDataset(data).content_hash
  reprepare_with_other_content(data, synthetic_raw)
  now = PreparedDataset(data).content_hash
  assert now != built
  with pytest.raises(manifest.StaleArtifactError) as e:
    semantic_ids.load(data, "rand")
  message = str(e.value)
  assert "\n" not in message and "semantic_ids artifact 'rand'" in message
  assert built in message and now in message
  assert message.endswith(f"`recjax fit --gin_file=fits/rqvae.gin --dataset syn={data} --gin.NAME=rand`")


def test_rqvae_fit_resumes_to_the_uninterrupted_result(data):
  from recjax.artifacts import checkpoints, semantic_ids
  from recjax.models import rqvae
  random_embeddings(data)
  cfg = rqvae.RQVAEConfig(input_dim=16, hidden_dims=(32,), latent_dim=8, num_levels=2, codebook_size=8,
                          steps=60, batch_size=32, log_every=10, dead_code_every=10)
  kw = dict(embeddings="rand16", config=cfg, unique_codes=64, checkpoint_every=20)
  whole = semantic_ids.fit(data, "whole", log=None, **kw)
  logs = []
  with pytest.raises(checkpoints.FitInterrupted):
    semantic_ids.fit(data, "parts", stop_after_steps=20, log=logs.append, **kw)
  assert manifest.find(data, "semantic_ids") == ["whole"]  # no half-built "parts"
  assert (manifest.build_dir(data, "semantic_ids", "parts") / "checkpoints" / "20").is_dir()
  logs.clear()
  parts = semantic_ids.fit(data, "parts", log=logs.append, **kw)
  assert logs[0] == "rqvae: resuming at step 20/60" and not any("step 10/" in line for line in logs)
  np.testing.assert_array_equal(semantic_ids.load(data, "parts").codes, semantic_ids.load(data, "whole").codes)
  import recjax.artifacts
  np.testing.assert_array_equal(recjax.artifacts.load(data, "semantic_ids", "parts").tokens,
                                semantic_ids.load(data, "whole").tokens)
  for key in ("reconstruction_mse", "latent_quantization_error", "codebook_usage", "dead_codes_restarted"):
    assert parts[key] == whole[key], key
  hist = lambda name: semantic_ids.load(data, name).metadata["history"]
  assert hist("parts") == hist("whole") and len(hist("whole")) == 6
  assert not manifest.build_dir(data, "semantic_ids", "parts").exists()  # checkpoints go with the build dir
  # The trained network is kept: it gives the items their codes again from their embeddings.
  import jax.numpy as jnp
  model, mean, std = semantic_ids.load_rqvae(data, "whole")
  emb, _ = recjax.artifacts.load(data, "text_embeddings", "rand16")
  x = jnp.asarray((emb[2:] - mean) / (std + 1e-6))
  np.testing.assert_array_equal(np.asarray(model(x)["codes"]), semantic_ids.load(data, "whole").codes[2:, :2])


def test_wals_fit_resumes_to_the_uninterrupted_result(data):
  from recjax.artifacts import checkpoints, wals
  from recjax.models import wals as wals_lib
  cfg = wals_lib.WALSConfig(dim=8, sweeps=6, cg_steps=2)
  kw = dict(config=cfg, checkpoint_every=2, evaluate_splits=("test",), log=None)
  whole = wals.fit(data, "whole", **kw)
  with pytest.raises(checkpoints.FitInterrupted, match="stopped at step 4"):
    wals.fit(data, "parts", stop_after_steps=3, **kw)  # stops at the first checkpoint at or after 3 sweeps
  parts = wals.fit(data, "parts", **kw)
  a, b = wals.load(data, "whole"), wals.load(data, "parts")
  np.testing.assert_array_equal(a.item_factors, b.item_factors)
  np.testing.assert_array_equal(a.user_factors, b.user_factors)
  assert a.losses == b.losses and len(a.losses) == 6 and parts["test"] == whole["test"]
  # The chunked fit is the same computation as the model file's one-call fit.
  users, items, num_users, vocab = wals.train_interactions(data)
  direct = wals_lib.fit(users, items, num_users=num_users, num_items=vocab, config=cfg)
  np.testing.assert_allclose(direct.item_factors, a.item_factors, rtol=1e-4, atol=1e-5)


def fit_cli(capsys, *args) -> tuple[int, str, str]:
  """`recjax fit ARGS` in this process (the command's code path; a subprocess would spend its
  time importing TensorFlow and JAX): (exit status, stdout, stderr)."""
  from recjax import main
  code = main.main(["fit", *map(str, args)])
  out = capsys.readouterr()
  return code, out.out, out.err


def test_fit_command_end_to_end(data, capsys):
  ds = f"syn={data}"
  tiny = ["--gin.rqvae.RQVAEConfig.steps=20", "--gin.rqvae.RQVAEConfig.batch_size=64",
          "--gin.rqvae.RQVAEConfig.hidden_dims=(32,)", "--gin.rqvae.RQVAEConfig.latent_dim=8",
          "--gin.rqvae.RQVAEConfig.codebook_size=8", "--gin.rqvae.RQVAEConfig.num_levels=2",
          "--gin.rqvae.RQVAEConfig.log_every=10", "--gin.semantic_ids.fit.unique_codes=64",
          "--gin.semantic_ids.fit.embeddings='rand16'"]
  code, _, err = fit_cli(capsys, "--gin_file=fits/rqvae.gin", "--dataset", ds, *tiny)
  assert code == 2 and "Traceback" not in err
  assert err.strip() == (f"recjax fit: error: {data} has no text_embeddings artifact 'rand16'; build it with "
                         f"`recjax fit --gin_file=fits/text_embeddings.gin --dataset syn={data} --gin.NAME=rand16`")
  random_embeddings(data)
  code, out, err = fit_cli(capsys, "--gin_file=fits/rqvae.gin", "--dataset", ds, *tiny)
  assert code == 0, err[-3000:]
  row = json.loads(out.strip().splitlines()[-1])
  assert row["artifact"] == str(data / "artifacts" / "semantic_ids" / "rqvae") and row["steps"] == 20
  assert "rqvae step 20/20" in err  # progress lines
  from recjax.artifacts import semantic_ids
  sids = semantic_ids.load(data, "rqvae")
  assert sids.codes.shape[1] == 3 and len(np.unique(sids.codes[2:], axis=0)) == len(sids.codes) - 2
  meta = manifest.read(data / "artifacts" / "semantic_ids" / "rqvae")
  assert meta["gin_file"] == "fits/rqvae.gin" and meta["fit"] == "recjax.artifacts.semantic_ids.fit"
  assert "RQVAEConfig.steps = 20" in meta["gin_config"] and meta["inputs"]["text_embeddings"]["name"] == "rand16"
  # The rebuild command repeats the overrides; a stale artifact's error names it.
  typed = [f"'{a}'" if "(" in a else a.replace("'rand16'", "rand16") for a in tiny]  # as a shell reads it
  assert meta["command"] == f"recjax fit --gin_file=fits/rqvae.gin --dataset syn={data} " + " ".join(typed)
  assert meta["gin_bindings"][0] == "rqvae.RQVAEConfig.steps = 20"
  # Stopped part-way by a gin binding, then resumed by the same command.
  code, out, err = fit_cli(capsys, "--gin_file=fits/rqvae.gin", "--dataset", ds, *tiny, "--gin.NAME=r2",
                           "--gin.semantic_ids.fit.checkpoint_every=10", "--gin.fit.fit.stop_after_steps=10")
  assert code == 0 and json.loads(out)["stopped_at"] == 10 and "r2" not in manifest.find(data, "semantic_ids")
  code, out, err = fit_cli(capsys, "--gin_file=fits/rqvae.gin", "--dataset", ds, *tiny, "--gin.NAME=r2",
                           "--gin.semantic_ids.fit.checkpoint_every=10")
  assert code == 0 and "resuming at step 10/20" in err
  # No dataset, or two without saying which: one sentence.
  code, _, err = fit_cli(capsys, "--gin_file=fits/wals.gin")
  assert code == 2 and "needs exactly one dataset: pass --dataset NAME=DIR" in err
  code, _, err = fit_cli(capsys, "--gin_file=fits/wals.gin", "--dataset", ds, "--dataset", f"other={data}")
  assert code == 2 and "--gin.DATASET=NAME" in err
  # The dataset changes under the artifact: refused, naming the command that rebuilds it as it was built.
  (data / "manifest.json").write_text(json.dumps({**json.loads((data / "manifest.json").read_text()),
                                                  "content_hash": "sha256:changed"}))
  with pytest.raises(manifest.StaleArtifactError) as e:
    semantic_ids.load(data, "rqvae")
  assert str(e.value).endswith(f"now has sha256:changed; rebuild it with `{meta['command']}`")


def test_tasks_refuse_a_stale_preference_benchmark(synthetic_prepared, tmp_path, synthetic_raw):
  """Registration lists the artifact; reading it after the dataset changed is refused."""
  import seqio
  from test_item_tasks import import_tasks
  from recjax.artifacts import preference_benchmark as pb
  data = tmp_path / "regen"
  shutil.copytree(synthetic_prepared["synthetic_regen"], data, ignore=shutil.ignore_patterns("artifacts"))
  rows = {"user": np.array([0], np.int32), "history": np.array([[3, 4]], np.int32),
          "preferences": np.array([[0]], np.int32), "target": np.array([5], np.int32),
          "sign": np.array([1.0], np.float32)}
  bench = pb.Benchmark(["Likes tests"], np.ones((1, 2), np.float32), np.zeros((8, 2), np.float32),
                       {s: rows for s in pb.SPLITS}, {"splits": {s: 1 for s in pb.SPLITS}})
  pb.save(bench, data, "ground_truth")
  tasks = import_tasks()
  tasks.register_dataset_tasks("stale_regen", data)
  try:
    task = seqio.get_mixture_or_task("stale_regen_pref_recommendation")
    got = list(task.get_dataset(None, split="test", shuffle=False).as_numpy_iterator())
    assert got[0]["items"].tolist() == [3, 4, 5]
    # The dataset changes under the registered task: reading its benchmark is refused.
    (data / "manifest.json").write_text(json.dumps({**json.loads((data / "manifest.json").read_text()),
                                                    "content_hash": "sha256:other"}))
    with pytest.raises(manifest.StaleArtifactError, match="preference_benchmark artifact 'ground_truth'"):
      task.get_dataset(None, split="train", shuffle=False)
  finally:
    tasks.unregister_dataset_tasks("stale_regen")


def test_the_fitting_math_imports_no_data_io_or_training_stage():
  """models/rqvae.py and models/wals.py hold networks, losses and fitting math only: reading
  datasets, files and drivers live in recjax/artifacts (the import-linter contract's subset)."""
  import ast
  root = pathlib.Path(__file__).resolve().parents[1] / "recjax" / "models"
  for name in ("rqvae.py", "wals.py"):
    tree = ast.parse((root / name).read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    recjax = sorted(m for m in imported if m.split(".")[0] in ("recjax", "tasks"))
    assert recjax == [], (name, recjax)
    assert not {"os", "pathlib", "json"} & imported, (name, imported)  # no file I/O either
