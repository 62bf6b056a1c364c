"""RecBole peer for `recjax bench`: SASRec / BERT4Rec on Amazon Beauty under a training-time budget.

Standalone script, run with the python of the RecBole virtualenv (recbole-requirements.txt;
`driver.ensure_venv` builds it):

  python recbole_runner.py --model sasrec|bert4rec --data DIR --budget_s S --work_dir W \
      [--epochs_max N] [--eval epoch|last] [--seed 2020] [--threads N]

It must not import recjax, jax or tensorflow. torch and recbole are imported inside functions
only, so that recjax's own tests can import `convert_beauty` without that virtualenv.

Steps:
  1. DIR/Beauty.txt (one user per line: `user item item ...`, chronological) -> RecBole atomic
     file W/beauty/beauty.inter, timestamp = position in the user's sequence.
  2. RecBole's leave-one-out split (last item test, second-to-last valid), full ranking over all
     items, no filtering; the runner fails if RecBole's user/item/interaction counts differ from
     the file's.
  3. Train epoch by epoch. The clock counts training only (RecBole's `_train_epoch`, including
     building batches); it is checked after every batch, so the last epoch may be partial.
     After each (possibly partial) epoch the model is evaluated on the TEST split (full ranking;
     with --eval last, after the last epoch only).

Stdout carries JSON lines only (one `{"event": "dataset", ...}` line, then one line per epoch);
RecBole's logging and anything else printed goes to stderr.

What RecBole 1.2.1 does, which the counters below reflect:
  * Every user's sequence is expanded into all its prefixes, one row each (`<i1..ik> -> i(k+1)`,
    the prefix cut to the last MAX_ITEM_LIST_LENGTH items), for SASRec and BERT4Rec alike; the
    leave-one-out split then gives each user's last row to test, the one before to valid. A Beauty
    epoch is 131,413 training rows, and the input items per epoch grow with the square of the
    sequence lengths.
  * SASRec scores one target per row: the next item, at the prefix's last position.
  * BERT4Rec ignores the row's target. Its batch transform masks the input prefix itself: each item
    with probability mask_ratio (0.2), at most int(0.2 * 50) = 10 scored; or, in a random half of
    the batches (ft_ratio 0.5), only the prefix's last item. So each user's last training item is
    never in BERT4Rec's training input, and a mask at position 0 is never scored. At test time it
    appends the mask after the history and drops the history's first item, short histories too.
  * Full-ranking evaluation of sequential models scores every item (only the padding id is
    excluded); items already in the history are not masked out.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time
from typing import Any, TextIO

DATASET = "beauty"
MODELS = {"sasrec": "SASRec", "bert4rec": "BERT4Rec"}
TOPK = (5, 10, 20)
INTER_HEADER = "user_id:token\titem_id:token\ttimestamp:float\n"


def convert_beauty(src: pathlib.Path, out_dir: pathlib.Path, dataset: str = DATASET) -> dict[str, Any]:
  """Writes Beauty.txt-style sequences as RecBole's `out_dir/<dataset>/<dataset>.inter`.

  One row per interaction, in file order; the timestamp is the item's position within its user's
  sequence (0, 1, ...), so RecBole's time ordering ('TO') reproduces the file's order. Ids are
  kept as tokens; RecBole remaps them. Returns the counts of the source file and the path written.
  """
  src, out_dir = pathlib.Path(src), pathlib.Path(out_dir)
  target = out_dir / dataset / f"{dataset}.inter"
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.with_name(target.name + ".tmp")
  users: set[str] = set()
  items: set[str] = set()
  interactions = 0
  with open(src, encoding="utf-8") as fin, open(tmp, "w", encoding="utf-8") as fout:
    fout.write(INTER_HEADER)
    for line_no, line in enumerate(fin, 1):
      fields = line.split()
      if not fields:
        continue
      user, seq = fields[0], fields[1:]
      if not seq:
        raise ValueError(f"{src}:{line_no}: user {user} has no items")
      if user in users:  # positions restart per line, so a repeated user would scramble its order
        raise ValueError(f"{src}:{line_no}: user {user} appears twice")
      users.add(user)
      items.update(seq)
      interactions += len(seq)
      fout.writelines(f"{user}\t{item}\t{pos}\n" for pos, item in enumerate(seq))
  os.replace(tmp, target)  # never leave a half-written file under the final name
  return {"users": len(users), "items": len(items), "interactions": interactions, "path": str(target)}


def recbole_config_dict(work_dir: pathlib.Path, seed: int) -> dict[str, Any]:
  """The settings shared with the recjax runs; everything else stays at RecBole's defaults."""
  return {
      # data: W/beauty/beauty.inter, read as it is (no filtering of any kind)
      "data_path": str(work_dir),
      "checkpoint_dir": str(work_dir / "checkpoints"),
      "USER_ID_FIELD": "user_id",
      "ITEM_ID_FIELD": "item_id",
      "TIME_FIELD": "timestamp",
      "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
      "rm_dup_inter": None,
      "val_interval": None,
      "filter_inter_by_user_or_item": False,
      "user_inter_num_interval": "[0,inf)",
      "item_inter_num_interval": "[0,inf)",
      "MAX_ITEM_LIST_LENGTH": 50,
      # evaluation: leave-one-out, full ranking over all items, on the test split
      "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
      "metrics": ["Hit", "NDCG", "MRR"],
      "topk": list(TOPK),
      "valid_metric": "NDCG@10",
      "metric_decimal_place": 6,
      "eval_batch_size": 1024,
      # model
      "n_layers": 2,
      "n_heads": 2,
      "hidden_size": 64,
      "inner_size": 256,
      "hidden_dropout_prob": 0.2,
      "attn_dropout_prob": 0.2,
      "hidden_act": "gelu",
      "loss_type": "CE",
      "train_neg_sample_args": None,  # CE over all items: no sampled negatives
      # training
      "train_batch_size": 256,
      "learner": "adam",
      "learning_rate": 1e-3,
      "weight_decay": 0.0,
      "shuffle": True,
      "worker": 0,
      # environment
      "gpu_id": "",  # empty -> RecBole picks torch.device("cpu")
      "use_gpu": False,
      "seed": seed,
      "reproducibility": True,
      "show_progress": False,
      "log_wandb": False,
      "save_dataset": False,
      "save_dataloaders": False,
  }


