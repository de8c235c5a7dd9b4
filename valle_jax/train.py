"""`python -m valle_jax.train --config configs/X.yaml [section.key=value ...]`: train a VALL-E model.

The run directory (`train.run_dir`) holds:
    config.yaml          the resolved run config (model block as trained: the checkpoint's with `init_from`)
    checkpoints/<step>/  orbax: train state + data iterator state of every process + metadata (keep-last-N)
    metrics.jsonl        one JSON object per log interval ("split": "train"), per eval ("split": "eval") and, with
                         train.eval_metrics, per evaluation of the eval samples ("split": "eval_samples");
                         strict JSON (non-finite values are null)
    checkpoint_health.json  which checkpoints' params gave a finite next step (healthy) or not
    tensorboard/         TensorBoard scalars (tensorboardX)
    curves.png           loss and accuracy curves (matplotlib)
    model/, model.sft    at the end: a valle_jax model directory and its export in the reference format
                         (`model.pth` when fine-tuned from a .pth); dtype `train.export_dtype`
    reference.json       metadata of the `init_from` reference checkpoint (kept for the export)
    base.json            a LoRA run (`train.lora`): the base it trains on, path and sha256 (a resume checks it)
    lora.sft             a LoRA run, at the end: the LoRA in the reference's format (only lora_ tensors); with
                         `train.lora.embeddings` also model/ + model.sft: the base with the trained *_emb tables

A LoRA run (`train.lora`, valle_jax.trainable) trains only the LoRA (and the *_emb tables with `embeddings: true`)
on the frozen base `train.init_from`; its checkpoints hold the LoRA, its optimizer state and the base pointer.
`model.frozen_params` (full training) freezes the named parameters (reference state-dict names).

A run resumes by itself from the newest usable checkpoint in its run directory (the model block then
comes from that checkpoint; data, train and mesh settings from the current config, so `train.steps=...`
extends a run). A checkpoint that does not fit the current config is refused (exit 2) with what differs:
`train.restore=params` keeps its params with a fresh optimizer state, `train.restart=true` starts over (moving the
checkpoints aside). Only unreadable checkpoints are set aside; unhealthy ones are passed over. Otherwise it starts from scratch, or from `train.init_from` (a valle_jax model directory or a
reference .sft/.pth): the model block then comes from that checkpoint, and of the run config's model block
only training-time fields that differ from their defaults are applied (`INIT_FROM_FIELDS`). Attention heads cannot
be read from weights: a reference file takes the run config's `model.heads` when set, else dim / 64 (releases).

SIGTERM or SIGINT (preemption): the current step finishes, a checkpoint is written, the process exits 0
(a second SIGINT interrupts at once). A NaN/inf loss or gradient skips the update; at the step where
`train.max_bad_steps` such steps are in a row the run stops with exit status 3, saving nothing from the bad steps
(a rerun resumes from the newest healthy checkpoint). The loop never waits for the device: metrics are read, and
processes agree on a stop, at log, save and eval steps only.

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
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from valle_jax.config import Config, ConfigError, ModelConfig, load_config, save_config
from valle_jax.fileio import atomic_write, atomic_write_text

DataFn = Callable[[Config, str, int, int], Any]
EXIT_DIVERGED = 3
INIT_FROM_FIELDS = ("dropout", "loss_factors", "training", "frozen_params", "attention_impl",
                    "experimental.p_rvq_levels", "experimental.rvq_level_range")  # fmt: skip


class TrainingDiverged(RuntimeError):
    pass


def write_eval_samples(state: dict, step: int, **context: Any) -> dict | None:
    """Called at every eval on every process (after the teacher-forced eval): the primary process synthesizes
    `train.eval_samples` held-out utterances under `run_dir/samples/<step>/` (valle_jax.eval_samples) and, with
    `train.eval_metrics`, evaluates them; returns the log fields (wer, cer, sim) then, else None.
    `context`: cfg, model_cfg, run_dir, trainer, primary, evaluator (a started valle_jax.evaluate.Evaluator or None),
    say."""
    cfg = context["cfg"]
    if cfg.train.eval_samples <= 0 or cfg.data.path == "synthetic":
        return None
    from valle_jax import parallel
    from valle_jax.eval_samples import metrics_record, write_samples

    params = parallel.to_host(context["trainer"].model_params(state))  # a collective: every process takes part
    if not context.get("primary", True):
        return None
    say = context.get("say", print)
    out = write_samples(cfg, context["model_cfg"], params, Path(context["run_dir"]), step, say=say,
                        evaluator=context.get("evaluator"))  # fmt: skip
    if out.files:
        say(f"eval samples @ {step}: {len(out.files)} written to {out.files[0].parent}")
    if out.metrics is not None:
        rec = metrics_record(out.metrics)
        say(f"eval samples @ {step}: WER {rec['wer']}, CER {rec['cer']}, SIM {rec['sim']} "
            f"(report {Path(context['run_dir']) / 'samples' / str(step) / 'eval' / 'index.html'})")  # fmt: skip
        return rec
    return None


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


def json_safe(value: Any) -> Any:
    """A log record as strict JSON: NaN and infinities become null (metrics.jsonl stays valid JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


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
                if not isinstance(rec, dict):
                    continue
                if rec.get("step", 0) <= start_step:
                    self.records.append(rec)
            atomic_write_text(self.path, "".join(json.dumps(json_safe(r), allow_nan=False) + "\n" for r in self.records))
        try:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        except ImportError:
            warnings.warn("tensorboardX is not installed: no TensorBoard scalars (pip install tensorboardX)", stacklevel=2)

    def write(self, record: dict) -> None:
        if not self.primary:
            return
        record = json_safe(record)
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.tb is not None:
            split = record.get("split", "train")
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time") and math.isfinite(v):
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
            rs = [r for r in records if r.get("split") == split and r.get(key) is not None]
            if rs:
                ax.plot([r["step"] for r in rs], [r[key] for r in rs], style, label=f"{split}", lw=1.8, ms=3)
        levels = sorted({k.split("_L")[1] for r in records if r.get("split") == "eval" for k in r if k.startswith(f"{key}_L")}, key=int)
        for lvl in levels:
            rs = [r for r in records if r.get("split") == "eval" and r.get(f"{key}_L{lvl}") is not None]
            ax.plot([r["step"] for r in rs], [r[f"{key}_L{lvl}"] for r in rs], "--", lw=0.8, label=f"eval L{lvl}")
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, dpi=100, format="png"))
    plt.close(fig)


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
    from valle_jax.checkpoint import cast_tree, load_model_dir
    from valle_jax.convert import load_reference

    path = Path(cfg.train.init_from)
    if path.is_dir():
        mcfg, params, reference = load_model_dir(path)
    elif path.is_file():
        mcfg, params, reference = load_reference(path, heads=cfg.model.heads)
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
    return mcfg, cast_tree(params, np.float32), reference


