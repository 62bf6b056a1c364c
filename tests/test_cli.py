"""The `recjax` command line: help, prepare on real data, bad-input behaviour."""

import json
import subprocess
import sys

import pytest

from recjax import main as cli


def run_cli(*argv):
  """Runs the installed entry point's code in a subprocess, like a user would."""
  return subprocess.run([sys.executable, "-m", "recjax.main", *map(str, argv)],
                        capture_output=True, text=True, timeout=300)


def test_help_explains_every_subcommand():
  out = run_cli("--help")
  assert out.returncode == 0
  for command in ("main", "synth", "prepare", "fit"):
    assert command in out.stdout
  # Artifacts are built by `recjax fit` with gin files; the per-artifact commands are gone.
  assert "semantic-ids" not in out.stdout and "\n    wals " not in out.stdout
  assert run_cli("wals", "--data", ".").returncode == 2
  out = run_cli("prepare", "--help")
  for flag in ("--format", "--kcore", "--skip_bad_lines", "--max_seq_len", "--short_ids"):
    assert flag in out.stdout


def test_malformed_line_fails_with_file_line_and_field(tmp_path):
  raw = tmp_path / "seq.txt"
  raw.write_text("1 1 2 3\n2 2 x 3\n3 1 2 3\n")
  out = run_cli("prepare", "--format", "s3rec", "--input", raw, "--output", tmp_path / "out")
  assert out.returncode == 2
  assert f"{raw}:2" in out.stderr and "item_id" in out.stderr
  assert "Traceback" not in out.stderr
  assert not (tmp_path / "out" / "manifest.json").exists()


def test_skip_bad_lines_counts_them_in_the_manifest(tmp_path):
  raw = tmp_path / "seq.txt"
  raw.write_text("1 1 2 3\n2 2 x 3\n3 1 2 3\n")
  code = cli.main(["prepare", "--format", "s3rec", "--input", str(raw), "--output",
                   str(tmp_path / "out"), "--skip_bad_lines"])
  assert code == 0
  manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
  assert manifest["bad_lines"]["skipped"] == 1
  assert "seq.txt:2" in manifest["bad_lines"]["examples"][0]
  assert manifest["num_users"] == 2


def test_missing_input_and_bad_option_are_one_sentence(tmp_path):
  out = run_cli("prepare", "--format", "s3rec", "--input", tmp_path / "nope.txt", "--output", tmp_path)
  assert out.returncode == 2 and "nope.txt: no such file" in out.stderr
  raw = tmp_path / "seq.txt"
  raw.write_text("1 1 2 3\n")
  out = run_cli("prepare", "--format", "s3rec", "--input", raw, "--output", tmp_path / "o",
                "--min_seq_len", "2")
  assert out.returncode == 2 and "--min_seq_len" in out.stderr


def test_prepare_beauty_matches_published_counts(beauty_dir, tmp_path):
  code = cli.main(["prepare", "--format", "s3rec", "--input", str(beauty_dir / "Beauty.txt"),
                   "--datamaps", str(beauty_dir / "datamaps.json"),
                   "--item_text", str(beauty_dir / "Amazon_Beauty.item"), "--output", str(tmp_path)])
  assert code == 0
  m = json.loads((tmp_path / "manifest.json").read_text())
  assert (m["num_users"], m["num_items"], m["num_interactions"]) == (22363, 12101, 198502)
  assert m["num_items_with_text"] == 12101
  assert m["max_category_depth"] >= 4


def test_prepare_office_matches_published_counts(office_dir, tmp_path):
  code = cli.main(["prepare", "--format", "lcrec", "--input", str(office_dir / "Office.inter.json"),
                   "--output", str(tmp_path)])
  assert code == 0
  m = json.loads((tmp_path / "manifest.json").read_text())
  assert (m["num_users"], m["num_items"], m["num_interactions"]) == (4905, 2420, 53258)
  assert m["num_items_with_text"] == 2420
  import pyarrow.parquet as pq
  cats = pq.read_table(tmp_path / "items.parquet", columns=["categories"]).column(0).to_pylist()
  assert all(len(c) >= 1 for c in cats)


@pytest.mark.parametrize("k", [5])
def test_beauty_is_already_a_5core(beauty_dir, tmp_path, k):
  code = cli.main(["prepare", "--format", "s3rec", "--input", str(beauty_dir / "Beauty.txt"),
                   "--output", str(tmp_path), "--kcore", str(k)])
  assert code == 0
  m = json.loads((tmp_path / "manifest.json").read_text())
  assert m["num_interactions"] == 198502 and m["filters"]["kcore_iterations"] == 1
