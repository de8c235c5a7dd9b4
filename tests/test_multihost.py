"""Two processes on localhost (`jax.distributed`, 2 fake CPU devices each, one 4-device data-parallel mesh) train
the tiny config, checkpoint, are SIGKILLed at a random step, resume, and end with exactly the parameters of an
uninterrupted two-process run. Every subprocess has a timeout; process groups are killed on any failure."""

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

from conftest import cli_env, free_port
from valle_jax.checkpoint import load_model_dir

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "train-tiny.yaml"
TIMEOUT = 300
STEPS = 12
COMMON = ("train.schedule=constant", f"train.steps={STEPS}", "train.save_every=4", "train.keep_checkpoints=2",
          "train.eval_every=6", "train.eval_batches=1", "train.log_every=1")  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory, devices=2)


class Pair:
    """Both processes of one run; `kill()` SIGKILLs their process groups."""

    def __init__(self, run_dir: Path, env: dict, *overrides: str):
        port = free_port()
        self.logs = [run_dir.parent / f"{run_dir.name}.p{i}.{port}.log" for i in range(2)]
        self.procs = []
        for i in range(2):
            cmd = [sys.executable, "-m", "valle_jax.train", "--config", str(CONFIG), f"train.run_dir={run_dir}",
                   f"train.coordinator_address=127.0.0.1:{port}", "train.num_processes=2", f"train.process_id={i}",
                   *COMMON, *overrides]  # fmt: skip
            with open(self.logs[i], "w") as log:
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                   start_new_session=True))  # fmt: skip

    def output(self) -> str:
        return "\n".join(f"--- process {i} ---\n" + p.read_text()[-3000:] for i, p in enumerate(self.logs))

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for p in self.procs:
            p.wait(timeout=30)

    def wait(self, timeout: float = TIMEOUT) -> list[int]:
        t0 = time.time()
        try:
            for p in self.procs:
                p.wait(timeout=max(1.0, timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"two-process run timed out after {timeout}s\n{self.output()}")
        return [p.returncode for p in self.procs]


def logged_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return 0
    return max((json.loads(x)["step"] for x in path.read_text().splitlines() if x.strip().endswith("}")), default=0)


def checkpoint_steps(run_dir: Path) -> list[int]:
    d = run_dir / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_equals_uninterrupted(tmp_path, env):
    ref_dir = tmp_path / "ref"
    pair = Pair(ref_dir, env)
    try:
        codes = pair.wait()
        assert codes == [0, 0], pair.output()
    finally:
        pair.kill()
    out = pair.output()
    assert "mesh data=4 x fsdp=1 x tensor=1 (4 cpu devices, 2 processes)" in out
    assert f"done: {STEPS} steps" in out and (ref_dir / "model.sft").exists()
    assert checkpoint_steps(ref_dir) == [8, 12]
    data_files = sorted(p.name for p in (ref_dir / "checkpoints" / "12" / "data").iterdir())
    assert any("process_0" in n for n in data_files) and any("process_1" in n for n in data_files), data_files

    run_dir = tmp_path / "killed"
    kill_after = random.Random().randint(5, 10)
    pair = Pair(run_dir, env)
    try:
        t0 = time.time()
        while logged_step(run_dir) < kill_after or not checkpoint_steps(run_dir):
            if any(p.poll() is not None for p in pair.procs):
                pytest.fail(f"a process ended before step {kill_after}\n{pair.output()}")
            if time.time() - t0 > TIMEOUT:
                pytest.fail(f"no step {kill_after} after {TIMEOUT}s\n{pair.output()}")
            time.sleep(0.05)
    finally:
        pair.kill()
    saved = checkpoint_steps(run_dir)
    assert saved and saved[-1] < STEPS and not (run_dir / "model").exists(), (kill_after, saved)

    pair = Pair(run_dir, env)
    try:
        codes = pair.wait()
        assert codes == [0, 0], pair.output()
    finally:
        pair.kill()
    assert f"resumed from checkpoint {saved[-1]}" in pair.output()
    _, ref_params, _ = load_model_dir(ref_dir / "model")
    _, params, _ = load_model_dir(run_dir / "model")
    for (k, x), (_, y) in zip(jax.tree_util.tree_flatten_with_path(ref_params)[0], jax.tree_util.tree_flatten_with_path(params)[0]):
        assert np.array_equal(x, y), f"{jax.tree_util.keystr(k)}: max diff {np.max(np.abs(x - y))}"