def export_model(cfg: Config, params_host: dict, reference: dict, run_dir: Path) -> Path:
    """Process 0: `run_dir/model` (valle_jax model directory) and its reference-format export."""
    from valle_jax.checkpoint import save_model_dir
    from valle_jax.convert import export_reference

    model_dir = save_model_dir(run_dir / "model", cfg.model, params_host, reference, force=True)
    suffix = ".pth" if reference.get("container") == "pth" else ".sft"
    return export_reference(model_dir, run_dir / f"model{suffix}", dtype=cfg.train.export_dtype, force=True)


def export_lora(cfg: Config, trained_host: dict, base_host: dict | None, reference: dict, run_dir: Path) -> Path:
    """Process 0, a LoRA run: `run_dir/lora.sft` in the reference's format (only the lora_ tensors, dtype
    train.export_dtype). With train.lora.embeddings the trained `*_emb` tables cannot go into that file (the
    reference's LoRA file holds only lora_ tensors): they go into `run_dir/model` (+ model.sft / model.pth), the
    base with the trained tables and without the LoRA, the base to use `lora.sft` with."""
    from valle_jax.lora_files import write_lora
    from valle_jax.trainable import EMBEDDINGS, LORA, overlay

    path = write_lora(run_dir / "lora.sft", cfg.train.lora, trained_host[LORA], dtype=cfg.train.export_dtype)
    if base_host is not None:
        export_model(cfg, overlay(base_host, trained_host[EMBEDDINGS]), reference, run_dir)
    return path


