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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SAMPLER_KEYS = {  # manifest / CLI name -> SamplingParams field (AR)
    "ar_temperature": "temperature", "ar_min_temperature": "min_temperature", "top_k": "top_k", "top_p": "top_p",
    "repetition_penalty": "repetition_penalty", "repetition_penalty_decay": "repetition_penalty_decay",
    "length_penalty": "length_penalty", "mirostat_tau": "mirostat_tau", "mirostat_eta": "mirostat_eta",
    "dry_multiplier": "dry_multiplier", "dry_base": "dry_base", "dry_allowed_length": "dry_allowed_length",
}  # fmt: skip
NAR_KEYS = {"nar_temperature": "temperature", "nar_min_temperature": "min_temperature", "top_k": "top_k", "top_p": "top_p"}
ITEM_KEYS = {"id", "text", "prompt", "codes", "language", "max_ar_steps"} | set(SAMPLER_KEYS) | set(NAR_KEYS)
SILENCE_RMS = 1e-4  # a prompt quieter than this (float samples in [-1, 1]) is treated as silent
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,200}$")


class ItemError(ValueError):
    """A manifest item that cannot be synthesized; recorded in results.jsonl, the job goes on."""


@dataclass
class Line:
    item_id: str
    index: int
    text_ids: np.ndarray
    prom: np.ndarray
    max_tokens: int
    ar: dict
    nar: dict


@dataclass
class Pending:
    item_id: str
    n_lines: int
    started: float
    audio: dict[int, np.ndarray] = field(default_factory=dict)
    received: int = 0
    error: str | None = None


# ---------------------------------------------------------------------------------------------------------
# results bookkeeping


def finished_ids(out_dir: Path) -> set[str]:
    """Ids with an ok line in results.jsonl whose wav exists (a torn last line is ignored)."""
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


# ---------------------------------------------------------------------------------------------------------
# the job


class Synthesizer:
    """Loads the model(s), the text front end and the codec sidecar; turns items into waveforms."""

    def __init__(self, args: argparse.Namespace):
        import jax

        from valle_jax.convert import load_any
        from valle_jax.text import TextFrontEnd

        self.args = args
        dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
        over = {"dtype": dtype, "attention_impl": args.attention}
        self.cfg, params = load_any(args.checkpoint, heads=args.heads, overrides=over, dtype=np.float32)
        self.params = jax.tree.map(lambda a: jax.numpy.asarray(a, dtype), params)
        if args.nar_checkpoint:
            self.nar_cfg, nar_params = load_any(args.nar_checkpoint, heads=args.heads, overrides=over, dtype=np.float32)
            self.nar_params = jax.tree.map(lambda a: jax.numpy.asarray(a, dtype), nar_params)
        else:
            self.nar_cfg, self.nar_params = self.cfg, self.params
        if not self.cfg.causal:
            raise SystemExit(f"error: {args.checkpoint} has no AR capability ({self.cfg.capabilities}); "
                             "give an AR model as --checkpoint and the NAR one as --nar-checkpoint")  # fmt: skip
        self.front = {}
        self.tokenizer = self.cfg.tokenizer
        self.TextFrontEnd = TextFrontEnd
        self.codec_kind = args.codec or self.cfg.codec
        self.fps = {"dac": 86.1328125}.get(self.codec_kind, 75.0)
        self.levels = self.nar_cfg.resp_levels

    # ----- inputs
    def text_lines(self, text: str, language: str) -> list[np.ndarray]:
        from valle_jax.text import FrontEndError

        if not isinstance(text, str) or not text.strip():
            raise ItemError("empty text")
        key = (self.tokenizer, language)
        try:
            if key not in self.front:
                self.front[key] = self.TextFrontEnd(tokenizer=self.tokenizer, language=language)
            lines = self.front[key].ids(text)
        except FrontEndError as e:
            raise ItemError(str(e)) from None
        out = []
        for ids in lines:
            if len(ids) > self.args.max_text_tokens:
                raise ItemError(f"text line of {len(ids)} tokens exceeds --max-text-tokens {self.args.max_text_tokens}")
            out.append(np.asarray(ids, np.int32))
        if not out:
            raise ItemError("empty text")
        return out

    def prompt_codes(self, item: dict, codec) -> np.ndarray:
        from valle_jax.codec import AudioFileError, CodecFileError, read_audio, read_codes

        if "codes" in item:
            try:
                codes, _ = read_codes(item["codes"])
            except (CodecFileError, OSError, ValueError) as e:
                raise ItemError(f"codes {item['codes']}: {e}") from None
            parts = [np.asarray(codes)]
        else:
            paths = item.get("prompt")
            paths = [paths] if isinstance(paths, str) else paths
            if not paths:
                raise ItemError("no prompt: give 'prompt' (audio path or list of paths) or 'codes'")
            waves = []
            for p in paths:
                try:
                    wav, sr = read_audio(p)
                except (FileNotFoundError, AudioFileError, OSError, ValueError) as e:
                    raise ItemError(f"prompt {p}: {e}") from None
                if not np.isfinite(wav).all() or float(np.sqrt(np.mean(np.square(wav)))) < SILENCE_RMS:
                    raise ItemError(f"prompt {p}: silent or invalid audio")
                waves.append((wav, sr))
            parts = [codec.encode([w], sr)[0] for w, sr in waves]  # each file encoded alone (spec 6.5)
        codes = np.concatenate(parts, axis=0)
        if codes.ndim != 2 or codes.shape[1] < self.levels:
            raise ItemError(f"prompt codes have shape {list(codes.shape)}, expected [frames, >= {self.levels}]")
        if self.args.prompt_seconds > 0:
            codes = codes[: int(self.fps * self.args.prompt_seconds)]
        if len(codes) > self.args.max_prompt_frames:
            codes = codes[: self.args.max_prompt_frames]
        return codes[:, : self.levels].astype(np.int32)


