"""Shared fixtures. Real datasets live in ../shared/data beside the checkout."""

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("RECJAX_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_dataset(name: str) -> pathlib.Path:
  """Path to ../shared/data/NAME, or skip the test with a clear reason."""
  path = SHARED_DATA / name
  if not path.is_dir():
    pytest.skip(f"real dataset {name!r} not found at {path} (set RECJAX_SHARED_DATA to its parent)")
  return path


@pytest.fixture
def beauty_dir() -> pathlib.Path:
  return shared_dataset("amazon-beauty")


@pytest.fixture
def office_dir() -> pathlib.Path:
  return shared_dataset("amazon-office")


@pytest.fixture(scope="session")
def synthetic_raw(tmp_path_factory) -> pathlib.Path:
  """A small synthetic dataset in raw Amazon 2018 + REGEN formats (generated once per run)."""
  from recjax.data import synthetic
  out = tmp_path_factory.mktemp("synthetic_raw")
  synthetic.write_synthetic(out, num_users=300, num_items=120, seed=0)
  return out


@pytest.fixture(scope="session")
def synthetic_prepared(synthetic_raw, tmp_path_factory) -> dict[str, pathlib.Path]:
  """The small synthetic dataset prepared twice: from Amazon 2018 and from REGEN.

  Returns {"synthetic": dir, "synthetic_regen": dir}; the REGEN one carries critiques,
  narratives, endorsements and preferences on top of ratings and reviews.
  """
  from recjax.data import prepare
  root = tmp_path_factory.mktemp("prepared")
  out = {}
  for name, fmt, src in (("synthetic", "amazon2018", "amazon2018/Synthetic.json.gz"),
                         ("synthetic_regen", "regen", "regen/synthetic.jsonl.gz")):
    prepare.prepare(fmt, synthetic_raw / src, root / name, options=prepare.PrepareOptions(kcore=5))
    out[name] = root / name
  return out


def copy_with_random_ids(src, dst) -> pathlib.Path:
  """A copy of a prepared dataset at `dst` with random semantic IDs named "rand" (3 levels
  of 4 codes + a unique level of 64), for generative-retrieval models."""
  import shutil
  import numpy as np
  from recjax.artifacts import semantic_ids
  from recjax.data.prepared import PreparedDataset
  from recjax.models import rqvae
  shutil.copytree(src, dst)
  n = PreparedDataset(dst).vocab_size
  codes = np.full((n, 4), -1, np.int32)
  codes[2:] = rqvae.add_unique_level(np.random.default_rng(0).integers(0, 4, (n - 2, 3)), 64)
  semantic_ids.save(dst, "rand", codes, [4, 4, 4, 64])
  return pathlib.Path(dst)


@pytest.fixture
def with_random_ids(tmp_path):
  """copy(prepared_dir) -> a copy under tmp_path with random semantic IDs named "rand"."""
  return lambda src: copy_with_random_ids(src, tmp_path / pathlib.Path(src).name)