class TrainClock:
  """Cumulative training seconds against a budget."""

  def __init__(self, budget_s: float):
    self.budget_s = budget_s
    self.spent_s = 0.0
    self._start: float | None = None

  def start(self) -> None:
    self._start = time.perf_counter()

  def stop(self) -> None:
    self.spent_s += time.perf_counter() - self._start
    self._start = None

  def elapsed(self) -> float:
    running = 0.0 if self._start is None else time.perf_counter() - self._start
    return self.spent_s + running

  def exhausted(self) -> bool:
    return self.elapsed() >= self.budget_s


class BudgetedBatches:
  """Stands in for RecBole's train loader in `Trainer._train_epoch`: yields its batches, counts
  them, and ends the epoch early once the training clock has run out.

  `_train_epoch` asks for the next batch only after the previous batch's optimizer step, so the
  check placed after each `yield` is a check after every batch; no batch is fetched (and so no
  collate/masking work is done) once the budget is spent.
  """

  def __init__(self, loader, clock: TrainClock, seq_len_field: str):
    self.loader = loader
    self.clock = clock
    self.seq_len_field = seq_len_field
    self.shuffle = loader.shuffle  # read by _train_epoch in distributed mode only
    self.rows = 0        # training rows (one prefix + its target each; see the module docstring)
    self.sequences = 0   # rows with at least one scored target
    self.items = 0       # non-padding input items
    self.targets = 0     # scored target positions
    self.batches = 0
    self.input_wait_s = 0.0  # time spent building batches, part of the training time
    self.complete = False

  def __len__(self) -> int:
    return len(self.loader)

  def __iter__(self):
    batches = iter(self.loader)
    while True:
      t = time.perf_counter()
      batch = next(batches, None)  # RecBole's collate (and BERT4Rec's masking) runs here
      self.input_wait_s += time.perf_counter() - t
      if batch is None:
        self.complete = True
        return
      self._count(batch)
      yield batch
      if self.clock.exhausted():
        return

  def _count(self, batch) -> None:
    lengths = batch[self.seq_len_field]
    self.batches += 1
    self.rows += len(lengths)
    self.items += int(lengths.sum())
    if "MASK_INDEX" in batch:
      # BERT4Rec: RecBole's mask transform lists the masked positions, left-padded with 0, and the
      # loss weights only entries > 0 (a mask at position 0 is in the input but never scored).
      scored = batch["MASK_INDEX"] > 0
      self.targets += int(scored.sum())
      self.sequences += int(scored.any(dim=1).sum())
    else:
      # SASRec: one target per row, the next item after the prefix (scored at the last position).
      self.targets += len(lengths)
      self.sequences += len(lengths)


def versions() -> dict[str, str]:
  import numpy
  import pandas
  import recbole
  import torch
  return {"python": platform.python_version(), "recbole": recbole.__version__, "torch": torch.__version__,
          "numpy": numpy.__version__, "pandas": pandas.__version__}


def rename_metrics(result: dict[str, float]) -> dict[str, float]:
  """RecBole's {'hit@10': ..} -> {'hr@10': ..}, floats."""
  out = {}
  for key, value in result.items():
    name, k = key.split("@")
    out[f"{'hr' if name == 'hit' else name}@{k}"] = float(value)
  return out


def emit(stream: TextIO, row: dict[str, Any]) -> None:
  stream.write(json.dumps(row) + "\n")
  stream.flush()


