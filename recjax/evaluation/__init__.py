"""Evaluators: full-catalog ranking (more to come: critique, steering, text).

Pure JAX: nothing here imports TensorFlow.
"""

from recjax.evaluation.ranking import (
    DEFAULT_CHUNK_SIZE,
    NUM_RESERVED,
    RankingMetrics,
    chunk_layout,
    format_metrics_table,
    history_exclusion,
    metrics_from_ranks,
    ranking_protocol,
    target_ranks,
    top_k,
)

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "NUM_RESERVED",
    "RankingMetrics",
    "chunk_layout",
    "format_metrics_table",
    "history_exclusion",
    "metrics_from_ranks",
    "ranking_protocol",
    "target_ranks",
    "top_k",
]
