"""`python -m valle_jax.train --config configs/X.yaml [section.key=value ...]`: train a VALL-E model.

The run directory (`train.run_dir`) holds:
    config.yaml          the resolved run config (model block as trained: the checkpoint's with `init_from`)
    checkpoints/<step>/  orbax: train state + data iterator state of every process + metadata (keep-last-N)
    metrics.jsonl        one JSON object per log interval ("split": "train") and per eval ("split": "eval")
    tensorboard/         TensorBoard scalars (tensorboardX)
    curves.png           loss and accuracy curves (matplotlib)
    model/, model.sft    at the end: a valle_jax model directory and its export in the reference format
                         (`model.pth` when fine-tuned from a .pth); dtype `train.export_dtype`
    reference.json       metadata of the `init_from` reference checkpoint (kept for the export)

A run resumes by itself from the newest complete checkpoint in its run directory (the model block then
comes from that checkpoint; data, train and mesh settings from the current config, so `train.steps=...`
extends a run). Otherwise it starts from scratch, or from `train.init_from` (a valle_jax model directory or a
reference .sft/.pth): the model block then comes from that checkpoint, and of the run config's model block
only training-time fields that differ from their defaults are applied (`INIT_FROM_FIELDS`).

SIGTERM or SIGINT (preemption): the current step finishes, a checkpoint is written, the process exits 0
(a second SIGINT interrupts at once). A NaN/inf loss or gradient skips the update; after
`train.max_bad_steps` such steps in a row the run saves and stops with exit status 3.

Data: `data.path: synthetic` uses `valle_jax.data.synthetic`; anything else `valle_jax.data.pipeline`.
Both offer `make_iterator(cfg, split, process_index, process_count)` -> a grain DatasetIterator of host-local
batches (dicts with the `models.valle.Batch` field names); split "train" must be endless, "eval" finite.
Multi-process: `train.coordinator_address` / `num_processes` / `process_id`, or automatic on TPU pods and
SLURM (`parallel.initialize_distributed`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from valle_jax.config import Config, ConfigError, ModelConfig, load_config, save_config

DataFn = Callable[[Config, str, int, int], Any]
EXIT_DIVERGED = 3
INIT_FROM_FIELDS = ("dropout", "loss_factors", "training", "frozen_params", "attention_impl",
                    "experimental.p_rvq_levels", "experimental.rvq_level_range")  # fmt: skip
NAN_STEPS_ENV = "VALLE_JAX_TEST_NAN_STEPS"  # tests: comma-separated step numbers whose loss is made NaN


class TrainingDiverged(RuntimeError):
    pass


def write_eval_samples(state: dict, step: int, **context: Any) -> None:
    """Called at every eval on every process (after the teacher-forced eval): the primary process synthesizes
    `train.eval_samples` held-out utterances under `run_dir/samples/<step>/` (valle_jax.eval_samples).
    `context`: cfg, model_cfg, run_dir, trainer, primary."""
    cfg = context["cfg"]
    if cfg.train.eval_samples <= 0 or cfg.data.path == "synthetic":
        return
    from valle_jax import parallel
    from valle_jax.eval_samples import write_samples

    params = parallel.to_host(state["params"])  # a collective in multi-process runs: every process takes part
    if context.get("primary", True):
        files = write_samples(cfg, context["model_cfg"], params, Path(context["run_dir"]), step)
        if files:
            print(f"eval samples @ {step}: {len(files)} written to {files[0].parent}", flush=True)


# ---------------------------------------------------------------------------------------------------------
# data


def default_data_fn(cfg: Config) -> DataFn:
    if cfg.data.path == "synthetic":
        from valle_jax.data.synthetic import make_iterator
    else:
        from valle_jax.data.pipeline import make_iterator  # type: ignore[import-not-found]
    return make_iterator


# ---------------------------------------------------------------------------------------------------------
# logging: metrics.jsonl, TensorBoard, curves.png, console


class RunLog:
    """Process 0 writes; other processes keep nothing."""

    def __init__(self, run_dir: Path, primary: bool, start_step: int):
        self.primary = primary
        self.path = run_dir / "metrics.jsonl"
        self.png = run_dir / "curves.png"
        self.records: list[dict] = []
        self.tb = None
        self._last_plot = 0.0
        if not primary:
            return
        if self.path.exists():  # drop what a killed run logged after the checkpoint we resume from
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step", 0) <= start_step:
                    self.records.append(rec)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.records))
            tmp.replace(self.path)
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard scalars (pip install tensorboardX)", stacklevel=2)

    def write(self, record: dict) -> None:
        if not self.primary:
            return
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step", "time") and math.isfinite(v):
                    self.tb.add_scalar(f"{split}/{k}", v, record["step"])
            self.tb.flush()

    def plot(self, force: bool = False) -> None:
        if not self.primary or not self.records or (not force and time.time() - self._last_plot < 60):
            return
        self._last_plot = time.time()
        try:
            write_curves(self.records, self.png)
        except ImportError:
            warnings.warn("matplotlib is not installed: no curves.png (pip install matplotlib)", stacklevel=2)

    def close(self) -> None:
        self.plot(force=True)
        if self.tb is not None:
            self.tb.close()


def write_curves(records: list[dict], path: Path) -> None:
    """Loss and top-10 accuracy against step: train (per log interval) and eval, overall and per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, title in ((axes[0], "loss", "loss (nll)"), (axes[1], "acc", "top-10 accuracy")):
        for split, style in (("train", "-"), ("eval", "o-")):
            rs = [r for r in records if r.get("split") == split and key in r]
            if rs:
                ax.plot([r["step"] for r in rs], [r[key] for r in rs], style, label=f"{split}", lw=1.8, ms=3)
        levels = sorted({k.split("_L")[1] for r in records if r.get("split") == "eval" for k in r if k.startswith(f"{key}_L")}, key=int)
        for lvl in levels:
            rs = [r for r in records if r.get("split") == "eval" and f"{key}_L{lvl}" in r]
            ax.plot([r["step"] for r in rs], [r[f"{key}_L{lvl}"] for r in rs], "--", lw=0.8, label=f"eval L{lvl}")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------------------
