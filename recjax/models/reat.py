"""ReAT ("Aligning Large Language Models with Recommendation Knowledge", Cao et al. 2024):
a T5-family encoder-decoder fine-tuned text-to-text on recommendation tasks.

The tasks and mixtures are the SeqIO ones of `recjax.tasks.text` (ds_reat_retrieval,
_ranking, _rating, _mim, _mlm, _bpr; mixtures ds_reat, ds_raat, ds_rpat, ds_ut, ds_ut_at).
The backbone is `t5_seq2seq.T5EncoderDecoder`: T5 v1.1-style (gated-GELU, untied head)
from scratch at the sizes given here, or a Hugging Face T5 / Flan-T5 checkpoint
(`pretrained`). A checkpoint brings its own SentencePiece model: the tasks must then be
registered with it (`text.register(..., spm_model=CKPT/spiece.model)` or gin's
`text_vocabulary_options.spm_model`); a different one is an error. Extra ids the
checkpoint lacks (seqio adds 100 sentinels) get freshly initialised embedding rows.

Data: every task is read whole into fixed-shape numpy rows (encoder tokens right-padded
to `inputs_length`, targets + EOS to `targets_length`). A mixture is the concatenation of
its tasks' rows: the ReAT mixtures have equal rates and every task yields one example per
window, so this is examples-proportional mixing, shuffled each epoch by the trainer.

Evaluation (test split, leave-one-out, one row per user):
  retrieval / ranking: beam search (width 20) over the text decoder; each beam's text is
    parsed back to an item through the catalogue's short ids ("I123"). A beam naming no
    item (or, for ranking, no item of the row's 100 candidates) is counted invalid and
    skipped, as is a repeat of an item already ranked; the rank of the target is its
    position among the remaining beams. HR@k (= Recall@k, one target) and NDCG@k.
  rating: AUC-ROC of log p("yes") - log p("no") (each target teacher-forced; for
    single-token answers this is the first decoder step's logit gap).

  model = Reat(vocab_size=vocabulary.vocab_size, spm_model=vocabulary.sentencepiece_model_file)
  train = build_examples(task_names("ds_reat"), "train", model)
  trainer, state, history = train_reat(model, train, steps=1000)
  scores = evaluate(trainer.network(state.params), {"retrieval": test}, vocabulary,
                    preprocessors.catalog(data_dir).short_ids)
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import logging
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from recjax.models.text import checkpoint as ckpt
from recjax.models.text import t5_seq2seq as s2s

log = logging.getLogger("recjax.reat")

EVAL_FAMILIES = ("retrieval", "ranking", "rating")
KS = (1, 5, 10, 20)
NDCG_KS = (5, 10, 20)
MISS = 1 << 30  # the rank of a target no beam names: past every cutoff
LIKE, DISLIKE = "yes", "no"  # the rating targets (preprocessors.LIKE / DISLIKE; no TensorFlow here)


@functools.lru_cache(maxsize=4)
def _checkpoint(path: str):
  """(config, numpy Param state) of a checkpoint. Eager even when first asked for inside a
  trace (the trainer builds the network under eval_shape / jit): nothing traced is cached."""
  with jax.ensure_compile_time_eval():
    model = s2s.load_t5(path).model
    return model.config, jax.tree.map(np.asarray, nnx.state(model, nnx.Param))


@dataclasses.dataclass
class Reat:
  """ReAT hyper-parameters (the trainer's model protocol)."""

  vocab_size: int = 0  # the tasks' vocabulary (SentencePiece + extra ids)
  spm_model: str = ""  # the tasks' SentencePiece file: checked against a checkpoint's
  inputs_length: int = 256
  targets_length: int = 32
  # From scratch: T5 v1.1 layout (gated-GELU FFN, untied head, no output rescale).
  d_model: int = 128
  d_kv: int = 32
  d_ff: int = 256
  num_heads: int = 4
  num_layers: int = 2
  num_decoder_layers: int = 2
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  # A Hugging Face T5 / Flan-T5 / mT5 checkpoint directory; its config replaces the sizes.
  pretrained: str = ""
  z_loss: float = 0.0

  batch_fields = ("encoder_tokens", "encoder_mask", "targets", "target_mask", "weights")

  def config(self) -> s2s.T5Seq2SeqConfig:
    if self.vocab_size <= 2:
      raise ValueError(f"Reat needs vocab_size from the tasks' vocabulary, got {self.vocab_size}")
    if not self.pretrained:
      return s2s.T5Seq2SeqConfig(
          vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
          num_layers=self.num_layers, num_decoder_layers=self.num_decoder_layers, num_heads=self.num_heads,
          relative_attention_num_buckets=self.relative_attention_num_buckets,
          relative_attention_max_distance=self.relative_attention_max_distance,
          feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)
    self.check_vocabulary()
    cfg = _checkpoint(str(self.pretrained))[0]
    # T5 pads its embedding (32128 >= 32000 pieces + 100 sentinels); grow it only when needed.
    return dataclasses.replace(cfg, vocab_size=max(cfg.vocab_size, self.vocab_size))

  def check_vocabulary(self) -> None:
    """A checkpoint's token ids mean its own SentencePiece pieces: refuse any other model."""
    directory = ckpt.checkpoint_dir(self.pretrained)
    spm = directory / "spiece.model"
    if not spm.is_file():
      log.warning("%s has no spiece.model: cannot check that the tasks' vocabulary is the checkpoint's", directory)
      return
    if not self.spm_model or pathlib.Path(self.spm_model).read_bytes() != spm.read_bytes():
      raise ValueError(
          f"the tasks' SentencePiece model ({self.spm_model or 'unknown'}) is not the checkpoint's {spm}: "
          f"register the tasks with spm_model={spm} (gin: text_vocabulary_options.spm_model = '{spm}'; "
          "`recjax reat --pretrained` does this itself)")

  def network(self, rngs: nnx.Rngs) -> s2s.T5EncoderDecoder:
    return s2s.T5EncoderDecoder(self.config(), rngs=rngs)

  def pretrained_params(self, fresh):
    """The checkpoint's parameters in the layout of `fresh` (this model's initial Param
    state): rows / columns beyond the checkpoint's vocabulary keep their fresh values."""
    loaded = _checkpoint(str(self.pretrained))[1]

    def merge(new, old):
      if new.shape == old.shape:
        return jnp.asarray(old, new.dtype)
      if new.ndim != old.ndim or any(o > n for o, n in zip(old.shape, new.shape)):
        raise ValueError(f"checkpoint parameter of shape {old.shape} does not fit {new.shape}")
      return new.at[tuple(slice(0, o) for o in old.shape)].set(jnp.asarray(old, new.dtype))

    return jax.tree.map(merge, fresh, loaded)

  def loss_fn(self, net: s2s.T5EncoderDecoder, batch, rng):
    """Mean target-token cross-entropy (padding rows have weight 0). No dropout: `rng` unused."""
    del rng
    mask = batch["target_mask"] * (batch["weights"][:, None] > 0)
    inputs = s2s.shift_right(batch["targets"], net.config.decoder_start_token_id)
    logits = net(batch["encoder_tokens"], batch["encoder_mask"], inputs)
    loss, m = s2s.cross_entropy(logits, batch["targets"], mask, z_loss=self.z_loss)
    return loss, {"loss_sum": m["loss_sum"], "targets": m["targets"], "accuracy_sum": m["accuracy_sum"],
                  "dropped_targets": jnp.zeros((), jnp.float32), "items": jnp.sum(batch["weights"])}


# -- data -------------------------------------------------------------------------------


def task_names(name: str) -> list[str]:
  """A task's name, or a mixture's tasks."""
  import seqio
  provider = seqio.get_mixture_or_task(name)
  if isinstance(provider, seqio.Mixture):
    return [t.name for t in provider.tasks]
  return [name]


def family(task_name: str) -> str:
  return task_name.rsplit("_reat_", 1)[-1]


def build_examples(names, split: str, model: Reat, *, limit: int | None = None) -> dict:
  """Fixed-shape numpy rows of tasks / mixtures (mixtures: their tasks' rows concatenated),
  with per-row "task", "target_item" (0 if none), "candidates" [100] (ranking rows, else
  0) and "label" (rating: 1 = yes). "truncated_targets" counts targets cut to
  `targets_length` (EOS kept); "inputs_at_length" counts inputs that fill `inputs_length`
  (the preprocessors keep the newest items that fit, then cut the text)."""
  import seqio
  from recjax.data import preprocessors as P
  li, lt = model.inputs_length, model.targets_length
  rows = collections.defaultdict(list)
  cut, full = collections.Counter(), collections.Counter()
  tasks = [t for n in names for t in task_names(n)]
  for name in tasks:
    task = seqio.get_mixture_or_task(name)
    # MLM sizes its spans to fit the targets; the others are read whole so cuts are counted.
    lengths = {"inputs": li, "targets": lt if family(name) == "mlm" else 4096}
    ds = task.get_dataset(lengths, split=split, shuffle=False, num_epochs=1, use_cached=False, seed=0)
    for n, ex in enumerate(ds.as_numpy_iterator()):
      if limit is not None and n >= limit:
        break
      inputs, targets = ex["inputs"][:li], ex["targets"]
      full[name] += len(inputs) >= li
      if len(targets) > lt:
        cut[name] += 1
        targets = np.concatenate([targets[:lt - 1], targets[-1:]])
      enc = np.zeros(li, np.int32)
      enc[:len(inputs)] = inputs
      tgt = np.zeros(lt, np.int32)
      tgt[:len(targets)] = targets
      candidates = np.zeros(P.NUM_NEGATIVES + 1, np.int32)
      if family(name) == "ranking":
        candidates[:len(ex["candidates"])] = ex["candidates"]
      label = int(ex["targets_pretokenized"] == P.LIKE.encode()) if family(name) == "rating" else 0
      for key, value in (("encoder_tokens", enc), ("encoder_mask", (enc > 0).astype(np.int32)),
                         ("targets", tgt), ("target_mask", (tgt > 0).astype(np.int32)), ("weights", 1.0),
                         ("task", name), ("target_item", int(ex.get("target", 0))),
                         ("candidates", candidates), ("label", label)):
        rows[key].append(value)
  if not rows:
    raise ValueError(f"no {split} examples in {list(names)}")
  out = {k: np.asarray(v) for k, v in rows.items()}
  out["weights"] = out["weights"].astype(np.float32)
  out["truncated_targets"] = dict(cut)
  out["inputs_at_length"] = dict(full)
  log.info("%s %s: %d rows; targets cut: %s; inputs at length %d: %s", split, tasks, len(out["weights"]),
           dict(cut), li, dict(full))
  return out


def select(examples: dict, rows) -> dict:
  """The given rows of every per-row array (counters dropped)."""
  n = len(examples["weights"])
  return {k: v[rows] for k, v in examples.items() if isinstance(v, np.ndarray) and len(v) == n}


# -- training ---------------------------------------------------------------------------


def train_reat(model: Reat, examples: dict, *, steps: int, batch_size: int = 32, seed: int = 0,
               learning_rate: float = 2e-3, warmup_steps: int = 100, **kwargs):
  """`recjax.train.arrays.train_arrays` (the Trainer's jitted step on one host), starting from the
  checkpoint's parameters when `model.pretrained`. Returns (trainer, state, history)."""
  from recjax.train.arrays import train_arrays  # the driver's trainer (issue 19 moves ReAT onto loop.train)
  return train_arrays(model, examples, steps=steps, batch_size=batch_size, seed=seed,
                           learning_rate=learning_rate, warmup_steps=warmup_steps,
                           init_params=model.pretrained_params if model.pretrained else None, **kwargs)


# -- parsing and metrics ----------------------------------------------------------------


def item_index(short_ids) -> dict[str, int]:
  """Short id ("I123") -> item id, from the catalogue's table (reserved rows are "")."""
  return {str(s): i for i, s in enumerate(short_ids) if s}


def parse_item(text: str, index: dict[str, int]) -> int:
  """The item a generated text names (0 = none: empty, not an id, or no such item)."""
  return index.get(text.strip(), 0)


def beam_ranks(texts, targets, index, candidates=None) -> tuple[np.ndarray, dict]:
  """0-based rank of each row's target among its beams' items (MISS if none names it).

  texts: per row, the beams' texts best first. Beams naming no item (or, with
  `candidates` [N, C], no candidate of the row) are invalid, and repeats of an item
  already ranked are duplicates: both are skipped, so later beams move up.
  """
  ranks = np.zeros(len(texts), np.int64)
  invalid = duplicates = total = top_invalid = 0
  for r, (beams, target) in enumerate(zip(texts, targets)):
    allowed = None if candidates is None else set(int(c) for c in candidates[r] if c > 0)
    seen: list[int] = []
    ranks[r] = MISS
    for b, text in enumerate(beams):
      total += 1
      item = parse_item(text, index)
      if not item or (allowed is not None and item not in allowed):
        invalid += 1
        top_invalid += b == 0
        continue
      if item in seen:
        duplicates += 1
        continue
      if item == target and ranks[r] == MISS:
        ranks[r] = len(seen)
      seen.append(item)
  counts = {"invalid_fraction": invalid / max(total, 1), "duplicate_fraction": duplicates / max(total, 1),
            "top1_invalid_fraction": top_invalid / max(len(texts), 1)}
  return ranks, counts


def hit_metrics(ranks: np.ndarray, ks=KS, ndcg_ks=NDCG_KS) -> dict:
  ranks = np.asarray(ranks)
  out = {f"hr@{k}": float(np.mean(ranks < k)) for k in ks}
  out.update({f"ndcg@{k}": float(np.mean(np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0))) for k in ndcg_ks})
  out["count"] = int(len(ranks))
  return out