# ---------------------------------------------------------------------------------------------------------
# the run


def _fmt_rate(x: float) -> str:
    return f"{x / 1e3:.1f}k" if x >= 1e3 else f"{x:.0f}"


def resolve_run(cfg: Config, run_dir: Path, resuming: bool, primary: bool) -> tuple[Config, dict, dict | None]:
    """The run's config, reference metadata and initial params: a resumed run keeps the model it trained (shapes
    may come from an init_from checkpoint); a new one starts from `train.init_from` or from scratch (params None).
    A LoRA run always loads its base (`train.init_from`; a resume checks it is the base in base.json).
    Writes config.yaml (and reference.json, base.json) on the primary process."""
    reference: dict = {}
    ref_file = run_dir / "reference.json"
    init_params = None
    if cfg.train.lora is not None:
        return _resolve_lora_run(cfg, run_dir, resuming, primary)
    if resuming:
        saved_cfg = run_dir / "config.yaml"
        if saved_cfg.is_file():
            cfg = dataclasses.replace(cfg, model=load_config(saved_cfg).model)
        if ref_file.is_file():
            reference = json.loads(ref_file.read_text())
    elif cfg.train.init_from:
        mcfg, init_params, reference = model_from_init(cfg)
        cfg = dataclasses.replace(cfg, model=mcfg)
        if primary:
            atomic_write_text(ref_file, json.dumps(reference, indent=1))
    if primary:
        save_config(cfg, run_dir / "config.yaml")
    return cfg, reference, init_params


def _resolve_lora_run(cfg: Config, run_dir: Path, resuming: bool, primary: bool) -> tuple[Config, dict, dict]:
    from valle_jax.trainable import base_pointer, check_base

    if not cfg.train.init_from:
        raise ConfigError("train.lora: a LoRA trains on a base model: set train.init_from (a model directory or a "
                          "reference .sft/.pth, e.g. an imported release)")  # fmt: skip
    if not Path(cfg.train.init_from).exists():
        raise ConfigError(f"train.init_from = {cfg.train.init_from!r}: no such model directory or checkpoint file")
    pointer = base_pointer(cfg.train.init_from)
    base_file = run_dir / "base.json"
    if resuming:
        if not base_file.is_file():
            raise ConfigError(f"{run_dir}: holds checkpoints but no base.json: not a LoRA run dir (train.restart=true "
                              "starts a LoRA run over, or use another train.run_dir)")  # fmt: skip
        check_base(json.loads(base_file.read_text()), pointer, run_dir)
    mcfg, base, reference = model_from_init(cfg)
    if resuming and (run_dir / "config.yaml").is_file():
        mcfg = load_config(run_dir / "config.yaml").model
    cfg = dataclasses.replace(cfg, model=mcfg)
    if primary:
        if not resuming:
            atomic_write_text(base_file, json.dumps(pointer, indent=1))
        atomic_write_text(run_dir / "reference.json", json.dumps(reference, indent=1))
        save_config(cfg, run_dir / "config.yaml")
    return cfg, reference, base


