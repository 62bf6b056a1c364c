"""Text-to-text SeqIO tasks and mixtures of a prepared dataset (ReAT and REGEN).

Registrations only; the logic is in `recjax.data.preprocessors`. The catalogue, with
prompt examples and mixing rates, is in docs/tasks.md ("Text tasks").

Per dataset `ds`:
  ds_reat_retrieval, ds_reat_ranking, ds_reat_rating (sources with ratings), ds_reat_mim,
  ds_reat_mlm, ds_reat_bpr
  ds_lumen_<narrative>, ds_narrative_<narrative> for each narrative the source has
    (purchase_reason, explanation, brief_summary, long_summary, profile, endorsement);
    with critiques also ds_lumen_<narrative>_no_critiques (the same examples, critiques
    left out of the prompt)
  mixtures ds_reat, ds_raat, ds_rpat (ratings only), ds_ut, ds_ut_at
"""

from __future__ import annotations

import functools

import seqio

from recjax.data import preprocessors as P
from recjax.data import vocab as _vocab
from recjax.data.prepared import PreparedDataset

# Every ReAT task yields exactly one example per window, so equal rates are the
# examples-proportional rates (and each task finishes an epoch together).
MIXTURES = {
    "reat": ("retrieval", "mim", "mlm"),
    "raat": ("ranking", "mim", "mlm", "bpr"),
    "rpat": ("rating", "mim", "mlm"),
    "ut": ("retrieval", "ranking", "rating"),
    "ut_at": ("retrieval", "ranking", "rating", "mim", "mlm"),
}
MIXING_RATE = 1.0
_MIXTURE_TITLES = {"reat": "ReAT", "raat": "RaAT", "rpat": "RpAT", "ut": "UT", "ut_at": "UT+AT"}
_REAT = {
    "retrieval": P.reat_retrieval,
    "ranking": P.reat_ranking,
    "rating": P.reat_rating,
    "mim": P.reat_mim,
    "mlm": P.reat_mlm,
    "bpr": P.reat_bpr,
}
_METRICS = {"retrieval", "ranking", "rating", "bpr"}  # exact-match targets
SHUFFLE_BUFFER = 10_000
# The narratives one LUMEN / FLARE + LLM model is trained on (per purchase: endorsement;
# about the user's last purchase: the other three).
LUMEN_NARRATIVES = ("endorsement", "purchase_reason", "explanation", "brief_summary")

_ABOUT = {
    "retrieval": "ReAT retrieval: last 20 items as text -> the next item's short id",
    "ranking": "ReAT ranking: history + 100 candidate ids (1 positive, 99 popularity negatives) -> the positive",
    "rating": "ReAT rating: history + an item -> 'yes' if rated > 3 else 'no'",
    "mim": "ReAT MIM: window with 20% of items '[masked item]' -> their short ids in order",
    "mlm": "ReAT MLM: T5 span corruption of the window's rendered items",
    "bpr": "ReAT BPR: history + two items (next, popularity negative) -> the next item's short id",
    "lumen": "REGEN LUMEN: history with <item> placeholders and critiques -> 'ID: <item> Text: {}'",
    "narrative": "REGEN narrative given the true next item (FLARE + LLM) -> {}",
    "mixture": "mixture ({}) of {}, equal rates",
    "lumen_mixture": "mixture of {}, examples-proportional",
}
# Task / mixture name -> one-line description, for `recjax tasks list / show`.
DESCRIPTIONS: dict[str, str] = {}
# Task name -> {frozen input name: loader}: the soft-prompt fusion inputs of the LUMEN /
# narrative tasks (recjax/artifacts/fusion.py), built on first use.
FROZEN: dict[str, dict] = {}


def frozen_array(task_name: str, name: str):
  """A frozen input of a text task (or of the first task of a mixture that has it); None if none."""
  provider = seqio.get_mixture_or_task(task_name)
  for task in (provider.tasks if isinstance(provider, seqio.Mixture) else [provider]):
    if name in FROZEN.get(task.name, {}):
      return FROZEN[task.name][name]()
  return None


def _fusion_inputs(data_dir: str) -> dict:
  def load(fn_name, *args):
    from recjax.artifacts import fusion  # pylint: disable=g-import-not-at-top
    return getattr(fusion, fn_name)(data_dir, *args)
  return {name: functools.partial(load, name)
          for name in ("wals_item_vectors", "interaction_content", "interaction_offsets")}


def describe(name: str) -> str | None:
  return DESCRIPTIONS.get(name)


def _add_task(name: str, **kwargs) -> None:
  if name in seqio.TaskRegistry.names():
    seqio.TaskRegistry.remove(name)  # re-registering re-points the name
  seqio.TaskRegistry.add(name, shuffle_buffer_size=SHUFFLE_BUFFER, **kwargs)


def _add_mixture(name: str, tasks: list[str]) -> None:
  if name in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove(name)
  seqio.MixtureRegistry.add(name, [(t, MIXING_RATE) for t in tasks])


@functools.lru_cache(maxsize=None)
def _train_examples(name: str, data_hash: str) -> int:
  del data_hash  # part of the key: a re-prepared dataset is counted again
  task = seqio.get_mixture_or_task(name)
  ds = task.get_dataset(sequence_length=None, split="train", shuffle=False, use_cached=False,
                        trim_output_features=False)
  return int(ds.reduce(0, lambda count, _: count + 1))


