"""Evaluation of RAST against its baselines: answer grading, metrics, datasets and prompt templates; the run
(:mod:`.run`), which feeds every (problem, sample, configuration) through one :class:`~rast_kernels.RastEngine`
per model set, its resumable samples store (:mod:`.store`) and its report (:mod:`.report`: summary, table, plot).
Command line: :func:`rast_kernels.eval.cli.main`.

Optional dependencies (the ``eval`` extra) are imported only where used: math-verify (grading kind
``"math"``), pyarrow (Parquet files), matplotlib (the alpha plot), lm-eval (the ``"rast"`` harness model).
"""
from .grading import KINDS, grade, grade_detail
from .metrics import majority_score, mean_se, pass_at_k, summarize

__all__ = ["KINDS", "grade", "grade_detail", "majority_score", "mean_se", "pass_at_k", "summarize"]