def build_parser() -> argparse.ArgumentParser:
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
    for name in SAMPLER_KEYS:
        ap.add_argument(f"--{name.replace('_', '-')}", type=float, dest=name)
    ap.add_argument("--nar-temperature", type=float, dest="nar_temperature")
    ap.add_argument("--nar-min-temperature", type=float, dest="nar_min_temperature")
    ap.add_argument("--beam-width", type=int, default=0, help="beam search (items are then decoded one at a time)")
    return ap


def _sampler_settings(args: argparse.Namespace, item: dict, keys: dict[str, str]) -> dict:
    out = {}
    for name, fld in keys.items():
        value = item.get(name, getattr(args, name, None))
        if value is not None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ItemError(f"field {name!r} = {value!r}: expected a number")
            out[fld] = value
    return out


def _item_id(n: int, item: dict | None) -> str:
    return str(item.get("id", f"line{n}")) if item else f"line{n}"


def run_job(args: argparse.Namespace, items: list[tuple[int, dict | None, str | None]], out_dir: Path) -> dict:
    """Synthesize every item not yet finished; returns counts."""
    import jax
    import jax.numpy as jnp
    from tqdm import tqdm

    from valle_jax import sampling
    from valle_jax.codec import CodecClient, CodecError, write_wav
    from valle_jax.generate import ARScheduler, bucket, nar_generate
    from valle_jax.models.valle import make_batch

    out_dir.mkdir(parents=True, exist_ok=True)
    done = finished_ids(out_dir)
    counts = {"ok": 0, "error": 0, "skipped": 0}
    todo = [(n, item, error) for n, item, error in items if _item_id(n, item) not in done]
    counts["skipped"] = len(items) - len(todo)
    if not todo:
        return counts
    items = todo
    syn = Synthesizer(args)
    cfg = syn.cfg
    codec_kw = {"random_seed": args.random_codec} if args.random_codec is not None else {
        "weights": args.codec_weights, "encodec_weights": args.encodec_weights}  # fmt: skip
    if args.random_codec is not None:
        print(f"WARNING: using a RANDOM {syn.codec_kind} codec (seed {args.random_codec}): the audio is not speech", file=sys.stderr)
    seen: set[str] = set()
    with CodecClient(syn.codec_kind, **codec_kw) as codec:
        # 1. inputs (front end + prompt encoding); bad items are recorded now
        lines: list[Line] = []
        pending: dict[str, Pending] = {}
        for n, item, error in tqdm(items, desc="prepare", unit="item", disable=args.quiet):
            item_id = _item_id(n, item)
            try:
                if error:
                    raise ItemError(error)
                if not SAFE_ID.match(item_id):
                    raise ItemError(f"id {item_id!r}: use letters, digits, '.', '_' or '-' (it names the wav file)")
                if item_id in seen:
                    raise ItemError(f"id {item_id!r} appears twice in the manifest")
                unknown = sorted(set(item) - ITEM_KEYS)
                if unknown:
                    raise ItemError(f"unknown field(s) {unknown}; expected some of {sorted(ITEM_KEYS)}")
                seen.add(item_id)
                text_lines = syn.text_lines(item.get("text"), item.get("language", args.language))
                prom = syn.prompt_codes(item, codec)
                ar = _sampler_settings(args, item, SAMPLER_KEYS)
                nar = _sampler_settings(args, item, NAR_KEYS)
                steps = int(item.get("max_ar_steps", args.max_ar_steps))
            except (ItemError, CodecError) as e:
                append_result(out_dir, {"id": item_id, "status": "error", "error": str(e), "line": n})
                counts["error"] += 1
                continue
            pending[item_id] = Pending(item_id, len(text_lines), time.perf_counter())
            lines += [Line(item_id, i, t, prom, steps, ar, nar) for i, t in enumerate(text_lines)]
        if not lines:
            return counts

        # 2. AR with continuous batching (one program per bucket shape)
        text_b = bucket(max(len(l.text_ids) for l in lines))
        prom_b = bucket(max(len(l.prom) for l in lines))
        max_tokens = max(l.max_tokens for l in lines)
        sched = ARScheduler(cfg, syn.params, slots=min(args.batch, max(1, len(lines))), max_tokens=max_tokens,
                            text_bucket=text_b, prom_bucket=prom_b, chunk=args.chunk, seed=args.seed,
                            continuous=not args.no_continuous)  # fmt: skip
        by_key = {}
        for l in lines:
            sp = sampling.ar_defaults(1, args.preset, **{**l.ar, "beam_width": 0})
            sched.submit((l.item_id, l.index), l.text_ids, l.prom, l.max_tokens, sp)
            by_key[(l.item_id, l.index)] = l
        nar_run = jax.jit(lambda p, b, l0, k, sp: nar_generate(syn.nar_cfg, p, b, l0, max_levels=args.max_nar_levels, key=k, sampling_params=sp))
        key = jax.random.key(args.seed + 1)
        futures = []
        bar = tqdm(total=len(lines), desc="synthesize", unit="line", disable=args.quiet)
        audio_seconds, t0 = 0.0, time.perf_counter()
        ready: list[tuple[tuple, np.ndarray]] = []

        def flush_nar(final: bool):
            nonlocal key
            while ready and (final or len(ready) >= sched.slots):
                group, rest = ready[: sched.slots], ready[sched.slots :]
                ready[:] = rest
                R = bucket(max(max(len(t), 1) for _, t in group))
                items_ = [{"text": by_key[k].text_ids, "prom": by_key[k].prom, "resp": np.asarray(t[:R]).reshape(-1, 1) if len(t) else np.zeros((1, 1), np.int32)} for k, t in group]
                batch = make_batch(items_, pad_to={"text": text_b, "prom": prom_b, "resp": R})
                sp = sampling.nar_defaults(len(group), args.preset)
                for j, (k, _) in enumerate(group):
                    for fld, v in by_key[k].nar.items():
                        arr = getattr(sp, fld)
                        sp = sp.replace(**{fld: arr.at[j].set(v)})
                key, sub = jax.random.split(key)
                codes = np.asarray(nar_run(syn.nar_params, batch, batch.resp[..., 0], sub, sp))
                for j, (k, tokens) in enumerate(group):
                    c = codes[j, : len(tokens)]
                    futures.append((k, codec.decode_async([np.clip(c, 0, 1023).astype(np.int16)]) if len(tokens) else None))

        for k, raw, tokens, finite in sched.run():
            if not finite:
                futures.append((k, _failed(f"line {k[1]}: NaN/inf in the model's logits")))
                bar.update(1)
                continue
            ready.append((k, tokens))
            flush_nar(final=False)
            bar.update(1)
            audio_seconds += len(tokens) / syn.fps
            bar.set_postfix(audio_s_per_s=f"{audio_seconds / (time.perf_counter() - t0):.1f}")
            _collect(futures, pending, out_dir, codec, counts, syn, write_wav, wait=False)
        flush_nar(final=True)
        _collect(futures, pending, out_dir, codec, counts, syn, write_wav, wait=True)
        bar.close()
    elapsed = time.perf_counter() - t0
    counts["seconds"] = round(elapsed, 3)
    counts["audio_seconds"] = round(audio_seconds, 3)
    return counts


