"""Offline batch synthesis: `python -m valle_jax.synthesize`.

    # a job: one JSON object per manifest line -> DIR/<id>.wav and DIR/results.jsonl
    python -m valle_jax.synthesize --checkpoint C [--nar-checkpoint C2] --manifest jobs.jsonl --out DIR
    # one utterance
    python -m valle_jax.synthesize --checkpoint C --text "..." --prompt ref.wav [--prompt ref2.wav] --out out.wav

Manifest line: {"id": "utt1", "text": "...", "prompt": "ref.wav" | ["a.wav", "b.flac"] | "codes": "ref.enc",
"language": "en", optional sampler overrides such as "ar_temperature", "nar_temperature", "top_k", "top_p",
"repetition_penalty", "length_penalty", "max_ar_steps"}. Each text line is synthesized separately and the
audio concatenated (as the reference). A bad item (missing or unreadable prompt, silent prompt, empty or
over-long text, unknown language, NaN output) gets a results line with its error and the job goes on.
Outputs are written under a temporary name and renamed; a rerun skips ids already finished (ok or error).
Exit status: 0 when every item is ok, 3 when some item was recorded as an error, 2 on a usage error.

A thin CLI over `valle_jax.pipeline` (which does the synthesis): manifest reading, results bookkeeping, wavs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


# ---------------------------------------------------------------------------------------------------------
# results bookkeeping


def finished_ids(out_dir: Path) -> set[str]:
    """Ids with an ok line in results.jsonl whose wav exists, and ids recorded as errors (a torn last line is
    ignored)."""
    done: set[str] = set()
    path = out_dir / "results.jsonl"
    if not path.is_file():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if rec.get("status") == "ok" and (out_dir / f"{rec.get('id')}.wav").is_file():
            done.add(rec["id"])
        elif rec.get("status") == "error":
            done.add(rec["id"])  # a bad item stays reported; fix the manifest line and remove it to retry
    return done


def append_result(out_dir: Path, record: dict) -> None:
    with open(out_dir / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_manifest(path: Path) -> list[tuple[int, dict | None, str | None]]:
    """(line number, item or None, error or None) for every non-blank line."""
    if not path.is_file():
        raise SystemExit(f"error: manifest {path} not found")
    out = []
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            item = json.loads(raw)
            if not isinstance(item, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            out.append((n, None, f"{path}:{n}: not a JSON object ({e})"))
            continue
        out.append((n, item, None))
    return out


def _item_id(n: int, item: dict | None) -> str:
    return str(item.get("id", f"line{n}")) if item else f"line{n}"


# ---------------------------------------------------------------------------------------------------------
# the job


def build_parser() -> argparse.ArgumentParser:
    from valle_jax.pipeline import AR_KEYS

    ap = argparse.ArgumentParser(prog="python -m valle_jax.synthesize", description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="AR(+NAR) model: a model directory or reference .sft/.pth")
    ap.add_argument("--nar-checkpoint", help="a separate NAR model (e.g. nar-llama-8 beside ar-llama-1)")
    ap.add_argument("--manifest", help="JSONL job file")
    ap.add_argument("--text", help="one utterance (instead of --manifest)")
    ap.add_argument("--prompt", action="append", help="prompt audio for --text (repeat for several files)")
    ap.add_argument("--language", default="en")
    ap.add_argument("--out", required=True, help="output directory (job) or .wav file (one utterance)")
    ap.add_argument("--codec", choices=["encodec", "vocos", "dac"], help="default: the model config's codec")
    ap.add_argument("--codec-weights", help="codec weights file/directory (default: the torch-hub cache)")
    ap.add_argument("--encodec-weights", help="EnCodec weights used by Vocos for encoding")
    ap.add_argument("--random-codec", type=int, metavar="SEED", help="a seeded RANDOM codec (tests/demos only)")
    ap.add_argument("--max-ar-steps", type=int, default=900, help="AR tokens per line (default 12 s at 75 fps)")
    ap.add_argument("--max-nar-levels", type=int, default=7, help="NAR levels after level 0 (default 7)")
    ap.add_argument("--prompt-seconds", type=float, default=3.0, help="trim the prompt to its first N seconds (0 = keep)")
    ap.add_argument("--max-prompt-frames", type=int, default=512)
    ap.add_argument("--max-text-tokens", type=int, default=512)
    ap.add_argument("--batch", type=int, default=16, help="AR slots decoded together")
    ap.add_argument("--chunk", type=int, default=32, help="AR steps between slot refills")
    ap.add_argument("--no-continuous", action="store_true", help="static batches (wait for the longest item)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    ap.add_argument("--heads", type=int, help="attention heads when not given by the checkpoint")
    ap.add_argument("--preset", default="cli", choices=["cli", "inference", "forward"], help="sampler defaults (spec 6.5)")
    for name in AR_KEYS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, dest=name)
    ap.add_argument("--nar-temperature", type=float, dest="nar_temperature")
    ap.add_argument("--nar-min-temperature", type=float, dest="nar_min_temperature")
    ap.add_argument("--beam-width", type=int, default=0, help="beam search (items are then decoded one at a time)")
    return ap


def settings_from_args(args: argparse.Namespace):
    """The job's typed synthesis settings from the CLI flags."""
    from valle_jax.pipeline import AR_KEYS, NAR_KEYS, Settings

    def chosen(keys: dict) -> dict:
        return {setting: getattr(args, name) for name, setting in keys.items() if getattr(args, name, None) is not None}

    return Settings(max_ar_steps=args.max_ar_steps, max_nar_levels=args.max_nar_levels, prompt_seconds=args.prompt_seconds,
                    max_prompt_frames=args.max_prompt_frames, max_text_tokens=args.max_text_tokens, slots=args.batch,
                    chunk=args.chunk, continuous=not args.no_continuous, seed=args.seed, preset=args.preset,
                    ar=chosen(AR_KEYS), nar=chosen(NAR_KEYS), language=args.language)  # fmt: skip


