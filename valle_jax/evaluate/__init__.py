"""Objective evaluation of synthesized speech: WER/CER from an ASR model, SIM-O from speaker embeddings, and a
report to look at and listen to.  `python -m valle_jax.evaluate --help` for the command line.

    from valle_jax.evaluate import EvalSettings, evaluate_items, load_job
    summary = evaluate_items(load_job("out/job1"), "out/job1-eval", EvalSettings())
    summary["wer_mean"], summary["sim_mean"]

The models (faster-whisper ASR; GE2E or WavLM+ECAPA speaker encoder) run in a spawned torch worker
(`Evaluator`), never in the calling (JAX) process; this package imports neither torch nor jax.
"""

from .client import EvalSettings, Evaluator, EvaluatorCrashError, EvaluatorError, EvaluatorTimeoutError
from .core import evaluate_items, summarize
from .items import EvalItem, ItemsError, load_items, load_job
from .models import MissingModelError, ModelChecksumError, resolve_asr, resolve_sim
from .text import NORMALISATION, cer, edit_distance, error_counts, normalize_text, wer

__all__ = [
    "EvalItem",
    "EvalSettings",
    "Evaluator",
    "EvaluatorCrashError",
    "EvaluatorError",
    "EvaluatorTimeoutError",
    "ItemsError",
    "MissingModelError",
    "ModelChecksumError",
    "NORMALISATION",
    "cer",
    "edit_distance",
    "error_counts",
    "evaluate_items",
    "load_items",
    "load_job",
    "normalize_text",
    "resolve_asr",
    "resolve_sim",
    "summarize",
    "wer",
]