def _failed(message: str):
    import concurrent.futures

    fut: concurrent.futures.Future = concurrent.futures.Future()
    fut.set_exception(ItemError(message))
    return fut


def _collect(futures, pending, out_dir, codec, counts, syn, write_wav, wait: bool) -> None:
    from valle_jax.codec import CodecError

    keep = []
    for k, fut in futures:
        if fut is not None and not wait and not fut.done():
            keep.append((k, fut))
            continue
        item_id, index = k
        p = pending[item_id]
        p.received += 1
        try:
            audio = fut.result()[0] if fut is not None else np.zeros((0,), np.float32)
            if not np.isfinite(audio).all():
                raise ItemError(f"line {index}: NaN/inf in the decoded audio")
            p.audio[index] = audio
        except (CodecError, ItemError) as e:
            p.error = p.error or str(e)
        if p.received == p.n_lines:
            _finish(p, out_dir, codec.sample_rate, counts, write_wav)
    futures[:] = keep


def _finish(p: Pending, out_dir: Path, sample_rate: int, counts: dict, write_wav) -> None:
    if p.error:
        append_result(out_dir, {"id": p.item_id, "status": "error", "error": p.error})
        counts["error"] += 1
        return
    audio = np.concatenate([p.audio[i] for i in range(p.n_lines)])
    if audio.size == 0:
        append_result(out_dir, {"id": p.item_id, "status": "error", "error": "the AR stopped at once: no audio"})
        counts["error"] += 1
        return
    write_wav(out_dir / f"{p.item_id}.wav", audio, sample_rate)  # atomic: temp name, then rename
    append_result(out_dir, {"id": p.item_id, "status": "ok", "seconds": round(len(audio) / sample_rate, 3),
                            "lines": p.n_lines, "wall_s": round(time.perf_counter() - p.started, 3)})  # fmt: skip
    counts["ok"] += 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.quiet = False
    if bool(args.manifest) == bool(args.text):
        raise SystemExit("error: give either --manifest (a job) or --text (one utterance)")
    if args.beam_width > 1:
        raise SystemExit("error: --beam-width > 1 is available through valle_jax.generate (batch = beams); "
                         "the job runner decodes items in shared slots")  # fmt: skip
    if args.manifest:
        out_dir = Path(args.out)
        counts = run_job(args, read_manifest(Path(args.manifest)), out_dir)
        print(json.dumps({"out": str(out_dir), **counts}))
        return 0 if counts.get("error", 0) == 0 else 3
    out = Path(args.out)
    if out.suffix.lower() != ".wav":
        raise SystemExit(f"error: --out {out}: expected a .wav path for --text")
    item = {"id": out.stem if SAFE_ID.match(out.stem) else "utterance", "text": args.text, "prompt": args.prompt or []}
    work = out.parent / f".{out.name}.work"
    if work.exists():
        import shutil

        shutil.rmtree(work)
    counts = run_job(args, [(1, item, None)], work)
    result = [json.loads(l) for l in (work / "results.jsonl").read_text().splitlines()] if (work / "results.jsonl").is_file() else []
    ok = counts.get("ok") == 1
    if ok:
        (work / f"{item['id']}.wav").replace(out)
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    if not ok:
        err = result[-1].get("error") if result else "nothing synthesized"
        print(f"error: {err}", file=sys.stderr)
        return 3
    print(json.dumps({"out": str(out), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
