"""The tiny model learns on real data: an espeak-ng corpus in 3 voices, prepared by the real pipeline (seeded random
EnCodec: no codec weights can be downloaded here), trained by the real CLI.

Thresholds asserted (CI-sized run, 60 steps): the mean training loss of the last 10 steps is below 4.5, far below
the uniform loss ln(1025) = 6.93 over the audio vocabulary, and has fallen by at least 1.5 from the first logged
value; the level-0 (AR) top-10 accuracy of the last log is above 0.5 and higher than at the first log.
With `train.eval_metrics` the eval sample is transcribed and compared with its prompt (valle_jax.evaluate): WER, CER
and SIM land in metrics.jsonl and TensorBoard. The README's training command then runs on the same data as written.
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
                        "train.save_every=60", "data.batch_tokens=3072", "train.warmup_steps=10", "train.eval_metrics=true"],
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
    samples = sorted((run / "samples" / "60").glob("*.wav"))  # the utterance synthesized by the model, and its prompt
    assert [p.name for p in samples] == ["0.prompt.wav", "0.wav"] and samples[1].stat().st_size > 1000
    # train.eval_metrics: the sample's WER/CER (against its text) and SIM (against its prompt) in the logs
    rec = [l for l in logs if l["split"] == "eval_samples"]
    assert [l["step"] for l in rec] == [60], logs[-3:]
    assert 0.0 <= rec[0]["wer"] and 0.0 <= rec[0]["cer"] and -1.0 <= rec[0]["sim"] <= 1.0 and rec[0]["eval_items"] == 1
    assert (run / "samples" / "60" / "eval" / "metrics.jsonl").is_file() and (run / "samples" / "60" / "eval" / "index.html").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run / "tensorboard")).Reload().Tags()["scalars"]
    assert {"eval_samples/wer", "eval_samples/cer", "eval_samples/sim"} <= set(tags), tags

    # the README's training command, as written there, on this data (only the run dir and the step count added)
    readme = (ROOT / "README.md").read_text()
    command = next(l for l in readme.splitlines() if "-m valle_jax.train --config configs/train-tiny.yaml" in l)
    args = command.split("#")[0].split()[3:]  # after `.venv/bin/python -m valle_jax.train`
    args = [f"data.path={data}" if a.startswith("data.path=") else a for a in args]
    r = subprocess.run([*py, "valle_jax.train", *args, f"train.run_dir={tmp_path / 'readme'}", "train.steps=2",
                        "train.eval_every=0"], cwd=ROOT, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert r.returncode == 0 and "done: 2 steps" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
