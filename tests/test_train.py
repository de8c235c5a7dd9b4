"""`python -m valle_jax.train` as a user runs it (subprocesses, one CPU device each, tiny config, synthetic data):
SIGKILL at a random step + resume == an uninterrupted run, bit for bit; SIGTERM saves and exits 0; NaN steps are
skipped, counted, and K in a row stop the run; keep-last-N; a half-written or unreadable newest checkpoint is
passed over. The subprocesses share a persistent compilation cache, so only the first one compiles."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import cli_env
from valle_jax.checkpoint import load_model_dir
from valle_jax.config import TrainConfig, load_config
from valle_jax.train_state import make_schedule, schedule_value

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train-tiny.yaml"
TIMEOUT = 240


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)


def start(run_dir: Path, env: dict, *overrides: str, nan_steps: str | None = None) -> subprocess.Popen:
    """The real training CLI; with `nan_steps`, tests/train_with_nan.py (the same run, the loss made NaN there)."""
    entry = ["-m", "valle_jax.train"] if nan_steps is None else [str(ROOT / "tests" / "train_with_nan.py"), "--nan-steps", nan_steps]
    cmd = [sys.executable, *entry, "--config", str(CONFIG), f"train.run_dir={run_dir}", "train.log_every=1", *overrides]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = TIMEOUT) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"train run timed out after {timeout}s:\n{out[-4000:]}")
    return out


def run(run_dir: Path, env: dict, *overrides: str, nan_steps: str | None = None) -> tuple[int, str]:
    proc = start(run_dir, env, *overrides, nan_steps=nan_steps)
    out = finish(proc)
    return proc.returncode, out


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return max(steps, default=0)


def wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = TIMEOUT) -> None:
    t0 = time.time()
    while logged_step(run_dir) < step:
        if proc.poll() is not None:
            pytest.fail(f"run ended before step {step}:\n{proc.stdout.read()[-4000:]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"run did not reach step {step} in {timeout}s")
        time.sleep(0.05)


def checkpoint_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def assert_same_params(a: dict, b: dict) -> None:
    la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
    assert [k for k, _ in la] == [k for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{jax.tree_util.keystr(k)} differs (max {np.max(np.abs(x - y))})"


STEPS = 40
# a constant schedule: the compiled step does not depend on train.steps, so every run here shares one program
COMMON = ("train.schedule=constant", f"train.steps={STEPS}", "train.save_every=7", "train.keep_checkpoints=3", "train.eval_every=20", "train.eval_batches=1")


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path, env):
    # uninterrupted reference run
    ref_dir = tmp_path / "ref"
    rc, out = run(ref_dir, env, *COMMON)
    assert rc == 0, out[-4000:]
    assert "done: 40 steps" in out
    # keep-last-N: saves at 7, 14, ..., 35 and the final 40; three kept
    assert checkpoint_steps(ref_dir) == [28, 35, 40]
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "model/config.yaml", "model.sft"):
        assert (ref_dir / name).exists(), name
    assert list((ref_dir / "tensorboard").iterdir())
    records = [json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train_recs] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if r["split"] == "eval"] == [20, 40]
    assert all(r["skipped"] == 0 and np.isfinite(r["loss"]) for r in train_recs)
    assert any(k.startswith("loss_L") for k in train_recs[-1]) and "tokens_per_s" in train_recs[-1]

    # the same run, SIGKILLed at a random step after its first checkpoint, then resumed
    run_dir = tmp_path / "killed"
    kill_after = random.Random().randint(8, 30)
    proc = start(run_dir, env, *COMMON)
    wait_for_step(proc, run_dir, kill_after)
    t0 = time.time()
    while not checkpoint_steps(run_dir) and proc.poll() is None and time.time() - t0 < 60:  # a complete one exists
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    finish(proc)
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint_steps(run_dir)
    assert saved and saved[-1] < STEPS and not (run_dir / "model").exists(), (kill_after, saved)
    # a half-written newer checkpoint (orbax's temporary directory) and an unreadable newer step are passed over
    latest = saved[-1]
    (run_dir / "checkpoints" / f"{latest + 2}.orbax-checkpoint-tmp-1234567" / "state").mkdir(parents=True)
    bogus = run_dir / "checkpoints" / str(latest + 1)
    bogus.mkdir()
    (bogus / "_CHECKPOINT_METADATA").write_text("{not json")

    rc, out = run(run_dir, env, *COMMON)
    assert rc == 0, out[-4000:]
    assert f"resumed from checkpoint {latest}" in out, (kill_after, saved, out[-3000:])
    assert "could not be restored" in out
    assert checkpoint_steps(run_dir) == [28, 35, 40]
    assert not any("orbax-checkpoint-tmp" in p.name for p in (run_dir / "checkpoints").iterdir())
    _, ref_params, _ = load_model_dir(ref_dir / "model")
    _, params, _ = load_model_dir(run_dir / "model")
    assert_same_params(ref_params, params)
    # the resumed log has each step once (lines a killed run wrote after its checkpoint are dropped)
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == list(range(1, STEPS + 1))


def test_sigterm_saves_and_exits_cleanly(tmp_path, env):
    run_dir = tmp_path / "term"
    proc = start(run_dir, env, "train.schedule=constant", "train.steps=100000", "train.save_every=1000", "train.eval_every=0")
    wait_for_step(proc, run_dir, 5)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc)
    assert proc.returncode == 0, out[-4000:]
    saved = checkpoint_steps(run_dir)
    assert len(saved) == 1 and 5 <= saved[0] < 1000, saved
    assert f"SIGTERM: checkpoint {saved[0]} saved" in out
    assert not (run_dir / "model").exists()


def saved_state(run_dir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return jax.tree.map(np.asarray, ckptr.restore(run_dir / "checkpoints" / str(step) / "state"))


def strict_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl as strict JSON: a bare NaN or Infinity fails here (json.loads would accept them)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def adam_count(state: dict) -> int:
    """Updates applied, as the optimizer counted them (AdamW's `count`)."""
    flat = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
    return int(next(x for path, x in flat if "count" in jax.tree_util.keystr(path)))


def health(run_dir: Path) -> dict[int, bool]:
    return {int(k): v for k, v in json.loads((run_dir / "checkpoint_health.json").read_text()).items()}


def test_nan_steps_are_skipped_counted_and_stop_the_run_at_exactly_max_bad_steps(tmp_path, env):
    """Issue 9 finding 2 with injected NaN: skipped steps change nothing, the run stops at the 3rd bad step in a row
    (not one later), no checkpoint is written during a bad streak, checkpoints are marked healthy or not by the
    step after them, metrics.jsonl stays strict JSON, and a plain rerun resumes from the newest healthy one."""
    run_dir = tmp_path / "nan"
    rc, out = run(run_dir, env, "train.schedule=constant", "train.steps=50", "train.max_bad_steps=3", "train.eval_every=0",
                  "train.save_every=1", "train.keep_checkpoints=0", nan_steps="3,6,7,8")  # fmt: skip
    assert rc == 3, out[-4000:]
    assert "step 3: loss nan" in out and "update skipped (1 in a row, 1 in total)" in out
    assert "update skipped (3 in a row, 4 in total)" in out
    assert "training diverged: 3 steps in a row (train.max_bad_steps = 3)" in out and "the last at step 8" in out
    assert "a rerun resumes from checkpoint 4 (healthy" in out
    recs = {r["step"]: r for r in strict_records(run_dir)}
    assert sorted(recs) == list(range(1, 9))  # stopped at exactly the 3rd bad step in a row
    assert recs[3]["loss"] is None and recs[2]["skipped"] == 0 and recs[3]["skipped"] == 1 and recs[8]["skipped"] == 4
    # saved at good steps only; checkpoint s is healthy when step s + 1 was finite
    assert checkpoint_steps(run_dir) == [1, 2, 4, 5] and not (run_dir / "model").exists()
    assert health(run_dir) == {1: True, 2: False, 4: True, 5: False}
    s = {k: saved_state(run_dir, k) for k in (2, 4, 5)}
    assert [int(s[k]["skipped"]) for k in s] == [0, 1, 1]
    assert [adam_count(s[k]) for k in s] == [2, 3, 4]  # step 3 applied nothing
    assert not np.array_equal(s[2]["params"]["sep"], s[4]["params"]["sep"])

    rc, out = run(run_dir, env, "train.schedule=constant", "train.steps=7", "train.eval_every=0", "train.save_every=100",
                  "train.keep_checkpoints=0")  # fmt: skip
    assert rc == 0, out[-4000:]
    assert "resumed from checkpoint 4 " in out and "done: 7 steps" in out
    assert checkpoint_steps(run_dir) == [1, 2, 4, 7]  # 5 (unhealthy, passed over) moved aside, not reused
    assert any(p.name.startswith("5.unhealthy-") for p in (run_dir / "checkpoints").iterdir())
    assert [r["step"] for r in strict_records(run_dir)] == list(range(1, 8))


def one_line_error(out: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in out, out[-4000:]
    return lines[0]


@pytest.mark.slow
def test_finding1_a_changed_setting_never_destroys_the_run(tmp_path, env):
    """Resuming with another optimizer: refused (exit 2) with what differs and the ways on, nothing set aside or
    overwritten; train.restore=params goes on with a fresh optimizer; train.restart=true starts over, moving the
    old checkpoints aside."""
    run_dir = tmp_path / "run"
    base = ("train.schedule=constant", "train.eval_every=0", "train.save_every=2", "train.keep_checkpoints=3")
    rc, out = run(run_dir, env, *base, "train.steps=4")
    assert rc == 0, out[-4000:]
    before = {name: (run_dir / name).read_bytes() for name in ("metrics.jsonl", "model.sft")}

    rc, out = run(run_dir, env, *base, "train.steps=6", "train.optimizer=prodigy")
    assert rc == 2, out[-4000:]
    line = one_line_error(out)
    for needle in ("checkpoint 4", "does not fit the current config", "train.optimizer: 'adamw' -> 'prodigy'",
                   "train.restore=params", "train.restart=true", "another train.run_dir"):  # fmt: skip
        assert needle in line, (needle, line)
    assert checkpoint_steps(run_dir) == [2, 4] and not any("unreadable" in p.name for p in (run_dir / "checkpoints").iterdir())
    assert {name: (run_dir / name).read_bytes() for name in before} == before

    rc, out = run(run_dir, env, *base, "train.steps=6", "train.optimizer=prodigy", "train.restore=params")
    assert rc == 0, out[-4000:]
    assert "resumed from checkpoint 4 " in out and "with a fresh optimizer state (train.restore=params)" in out
    assert checkpoint_steps(run_dir) == [2, 4, 6]

    rc, out = run(run_dir, env, *base, "train.steps=2", "train.optimizer=prodigy", "train.restart=true")
    assert rc == 0, out[-4000:]
    assert "started from scratch" in out and "train.restart" in out
    old = [p for p in run_dir.iterdir() if p.name.startswith("checkpoints.replaced-")]
    assert len(old) == 1 and sorted(int(p.name) for p in old[0].iterdir() if p.name.isdigit()) == [2, 4, 6]
    assert checkpoint_steps(run_dir) == [2]


@pytest.mark.slow
def test_finding2_a_diverged_run_keeps_its_last_good_checkpoint_and_a_sane_retry_recovers(tmp_path, env):
    """train.learning_rate=1e30 on resume: the first update is finite but wrecks the params; the steps after it are
    NaN. Checkpoint 4 (healthy: its next step was finite) survives rotation, nothing from the bad steps is saved
    as healthy, metrics.jsonl stays strict JSON, and a retry at the normal learning rate recovers."""
    run_dir = tmp_path / "run"
    base = ("train.schedule=constant", "train.eval_every=0", "train.keep_checkpoints=1", "train.max_bad_steps=3")
    rc, out = run(run_dir, env, *base, "train.steps=4", "train.save_every=2")
    assert rc == 0, out[-4000:]
    rc, out = run(run_dir, env, *base, "train.steps=30", "train.save_every=1", "train.learning_rate=1e30")
    assert rc == 3, out[-4000:]
    assert "training diverged" in out and "a rerun resumes from checkpoint 4 (healthy" in out, out[-3000:]
    recs = strict_records(run_dir)
    assert any(r["loss"] is None for r in recs if r["split"] == "train")
    marks = health(run_dir)
    assert marks.get(4) is True and not any(v for s, v in marks.items() if s > 4)
    assert 4 in checkpoint_steps(run_dir)  # kept out of rotation (keep_checkpoints=1) as the newest healthy one
    rc, out = run(run_dir, env, *base, "train.steps=8", "train.save_every=4")
    assert rc == 0, out[-4000:]
    assert "resumed from checkpoint 4 " in out and "done: 8 steps" in out
    last = [r for r in strict_records(run_dir) if r["split"] == "train"][-1]
    assert last["step"] == 8 and last["loss"] is not None and last["loss"] < 8


def test_finding8_missing_or_empty_dataset_and_unwritable_run_dir_are_one_line_exit_2(tmp_path, env):
    empty = tmp_path / "empty"
    empty.mkdir()
    for data in (tmp_path / "nowhere", empty):
        run_dir = tmp_path / f"run-{data.name}"
        rc, out = run(run_dir, env, f"data.path={data}")
        assert rc == 2, out[-3000:]
        assert str(data) in one_line_error(out) and "not a prepared dataset" in out
        assert not run_dir.exists()  # nothing left behind
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    rc, out = run(blocker / "run", env, "train.steps=1")
    assert rc == 2, out[-3000:]
    line = one_line_error(out)
    assert "train.run_dir" in line and str(blocker / "run") in line


def test_learning_rate_schedule_values():
    """Hand-computed points: linear warmup (lr (n+1)/warmup, never 0), cosine to lr x end fraction at `steps`, then
    flat; the optimizer's schedule (traced) and the logged value (host) are the same function."""
    t = TrainConfig(schedule="cosine", learning_rate=1.0, warmup_steps=10, steps=110, end_learning_rate_fraction=0.1)
    want = {0: 0.1, 4: 0.5, 9: 1.0, 10: 1.0, 60: 0.55, 110: 0.1, 200: 0.1}  # 60: halfway, 0.1 + 0.9 * 0.5
    sched = make_schedule(t)
    for step, lr in want.items():
        assert schedule_value(t, step) == pytest.approx(lr, abs=1e-6), step
        assert float(sched(step)) == pytest.approx(lr, abs=1e-6), step
    const = TrainConfig(schedule="constant", learning_rate=0.5, warmup_steps=4)
    assert [schedule_value(const, n) for n in (0, 1, 3, 50)] == pytest.approx([0.125, 0.25, 0.5, 0.5])


@pytest.mark.slow
def test_fine_tune_from_reference_checkpoint_and_export(tmp_path, env):
    """train.init_from a reference .sft: the model comes from the checkpoint, a few steps change the weights,
    and the export has the source's keys (in order), shapes and metadata."""
    from valle_jax.convert import read_safetensors

    src = ROOT / "tests" / "fixtures" / "llama_v5_split_nosums_nonunified.sft"
    run_dir = tmp_path / "ft"
    rc, out = run(run_dir, env, f"train.init_from={src}", "model.heads=2", "train.steps=3", "train.eval_every=0",
                  "train.save_every=100")  # heads: weights cannot say them (fixtures.json does)
    assert rc == 0, out[-4000:]
    assert f"started from {src}" in out
    ref_tensors, ref_meta = read_safetensors(src)
    tensors, meta = read_safetensors(run_dir / "model.sft")
    assert list(tensors) == list(ref_tensors) and meta == ref_meta
    assert all(tensors[k].shape == ref_tensors[k].shape for k in tensors)
    changed = [k for k in tensors if not np.allclose(tensors[k].astype(np.float32), ref_tensors[k].astype(np.float32))]
    assert any("layers" in k for k in changed)
    saved = load_config(run_dir / "config.yaml")
    assert saved.model.experimental.split_classifiers and not saved.model.experimental.audio_embedding_sums


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])
def test_optimizers_with_warmup_schedule_minimise_a_toy_loss(optimizer):
    """The configured optimizer chain (clipping, warmup, AdamW or Prodigy) takes finite steps from the first one
    (Prodigy cannot take a zero learning rate, so warmup starts above 0)."""
    import jax.numpy as jnp
    import optax

    from valle_jax.train_state import make_optimizer

    t = TrainConfig(optimizer=optimizer, learning_rate=1.0 if optimizer == "prodigy" else 0.2, warmup_steps=5,
                    steps=60, weight_decay=0.0)  # fmt: skip
    tx = make_optimizer(t)
    params = {"w": jnp.zeros((4, 3)), "b": jnp.full((3,), 2.0)}
    loss = lambda p: jnp.sum((p["w"] - 1.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)  # noqa: E731
    @jax.jit
    def step(params, opt):
        updates, opt = tx.update(jax.grad(loss)(params), opt, params)
        return optax.apply_updates(params, updates), opt

    opt, first = tx.init(params), float(loss(params))
    for _ in range(60):
        params, opt = step(params, opt)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert float(loss(params)) < 0.1 * first
