"""A demo corpus made on the spot: espeak-ng speaks generated sentences in several voices, then the normal
preparation (prepare.prepare_audio) turns it into a dataset.

    make_demo("data/demo", sentences=300, speakers=4)

The speakers are espeak-ng voices with different variants, pitches and speeds (`espeak-ng -v en-us+m3
-p 40 -s 150 -w out.wav "text"`); the sentences come from a small seeded grammar, so the same arguments
give the same corpus.  The audio lies under OUT/source as a LibriTTS-style tree
(`speaker/chapter/utt.wav` + `utt.normalized.txt`); the dataset is OUT itself.  Real EnCodec weights are
used when they are installed; otherwise the seeded random EnCodec is used and the output and metadata say so.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

from .prepare import AudioLimits, PrepareError, banner, prepare_audio

__all__ = ["DEMO_VOICES", "demo_sentences", "make_demo", "speak"]

# (name, espeak voice+variant, pitch 0-99, words per minute)
DEMO_VOICES = [
    ("us_m3", "en-us+m3", 40, 150),
    ("us_f2", "en-us+f2", 70, 165),
    ("gb_m1", "en-gb+m1", 50, 140),
    ("us_f4", "en-us+f4", 60, 175),
    ("rp_m7", "en-gb-x-rp+m7", 30, 130),
    ("sc_f1", "en-gb-scotland+f1", 55, 155),
    ("us_m5", "en-us+m5", 25, 145),
    ("gb_f3", "en-gb+f3", 65, 160),
]

_SUBJECTS = ["the old farmer", "a young girl", "my neighbour", "the tall soldier", "our teacher", "the quiet child",
             "a tired traveller", "the baker", "his sister", "the captain", "a clever fox", "the little bird"]
_VERBS = ["found", "carried", "painted", "opened", "watched", "remembered", "followed", "cleaned", "sold", "built",
          "described", "noticed"]
_OBJECTS = ["a wooden box", "the green door", "an empty bottle", "the heavy basket", "a small boat", "the silver key",
            "a bright lamp", "the broken chair", "a warm blanket", "the narrow bridge", "a long letter", "the red apple"]
_PLACES = ["near the river", "in the garden", "under the bridge", "at the station", "behind the house",
           "in the morning", "before dinner", "after the storm", "on the hill", "by the window"]
_ENDINGS = ["and smiled", "without a word", "with great care", "very slowly", "for the first time", "once again"]
_QUESTIONS = ["did you see", "who painted", "where is", "why did they move", "have you ever seen"]  # fmt: skip


def demo_sentences(n: int, seed: int = 0) -> list[str]:
    """`n` distinct sentences of about four to sixteen words from a seeded grammar."""
    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        form = rng.random()
        if form < 0.15:
            s = f"{rng.choice(_QUESTIONS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}?"
        elif form < 0.5:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        elif form < 0.8:
            s = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}."
        else:
            s = (f"{rng.choice(_PLACES)}, {rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                 f"{rng.choice(_ENDINGS)}.")  # fmt: skip
        s = s[0].upper() + s[1:]
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def espeak_binary() -> str:
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        from valle_jax.text import ESPEAK_INSTALL_COMMAND

        raise PrepareError(f"the espeak-ng program is not installed; install it with: {ESPEAK_INSTALL_COMMAND}")
    return exe


def speak(text: str, path: str | os.PathLike, voice: str = "en-us", pitch: int = 50, speed: int = 160) -> Path:
    """espeak-ng speaks `text` into the wav file `path` (written under a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    cmd = [espeak_binary(), "-v", voice, "-p", str(pitch), "-s", str(speed), "-w", str(tmp), text]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0 or not tmp.is_file():
        raise PrepareError(f"espeak-ng failed for voice {voice!r}: {res.stderr.strip() or res.returncode}")
    os.replace(tmp, path)
    return path


def make_demo(
    out: str | os.PathLike,
    *,
    sentences: int = 300,
    speakers: int = 4,
    seed: int = 0,
    codec: str = "encodec",
    codec_weights: str | None = None,
    random_codec: int | None = None,
    tokenizer: str = "bpe",
    eval_fraction: float = 0.05,
    workers: int | None = None,
    shard_size: int = 512,
    progress: bool = True,
    say: Callable[[str], None] | None = None,
) -> dict:
    """Speak `sentences` sentences spread over `speakers` voices into OUT/source, then prepare OUT.
    `random_codec=None` uses the real codec weights when they are installed and the seeded random EnCodec
    (seed 0) otherwise, loudly."""
    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    if not 1 <= speakers <= len(DEMO_VOICES):
        raise PrepareError(f"--speakers must be between 1 and {len(DEMO_VOICES)}")
    if sentences < 1:
        raise PrepareError("--sentences must be >= 1")
    out = Path(out)
    src = out / "source"
    texts = demo_sentences(sentences, seed)
    jobs = []
    for i, text in enumerate(texts):
        name, voice, pitch, speed = DEMO_VOICES[i % speakers]
        chapter = "c0"
        uid = f"{name}_{chapter}_{i:06d}"
        wav = src / name / chapter / f"{uid}.wav"
        txt = wav.with_name(f"{uid}.normalized.txt")
        jobs.append((text, wav, txt, voice, pitch, speed))
    todo = [j for j in jobs if not (j[1].is_file() and j[2].is_file())]
    say(f"demo: espeak-ng speaks {len(todo)} of {len(jobs)} sentences in {speakers} voices into {src}")
    espeak_binary()

    def one(job) -> None:
        text, wav, txt, voice, pitch, speed = job
        speak(text, wav, voice, pitch, speed)
        txt.write_text(text + "\n", encoding="utf-8")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        list(pool.map(one, todo))

    if random_codec is None and codec != "dac":
        from valle_jax.codec import MissingWeightsError
        from valle_jax.codec.weights import resolve_encodec

        try:
            resolve_encodec(codec_weights)
        except MissingWeightsError as e:
            random_codec = 0
            banner(f"real EnCodec weights are missing ({e}).\n!! The demo corpus is encoded with the SEEDED RANDOM "
                   "EnCodec (seed 0) instead: fine for exercising training, useless for real voices.", say)  # fmt: skip
    summary = prepare_audio(src, out, codec=codec, codec_weights=codec_weights, random_codec=random_codec,
                            tokenizer=tokenizer, eval_fraction=eval_fraction,
                            limits=AudioLimits(min_duration=0.3, max_duration=30.0), workers=workers,
                            shard_size=shard_size, progress=progress, say=say)  # fmt: skip
    say(f"demo: dataset ready in {out}; train with  data.path={out}")
    return summary
