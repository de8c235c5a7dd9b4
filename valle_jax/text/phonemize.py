"""Grapheme-to-phoneme conversion with espeak-ng, set up like the reference (spec 8.1).

The reference runs the `phonemizer` package's espeak backend with punctuation and stress kept, strips
each result, and joins phones with the default separator (no phone separator, words split by one
space). "en" becomes "en-us"; every other code goes to espeak unchanged. One backend is built per
language and reused.

`TTS.inference` of the reference splits its input on newlines and speaks each line on its own;
`split_lines` gives those lines, and `phonemize` handles one of them.

espeak-ng is a system package, not a Python one: `apt-get install -y espeak-ng`.
"""

from __future__ import annotations

import threading
from typing import Any

ESPEAK_INSTALL_COMMAND = "apt-get install -y espeak-ng"

# phonemizer options the reference uses (spec 8.1); everything else is phonemizer's default.
_BACKEND_NAME = "espeak"
_PRESERVE_PUNCTUATION = True
_WITH_STRESS = True
_STRIP = True


class FrontEndError(RuntimeError):
    """The text front end cannot turn this input into phonemes or token ids."""


class EspeakNotFoundError(FrontEndError):
    """The espeak-ng shared library cannot be found or loaded."""


class UnsupportedLanguageError(FrontEndError, ValueError):
    """espeak-ng (or this port) has no voice for the requested language."""


_backends: dict[str, Any] = {}
_lock = threading.Lock()


def espeak_language(language: str) -> str:
    """The espeak voice the reference would use for `language` ("en" -> "en-us", others unchanged)."""
    if not isinstance(language, str) or not language:
        raise UnsupportedLanguageError(f"language must be a non-empty string, got {language!r}")
    if language.lower().startswith("ja"):
        # The reference first converts Japanese to hiragana with pykakasi; that step is not ported.
        raise UnsupportedLanguageError(
            f"language {language!r}: Japanese is not supported by this port "
            "(the reference converts it to kana with pykakasi first, which is not implemented here)"
        )
    return "en-us" if language == "en" else language


def _missing_espeak(detail: str = "") -> EspeakNotFoundError:
    why = f" ({detail})" if detail else ""
    return EspeakNotFoundError(
        f"espeak-ng was not found{why}. The phonemizer needs the espeak-ng system library; "
        f"install it with: {ESPEAK_INSTALL_COMMAND}  (on Debian/Ubuntu, run apt-get update first if needed)"
    )


def espeak_available() -> bool:
    """True when phonemizer can load the espeak(-ng) shared library."""
    from phonemizer.backend.espeak.espeak import EspeakBackend

    try:
        return bool(EspeakBackend.is_available())
    except (OSError, RuntimeError):
        return False


def _make_backend(voice: str) -> Any:
    try:
        from phonemizer.backend.espeak.espeak import EspeakBackend
    except ImportError as e:  # the Python package itself is missing
        raise FrontEndError(f"the 'phonemizer' Python package is required: pip install phonemizer ({e})") from e

    if not espeak_available():
        raise _missing_espeak("phonemizer could not load the espeak shared library")
    try:
        supported = EspeakBackend.supported_languages()
    except (OSError, RuntimeError) as e:
        raise _missing_espeak(str(e)) from e
    if voice not in supported:
        raise UnsupportedLanguageError(
            f"language {voice!r} is not supported by espeak-ng "
            f"({len(supported)} voices are installed, e.g. en-us, de, fr-fr, es)"
        )
    try:
        return EspeakBackend(voice, preserve_punctuation=_PRESERVE_PUNCTUATION, with_stress=_WITH_STRESS)
    except RuntimeError as e:
        raise FrontEndError(f"could not start espeak-ng for language {voice!r}: {e}") from e


def get_backend(language: str = "en") -> Any:
    """The cached phonemizer espeak backend for `language` (built on first use)."""
    voice = espeak_language(language)
    with _lock:
        backend = _backends.get(voice)
        if backend is None:
            backend = _make_backend(voice)
            _backends[voice] = backend
        return backend


def clear_backend_cache() -> None:
    """Forget every cached backend (the next call builds and checks them again)."""
    with _lock:
        _backends.clear()


def phonemize(text: str, language: str = "en") -> str:
    """IPA phonemes of `text` as one string, e.g. 'Hello world.' -> 'həlˈoʊ wˈɜːld.'.

    The text is given to espeak as a single utterance, like the reference's `g2p.encode`; split
    multi-line input with `split_lines` first (as `TTS.inference` does).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    backend = get_backend(language)
    out = backend.phonemize([text], strip=_STRIP)
    if not out:
        # phonemizer drops empty utterances; the reference raises here too.
        raise FrontEndError(f"failed to phonemize, espeak returned nothing for {text!r}")
    return out[0]


def split_lines(text: str) -> list[str]:
    """The lines the reference synthesises one by one: `text` split on "\\n", blank lines dropped.

    A trailing "\\r" (Windows line ending) is removed from each line. Lines are otherwise kept as
    they are (espeak strips surrounding spaces itself).
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    lines = (line[:-1] if line.endswith("\r") else line for line in text.split("\n"))
    return [line for line in lines if line.strip()]
