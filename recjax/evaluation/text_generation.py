"""Evaluation of LM recommenders that write (LUMEN, FLARE + LLM's LM): item metrics from
the item softmax and narrative metrics of the generated texts.

Per task of the evaluated mixture (REGEN's protocol, docs/lumen.md):
  items      rows whose target names an item (after "ID:"): the item logits rank the whole
             catalogue, nothing excluded; Recall@k / NDCG@k / MRR of the held-out item
  narrative  the text decoded greedily (after the model's own top item on LUMEN rows)
             against the reference narrative: BLEU, ROUGE-1/2/L and, with a sentence
             encoder, the mean cosine similarity

The generation itself is the model's `predict_batch` (jitted once per trainer), or an
export's (no model code): both give the same texts and items.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np

from recjax.evaluation import evaluate as eval_lib
from recjax.evaluation import narratives
from recjax.evaluation import ranking
from recjax.evaluation import scorer as scorer_lib

# The eval converter's features the model reads (`PrefixLMEvalConverter`).
FEATURES = ("prompt_tokens", "prompt_item_ids", "prompt_mask", "item_target", "prompt_soft_items",
            "prompt_soft_users", "prompt_soft_positions")


def checkpoint_generator(model, trainer, params, *, num_items: int, max_new_tokens: int) -> Callable:
  """generate(features, recommend) -> {"items", "item_scores", "target_rank", "text"} of
  in-memory parameters; one compilation per (trainer, recommend)."""
  def build(recommend):
    @jax.jit
    def run(params, frozen, batch):
      if frozen:
        batch = dict(batch, frozen=frozen)
      return model.predict_batch(trainer.network(params), batch, num_items=num_items,
                                 max_new_tokens=max_new_tokens, recommend=recommend)
    return run

  def generate(batch, recommend: bool):
    run = scorer_lib.jitted_for(trainer, (id(model), "generate", num_items, max_new_tokens, recommend),
                                lambda: build(recommend))
    return run(params, trainer.frozen, batch)

  return generate


def decode_text(vocabulary, ids, *, after_item: bool) -> str:
  """Generated ids up to EOS as text; after an item, the "Text:" marker that follows it
  in LUMEN targets is dropped."""
  ids = [int(t) for t in ids]
  ids = ids[:ids.index(1)] if 1 in ids else ids
  text = vocabulary.decode([t for t in ids if t > 1]).strip()
  if after_item and text.startswith("Text:"):
    text = text[len("Text:"):].strip()
  return text


def reference_text(target: str) -> str:
  """The narrative of a task's target string ("ID: <item> Text: narrative" or the narrative)."""
  return target.split(" Text: ", 1)[-1] if target.startswith("ID:") else target


def generated_rows(generate: Callable, batches, vocabulary, *, put: Callable = np.asarray):
  """Decodes every valid row of a task's split (eval_batches: all, or the first max_rows), yielding
  {"user_id", "prompt", "target", "target_rank", "items", "generated", "reference"}
  ("target" / "target_rank" / "items" on rows whose target names an item). One process."""
  if jax.process_count() > 1:
    raise NotImplementedError("text generation is evaluated in one process")
  recommend = None
  for batch in batches:
    valid = np.asarray(batch["valid"])
    if not valid.any():
      break
    has_item = np.asarray(batch["item_target"])[valid] > 0
    if recommend is None:
      recommend = bool(has_item[0])
    if has_item.any() != recommend or has_item.all() != recommend:
      raise ValueError("a task mixes rows whose targets name an item with rows whose targets do not")
    got = jax.device_get(generate({k: put(batch[k]) for k in FEATURES if k in batch}, recommend))
    for r in np.flatnonzero(valid):
      record = {"user_id": int(batch["user_id"][r]) if "user_id" in batch else None,
                "prompt": vocabulary.decode([int(t) for t in batch["prompt_tokens"][r] if t > 1])}
      if recommend:
        record.update(target=int(batch["item_target"][r]), target_rank=int(got["target_rank"][r]),
                      items=[int(i) for i in got["items"][r]])
      record["generated"] = decode_text(vocabulary, got["text"][r], after_item=recommend)
      if "targets_pretokenized" in batch:
        ref = batch["targets_pretokenized"][r]
        record["reference"] = reference_text(ref.decode() if isinstance(ref, bytes) else str(ref))
      yield record


def conversation(record: dict, titles: dict[int, str]) -> str:
  """One generated row as a conversation: the prompt (history, critiques), the recommended
  items (the held-out one starred), the generated narrative, the held-out item, the reference."""
  lines = [f"prompt: {record['prompt']}"]
  if "items" in record:
    lines.append("recommended (top 5):")
    lines += [f"  {'*' if i == record['target'] else ' '} {i:>6}  {titles.get(i, '?')}" for i in record["items"][:5]]
  lines.append(f"generated: {record['generated']}")
  if "target" in record:
    lines.append(f"held-out item: {record['target']}  {titles.get(record['target'], '?')}")
  if "reference" in record:
    lines.append(f"reference: {record['reference']}")
  return "\n".join(lines)


def evaluate(*, generate: Callable, converter, vocabulary, mixture_or_task_name: str, task_feature_lengths,
             splits, batch_size: int, ks, put: Callable, max_rows: int | None = None,
             encoder=None) -> tuple[dict, str]:
  """{"split/task/items": item metrics, "split/task/narrative": text metrics} over each
  task of the mixture (the first `max_rows` rows of each, or all)."""
  results = {}
  for split in splits:
    pooled = []  # every recommended row of the mixture's tasks: one "split/items" line
    for task in eval_lib.eval_task_names(mixture_or_task_name):
      batches = eval_lib.eval_batches(task, split, converter, task_feature_lengths, batch_size, max_rows)
      rows = list(generated_rows(generate, batches, vocabulary, put=put))
      if not rows:
        continue
      prefix = f"{split}/{task}"
      if "target_rank" in rows[0]:
        acc = ranking.RankingMetrics(ks)
        acc.update(np.asarray([r["target_rank"] for r in rows]))
        results[f"{prefix}/items"] = acc.result()
        pooled += [r["target_rank"] for r in rows]
      if "reference" in rows[0]:
        results[f"{prefix}/narrative"] = narratives.narrative_metrics(
            [r["generated"] for r in rows], [r["reference"] for r in rows], encoder=encoder)
    if pooled and len(eval_lib.eval_task_names(mixture_or_task_name)) > 1:
      acc = ranking.RankingMetrics(ks)
      acc.update(np.asarray(pooled))
      results[f"{split}/items"] = acc.result()
  protocol = ("LM recommender: item softmax after 'ID:' ranks the whole catalogue, nothing excluded; "
              "narratives decoded greedily (after the model's top item) vs the reference: BLEU, ROUGE"
              + (", sentence similarity" if encoder is not None else ""))
  return results, protocol
