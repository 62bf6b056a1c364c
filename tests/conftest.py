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