def run(args: argparse.Namespace, out: TextIO) -> None:
  # torch >= 2.6 loads checkpoints with weights_only=True by default, which RecBole's own
  # checkpoints (config objects inside) do not pass; set before torch is imported.
  os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
  import torch
  from recbole.config import Config
  from recbole.data import data_preparation
  from recbole.data.dataset import SequentialDataset
  from recbole.utils import get_model, get_trainer, init_logger, init_seed

  if args.threads:
    torch.set_num_threads(args.threads)
  data_dir = pathlib.Path(args.data).resolve()  # before the chdir below
  work_dir = pathlib.Path(args.work_dir).resolve()
  work_dir.mkdir(parents=True, exist_ok=True)
  os.chdir(work_dir)  # RecBole writes log/ and log_tensorboard/ under the working directory

  t0 = time.perf_counter()
  source = convert_beauty(data_dir / "Beauty.txt", work_dir)

  model_name = MODELS[args.model]
  sys.argv = sys.argv[:1]  # RecBole's Config also parses `--key=value` from the command line
  config = Config(model=model_name, dataset=DATASET,
                  config_dict=recbole_config_dict(work_dir, args.seed))
  init_seed(config["seed"], config["reproducibility"])
  init_logger(config)

  class CountingDataset(SequentialDataset):
    """Records the interaction count RecBole kept, before it expands sequences into prefixes."""

    def data_augmentation(self):
      self.kept_interactions = len(self.inter_feat)
      super().data_augmentation()

  dataset = CountingDataset(config)
  train_data, _, test_data = data_preparation(config, dataset)
  kept = {"users": dataset.user_num - 1, "items": dataset.item_num - 1,  # minus RecBole's [PAD] id 0
          "interactions": dataset.kept_interactions}
  for key, value in kept.items():
    if value != source[key]:
      raise RuntimeError(f"RecBole kept {value} {key}, the source file has {source[key]}: "
                         "something was filtered or merged")
  load_s = time.perf_counter() - t0
  emit(out, {"event": "dataset", "peer": "recbole", "model": args.model, **kept,
             "train_sequences": len(train_data.dataset), "test_sequences": len(test_data.dataset),
             "load_s": round(load_s, 3)})

  init_seed(config["seed"], config["reproducibility"])
  model = get_model(model_name)(config, train_data.dataset).to(config["device"])
  trainer = get_trainer(config["MODEL_TYPE"], model_name)(config, model)
  seq_len_field = config["ITEM_LIST_LENGTH_FIELD"]
  clock = TrainClock(args.budget_s)
  totals = {"rows": 0, "sequences": 0, "items": 0, "targets": 0, "input_wait_s": 0.0}
  info = {"torch_threads": torch.get_num_threads(), "versions": versions(), "budget_s": args.budget_s}
  if args.model == "bert4rec":
    info["mask_ratio"], info["ft_ratio"] = config["mask_ratio"], config["ft_ratio"]

  epoch = 0
  while not clock.exhausted() and (args.epochs_max is None or epoch < args.epochs_max):
    batches = BudgetedBatches(train_data, clock, seq_len_field)
    clock.start()
    loss = trainer._train_epoch(batches, epoch)  # pylint: disable=protected-access
    clock.stop()
    for key in totals:
      totals[key] += getattr(batches, key)
    epoch += 1
    train_s = clock.spent_s
    row = {"peer": "recbole", "model": args.model, "epoch": epoch, "complete_epoch": batches.complete,
           "batches": batches.batches, "loss_sum": float(loss) if loss is not None else None,
           "train_s": round(train_s, 3), **totals, "input_wait_s": round(totals["input_wait_s"], 3),
           "sequences_per_s": totals["sequences"] / train_s, "items_per_s": totals["items"] / train_s,
           "targets_per_s": totals["targets"] / train_s,
           "input_wait_fraction": totals["input_wait_s"] / train_s}
    last = clock.exhausted() or (args.epochs_max is not None and epoch >= args.epochs_max)
    if args.eval == "epoch" or last:
      t_eval = time.perf_counter()
      result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
      row["eval_s"] = round(time.perf_counter() - t_eval, 3)
      row["test"] = rename_metrics(result)
    emit(out, {**row, **info})


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, choices=sorted(MODELS))
  parser.add_argument("--data", required=True, help="directory holding Beauty.txt")
  parser.add_argument("--budget_s", type=float, required=True, help="training wall-clock budget, seconds")
  parser.add_argument("--work_dir", required=True)
  parser.add_argument("--epochs_max", type=int, default=None)
  parser.add_argument("--seed", type=int, default=2020)
  parser.add_argument("--eval", choices=["epoch", "last"], default="epoch",
                      help="evaluate the test split after every epoch, or after the last one only")
  parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
  args = parser.parse_args(argv)
  # Keep the real stdout for the JSON lines; everything else that prints goes to stderr.
  out, sys.stdout = sys.stdout, sys.stderr
  try:
    run(args, out)
  finally:
    sys.stdout = out


if __name__ == "__main__":
  main()
