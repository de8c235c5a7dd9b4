"""`python -m valle_jax.prepare`: make a training dataset (ArrayRecord shards + metadata) for valle_jax.

    # audio + transcripts: a LibriTTS-style tree (speaker/chapter/utt.wav|flac + utt.normalized.txt|utt.txt)
    # or a .csv / .jsonl manifest (id, audio, text, speaker, optional language)
    python -m valle_jax.prepare audio SRC OUT [--codec encodec|vocos|dac] [--codec-weights PATH]
                                              [--random-codec SEED] [--tokenizer bpe|naive] [--language en]
                                              [--eval-fraction 0.02] [--min-duration 0.5] [--max-duration 20]
                                              [--workers N] [--shard-size 512]
    # the reference's quantised data: a data.h5 file, or a training/ folder with data/{group}/{speaker}/*.enc
    # and metadata/{group}/{speaker}.json; nothing is re-encoded
    python -m valle_jax.prepare reference SRC OUT [--codec ...] [--tokenizer bpe|naive] [--text-ids keep|retokenize]
    # a demo corpus spoken by espeak-ng in several voices, then prepared as above
    python -m valle_jax.prepare demo OUT [--sentences 300] [--speakers 4]

Reruns resume: ids already in OUT (finished or rejected) are skipped; `--retry-rejected` tries the rejected
ones again.  Skipped inputs are listed with their reason in OUT/rejected.jsonl.  Train with data.path=OUT.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _common(p: argparse.ArgumentParser, codec_default: str | None = "encodec") -> None:
    p.add_argument("--tokenizer", choices=("bpe", "naive"), default="bpe",
                   help="bpe: tokenizer.json of the llama releases (default); naive: the retnet release's")
    p.add_argument("--language", default="en", help="espeak-ng language for transcripts without one (default en)")
    p.add_argument("--eval-fraction", type=float, default=0.02, help="held-out share for the eval split (0.02)")
    p.add_argument("--min-duration", type=float, default=0.5, help="seconds; shorter inputs are skipped (0.5)")
    p.add_argument("--max-duration", type=float, default=20.0, help="seconds; longer inputs are skipped (20)")
    p.add_argument("--shard-size", type=int, default=512, help="utterances per ArrayRecord shard (512)")
    p.add_argument("--retry-rejected", action="store_true", help="try inputs rejected by an earlier run again")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--codec", choices=("encodec", "vocos", "dac"), default=codec_default,
                   help="encodec/vocos: EnCodec 24 kHz codes (8 levels); dac: DAC 44.1 kHz (9 levels)")


def _codec_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--codec-weights", default=None,
                   help="the encoder's weights file (EnCodec .th or DAC .pth); default: the usual cache folders")
    p.add_argument("--random-codec", type=int, default=None, metavar="SEED",
                   help="encode with a SEEDED RANDOM codec (pipeline tests only; never a fallback)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes reading audio and phonemizing (default: all cores; 0 = none)")
    p.add_argument("--device", default="cpu", help="torch device of the codec sidecar (cpu, cuda)")
    p.add_argument("--codec-batch", type=int, default=16, help="clips per codec request (16)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m valle_jax.prepare", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)  # fmt: skip
    ap.add_argument("-v", "--verbose", action="store_true", help="log every skipped input")
    sub = ap.add_subparsers(dest="command", required=True)

    a = sub.add_parser("audio", help="audio + transcripts (tree or manifest) -> dataset")
    a.add_argument("src", help="a LibriTTS-style folder, or a .csv / .jsonl manifest")
    a.add_argument("out", help="dataset folder (created or resumed)")
    _common(a)
    _codec_args(a)

    r = sub.add_parser("reference", help="import the reference's .enc/.dac files or data.h5 without re-encoding")
    r.add_argument("src", help="data.h5, or a folder with data/{group}/{speaker}/{id}.enc (+ metadata/)")
    r.add_argument("out", help="dataset folder (created or resumed)")
    _common(r, codec_default=None)
    r.add_argument("--text-ids", choices=("keep", "retokenize"), default="keep",
                   help="data.h5: keep the stored token ids (default) or rebuild them from the phonemes")

    d = sub.add_parser("demo", help="speak a demo corpus with espeak-ng and prepare it")
    d.add_argument("out", help="dataset folder; the audio goes to OUT/source")
    d.add_argument("--sentences", type=int, default=300)
    d.add_argument("--speakers", type=int, default=4, help="espeak-ng voices, 1 to 8 (4)")
    d.add_argument("--seed", type=int, default=0, help="sentence generator seed")
    d.add_argument("--tokenizer", choices=("bpe", "naive"), default="bpe")
    d.add_argument("--eval-fraction", type=float, default=0.05)
    d.add_argument("--codec", choices=("encodec", "vocos"), default="encodec")
    d.add_argument("--shard-size", type=int, default=512)
    d.add_argument("--no-progress", action="store_true")
    _codec_args(d)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")  # fmt: skip
    from valle_jax.data.prepare import AudioLimits, PrepareError
    from valle_jax.data.records import DatasetError

    try:
        if args.command == "audio":
            from valle_jax.data.prepare import prepare_audio

            summary = prepare_audio(
                args.src, args.out, codec=args.codec, codec_weights=args.codec_weights, random_codec=args.random_codec,
                tokenizer=args.tokenizer, language=args.language, eval_fraction=args.eval_fraction,
                limits=AudioLimits(args.min_duration, args.max_duration), workers=args.workers,
                shard_size=args.shard_size, codec_batch=args.codec_batch, device=args.device,
                retry_rejected=args.retry_rejected, progress=not args.no_progress,
            )  # fmt: skip
        elif args.command == "reference":
            from valle_jax.data.reference import import_reference

            summary = import_reference(
                args.src, args.out, codec=args.codec, tokenizer=args.tokenizer, language=args.language,
                eval_fraction=args.eval_fraction, limits=AudioLimits(args.min_duration, args.max_duration),
                shard_size=args.shard_size, text_ids=args.text_ids, retry_rejected=args.retry_rejected,
                progress=not args.no_progress,
            )  # fmt: skip
        else:
            from valle_jax.data.demo import make_demo

            summary = make_demo(
                args.out, sentences=args.sentences, speakers=args.speakers, seed=args.seed, codec=args.codec,
                codec_weights=args.codec_weights, random_codec=args.random_codec, tokenizer=args.tokenizer,
                eval_fraction=args.eval_fraction, workers=args.workers, shard_size=args.shard_size,
                progress=not args.no_progress,
            )  # fmt: skip
    except (PrepareError, DatasetError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
    print(json.dumps(summary, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