class MetricsWindow:
    """Step metrics -> a log record every `train.log_every` steps (loss, accuracy per level, lr, tokens/s), and the
    NaN/inf accounting: `add` returns the divergence message at the step where `train.max_bad_steps` bad steps
    are in a row (the device froze the state there: later steps' metrics carry `stopped` and are dropped).

    Metrics stay on the device until `flush` (at log, save and eval steps): the loop never waits for a step."""

    def __init__(self, cfg: Config, trainer: Any, log: RunLog, bar: Any, say: Callable, lr_origin: int = 0):
        self.cfg, self.trainer, self.log, self.bar, self.say = cfg, trainer, log, bar, say
        self.lr_origin = lr_origin  # the step where the optimizer state began (train.restore=params)
        self.window: list[dict] = []
        self.pending: list[dict] = []  # device metrics not read yet
        self.started = False  # the first step of a process includes compilation: not timed
        self.tokens, self.steps = 0.0, 0
        self.start = time.time()
        self.last: dict | None = None  # the newest metrics read (host)
        self.on_step: Callable[[dict], None] | None = None  # e.g. checkpoint health, per step read

    def pause(self, seconds: float) -> None:
        """Leave `seconds` (an eval) out of the throughput."""
        self.start += seconds

    def push(self, m_dev: dict) -> None:
        """Queue a step's device metrics; their copy to the host starts now, nobody waits for it."""
        import jax

        for leaf in jax.tree.leaves(m_dev):
            if hasattr(leaf, "copy_to_host_async"):
                leaf.copy_to_host_async()
        self.pending.append(m_dev)

    def flush(self) -> str | None:
        """Read every queued step (in order); returns the divergence message if one of them diverged."""
        diverged = None
        pending, self.pending = self.pending, []
        for m in pending:
            diverged = self.add(m) or diverged
            if diverged:
                break
        return diverged

    def add(self, m_dev: dict) -> str | None:
        import jax

        from valle_jax.train_state import summarize

        t = self.cfg.train
        m = jax.tree.map(np.asarray, jax.device_get(m_dev))
        if bool(m.get("stopped", False)):
            return None  # the state was frozen before this step: nothing happened
        self.last = m
        if self.on_step is not None:
            self.on_step(m)
        s = int(m["step"])
        diverged = None
        if not bool(m["finite"]):
            (self.bar.write if self.bar else self.say)(
                f"step {s}: loss {float(m['loss']):.4g}, grad norm {float(m['grad_norm']):.4g}: not finite, update "
                f"skipped ({int(m['bad_steps'])} in a row, {int(m['skipped'])} in total)")  # fmt: skip
            if int(m["bad_steps"]) >= t.max_bad_steps:
                diverged = (f"training diverged: {int(m['bad_steps'])} steps in a row (train.max_bad_steps = "
                            f"{t.max_bad_steps}) had a NaN/inf loss or gradient, the last at step {s}, where the run "
                            f"stopped.")  # fmt: skip
        self.window.append(m)
        now = time.time()
        if not self.started:
            self.started, self.start = True, now
        else:
            self.tokens += float(m["tokens"])
            self.steps += 1
        if s % t.log_every == 0 or s == t.steps or diverged:
            dt = max(now - self.start, 1e-9)
            rec = {"split": "train", "step": s, **summarize(self.window, self.cfg.model.resp_levels),
                   "lr": self.trainer.learning_rate(s - self.lr_origin - int(m["skipped"])),
                   "grad_norm": float(np.mean([float(w["grad_norm"]) for w in self.window])), "skipped": int(m["skipped"]),
                   "tokens_per_s": self.tokens / dt, "steps_per_s": self.steps / dt, "time": now}  # fmt: skip
            self.log.write(rec)
            self.log.plot()
            if self.bar is not None and rec["loss"] == rec["loss"]:
                self.bar.set_postfix_str(f"loss {rec['loss']:.3f} acc {rec['acc']:.3f} {_fmt_rate(rec['tokens_per_s'])} tok/s")
            self.window.clear()
            self.start, self.tokens, self.steps = time.time(), 0.0, 0
        return diverged


