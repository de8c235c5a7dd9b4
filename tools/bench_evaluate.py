"""Evaluation throughput: one JSON line (items, seconds, items/s) for an N-item evaluation.

    python tools/bench_evaluate.py [--items 20] [--asr-model NAME|PATH] [--sim-model ge2e] [--no-report]
        [--device cpu] [--threads N] [--out DIR]

The items are the five real LibriVox clips of Debian's pocketsphinx-testdata (3 to 7 s each), cycled to N,
each with another clip as its prompt: what `python -m valle_jax.evaluate --items` does for a job of N
utterances, end to end (worker start and model loading included in `seconds`, also reported apart as
`start_seconds`), with the report (index.html, embedded audio and pictures) unless --no-report.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LIBRIVOX = Path("/usr/share/pocketsphinx/test/data/librivox")


def clip_items(n: int) -> list[dict]:
    listing = LIBRIVOX / "transcription"
    if not listing.is_file():
        raise SystemExit(f"{listing} missing: apt-get install pocketsphinx-testdata (tools/setup.sh does)")
    clips = []
    for line in listing.read_text().splitlines():
        text, name = re.fullmatch(r"<s> (.*) </s> \((.*)\)", line.strip()).groups()
        clips.append((LIBRIVOX / f"{name}.wav", text))
    return [{"id": f"u{i:04d}", "text": clips[i % len(clips)][1], "audio": str(clips[i % len(clips)][0]),
             "prompt": str(clips[(i + 1) % len(clips)][0])} for i in range(n)]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=20)
    ap.add_argument("--asr-model", default=None)
    ap.add_argument("--sim-model", default="ge2e")
    ap.add_argument("--sim-weights", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--out", default=None, help="keep the outputs here (default: a temporary folder)")
    args = ap.parse_args()

    from valle_jax.evaluate import EvalSettings, Evaluator, evaluate_items

    settings = EvalSettings(asr_model=args.asr_model, sim_model=args.sim_model, sim_weights=args.sim_weights,
                            device=args.device, num_threads=args.threads, report=not args.no_report, progress=False)  # fmt: skip
    items = clip_items(args.items)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        t0 = time.perf_counter()
        with Evaluator(settings) as ev:
            started = time.perf_counter() - t0
            summary = evaluate_items(items, out, settings, evaluator=ev, source="bench_evaluate")
        seconds = time.perf_counter() - t0
    print(json.dumps({
        "bench": "evaluate", "items": args.items, "seconds": round(seconds, 2), "items_per_s": round(args.items / seconds, 3),
        "start_seconds": round(started, 2), "audio_seconds": summary["seconds_total"], "report": not args.no_report,
        "wer_mean": summary["wer_mean"], "sim_mean": summary["sim_mean"], "device": args.device,
        "asr": summary["models"]["asr"]["name"], "sim": summary["models"]["sim"]["name"],
    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
