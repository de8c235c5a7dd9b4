"""The tiny model learns on real data: an espeak-ng corpus in 3 voices, prepared by the real pipeline (seeded random
EnCodec: no codec weights can be downloaded here), trained by the real CLI.

Thresholds asserted (CI-sized run, 60 steps): the mean training loss of the last 10 steps is below 4.5, far below
the uniform loss ln(1025) = 6.93 over the audio vocabulary, and has fallen by at least 1.5 from the first logged
value; the level-0 (AR) top-10 accuracy of the last log is above 0.5 and higher than at the first log.
"""

import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT

UNIFORM = math.log(1025)


@pytest.mark.slow
def test_tiny_model_learns_on_the_demo_corpus(tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    py = [sys.executable, "-m"]
    subprocess.run([*py, "valle_jax.prepare", "demo", str(data), "--sentences", "30", "--speakers", "3", "--no-progress"],
                   check=True, cwd=ROOT, timeout=900)  # fmt: skip
    r = subprocess.run([*py, "valle_jax.train", "--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={data}",
                        f"train.run_dir={run}", "train.steps=60", "train.log_every=5", "train.eval_every=60",
                        "train.save_every=60", "data.batch_tokens=3072", "train.warmup_steps=10"],
                       cwd=ROOT, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    logs = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in logs if l["split"] == "train"]
    first, last = train[0], train[-1]
    tail = [l["loss"] for l in train if l["step"] > 50]
    tail_loss = sum(tail) / len(tail)
    assert tail_loss < 4.5 < UNIFORM, tail_loss
    assert first["loss"] - tail_loss > 1.5, (first["loss"], tail_loss)
    ar_acc = [l["acc_L0"] for l in train if "acc_L0" in l]
    assert ar_acc[-1] > 0.5 and ar_acc[-1] > ar_acc[0], ar_acc
    evals = [l for l in logs if l["split"] == "eval"]
    assert evals and evals[-1]["loss"] < UNIFORM
    assert (run / "curves.png").stat().st_size > 1000
    assert (run / "model.sft").is_file() and (run / "model" / "config.yaml").is_file()
    samples = list((run / "samples" / "60").glob("*.wav"))  # eval wrote an utterance synthesized by the model
    assert len(samples) == 1 and samples[0].stat().st_size > 1000