class Evaluator:
    """Teacher-forced eval on the held-out split (loss and accuracy per level) and audio samples, every
    `train.eval_every` steps; disabled (with one message) when the data has no eval split."""

    def __init__(self, cfg: Config, trainer: Any, data_fn: DataFn, log: RunLog, bar: Any, say: Callable,
                 run_dir: Path, primary: bool):  # fmt: skip
        self.cfg, self.trainer, self.data_fn, self.log, self.bar, self.say = cfg, trainer, data_fn, log, bar, say
        self.run_dir, self.primary = run_dir, primary
        self.enabled = cfg.train.eval_every > 0
        self._metrics: Any = None
        self._metrics_failed = False

    def due(self, step: int) -> bool:
        return self.enabled and step % self.cfg.train.eval_every == 0

    def metrics_evaluator(self) -> Any:
        """`train.eval_metrics`: one started valle_jax.evaluate.Evaluator for the whole run (the ASR and speaker
        models load once), on the primary process; None when off or when the models cannot be had (said once)."""
        if not (self.cfg.train.eval_metrics and self.primary) or self._metrics_failed:
            return None
        if self._metrics is None:
            from valle_jax.evaluate import EvalSettings, Evaluator as MetricsEvaluator

            try:
                self._metrics = MetricsEvaluator(EvalSettings(progress=False)).start()
            except Exception as e:  # noqa: BLE001 - a missing model must not stop training: say so, go on
                self._metrics_failed = True
                self.say(f"train.eval_metrics: no WER/SIM ({type(e).__name__}: {e})")
                return None
        return self._metrics

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None

    def __call__(self, state: dict, step: int) -> float:
        """Evaluate; returns the seconds it took."""
        import jax

        from valle_jax import parallel
        from valle_jax.train_state import summarize

        t0 = time.time()
        pi, pc = jax.process_index(), jax.process_count()
        try:
            it = self.data_fn(self.cfg, "eval", pi, pc)
        except Exception as e:  # no held-out split: warn once, go on training
            self.say(f"eval disabled: no eval data ({type(e).__name__}: {e})")
            self.enabled = False
            return time.time() - t0
        stats = []
        for _ in range(max(self.cfg.train.eval_batches, 1)):
            b = next(it, None)
            if b is None:
                break
            rows = np.shape(b["text"] if isinstance(b, dict) else b.text)[0] * pc
            if rows % parallel.batch_divisor(self.trainer.mesh, self.trainer.rules):  # a ragged last batch: skipped
                continue
            stats.append(jax.tree.map(np.asarray, jax.device_get(self.trainer.eval_step(state, b))))
        levels = self.cfg.model.resp_levels
        if stats:
            rec = {"split": "eval", "step": step, **summarize(stats, levels), "batches": len(stats), "time": time.time()}
            self.log.write(rec)
            per_level = " ".join(f"L{k}:{rec[f'loss_L{k}']:.3f}" for k in range(levels) if f"loss_L{k}" in rec)
            (self.bar.write if self.bar else self.say)(f"eval @ {step}: loss {rec['loss']:.4f} acc {rec['acc']:.4f} [{per_level}]")
        sample_metrics = write_eval_samples(state, step, cfg=self.cfg, model_cfg=self.trainer.mcfg, run_dir=self.run_dir,
                                            trainer=self.trainer, primary=self.primary, evaluator=self.metrics_evaluator(),
                                            say=self.bar.write if self.bar else self.say)  # fmt: skip
        if sample_metrics is not None:
            self.log.write({"split": "eval_samples", "step": step, **sample_metrics, "time": time.time()})
        self.log.plot(force=True)
        return time.time() - t0


def config_changes(saved: dict, current: dict, limit: int = 6) -> list[str]:
    """`section.key: old -> new` for every setting that differs between two `Config.to_dict()`s."""
    out: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        elif a != b:
            out.append(f"{prefix}: {a!r} -> {b!r}")

    walk(saved, current, "")
    shaping = ("model.", "train.optimizer", "train.grad_clip", "train.grad_accum", "mesh.")  # what shapes the state
    out.sort(key=lambda line: not line.startswith(shaping))
    return out[:limit] + ([f"(+{len(out) - limit} more)"] if len(out) > limit else [])