def train_examples_rate(task: seqio.Task, data_hash: str = "") -> float:
  """Examples-proportional mixing: the task's training examples, counted once per dataset
  content (the sources' counts are users, not the windows the preprocessors keep)."""
  return float(_train_examples(task.name, data_hash))


def _pipeline(data_dir: str, step, **kwargs) -> list:
  return [P.window, seqio.CacheDatasetPlaceholder(), functools.partial(step, data_dir=data_dir, **kwargs),
          seqio.preprocessors.append_eos_after_trim]


def register(dataset_name: str, data_dir, *, spm_model: str | None = None,
             vocab_size: int | None = None) -> list[str]:
  """Registers the text tasks and mixtures of one prepared dataset; returns their names.

  Cheap: nothing is read beyond the manifest, and the vocabulary (the dataset's own
  SentencePiece model unless `spm_model` or gin's `text_vocabulary_options` names one)
  is trained or loaded on first use.
  """
  dataset = PreparedDataset(data_dir)
  data_dir = str(dataset.data_dir)
  vocabulary = P.text_vocabulary(data_dir, spm_model, vocab_size)
  text = {"inputs": seqio.Feature(vocabulary, add_eos=True), "targets": seqio.Feature(vocabulary, add_eos=True)}
  items = _vocab.ItemVocabulary(dataset.num_items)
  item_ids = seqio.Feature(items, add_eos=False, required=False)
  names = []

  reat = {}
  for family, step in _REAT.items():
    columns = ("items", "ratings") if family == "rating" else ("items",)
    if not all(dataset.has_field(c) for c in columns):
      continue
    name = reat[family] = f"{dataset_name}_reat_{family}"
    _add_task(name, source=P.text_source(data_dir, columns), preprocessors=_pipeline(data_dir, step),
              output_features=text, metric_fns=[P.exact_match] if family in _METRICS else [])
    DESCRIPTIONS[name] = _ABOUT[family]
    names.append(name)

  critiques = ("critiques",) if dataset.has_field("critiques") else ()
  for narrative, (column, _, _) in P.NARRATIVES.items():
    if not dataset.has_field(column):
      continue
    per_user = narrative in P.PER_USER_NARRATIVES
    source = P.text_source(data_dir, ("items", *critiques, column), per_user=per_user)
    for kind, step, features in (
        ("lumen", P.regen_lumen, {**text, "inputs_item_ids": item_ids, "targets_item_ids": item_ids}),
        ("narrative", P.regen_narrative, {**text, "inputs_item_ids": item_ids})):
      name = f"{dataset_name}_{kind}_{narrative}"
      _add_task(name, source=source, preprocessors=_pipeline(data_dir, step, narrative=narrative),
                output_features=features, metric_fns=[])
      FROZEN[name] = _fusion_inputs(data_dir)
      split = "users split 80/10/10" if per_user else "leave-one-out"
      DESCRIPTIONS[name] = _ABOUT[kind].format(narrative.replace("_", " ")) + f" ({split})"
      names.append(name)
      if critiques and kind == "lumen":  # REGEN Tables 4/5 compare with and without critiques
        name += "_no_critiques"
        _add_task(name, source=source, output_features=features, metric_fns=[],
                  preprocessors=_pipeline(data_dir, step, narrative=narrative, critiques=False))
        FROZEN[name] = _fusion_inputs(data_dir)
        DESCRIPTIONS[name] = DESCRIPTIONS[name[:-len("_no_critiques")]].replace(" and critiques", "")
        names.append(name)

  for kind in ("lumen", "lumen_no_critiques", "narrative"):
    tasks = [f"{dataset_name}_{kind.replace('_no_critiques', '')}_{n}" + ("_no_critiques" if "no_" in kind else "")
             for n in LUMEN_NARRATIVES]
    tasks = [t for t in tasks if t in names]
    if tasks:
      name = f"{dataset_name}_{kind}"
      if name in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(name)
      rate = functools.partial(train_examples_rate, data_hash=dataset.content_hash)
      seqio.MixtureRegistry.add(name, [(t, rate) for t in tasks])
      DESCRIPTIONS[name] = _ABOUT["lumen_mixture"].format(", ".join(tasks))
      names.append(name)

  for mixture, families in MIXTURES.items():
    if mixture == "rpat" and "rating" not in reat:
      continue  # RpAT exists only with ratings; UT then has retrieval + ranking
    tasks = [reat[f] for f in families if f in reat]
    _add_mixture(f"{dataset_name}_{mixture}", tasks)
    DESCRIPTIONS[f"{dataset_name}_{mixture}"] = _ABOUT["mixture"].format(
        _MIXTURE_TITLES[mixture], ", ".join(f for f in families if f in reat))
    names.append(f"{dataset_name}_{mixture}")
  return names


def unregister(names) -> None:
  """Removes tasks / mixtures registered by `register` (mixtures first)."""
  for name in names:
    if name in seqio.MixtureRegistry.names():
      seqio.MixtureRegistry.remove(name)
  for name in names:
    if name in seqio.TaskRegistry.names():
      seqio.TaskRegistry.remove(name)
    DESCRIPTIONS.pop(name, None)
    FROZEN.pop(name, None)