def open_codec(args: argparse.Namespace, kind: str):
    """The codec sidecar of the job (not started yet)."""
    from valle_jax.codec import CodecClient

    if args.random_codec is not None:
        print(f"WARNING: using a RANDOM {kind} codec (seed {args.random_codec}): the audio is not speech", file=sys.stderr)
        return CodecClient(kind, random_seed=args.random_codec)
    return CodecClient(kind, args.codec_weights, encodec_weights=args.encodec_weights)


def run_job(args: argparse.Namespace, items: list[tuple[int, dict | None, str | None]], out_dir: Path) -> dict:
    """Synthesize every item not yet finished: bad items are recorded as errors, the others written as wavs."""
    from tqdm import tqdm

    from valle_jax.codec import CodecError, write_wav
    from valle_jax.pipeline import ItemError, Synthesizer, load_models

    out_dir.mkdir(parents=True, exist_ok=True)
    done = finished_ids(out_dir)
    todo = [(n, item, error) for n, item, error in items if _item_id(n, item) not in done]
    counts: dict[str, Any] = {"ok": 0, "error": 0, "skipped": len(items) - len(todo)}
    if not todo:
        return counts

    def record(rec: dict) -> None:
        append_result(out_dir, rec)
        counts[rec["status"]] += 1

    models = load_models(args.checkpoint, args.nar_checkpoint, dtype=args.dtype, attention=args.attention, heads=args.heads)
    t0, seen = time.perf_counter(), set()
    with open_codec(args, args.codec or models.codec) as codec:
        syn = Synthesizer(models, settings_from_args(args), codec)
        requests = []
        for n, item, error in tqdm(todo, desc="prepare", unit="item", disable=args.quiet):
            item_id = _item_id(n, item)
            try:
                if error:
                    raise ItemError(error)
                if not SAFE_ID.match(item_id):
                    raise ItemError(f"id {item_id!r}: use letters, digits, '.', '_' or '-' (it names the wav file)")
                if item_id in seen:
                    raise ItemError(f"id {item_id!r} appears twice in the manifest")
                seen.add(item_id)
                requests.append(syn.request(item_id, item))
            except (ItemError, CodecError) as e:
                record({"id": item_id, "status": "error", "error": str(e), "line": n})
        audio_seconds = 0.0
        for out in syn.run(requests, progress=not args.quiet):
            if out.error:
                record({"id": out.id, "status": "error", "error": out.error})
                continue
            write_wav(out_dir / f"{out.id}.wav", out.audio, codec.sample_rate)  # atomic: temp name, then rename
            audio_seconds += out.seconds
            record({"id": out.id, "status": "ok", "seconds": out.seconds, "lines": len(out.codes), "wall_s": out.wall_s})
    counts["seconds"] = round(time.perf_counter() - t0, 3)
    counts["audio_seconds"] = round(audio_seconds, 3)
    return counts


def main(argv: list[str] | None = None) -> int:
    from valle_jax.codec import MissingWeightsError
    from valle_jax.config import ConfigError
    from valle_jax.convert import CheckpointError

    args = build_parser().parse_args(argv)
    args.quiet = False
    if bool(args.manifest) == bool(args.text):
        raise SystemExit("error: give either --manifest (a job) or --text (one utterance)")
    if args.beam_width > 1:
        raise SystemExit("error: --beam-width > 1 is available through valle_jax.generate (batch = beams); "
                         "the job runner decodes items in shared slots")  # fmt: skip
    try:
        if args.manifest:
            out_dir = Path(args.out)
            counts = run_job(args, read_manifest(Path(args.manifest)), out_dir)
            print(json.dumps({"out": str(out_dir), **counts}))
            return 0 if counts.get("error", 0) == 0 else 3
        return one_utterance(args)
    except (ConfigError, CheckpointError, MissingWeightsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def one_utterance(args: argparse.Namespace) -> int:
    """`--text ... --out x.wav`: a job of one item in a work folder beside the output, then renamed."""
    out = Path(args.out)
    if out.suffix.lower() != ".wav":
        raise SystemExit(f"error: --out {out}: expected a .wav path for --text")
    item = {"id": out.stem if SAFE_ID.match(out.stem) else "utterance", "text": args.text, "prompt": args.prompt or []}
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        counts = run_job(args, [(1, item, None)], work)
        results = work / "results.jsonl"
        result = [json.loads(line) for line in results.read_text().splitlines()] if results.is_file() else []
        if counts.get("ok") != 1:
            print(f"error: {result[-1].get('error') if result else 'nothing synthesized'}", file=sys.stderr)
            return 3
        (work / f"{item['id']}.wav").replace(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"out": str(out), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
