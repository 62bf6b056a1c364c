"""Reading Hugging Face checkpoints (config.json + safetensors) without torch."""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def checkpoint_dir(path) -> pathlib.Path:
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"text encoder checkpoint directory not found: {path}")
  if not path.is_dir():
    raise NotADirectoryError(f"text encoder checkpoint must be a directory (config.json + "
                             f"{WEIGHTS}), got the file {path}")
  return path


def require_file(directory: pathlib.Path, name: str) -> pathlib.Path:
  path = directory / name
  if not path.is_file():
    raise FileNotFoundError(f"checkpoint file not found: {path}")
  return path


def read_config(directory: pathlib.Path) -> dict:
  return json.loads(require_file(directory, "config.json").read_text())


def weight_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The safetensors file, or the shards named by the index."""
  if (directory / WEIGHTS).is_file():
    return [directory / WEIGHTS]
  if (directory / WEIGHTS_INDEX).is_file():
    index = json.loads((directory / WEIGHTS_INDEX).read_text())
    return [require_file(directory, f) for f in sorted(set(index["weight_map"].values()))]
  hint = " (a torch-only pytorch_model.bin is not read: convert it to safetensors)" if (
      directory / "pytorch_model.bin").exists() else ""
  raise FileNotFoundError(f"checkpoint file not found: {directory / WEIGHTS} "
                          f"(nor {WEIGHTS_INDEX}){hint}")


def load_tensors(directory: pathlib.Path, keep: Callable[[str], bool]) -> dict[str, np.ndarray]:
  """Tensors whose name passes `keep`, as float32 numpy arrays."""
  from safetensors import safe_open
  out = {}
  for path in weight_files(directory):
    with safe_open(str(path), framework="np") as f:
      for name in f.keys():
        if keep(name):
          # bf16 checkpoints come back as ml_dtypes.bfloat16: widen to float32 parameters.
          out[name] = np.asarray(f.get_tensor(name), np.float32)
  return out


def take(tensors: dict[str, np.ndarray], name: str, directory) -> np.ndarray:
  if name not in tensors:
    raise KeyError(f"{directory}: the checkpoint has no tensor {name!r} (does config.json match it?)")
  return tensors.pop(name)


def assign(variable: nnx.Variable, array: np.ndarray, name: str) -> None:
  """Sets an (abstract) parameter from a checkpoint tensor, checking the shape."""
  expected = variable.get_value()  # a ShapeDtypeStruct while the model is abstract
  if tuple(expected.shape) != tuple(array.shape):
    raise ValueError(f"checkpoint tensor {name} has shape {tuple(array.shape)}, the model expects "
                     f"{tuple(expected.shape)}")
  variable.set_value(jnp.asarray(array, expected.dtype))


def check_consumed(tensors: dict[str, np.ndarray], model: nnx.Module, directory) -> None:
  """Every checkpoint tensor was used and every parameter was set."""
  unset = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(
      nnx.state(model)) if isinstance(leaf, jax.ShapeDtypeStruct)]
  if unset:
    raise ValueError(f"{directory}: parameters not found in the checkpoint: {unset[:5]}")
  if tensors:
    names = sorted(tensors)
    raise ValueError(f"{directory}: {len(names)} checkpoint tensors were not used, e.g. {names[:5]}; "
                     "the config does not describe this checkpoint")


_DIGESTS: dict[tuple, str] = {}


def file_digest(path: pathlib.Path) -> str:
  """sha256 of a file, memoised per (path, size, mtime) so a process hashes it once."""
  st = path.stat()
  key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
  if key not in _DIGESTS:
    with path.open("rb") as f:
      _DIGESTS[key] = hashlib.file_digest(f, "sha256").hexdigest()
  return _DIGESTS[key]


def fingerprint(files, extra: dict) -> str:
  """Identity of an encoder: the content of its files plus `extra` (config, dtype, ...)."""
  h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
  for path in files:
    h.update(f"{path.name}:{file_digest(path)}\n".encode())
  return h.hexdigest()


def check_tokenizer(path, file_name: str, spm_model: str, binding: str) -> None:
  """A checkpoint's token ids mean its own SentencePiece pieces (`file_name` in its
  directory): refuse tasks tokenized with any other model. `binding` names the gin binding
  that chose the checkpoint, for the error."""
  directory = checkpoint_dir(path)
  spm = directory / file_name
  if not spm.is_file():
    logging.getLogger("recjax.checkpoint").warning(
        "%s has no %s: cannot check that the tasks' vocabulary is the checkpoint's", directory, file_name)
    return
  if not spm_model or pathlib.Path(spm_model).read_bytes() != spm.read_bytes():
    raise ValueError(
        f"the tasks' SentencePiece model ({spm_model or 'unknown'}) is not the checkpoint's {spm} "
        f"({binding}): register the tasks with it, gin: text_vocabulary_options.spm_model = '{spm}'")


def fit_loaded(new, old):
  """A checkpoint array `old` in the place of the fresh `new`: equal shapes take `old`; a
  larger `new` (a vocabulary grown past the checkpoint's) keeps its fresh values beyond."""
  if new.shape == old.shape:
    return jnp.asarray(old, new.dtype)
  if new.ndim != old.ndim or any(o > n for o, n in zip(old.shape, new.shape)):
    raise ValueError(f"checkpoint parameter of shape {old.shape} does not fit {new.shape}")
  return new.at[tuple(slice(0, o) for o in old.shape)].set(jnp.asarray(old, new.dtype))