def restore_run(ckpts: Any, trainer: Any, cfg: Config, train_it: Any) -> tuple[int, dict, int]:
    """(step, state, lr origin) from the run dir's newest usable checkpoint, as `train.restore` says. A checkpoint
    that does not fit the config is refused with what differs and the ways on (ConfigError, exit 2)."""
    from valle_jax.checkpoint import CheckpointMismatch, NoUsableCheckpoint

    ways = ("Ways on: train.restore=params (keep its params, start a fresh optimizer state), train.restart=true (start "
            "over; the checkpoints are moved aside, not deleted), or another train.run_dir.")  # fmt: skip
    params_only = cfg.train.restore == "params"
    try:
        step, state, meta = ckpts.restore(trainer.abstract_state, train_it, params_only=params_only)
    except CheckpointMismatch as e:
        changed = []
        try:
            newest = ckpts.latest_step()
            changed = config_changes(ckpts.read_meta(newest).get("config", {}), cfg.to_dict())
        except Exception:  # noqa: BLE001 - the explanation is a courtesy; the refusal stands without it
            pass
        said = f" Settings changed since it was written: {'; '.join(changed)}." if changed else ""
        raise CheckpointMismatch(f"{e}.{said} {ways}") from None
    except NoUsableCheckpoint as e:
        raise NoUsableCheckpoint(f"{e}. To start this run dir over: train.restart=true (the checkpoints are moved "
                                 "aside, not deleted), or use another train.run_dir.") from None  # fmt: skip
    origin = int(meta.get("lr_origin", 0))
    if params_only:
        state = trainer.fresh_optimizer(state["params"], step)
        origin = step
    return step, state, origin


def train(cfg: Config, data_fn: DataFn | None = None, *, loss_fn: Callable | None = None, progress: bool = True) -> dict:
    """Run (or resume) training as configured. Returns {"status": done|stopped, "step", "run_dir", "export" (path
    or None), "reason", "state"}. Raises TrainingDiverged at the step where train.max_bad_steps NaN/inf steps are
    in a row (nothing is saved from then on: a rerun resumes from the newest healthy checkpoint). `loss_fn`
    replaces the optimised loss (train_state.Trainer). A user error (bad config, dataset, run dir, a checkpoint
    that does not fit) raises ConfigError / DatasetError / OSError and leaves no run dir that was not there."""
    run_dir = Path(cfg.train.run_dir).absolute()
    existed = run_dir.exists()
    started = [False]
    try:
        return _train(cfg, run_dir, data_fn, loss_fn, progress, started)
    except BaseException:
        if not existed and not started[0]:
            import jax
            import shutil

            if jax.process_index() == 0:
                shutil.rmtree(run_dir, ignore_errors=True)  # what this call created, before its first step
        raise


