"""Test helper (run as a script): `python -m valle_jax.train`'s behaviour, with the loss made NaN at given steps.

    python tests/train_with_nan.py --nan-steps 3,6,7,8 --config CONFIG [section.key=value ...]

The fault is injected through the trainer's public `loss_fn` hook, from here: production code holds no test hook.
Steps are counted as logged (the first update is step 1). Exit status as the real CLI: 3 when the run diverges.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax.numpy as jnp  # noqa: E402

from valle_jax.config import load_config  # noqa: E402
from valle_jax.train import EXIT_DIVERGED, TrainingDiverged, train  # noqa: E402
from valle_jax.train_state import default_loss  # noqa: E402


def nan_at(steps: list[int]):
    def loss_fn(cfg, logits, batch, step):
        total, metrics = default_loss(cfg, logits, batch, step)
        return jnp.where(jnp.isin(step + 1, jnp.asarray(steps)), jnp.nan, total), metrics

    return loss_fn


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nan-steps", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    try:
        train(cfg, loss_fn=nan_at([int(s) for s in args.nan_steps.split(",")]))
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    return 0


if __name__ == "__main__":
    sys.exit(main())
