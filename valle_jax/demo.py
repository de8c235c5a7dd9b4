"""The built-in default job: `python -m valle_jax.demo [--out runs/demo] [--steps N] [--sentences N]`.

1. espeak-ng speaks a small corpus in several voices; `prepare` turns it into shards (with the seeded RANDOM
   EnCodec when the real EnCodec weights are not installed: it says so, and the audio of step 4 is then noise);
2. the tiny model (configs/train-tiny.yaml) trains on it on the CPU for a few minutes, with progress;
3. the loss/accuracy plot is written (runs/demo/run/curves.png);
4. a sentence is synthesized from the trained model with one of the corpus voices as the prompt;
5. the sample is evaluated (`python -m valle_jax.evaluate`: the ASR transcript and its WER against the sentence,
   runs/demo/eval/). With the random codec the sample is not speech, and the demo says that its WER means nothing.
Each step is resumable: rerunning skips what is done (the corpus, finished training steps).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], check: bool = True) -> subprocess.CompletedProcess:
    """Run a valle_jax step; `check=False` captures its output for the caller instead of failing on exit != 0."""
    print("+ " + " ".join(args), flush=True)
    return subprocess.run([sys.executable, *args], check=check, cwd=ROOT, capture_output=not check, text=True)


def evaluate_sample(sample: Path, text: str, prompt: Path | None, out: Path, random_codec: bool) -> dict:
    """Step 5: WER (and SIM against the prompt) of the demo's sample, through the evaluation CLI (out/eval/)."""
    item = {"id": "sample", "text": text, "audio": str(sample), **({"prompt": str(prompt)} if prompt else {})}
    items = out / "eval-items.jsonl"
    items.write_text(json.dumps(item) + "\n")
    r = _run(["-m", "valle_jax.evaluate", "--items", str(items), "--out", str(out / "eval"), "--no-progress"], check=False)
    if r.returncode == 2:  # the evaluation models are not installed (or the list could not be read)
        print(f"evaluation skipped: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else 'it did not run'}")
        return {"evaluated": False, "meaningful": False}
    metrics = json.loads((out / "eval" / "metrics.jsonl").read_text().splitlines()[0])
    found, message = judge_sample(metrics, text, random_codec)
    print(message)
    return {**found, "report": str(out / "eval" / "index.html")}


def judge_sample(metrics: dict, text: str, random_codec: bool) -> tuple[dict, str]:
    """What the evaluation of the sample says, and the line that tells it: `meaningful` is false when the audio
    cannot be speech (the random codec) or no transcript was made."""
    found = {"evaluated": True, "wer": metrics["wer"], "cer": metrics["cer"], "sim": metrics["sim"],
             "transcript": metrics["transcript"], "meaningful": not random_codec and metrics["wer"] is not None}  # fmt: skip
    if random_codec:
        return found, (f"evaluation: the sample was decoded by a RANDOM codec (no real EnCodec weights here), so it is "
                       f"not speech: its WER ({metrics['wer']}) and transcript ({metrics['transcript']!r}) say nothing "
                       "about the model")  # fmt: skip
    return found, f"evaluation: WER {metrics['wer']} against {text!r} (transcript {metrics['transcript']!r}), SIM {metrics['sim']}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m valle_jax.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--sentences", type=int, default=120)
    ap.add_argument("--speakers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--text", default="The quick brown fox jumps over the lazy dog.")
    args = ap.parse_args(argv)
    out = (ROOT / args.out).resolve() if not Path(args.out).is_absolute() else Path(args.out)
    data, run = out / "data", out / "run"

    _run(["-m", "valle_jax.prepare", "demo", str(data), "--sentences", str(args.sentences), "--speakers", str(args.speakers)])
    meta = json.loads((data / "dataset.json").read_text())
    random_seed = meta.get("random_codec")
    _run(["-m", "valle_jax.train", "--config", str(ROOT / "configs" / "demo.yaml"), f"data.path={data}",
          f"train.run_dir={run}", f"train.steps={args.steps}"])  # fmt: skip

    model_dir = run / "model"
    wavs = sorted((data / "source").rglob("*.wav"))  # the corpus voices (LibriTTS-style tree)
    prompt = wavs[0] if wavs else None
    cmd = ["-m", "valle_jax.synthesize", "--checkpoint", str(model_dir), "--text", args.text, "--out", str(out / "sample.wav"),
           "--codec", meta.get("codec", "encodec"), "--max-ar-steps", "300", "--ar-temperature", "0"]  # fmt: skip
    if prompt is not None:
        cmd += ["--prompt", str(prompt)]
    if random_seed is not None:
        cmd += ["--random-codec", str(random_seed)]
    _run(cmd)
    evaluation = evaluate_sample(out / "sample.wav", args.text, prompt, out, random_seed is not None)
    print(json.dumps({"plot": str(run / "curves.png"), "sample": str(out / "sample.wav"), "model": str(model_dir),
                      "random_codec": random_seed is not None, "evaluation": evaluation}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
