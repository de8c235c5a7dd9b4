"""Datasets: preparation (audio -> phonemes + codes -> ArrayRecord shards), reference-format import, a demo
corpus, and the grain input pipeline with duration buckets.  Never imports valle_jax.models.

    python -m valle_jax.prepare audio LibriTTS/train-clean-100 data/libritts      # or a .csv / .jsonl manifest
    python -m valle_jax.prepare reference training/data.h5 data/imported          # or training/ with .enc files
    python -m valle_jax.prepare demo data/demo --sentences 300 --speakers 4

    from valle_jax.data import make_iterator
    it = make_iterator(cfg, "train", jax.process_index(), jax.process_count())

Submodules: records (dataset layout and writer), sources (trees and manifests), prepare (audio preparation),
reference (.enc/.dac and data.h5 import), demo, batching (buckets, plan, prompts; numpy only), pipeline (grain).
Names are loaded on first use, so importing this package costs nothing.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "make_iterator": "pipeline",
    "DataPipeline": "pipeline",
    "describe": "pipeline",
    "Bucket": "batching",
    "DatasetError": "records",
    "DatasetWriter": "records",
    "Utterance": "records",
    "decode_record": "records",
    "encode_record": "records",
    "load_metadata": "records",
    "prepare_audio": "prepare",
    "PrepareError": "prepare",
    "AudioLimits": "prepare",
    "import_reference": "reference",
    "make_demo": "demo",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