# signals


class StopFlag:
    """SIGTERM/SIGINT -> finish the step, save, exit. A second SIGINT raises KeyboardInterrupt."""

    def __init__(self):
        self.reason: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.reason is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


def _agree(flag: bool) -> bool:
    """True on every process if it is True on any (multi-process runs stop and save at the same step)."""
    import jax

    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


# ---------------------------------------------------------------------------------------------------------
# model config and weights for a run


def _differs_from_default(cfg: ModelConfig, dotted: str) -> tuple[bool, Any]:
    default = ModelConfig()
    a, b = cfg, default
    for part in dotted.split("."):
        a, b = getattr(a, part), getattr(b, part)
    return a != b, a


def model_from_init(cfg: Config) -> tuple[ModelConfig, dict, dict]:
    """(model config, float32 params, reference metadata) of `train.init_from`."""
    from valle_jax.checkpoint import load_model_dir
    from valle_jax.convert import load_reference

    path = Path(cfg.train.init_from)
    if path.is_dir():
        mcfg, params, reference = load_model_dir(path)
    elif path.is_file():
        mcfg, params, reference = load_reference(path)
    else:
        raise ConfigError(f"train.init_from = {str(path)!r}: no such model directory or checkpoint file")
    overrides = {}
    for name in INIT_FROM_FIELDS:
        changed, value = _differs_from_default(cfg.model, name)
        if changed:
            overrides[name] = value
    if overrides:
        mcfg = mcfg.override(overrides)
    mcfg = dataclasses.replace(mcfg, dtype=cfg.model.dtype)
    params = _cast(params, np.float32)
    return mcfg.validate(), params, reference


def _cast(tree: dict, dtype) -> dict:
    return {k: _cast(v, dtype) if isinstance(v, dict) else np.asarray(v).astype(dtype) for k, v in tree.items()}


def export_model(cfg: Config, params_host: dict, reference: dict, run_dir: Path) -> Path:
    """Process 0: `run_dir/model` (valle_jax model directory) and its reference-format export."""
    from valle_jax.checkpoint import save_model_dir
    from valle_jax.convert import export_reference

    model_dir = save_model_dir(run_dir / "model", cfg.model, params_host, reference, force=True)
    suffix = ".pth" if reference.get("container") == "pth" else ".sft"
    return export_reference(model_dir, run_dir / f"model{suffix}", dtype=cfg.train.export_dtype)