def _train(cfg: Config, run_dir: Path, data_fn: DataFn | None, loss_fn: Callable | None, progress: bool,
           started: list) -> dict:  # fmt: skip
    import absl.flags

    if not absl.flags.FLAGS.is_parsed():
        absl.flags.FLAGS.mark_as_parsed()  # grain reads absl flags (its worker processes too)
    from valle_jax import parallel

    parallel.initialize_distributed(cfg.train)
    import jax

    from valle_jax.checkpoint import TrainCheckpoints
    from valle_jax.config import describe_attention
    from valle_jax.train_state import Trainer

    # ----- the model and the data first (user errors end here, before the run dir is touched)
    pi, pc = jax.process_index(), jax.process_count()
    primary = pi == 0
    say = (lambda *a: print(*a, flush=True)) if primary else (lambda *a: None)  # noqa: E731
    data_fn = data_fn or default_data_fn(cfg)
    t = cfg.train
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{pi}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise OSError(f"train.run_dir = {str(run_dir)!r}: cannot write there ({e.strerror or e})") from None
    ckpts = TrainCheckpoints(run_dir, keep=t.keep_checkpoints)
    if t.restart and ckpts.has_history():
        moved = ckpts.archive()
        say(f"train.restart: the run dir's checkpoints were moved to {moved}; starting over")
    resuming = ckpts.has_history()
    cfg, reference, init_params = resolve_run(cfg, run_dir, resuming, primary)
    trainer = Trainer(cfg, loss_fn=loss_fn)
    say(f"valle_jax.train: mesh {parallel.describe(trainer.mesh)}; run dir {run_dir}")
    say(f"model: {describe_attention(trainer.mcfg)}")
    # every batch must split over the mesh's batch shards (and micro-batches): the pipeline rounds to this multiple;
    # data.batch_tokens unset: the platform's budget per batch shard (data.batching.DEFAULT_BATCH_TOKENS)
    from valle_jax.data.batching import default_batch_tokens

    multiple = math.lcm(cfg.data.batch_multiple, trainer.batch_divisor)
    budget = cfg.data.batch_tokens or default_batch_tokens(trainer.platform, parallel.batch_divisor(trainer.mesh, trainer.rules))
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_multiple=multiple, batch_tokens=budget))
    train_it = data_fn(cfg, "train", pi, pc)
    lr_origin = 0
    if resuming:
        if trainer.lora is not None:
            trainer.set_base(init_params)
        step, state, lr_origin = restore_run(ckpts, trainer, cfg, train_it)
        say(f"resumed from checkpoint {step} ({ckpts.directory / str(step)})"
            + (" with a fresh optimizer state (train.restore=params)" if t.restore == "params" else ""))  # fmt: skip
    else:
        step, state = 0, trainer.init_state(init_params)
        say(f"started {'from ' + str(cfg.train.init_from) if cfg.train.init_from else 'from scratch'}")
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainer.frozen_shapes if trainer.lora else trainer.abstract_state["params"]))
    say(f"model: {cfg.model.arch_type}, {n_params / 1e6:.2f}M params, compute {trainer.mcfg.dtype}; "
        f"optimizer {cfg.train.optimizer}, {cfg.train.steps} steps")  # fmt: skip
    mem = trainer.memory()
    if trainer.lora is not None or mem["frozen_params"]:
        what = (f"LoRA rank {trainer.lora.rank}, alpha {trainer.lora.alpha}" + (" + embeddings" if trainer.lora.embeddings else "")
                if trainer.lora is not None else "model.frozen_params")  # fmt: skip
        say(f"trains {mem['trained_params'] / 1e6:.3f}M params ({what}; {mem['frozen_params'] / 1e6:.2f}M frozen); "
            f"optimizer state {mem['opt_state_bytes'] / 2**20:.2f} MiB")  # fmt: skip

    # ----- logging, evaluation, signals
    bar = None
    if primary and progress:
        from tqdm import tqdm

        bar = tqdm(total=t.steps, initial=step, desc="train", dynamic_ncols=True, file=sys.stderr,
                   mininterval=1.0 if sys.stderr.isatty() else 30.0, smoothing=0.1)  # fmt: skip
    log = RunLog(run_dir, primary, step)
    window = MetricsWindow(cfg, trainer, log, bar, say, lr_origin)
    evaluator = Evaluator(cfg, trainer, data_fn, log, bar, say, run_dir, primary)
    stop = StopFlag()
    stop.install()
    base_file = run_dir / "base.json"
    base = json.loads(base_file.read_text()) if trainer.lora is not None and base_file.is_file() else None
    meta = lambda s: {"config": cfg.to_dict(), "step": int(s), "time": time.time(), "process_count": pc,  # noqa: E731
                      "lr_origin": lr_origin, **({"base": base} if base else {})}  # fmt: skip
    status, reason, diverged, export = "done", None, None, None
    last_saved = step
    awaiting: set[int] = {step} if resuming else set()  # checkpoints whose health the next step tells

    def on_step(m: dict) -> None:  # the metrics of step s tell whether checkpoint s - 1's params were healthy
        s = int(m["step"]) - 1
        if s in awaiting:
            awaiting.discard(s)
            ckpts.mark(s, bool(m["finite"]))

    window.on_step = on_step

    def bad_now() -> int:
        return int(window.last["bad_steps"]) if window.last is not None else 0

    # ----- the loop: no host-device sync per step. Metrics are read (and processes agree on a stop) at log,
    # save and eval steps only; a NaN streak freezes the state on the device at exactly train.max_bad_steps.
    started[0] = True
    try:
        while step < t.steps and diverged is None:
            sync = step % t.log_every == 0 or (t.save_every > 0 and step % t.save_every == 0)
            if (pc == 1 or sync) and _agree(stop.reason is not None):
                status, reason = "stopped", stop.reason or "another process was signalled"
                break
            batch = next(train_it, None)
            if batch is None:  # every process follows the same batch plan, so all run out at the same step
                reason = f"the training data ran out at step {step}"
                say(f"\n{reason}")
                break
            state, m = trainer.train_step(state, batch)
            step += 1
            window.push(m)
            if bar is not None:
                bar.update(1)
            save_due = t.save_every > 0 and step % t.save_every == 0
            if save_due or step % t.log_every == 0 or evaluator.due(step) or step == t.steps:
                diverged = window.flush()
                if diverged:
                    break
            if save_due:
                if bad_now():  # params of a NaN/inf streak never go into a checkpoint
                    say(f"\ncheckpoint {step} not written: the last {bad_now()} step(s) were not finite")
                else:
                    ckpts.save(step, state, train_it, meta(step))
                    awaiting.add(step)
                    last_saved = step
            if evaluator.due(step):
                window.pause(evaluator(state, step))
        if diverged is None:
            diverged = window.flush()
        if diverged is None and step != last_saved and ckpts.latest_step() != step:
            ckpts.save(step, state, train_it, meta(step))
            if bad_now():
                ckpts.mark(step, False)
        ckpts.wait()
        if status == "stopped":
            say(f"\n{reason}: checkpoint {step} saved in {ckpts.directory}; rerun the same command to resume")
        elif diverged is None:
            if evaluator.enabled and step % max(t.eval_every, 1) != 0:
                evaluator(state, step)
            params_host = parallel.to_host(state["params"])
            if trainer.lora is not None:
                base_host = parallel.to_host(trainer.frozen) if trainer.lora.embeddings else None
                if primary:
                    export = export_lora(cfg, params_host, base_host, reference, run_dir)
                    extra = f"; base with the trained embeddings {run_dir / 'model'}" if base_host is not None else ""
                    say(f"\ndone: {step} steps; LoRA {export} (reference format){extra}")
            elif primary:
                export = export_model(cfg, params_host, reference, run_dir)
                say(f"\ndone: {step} steps; model {run_dir / 'model'}, reference export {export}")
    finally:
        stop.restore()
        if bar is not None:
            bar.close()
        ckpts.close()
        log.close()
        evaluator.close()
    if diverged is not None:
        healthy = ckpts.healthy_steps()
        usable = [s for s in ckpts.steps() if ckpts.health.get(s) is not False]
        if usable:
            where = (f"Nothing was saved from the bad steps; a rerun resumes from checkpoint {usable[-1]}"
                     + (" (healthy: its next step was finite)" if usable[-1] in healthy else "") + ".")  # fmt: skip
        else:
            where = "No checkpoint of this run is healthy: rerun with train.restart=true."
        raise TrainingDiverged(f"{diverged} {where} Lower train.learning_rate or check the data before rerunning.")
    return {"status": status, "step": step, "run_dir": str(run_dir), "export": str(export) if export else None,
            "reason": reason, "state": state}  # fmt: skip


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
    from valle_jax.data.records import DatasetError

    try:
        result = train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_DIVERGED
    except (ConfigError, DatasetError, OSError) as e:  # user errors: one line, nothing half-made left behind
        print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
        return 2
    return 0 if result["status"] in ("done", "stopped") else 1


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


if __name__ == "__main__":
    sys.exit(main())
