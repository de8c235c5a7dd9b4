"""Offline batch synthesis: `python -m valle_jax.synthesize`.

    # a job: one JSON object per manifest line -> DIR/<id>.wav and DIR/results.jsonl (--evaluate: DIR/eval/)
    python -m valle_jax.synthesize --checkpoint C [--nar-checkpoint C2] --manifest jobs.jsonl --out DIR
    # one utterance
    python -m valle_jax.synthesize --checkpoint C --text "..." --prompt ref.wav [--prompt ref2.wav] --out out.wav
    # one job on several processes or hosts: the same command on each (TPU pods and SLURM are detected), or
    python -m valle_jax.synthesize ... --coordinator HOST:PORT --num-processes N --process-id K

Manifest line: {"id": "utt1", "text": "...", "prompt": "ref.wav" | ["a.wav", "b.flac"] | "codes": "ref.enc",
"language": "en", optional sampler overrides such as "ar_temperature", "nar_temperature", "top_k", "top_p",
"repetition_penalty", "length_penalty", "max_ar_steps"}. Each text line is synthesized separately and the
audio concatenated (as the reference).

The rules of a job:
- An item's id is its "id" (letters, digits, '.', '_', '-', starting with a letter or digit: it names the wav),
  else "line<N>". An id on several manifest lines is an error of that id: none of those lines is synthesized.
- Every field of every item is checked (type and range) before any work; a bad item (bad field, missing,
  unreadable or silent prompt, empty or over-long text, unknown language, NaN output) gets a results line with
  its error, `"kind": "permanent"`, and the job goes on. A failure that may pass on another try (the codec
  sidecar crashed or timed out, memory ran out) is recorded with `"kind": "transient"`.
- A rerun skips ids already ok (wav present) and ids in permanent error, and tries transient errors again;
  `--retry-errors` tries every error again (after fixing the manifest).
- One job at a time on a folder (DIR/.lock names the running one); a killed job's temporary files are removed
  by the next run; results.jsonl ends with exactly one line per id.
- Several processes share the ids still to do, in manifest order, round robin; each writes its own wavs and
  results; the last step folds them into results.jsonl.
Exit status: 0 when every id of the manifest is ok, 3 while any id is in error or not done (also on a rerun that
only skipped it; also when --evaluate could not finish), 2 on a usage or set-up error (one line on stderr;
nothing is left behind).

A thin CLI over `valle_jax.pipeline` (the synthesis) and `valle_jax.jobfolder` (the folder's bookkeeping).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from valle_jax import jobfolder
from valle_jax.fileio import jsonl_objects

SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}")  # matched whole (fullmatch): it names a file


class UsageError(Exception):
    """A problem with the command or its set-up (arguments, files, models): one line on stderr, exit 2."""


# ---------------------------------------------------------------------------------------------------------
# the manifest


@dataclass
class Entry:
    """One id of the manifest: its first line, the item (None when the line is not a JSON object), and the
    error known before any work (bad line, duplicated id)."""

    id: str
    line: int
    item: dict | None
    error: str | None = None


def item_id(n: int, obj: Any) -> str:
    """The id of the item on manifest line `n` (the rule valle_jax.evaluate's load_job follows too)."""
    return str(obj.get("id", f"line{n}")) if isinstance(obj, dict) else f"line{n}"


def read_manifest(path: Path) -> list[Entry]:
    """One entry per id, in the order of first appearance; UsageError when the file cannot be read."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"manifest {path} not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"manifest {path} cannot be read: {e}") from None
    entries: dict[str, Entry] = {}
    lines_of: dict[str, list[int]] = {}
    for n, obj, error in jsonl_objects(text, path):
        i = item_id(n, obj)
        lines_of.setdefault(i, []).append(n)
        entries.setdefault(i, Entry(i, n, obj, error))
    for i, ns in lines_of.items():
        if len(ns) > 1:
            entries[i].error = (f"id {i!r} is on lines {', '.join(map(str, ns))} of the manifest: ids must be unique "
                                "(each names one wav); none of these lines is synthesized")  # fmt: skip
    return list(entries.values())


def precheck(entry: Entry, settings: Any) -> str | None:
    """The error of an entry that needs no model to see (its line, id and every field), or None."""
    from valle_jax.pipeline import AR_KEYS, NAR_KEYS, ItemError, check_item, check_max_ar_steps, item_settings

    if entry.error:
        return entry.error
    if not SAFE_ID.fullmatch(entry.id):
        return (f"id {entry.id!r}: use letters, digits, '.', '_' or '-', starting with a letter or digit, at most "
                "201 characters (it names the wav file)")  # fmt: skip
    try:
        check_item(entry.item)
        check_max_ar_steps(entry.item.get("max_ar_steps", settings.max_ar_steps), settings.max_ar_steps)
        item_settings(entry.item, AR_KEYS)
        item_settings(entry.item, NAR_KEYS)
    except ItemError as e:
        return str(e)
    return None


# ---------------------------------------------------------------------------------------------------------
# the processes of a job


class Processes:
    """The processes that run one job (`jax.distributed`), or this one alone: index, count, and the two
    things they agree on: a barrier and a short message from process 0."""

    def __init__(self, index: int = 0, count: int = 1):
        self.index, self.count = index, count

    @classmethod
    def start(cls, args: argparse.Namespace) -> "Processes":
        """Join the job's other processes: explicit flags, else detected (TPU pod, SLURM, ...), else alone."""
        from valle_jax.config import ConfigError, TrainConfig
        from valle_jax.parallel import initialize_distributed

        given = [args.coordinator, args.num_processes, args.process_id]
        if any(v is not None for v in given) and any(v is None for v in given):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        if args.num_processes is not None and not 0 <= args.process_id < args.num_processes:
            raise UsageError(f"--process-id {args.process_id}: expected 0 to {args.num_processes - 1}")
        try:
            started = initialize_distributed(TrainConfig(coordinator_address=args.coordinator,
                                                         num_processes=args.num_processes, process_id=args.process_id))  # fmt: skip
        except ConfigError as e:
            raise UsageError(str(e)) from None
        if not started:
            return cls()
        import jax

        return cls(jax.process_index(), jax.process_count())

    def _client(self) -> Any:
        from jax._src.distributed import global_state  # the coordination service's key-value store and barriers

        return global_state.client

    def barrier(self, name: str, timeout_s: float = 7 * 24 * 3600) -> None:
        """Wait until every process gets here (a dead process ends the wait with an error)."""
        if self.count > 1:
            self._client().wait_at_barrier(f"valle_jax_synthesize_{name}", int(timeout_s * 1000))

    def from_first(self, name: str, value: Any, timeout_s: float = 600) -> Any:
        """Process 0's `value` (JSON), on every process."""
        if self.count == 1:
            return value
        key = f"valle_jax_synthesize/{name}"
        if self.index == 0:
            self._client().key_value_set(key, json.dumps(value))
            return value
        return json.loads(self._client().blocking_key_value_get(key, int(timeout_s * 1000)))

    def shutdown(self) -> None:
        if self.count > 1:
            import jax

            jax.distributed.shutdown()


# ---------------------------------------------------------------------------------------------------------
# the CLI


def build_parser() -> argparse.ArgumentParser:
    from valle_jax.pipeline import AR_KEYS

    ap = argparse.ArgumentParser(prog="python -m valle_jax.synthesize", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    ap.add_argument("--checkpoint", required=True, help="AR(+NAR) model: a model directory or reference .sft/.pth")
    ap.add_argument("--nar-checkpoint", help="a separate NAR model (e.g. nar-llama-8 beside ar-llama-1)")
    ap.add_argument("--manifest", help="JSONL job file")
    ap.add_argument("--text", help="one utterance (instead of --manifest)")
    ap.add_argument("--prompt", action="append", help="prompt audio for --text (repeat for several files)")
    ap.add_argument("--language", default="en")
    ap.add_argument("--out", required=True, help="output directory (job) or .wav file (one utterance)")
    ap.add_argument("--retry-errors", action="store_true", help="try ids in permanent error again (transient ones always are)")
    ap.add_argument("--codec", choices=["encodec", "vocos", "dac"], help="default: the model config's codec")
    ap.add_argument("--codec-weights", help="codec weights file/directory (default: the torch-hub cache)")
    ap.add_argument("--encodec-weights", help="EnCodec weights used by Vocos for encoding")
    ap.add_argument("--codec-device", default="auto", help="torch device of the codec sidecar (cpu, cuda, cuda:1; "
                    "default auto: the codec client's choice)")  # fmt: skip
    ap.add_argument("--codec-timeout", type=float, default=600.0, help="seconds a codec request may take before the "
                    "sidecar is killed and restarted (its items are then transient errors)")  # fmt: skip
    ap.add_argument("--random-codec", type=int, metavar="SEED", help="a seeded RANDOM codec (tests/demos only)")
    ap.add_argument("--max-ar-steps", type=int, default=900, help="AR tokens per line at most (default 12 s at 75 fps); "
                    "an item's max_ar_steps may ask for fewer")  # fmt: skip
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
        ap.add_argument(f"--{name.replace('_', '-')}", type=_int_or_float, dest=name)
    ap.add_argument("--nar-temperature", type=float, dest="nar_temperature")
    ap.add_argument("--nar-min-temperature", type=float, dest="nar_min_temperature")
    ap.add_argument("--beam-width", type=int, default=0, help="beam search: each item takes this many slots (causal_size 1 "
                    "models, e.g. ar-llama-1; the combined ar+nar models decode several tokens per step)")  # fmt: skip
    ap.add_argument("--mirostat-shared", action="store_true", help="the reference's one mirostat state for the whole "
                    "batch (for parity; default: one per item, so an item's audio does not depend on its batch)")  # fmt: skip
    ap.add_argument("--devices", type=int, help="local devices the job decodes on (default: all of this process's)")
    ap.add_argument("--lora", metavar="FILE", help="a reference LoRA file (.sft/.pth) for every item that names none; "
                    "items may name their own (\"lora\": \"voices/alice.lora.sft\"), several LoRAs share a batch")  # fmt: skip
    multi = ap.add_argument_group("several processes (hosts) on one job; automatic on TPU pods and under SLURM")
    multi.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordination service")
    multi.add_argument("--num-processes", type=int)
    multi.add_argument("--process-id", type=int)
    ev = ap.add_argument_group("evaluation when the job ends (python -m valle_jax.evaluate --help)")
    ev.add_argument("--evaluate", action="store_true", help="WER/CER and SIM-O of the job into --eval-out")
    ev.add_argument("--eval-out", help="default: OUT/eval")
    ev.add_argument("--asr-model", metavar="NAME|PATH", help="default: the packaged Whisper tiny.en")
    ev.add_argument("--sim-model", choices=("ge2e", "wavlm-ecapa"), default="ge2e")
    ev.add_argument("--sim-weights", metavar="FILE")
    ev.add_argument("--eval-device", default="cpu", help="torch/CTranslate2 device of the evaluation models")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    return ap


def _int_or_float(text: str) -> int | float:
    """A CLI number as typed (so that --top-k 2.5 is refused, not truncated)."""
    try:
        return int(text)
    except ValueError:
        return float(text)


def settings_from_args(args: argparse.Namespace):
    """The job's typed synthesis settings from the CLI flags; UsageError naming a bad flag."""
    from valle_jax.config import ConfigError
    from valle_jax.pipeline import AR_KEYS, NAR_KEYS, ItemError, Settings, check_setting

    def chosen(keys: dict) -> dict:
        out = {}
        for name, setting in keys.items():
            if getattr(args, name, None) is not None:
                try:
                    out[setting] = check_setting(name, setting, getattr(args, name))
                except ItemError as e:
                    raise UsageError(f"--{name.replace('_', '-')}: {e}") from None
        return out

    try:
        return Settings(max_ar_steps=args.max_ar_steps, max_nar_levels=args.max_nar_levels, prompt_seconds=args.prompt_seconds,
                        max_prompt_frames=args.max_prompt_frames, max_text_tokens=args.max_text_tokens, slots=args.batch,
                        chunk=args.chunk, continuous=not args.no_continuous, seed=args.seed, preset=args.preset,
                        ar=chosen(AR_KEYS), nar=chosen(NAR_KEYS), language=args.language, beam_width=args.beam_width,
                        mirostat_shared=args.mirostat_shared, lora=args.lora)  # fmt: skip
    except ConfigError as e:
        raise UsageError(str(e)) from None


def open_codec(args: argparse.Namespace, kind: str):
    """The codec sidecar of the job (not started yet); weights are resolved here (MissingWeightsError)."""
    from valle_jax.codec import CodecClient

    options: dict[str, Any] = {"timeout": args.codec_timeout}
    if args.codec_device != "auto":  # "auto": the client's own choice of device
        options["device"] = args.codec_device
    if args.random_codec is not None:
        print(f"WARNING: using a RANDOM {kind} codec (seed {args.random_codec}): the audio is not speech", file=sys.stderr)
        return CodecClient(kind, random_seed=args.random_codec, **options)
    return CodecClient(kind, args.codec_weights, encodec_weights=args.encodec_weights, **options)


# ---------------------------------------------------------------------------------------------------------
# the job


@contextlib.contextmanager
def job_folder(out_dir: Path, procs: Processes, manifest: Path | None, order: list[str]) -> Iterator[None]:
    """Process 0 makes the folder, takes its lock, removes a killed run's temporary files, folds its results
    into one line per id and copies the manifest; the others wait for it.  On a set-up failure (UsageError) a
    folder made here is removed again; the lock is released at the end."""
    created, lock = False, None
    try:
        failure = None
        if procs.index == 0:
            created = not out_dir.exists()
            try:
                out_dir.mkdir(parents=True, exist_ok=True)
                lock = jobfolder.acquire(out_dir, processes=procs.count)
            except jobfolder.JobLockedError as e:
                failure = str(e)
            except OSError as e:
                failure = f"cannot write the output folder {out_dir}: {e.strerror or e}"
            if lock is not None:
                _prepare_folder(out_dir, lock, manifest, order)
        failure = procs.from_first("folder", failure)
        if failure:
            raise UsageError(failure)
        procs.barrier("folder")
        yield
    except UsageError:
        if created:  # nothing of this job may stay in a folder it made
            with contextlib.suppress(OSError):
                if lock is not None:
                    lock.release()
                    (out_dir / jobfolder.MANIFEST_NAME).unlink(missing_ok=True)
                out_dir.rmdir()  # only when empty: results written before the failure stay
        raise
    finally:
        if lock is not None:
            lock.release()


def _prepare_folder(out_dir: Path, lock: jobfolder.JobLock, manifest: Path | None, order: list[str]) -> None:
    from valle_jax.fileio import atomic_write

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    if lock.stale:
        say(f"note: {jobfolder.describe_stale(lock.stale)}")
    removed = jobfolder.remove_stale_temp_files(out_dir)
    if removed:
        say(f"note: removed {len(removed)} temporary file(s) of a killed run: {', '.join(removed[:5])}")
    jobfolder.compact(out_dir, order)
    copy = out_dir / jobfolder.MANIFEST_NAME
    if manifest is not None and not (copy.exists() and copy.samefile(manifest)):
        data = manifest.read_bytes()
        atomic_write(copy, lambda f: f.write(data))


def set_up(args: argparse.Namespace, settings: Any) -> tuple[Any, Any]:
    """The job's Synthesizer (on this process's devices) and its started codec sidecar; UsageError (exit 2)
    when they cannot be had."""
    from valle_jax.codec import CodecError, MissingWeightsError, WeightsChecksumError
    from valle_jax.config import ConfigError
    from valle_jax.convert import CheckpointError
    from valle_jax.parallel import synthesis_mesh
    from valle_jax.pipeline import Synthesizer, load_models

    try:
        models = load_models(args.checkpoint, args.nar_checkpoint, dtype=args.dtype, attention=args.attention, heads=args.heads)
        codec = open_codec(args, args.codec or models.codec)
        syn = Synthesizer(models, settings, codec, mesh=synthesis_mesh(args.devices))
    except (ConfigError, CheckpointError, MissingWeightsError, WeightsChecksumError) as e:
        raise UsageError(str(e)) from None
    try:
        codec.start()
    except CodecError as e:
        codec.close()
        raise UsageError(f"the codec sidecar did not start: {e}") from None
    return syn, codec


def synthesize_share(args: argparse.Namespace, settings: Any, entries: list[Entry], out_dir: Path,
                     writer: jobfolder.ResultsWriter, procs: Processes) -> dict[str, Any]:  # fmt: skip
    """Synthesize this process's entries: every one ends with a results line (ok, or error with its kind)."""
    from tqdm import tqdm

    from valle_jax.codec import CodecError, write_wav
    from valle_jax.pipeline import PERMANENT, TRANSIENT, ItemError, error_kind

    counts: dict[str, Any] = {"ok": 0, "error": 0, "transient": 0, "audio_seconds": 0.0}
    lines = {e.id: e.line for e in entries}

    def record(rec: dict) -> None:
        writer.append({**rec, "line": lines[rec["id"]], **({"process": procs.index} if procs.count > 1 else {})})
        if rec["status"] == "ok":
            counts["ok"] += 1
        else:
            counts["error"] += 1
            counts["transient"] += rec["kind"] == TRANSIENT

    checked = [(e, precheck(e, settings)) for e in entries]
    valid = [e for e, error in checked if error is None]
    syn, codec = set_up(args, settings) if valid else (None, None)  # before anything is written: a failure leaves nothing
    for e, error in checked:
        if error is not None:
            record({"id": e.id, "status": "error", "error": error, "kind": PERMANENT})
    if codec is None:
        return counts
    with codec:
        requests = []
        for e in tqdm(valid, desc="prepare", unit="item", disable=args.quiet):
            try:
                requests.append(syn.request(e.id, e.item))
            except (ItemError, CodecError) as err:
                record({"id": e.id, "status": "error", "error": str(err), "kind": error_kind(err)})
        pending = {r.id for r in requests}
        try:
            for out in syn.run(requests, progress=not args.quiet):
                pending.discard(out.id)
                if out.error:
                    record({"id": out.id, "status": "error", "error": out.error, "kind": out.error_kind or PERMANENT})
                    continue
                write_wav(out_dir / f"{out.id}.wav", out.audio, codec.sample_rate)  # atomic: temp name, then rename
                counts["audio_seconds"] += out.seconds
                record({"id": out.id, "status": "ok", "seconds": out.seconds, "lines": len(out.codes), "wall_s": out.wall_s})
        except Exception as err:  # out of memory: the items not finished are transient errors; anything else is a bug
            if error_kind(err) != TRANSIENT:
                raise
            first_line = (str(err).strip().splitlines() or [""])[0]
            for r in requests:
                if r.id in pending:
                    record({"id": r.id, "status": "error", "error": f"synthesis stopped: {type(err).__name__}: {first_line}",
                            "kind": TRANSIENT})  # fmt: skip
    counts["audio_seconds"] = round(counts["audio_seconds"], 3)
    return counts


def run_job(args: argparse.Namespace, entries: list[Entry], out_dir: Path, procs: Processes | None = None,
            manifest: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the job in out_dir on this process's share of the ids still to do; returns this run's
    counts and, under "job", the state of every id of the manifest after it."""
    procs = procs or Processes()
    settings = settings_from_args(args)
    order = [e.id for e in entries]
    t0 = time.perf_counter()
    with job_folder(out_dir, procs, manifest, order):
        state = jobfolder.job_state(out_dir)
        todo = [e for e in entries if not jobfolder.is_done(state.get(e.id), out_dir, args.retry_errors)]
        mine = todo[procs.index :: procs.count]
        writer = jobfolder.ResultsWriter(jobfolder.part_path(out_dir, procs.index, procs.count))
        counts = synthesize_share(args, settings, mine, out_dir, writer, procs)
        procs.barrier("synthesized")
        if procs.index == 0:
            jobfolder.compact(out_dir, order)
        procs.barrier("compacted")
    job = jobfolder.tally(jobfolder.job_state(out_dir), order, out_dir)
    return {**counts, "skipped": len(entries) - len(todo), "seconds": round(time.perf_counter() - t0, 3), "job": job}


def evaluator_for(args: argparse.Namespace):
    """The evaluator of `--evaluate` (models resolved and hash-checked now, started later); UsageError."""
    from valle_jax.evaluate import EvalSettings, Evaluator, MissingModelError, ModelChecksumError

    settings = EvalSettings(asr_model=args.asr_model, sim_model=args.sim_model, sim_weights=args.sim_weights,
                            device=args.eval_device, progress=not args.quiet)  # fmt: skip
    try:
        return Evaluator(settings)
    except (MissingModelError, ModelChecksumError, ValueError) as e:
        raise UsageError(f"--evaluate: {e}") from None


def evaluate_job(args: argparse.Namespace, evaluator: Any, out_dir: Path) -> dict | None:
    """Evaluate the finished job into --eval-out (default OUT/eval); the summary, or None when it failed."""
    from valle_jax.evaluate import EvaluatorError, ItemsError, evaluate_items, load_job

    eval_out = Path(args.eval_out) if args.eval_out else out_dir / "eval"
    try:
        with evaluator:
            summary = evaluate_items(load_job(out_dir), eval_out, evaluator.settings, evaluator=evaluator,
                                     source=f"job {out_dir}", say=lambda m: print(m, file=sys.stderr))  # fmt: skip
    except (ItemsError, EvaluatorError, OSError) as e:
        print(f"error: the evaluation did not finish: {e}", file=sys.stderr)
        return None
    return {k: summary[k] for k in ("n", "n_items", "n_errors", "wer_mean", "cer_mean", "sim_mean")} | {"out": str(eval_out)}


def main(argv: list[str] | None = None) -> int:
    from valle_jax.codec import share_gpu_with_codec

    args = build_parser().parse_args(argv)
    share_gpu_with_codec(args.codec_device)  # before JAX takes the GPU: the codec sidecar may need room on it
    try:
        if bool(args.manifest) == bool(args.text):
            raise UsageError("give either --manifest (a job) or --text (one utterance)")
        if args.text and args.evaluate:
            raise UsageError("--evaluate goes with --manifest (evaluate one file with python -m valle_jax.evaluate --items)")
        if args.manifest:
            return job_main(args)
        return one_utterance(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def job_main(args: argparse.Namespace) -> int:
    manifest = Path(args.manifest)
    entries = read_manifest(manifest)
    settings_from_args(args)  # bad flags are refused before anything else
    procs = Processes.start(args)
    evaluator = evaluator_for(args) if args.evaluate and procs.index == 0 else None
    out_dir = Path(args.out)
    counts = run_job(args, entries, out_dir, procs, manifest)
    procs.shutdown()  # the processes are done with each other; process 0 may evaluate alone
    job = counts["job"]
    status = 0 if job["ok"] == len(entries) else 3
    if evaluator is not None:
        counts["evaluation"] = evaluate_job(args, evaluator, out_dir)
        status = 3 if counts["evaluation"] is None else status
    print(json.dumps({"out": str(out_dir), "process": procs.index, **counts}))
    return status


def one_utterance(args: argparse.Namespace) -> int:
    """`--text ... --out x.wav`: a job of one item in a work folder beside the output, then renamed."""
    out = Path(args.out)
    if out.suffix.lower() != ".wav":
        raise UsageError(f"--out {out}: expected a .wav path for --text")
    item = {"id": out.stem if SAFE_ID.fullmatch(out.stem) else "utterance", "text": args.text}
    if args.prompt:
        item["prompt"] = args.prompt
    work = out.parent / f".{out.name}.work"
    shutil.rmtree(work, ignore_errors=True)
    try:
        counts = run_job(args, [Entry(item["id"], 1, item)], work)
        result = jobfolder.job_state(work).get(item["id"])
        if counts["job"]["ok"] != 1:
            print(f"error: {result.get('error') if result else 'nothing synthesized'}", file=sys.stderr)
            return 3
        (work / f"{item['id']}.wav").replace(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({"out": str(out), **counts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