# ---------------------------------------------------------------------------------------------------------
# the run


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def train(cfg: Config, data_fn: DataFn | None = None, nan_steps: tuple[int, ...] = (), progress: bool = True) -> dict:
    """Run (or resume) training as configured. Returns {"status": done|stopped|diverged, "step", "run_dir",
    "export" (path or None), "reason"}. Raises TrainingDiverged after train.max_bad_steps NaN/inf steps in a row
    (after saving a checkpoint)."""
    import absl.flags

    if not absl.flags.FLAGS.is_parsed():
        absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags (its worker processes too)

    from valle_jax import parallel

    parallel.initialize_distributed(cfg.train)
    import jax

    from valle_jax.checkpoint import TrainCheckpoints
    from valle_jax.train_state import Trainer, summarize

    pi, pc = jax.process_index(), jax.process_count()
    primary = pi == 0
    run_dir = Path(cfg.train.run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    data_fn = data_fn or default_data_fn(cfg)
    say = (lambda *a: print(*a, flush=True)) if primary else (lambda *a: None)  # noqa: E731

    ckpts = TrainCheckpoints(run_dir, keep=cfg.train.keep_checkpoints)
    latest = ckpts.latest_step()
    reference: dict = {}
    ref_file = run_dir / "reference.json"
    init_params = None
    if latest is not None:
        saved_cfg = run_dir / "config.yaml"
        if saved_cfg.is_file():  # the model as trained so far (shapes may come from an init_from checkpoint)
            cfg = dataclasses.replace(cfg, model=load_config(saved_cfg).model)
        if ref_file.is_file():
            reference = json.loads(ref_file.read_text())
    elif cfg.train.init_from:
        mcfg, init_params, reference = model_from_init(cfg)
        cfg = dataclasses.replace(cfg, model=mcfg)
        if primary:
            ref_file.write_text(json.dumps(reference, indent=1))
    if primary:
        save_config(cfg, run_dir / "config.yaml")

    trainer = Trainer(cfg, nan_steps=nan_steps)
    say(f"valle_jax.train: mesh {parallel.describe(trainer.mesh)}; run dir {run_dir}")
    # every batch must split over the mesh's batch shards (and micro-batches): the pipeline rounds its batch
    # sizes to this multiple
    multiple = math.lcm(max(1, int(cfg.data.batch_multiple)), trainer.batch_divisor)
    if multiple != cfg.data.batch_multiple:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_multiple=multiple))
    train_it = data_fn(cfg, "train", pi, pc)
    if latest is not None:
        step, state, _ = ckpts.restore(trainer.abstract_state, train_it)
        say(f"resumed from checkpoint {step} ({ckpts.directory / str(step)})")
    else:
        state = trainer.init_state(init_params)
        step = 0
        say(f"started {'from ' + str(cfg.train.init_from) if cfg.train.init_from else 'from scratch'}")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.abstract_state["params"]))
    say(f"model: {cfg.model.arch_type}, {n_params / 1e6:.2f}M params, compute {trainer.mcfg.dtype}; "
        f"optimizer {cfg.train.optimizer}, {cfg.train.steps} steps")  # fmt: skip

    log = RunLog(run_dir, primary, step)
    stop = StopFlag()
    stop.install()
    t = cfg.train
    meta = lambda s: {"config": cfg.to_dict(), "step": int(s), "time": time.time(), "process_count": pc}  # noqa: E731
    bar = None
    if primary and progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.1)  # fmt: skip

    window: list[dict] = []
    timed = {"started": False, "tokens": 0.0, "steps": 0}
    pending: list[dict] = []
    last_saved = step
    window_start = time.time()
    status, reason, diverged_msg = "done", None, None
    eval_enabled = t.eval_every > 0

    def handle(m_dev: dict) -> None:
        nonlocal window_start, diverged_msg
        m = jax.tree.map(np.asarray, jax.device_get(m_dev))
        s = int(m["step"])
        if not bool(m["finite"]):
            msg = (f"step {s}: loss {float(m['loss']):.4g}, grad norm {float(m['grad_norm']):.4g}: not finite, update "
                   f"skipped ({int(m['bad_steps'])} in a row, {int(m['skipped'])} in total)")  # fmt: skip
            (bar.write if bar else say)(msg)
            if int(m["bad_steps"]) >= t.max_bad_steps:
                diverged_msg = (f"training diverged: {int(m['bad_steps'])} steps in a row (train.max_bad_steps = "
                                f"{t.max_bad_steps}) had a NaN/inf loss or gradient, last at step {s}; params are those "
                                f"of the last good step. Lower train.learning_rate or check the data.")  # fmt: skip
        window.append(m)
        now = time.time()
        if not timed["started"]:  # the first step of this process includes compilation: not timed
            timed["started"], window_start = True, now
        else:
            timed["tokens"] += float(m["tokens"])
            timed["steps"] += 1
        if s % t.log_every == 0 or s == t.steps:
            summ = summarize(window, cfg.model.resp_levels)
            dt = max(now - window_start, 1e-9)
            good = s - int(m["skipped"])
            rec = {"split": "train", "step": s, **summ, "lr": trainer.learning_rate(good),
                   "grad_norm": float(np.mean([float(w["grad_norm"]) for w in window])), "skipped": int(m["skipped"]),
                   "tokens_per_s": timed["tokens"] / dt, "steps_per_s": timed["steps"] / dt, "time": now}  # fmt: skip
            log.write(rec)
            log.plot()
            if bar is not None:
                bar.set_postfix_str(f"loss {rec['loss']:.3f} acc {rec['acc']:.3f} {_fmt_rate(rec['tokens_per_s'])} tok/s")
            window.clear()
            window_start = time.time()
            timed["tokens"], timed["steps"] = 0.0, 0

    def run_eval(s: int) -> None:
        nonlocal eval_enabled, window_start
        t0 = time.time()
        try:
            it = data_fn(cfg, "eval", pi, pc)
        except Exception as e:  # no held-out split: warn once, go on training
            say(f"eval disabled: no eval data ({type(e).__name__}: {e})")
            eval_enabled = False
            return
        stats = []
        for _ in range(max(t.eval_batches, 1)):
            try:
                b = next(it)
            except StopIteration:
                break
            rows = np.shape(b["text"] if isinstance(b, dict) else b.text)[0] * pc
            if rows % parallel.batch_divisor(trainer.mesh, trainer.rules):  # a ragged last batch: not evaluated
                continue
            stats.append(jax.tree.map(np.asarray, jax.device_get(trainer.eval_step(state, b))))
        if stats:
            rec = {"split": "eval", "step": s, **summarize(stats, cfg.model.resp_levels), "batches": len(stats), "time": time.time()}
            log.write(rec)
            levels = " ".join(f"L{k}:{rec[f'loss_L{k}']:.3f}" for k in range(cfg.model.resp_levels) if f"loss_L{k}" in rec)
            (bar.write if bar else say)(f"eval @ {s}: loss {rec['loss']:.4f} acc {rec['acc']:.4f} [{levels}]")
        write_eval_samples(state, s, cfg=cfg, model_cfg=trainer.mcfg, run_dir=run_dir, trainer=trainer, primary=primary)
        log.plot(force=True)
        window_start += time.time() - t0

    try:
        while step < t.steps:
            # a signal is checked before the next batch is drawn, so the saved iterator matches the saved step
            if _agree(stop.reason is not None):
                status, reason = "stopped", stop.reason or "another process was signalled"
                break
            try:
                batch = next(train_it)
            except StopIteration:
                batch = None
            if _agree(batch is None):  # a train iterator should be endless; a finite one ends the run here
                reason = f"the training data ran out at step {step}"
                say(f"\n{reason}")
                break
            state, m = trainer.train_step(state, batch)
            step += 1
            pending.append(m)
            if len(pending) > 1:
                handle(pending.pop(0))
            if bar is not None:
                bar.update(1)
            if diverged_msg is not None:
                status = "diverged"
                break
            if t.save_every > 0 and step % t.save_every == 0:
                ckpts.save(step, state, train_it, meta(step))
                last_saved = step
            if eval_enabled and step % t.eval_every == 0:
                run_eval(step)
        while pending:
            handle(pending.pop(0))
        if diverged_msg is not None:
            status = "diverged"
        if step != last_saved or ckpts.latest_step() != step:
            ckpts.save(step, state, train_it, meta(step))
        ckpts.wait()
        if status == "stopped":
            say(f"\n{reason}: checkpoint {step} saved in {ckpts.directory}; rerun the same command to resume")
        export = None
        if status == "done":
            if eval_enabled and step % max(t.eval_every, 1) != 0:
                run_eval(step)
            params_host = parallel.to_host(state["params"])
            if primary:
                export = export_model(cfg, params_host, reference, run_dir)
                say(f"\ndone: {step} steps; model {run_dir / 'model'}, reference export {export}")
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        ckpts.close()
        log.close()
    result = {"status": status, "step": step, "run_dir": str(run_dir), "export": str(export) if export else None,
              "reason": reason, "state": state}  # fmt: skip
    if status == "diverged":
        raise TrainingDiverged(diverged_msg + f" Checkpoint {step} saved.")
    return result


# ---------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m valle_jax.train", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--config", required=True, help="run YAML (model/data/train/mesh blocks), e.g. configs/train-tiny.yaml")
    ap.add_argument("overrides", nargs="*", help="section.key=value (a bare key means model.key), e.g. train.steps=2000")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    nan_steps = tuple(int(x) for x in os.environ.get(NAN_STEPS_ENV, "").split(",") if x.strip())
    try:
        result = train(cfg, nan_steps=nan_steps)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if result["status"] in ("done", "stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