def auc_roc(scores, labels) -> float:
  """Area under the ROC curve: P(score of a positive > score of a negative), ties count
  half (Mann-Whitney U with average ranks). NaN without both classes."""
  scores = np.asarray(scores, np.float64)
  labels = np.asarray(labels).astype(bool)
  pos, neg = int(labels.sum()), int((~labels).sum())
  if not pos or not neg:
    return float("nan")
  order = np.argsort(scores, kind="mergesort")
  sorted_scores = scores[order]
  ranks = np.empty(len(scores), np.float64)
  # Average 1-based rank over each run of equal scores.
  starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
  ends = np.r_[starts[1:], len(scores)]
  for s, e in zip(starts, ends):
    ranks[order[s:e]] = (s + 1 + e) / 2.0
  return float((ranks[labels].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def decode_ids(vocabulary, ids) -> str:
  ids = [int(t) for t in ids]
  ids = ids[:ids.index(1)] if 1 in ids else ids  # up to EOS
  return vocabulary.decode([t for t in ids if t > 1]).strip()


# -- evaluation -------------------------------------------------------------------------


def _padded_batches(examples: dict, fields, batch_size: int):
  n = len(examples["weights"])
  for s in range(0, n, batch_size):
    batch = {k: examples[k][s:s + batch_size] for k in fields}
    pad = batch_size - len(batch["weights"])  # one shape: one compilation
    yield {k: np.pad(v, [(0, pad)] + [(0, 0)] * (v.ndim - 1)) for k, v in batch.items()}, batch_size - pad


# Module-level jits with the graph static: every family, batch and mixture of one model
# shape shares one compilation.
@functools.partial(jax.jit, static_argnums=(0, 4, 5))
def _beams(graphdef, params, ids, mask, num_beams: int, max_new_tokens: int):
  out = s2s.generate(nnx.merge(graphdef, params), ids, mask, max_new_tokens=max_new_tokens,
                     num_beams=num_beams, length_penalty=0.0)  # rank by p(item): no length bonus
  return out.sequences


@functools.partial(jax.jit, static_argnums=0)
def _answer_gap(graphdef, params, ids, mask, answers):
  """log p(answers[0]) - log p(answers[1]) per row; answers [2, W] end with EOS, 0-padded."""
  model = nnx.merge(graphdef, params)
  memory = model.encode(ids, mask)
  out = []
  for a in answers:  # two short teacher-forced passes
    tgt = jnp.broadcast_to(a, (ids.shape[0], answers.shape[1]))
    logp = jax.nn.log_softmax(model.decode(s2s.shift_right(tgt), memory, mask), -1)
    tok = jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    out.append(jnp.sum(jnp.where(tgt > 0, tok, 0.0), -1))
  return out[0] - out[1]


def _map_batches(fn, examples: dict, batch_size: int) -> np.ndarray:
  """fn(ids, mask) over padded batches; every batch is dispatched before the one copy to host."""
  outs = [(fn(b["encoder_tokens"], b["encoder_mask"]), keep)
          for b, keep in _padded_batches(examples, ("encoder_tokens", "encoder_mask", "weights"), batch_size)]
  got = jax.device_get([o for o, _ in outs])
  return np.concatenate([g[:keep] for g, (_, keep) in zip(got, outs)])


def generate_beams(net: s2s.T5EncoderDecoder, examples: dict, *, num_beams: int, max_new_tokens: int,
                   batch_size: int = 32) -> np.ndarray:
  """int32 [N, num_beams, max_new_tokens]: beam-search outputs, best first."""
  graphdef, params = nnx.split(net)
  return _map_batches(lambda ids, mask: _beams(graphdef, params, ids, mask, num_beams, max_new_tokens),
                      examples, batch_size)


def answer_scores(net: s2s.T5EncoderDecoder, examples: dict, yes: list[int], no: list[int], *,
                  batch_size: int = 64) -> np.ndarray:
  """float [N]: log p(yes + EOS) - log p(no + EOS) given each row's input."""
  graphdef, params = nnx.split(net)
  width = max(len(yes), len(no)) + 1
  answers = np.zeros((2, width), np.int32)
  answers[0, :len(yes) + 1] = yes + [1]
  answers[1, :len(no) + 1] = no + [1]
  return _map_batches(lambda ids, mask: _answer_gap(graphdef, params, ids, mask, answers), examples, batch_size)


def evaluate(net: s2s.T5EncoderDecoder, tests: dict[str, dict], vocabulary, short_ids, *,
             num_beams: int = 20, batch_size: int = 32, samples: int = 2) -> dict:
  """Metrics per evaluated family, from {family: test examples}."""
  index = item_index(short_ids)
  max_new = max(len(vocabulary.encode(str(s))) for s in short_ids if s) + 1  # + EOS
  out = {}
  for fam, ex in tests.items():
    start = time.perf_counter()
    if fam in ("retrieval", "ranking"):
      seqs = generate_beams(net, ex, num_beams=num_beams, max_new_tokens=max_new, batch_size=batch_size)
      texts = [[decode_ids(vocabulary, b) for b in row] for row in seqs]
      ranks, counts = beam_ranks(texts, ex["target_item"], index,
                                 ex["candidates"] if fam == "ranking" else None)
      out[fam] = {**hit_metrics(ranks), **counts,
                  "samples": [{"target": str(short_ids[t]), "beams": b[:5]}
                              for t, b in zip(ex["target_item"][:samples], texts[:samples])]}
    elif fam == "rating":
      scores = answer_scores(net, ex, vocabulary.encode(LIKE), vocabulary.encode(DISLIKE),
                             batch_size=2 * batch_size)
      out[fam] = {"auc": auc_roc(scores, ex["label"]), "positive_fraction": float(np.mean(ex["label"])),
                  "accuracy": float(np.mean((scores > 0) == (ex["label"] > 0))), "count": int(len(scores))}
    else:
      raise ValueError(f"no evaluation for {fam!r}; choose from {EVAL_FAMILIES}")
    out[fam]["seconds"] = round(time.perf_counter() - start, 1)
  return out


# -- the `recjax reat` command ----------------------------------------------------------

# The paper's ablation order (retrieval, + MLM, + MIM, + BPR), then its mixtures.
ABLATION = ("retrieval", "retrieval+mlm", "retrieval+mlm+mim", "retrieval+mlm+mim+bpr")
MIXTURES = ("reat", "raat", "rpat", "ut", "ut_at")
TITLES = {"reat": "ReAT", "raat": "RaAT", "rpat": "RpAT", "ut": "UT", "ut_at": "UT+AT"}


def spec_tasks(dataset: str, spec: str) -> list[str]:
  """'retrieval+mlm' -> that dataset's tasks; 'reat' etc. -> the mixture's tasks."""
  import seqio
  if spec in MIXTURES:
    name = f"{dataset}_{spec}"
    if name not in seqio.MixtureRegistry.names():
      raise ValueError(f"no mixture {name} (RpAT needs ratings)")
    return task_names(name)
  names = [f"{dataset}_reat_{f.strip()}" for f in spec.split("+")]
  missing = [n for n in names if n not in seqio.TaskRegistry.names()]
  if missing:
    raise ValueError(f"--mixtures {spec!r}: no task {missing[0]}; use families retrieval, ranking, rating, mim, "
                     f"mlm, bpr joined by '+', or a mixture: {', '.join(MIXTURES)}")
  return names


def format_results(results: list[dict]) -> str:
  head = (f"{'mixture':<24} {'rows':>7} {'steps':>6} {'train s':>8} | {'R@1':>6} {'R@5':>6} {'R@10':>6} "
          f"{'R@20':>6} {'N@10':>6} {'N@20':>6} {'inv':>5} | {'K@1':>6} {'K@5':>6} {'K@10':>6} {'KN@10':>6} "
          f"{'inv':>5} | {'AUC':>6}")
  lines = [head, "-" * len(head)]
  f = lambda m, k: f"{m[k]:>6.4f}" if m and k in m else f"{'-':>6}"
  for r in results:
    s = r["scores"]
    rt, rk, ra = s.get("retrieval"), s.get("ranking"), s.get("rating")
    inv = lambda m: f"{m['invalid_fraction']:>5.2f}" if m else f"{'-':>5}"
    lines.append(f"{r['mixture']:<24} {r['train_rows']:>7} {r['steps']:>6} {r['train_seconds']:>8.0f} | "
                 f"{f(rt, 'hr@1')} {f(rt, 'hr@5')} {f(rt, 'hr@10')} {f(rt, 'hr@20')} {f(rt, 'ndcg@10')} "
                 f"{f(rt, 'ndcg@20')} {inv(rt)} | {f(rk, 'hr@1')} {f(rk, 'hr@5')} {f(rk, 'hr@10')} "
                 f"{f(rk, 'ndcg@10')} {inv(rk)} | {f(ra, 'auc')}")
  lines.append("R = retrieval HR@k over the catalogue, K = ranking HR@k among 100 candidates (N/KN: NDCG), "
               "both from beam rank (width 20, invalid beams skipped; inv = their fraction); AUC = rating")
  return "\n".join(lines)


def run(data_dir, *, dataset: str = "reat", mixtures=ABLATION + MIXTURES, steps: int = 1000,
        batch_size: int = 32, learning_rate: float = 2e-3, eval_limit: int | None = 500,
        train_limit: int | None = None, num_beams: int = 20, log_path=None, seed: int = 0,
        **model_kwargs) -> list[dict]:
  """Trains one model per mixture spec and evaluates it on the test split's retrieval,
  ranking and rating tasks (those the dataset has). Returns one result dict per spec
  (also appended to `log_path` as JSON lines)."""
  import seqio
  from recjax.data import preprocessors as P
  from recjax.data.prepared import PreparedDataset
  from recjax.tasks import text as text_tasks
  pretrained = model_kwargs.get("pretrained") or ""
  spm = str(ckpt.checkpoint_dir(pretrained) / "spiece.model") if pretrained else None
  if spm and not pathlib.Path(spm).is_file():
    spm = None
  text_tasks.register(dataset, data_dir, spm_model=spm)
  data_dir = str(PreparedDataset(data_dir).data_dir)
  vocabulary = P.text_vocabulary(data_dir, spm)
  short_ids = P.catalog(data_dir).short_ids
  base = Reat(vocab_size=vocabulary.vocab_size, spm_model=vocabulary.sentencepiece_model_file, **model_kwargs)
  cache: dict[tuple, dict] = {}

  def examples(name, split, limit):
    key = (name, split, limit)
    if key not in cache:
      cache[key] = build_examples([name], split, base, limit=limit)
    return cache[key]

  specs = {spec: spec_tasks(dataset, spec) for spec in mixtures}  # bad names fail before any work
  tests = {f: examples(f"{dataset}_reat_{f}", "test", eval_limit) for f in EVAL_FAMILIES
           if f"{dataset}_reat_{f}" in seqio.TaskRegistry.names()}
  results = []
  for spec, names in specs.items():
    parts = [examples(n, "train", train_limit) for n in names]
    train = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if isinstance(parts[0][k], np.ndarray)}
    start = time.perf_counter()
    trainer, state, history = train_reat(base, train, steps=steps, batch_size=batch_size, seed=seed,
                                         learning_rate=learning_rate, warmup_steps=min(100, steps // 10))
    train_s = time.perf_counter() - start
    scores = evaluate(trainer.network(state.params), tests, vocabulary, short_ids, num_beams=num_beams,
                      batch_size=batch_size)
    row = {"mixture": TITLES.get(spec, spec), "spec": spec, "tasks": names,
           "train_rows": int(len(train["weights"])),
           "train_rows_per_task": {n: int(len(p["weights"])) for n, p in zip(names, parts)},
           "truncated_targets": {n: p["truncated_targets"].get(n, 0) for n, p in zip(names, parts)},
           "inputs_at_length": {n: p["inputs_at_length"].get(n, 0) for n, p in zip(names, parts)},
           "steps": steps, "batch_size": batch_size, "learning_rate": learning_rate,
           "train_seconds": round(train_s, 1), "final_loss": history[-1]["loss"],
           "final_token_accuracy": history[-1]["accuracy"], "num_beams": num_beams,
           "test_inputs_at_length": {f: t["inputs_at_length"] for f, t in tests.items()},
           "model": {k: v for k, v in dataclasses.asdict(base).items() if k != "spm_model"},
           "parameters": int(sum(x.size for x in jax.tree.leaves(state.params))),
           "scores": scores}
    log.info("reat %s: %s", spec, json.dumps(scores, default=float)[:500])
    results.append(row)
    if log_path:
      pathlib.Path(log_path).parent.mkdir(parents=True, exist_ok=True)
      with open(log_path, "a") as f:
        f.write(json.dumps(row, default=float) + "\n")
  return results
