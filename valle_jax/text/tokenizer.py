"""Phoneme tokenizers of the reference (spec 8.2): the BPE file of the llama releases and the naive one.

* `BPETokenizer`: `tokenizer.json` (shipped in this package, unchanged from the reference's `data/`),
  loaded with the `tokenizers` library. It has no normaliser and no pre-tokeniser, so the whole phoneme
  string, spaces included, is one BPE piece; characters outside the vocabulary become `<unk>` = 0, as in
  the reference. Its post-processor wraps every encoding as 1 ... 2. All ids are below 256.
* `NaiveTokenizer`: the fixed 229-entry symbol table the retnet release used (`tokenizer: naive`).
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Mapping, Sequence

from .phonemize import FrontEndError

TOKENIZER_FILE = "tokenizer.json"
BOS_ID = 1
EOS_ID = 2

# Stress and length marks the naive tokenizer glues to the symbol before them.
NAIVE_MODIFIERS = ("\u02c8", "\u02cc", "\u02d0")  # ˈ primary stress, ˌ secondary stress, ː long

# The reference's NaiveTokenizer table, symbol -> id, in its own order. Ids run 1..228 and "p" shares 7
# with "?", hence 229 entries. Combining marks are written as escapes: \u0329 syllabic, \u0303 tilde,
# \u031e lowered.
NAIVE_VOCAB: Mapping[str, int] = {
    "<s>": 1, "</s>": 2, " ": 3, ".": 4, ",": 5, "!": 6, "?": 7, "p": 7,
    "iː": 8, "ɚ": 9, "ˌ": 10, "dˌ": 11, "mˌ": 12, "d": 13, "ɹ": 14, "tˈ": 15,
    "pˌ": 16, "uː": 17, "l": 18, "æ": 19, "ɛ": 20, "ɪ": 21, "j": 22, "ʊ": 23,
    "t": 24, "n": 25, "v": 26, "a": 27, "o": 28, "ŋ": 29, "w": 30, "ʌ": 31,
    "hˈ": 32, "ɡˈ": 33, "ə": 34, "θˈ": 35, "dˈ": 36, "wˌ": 37, "h": 38, "z": 39,
    "k": 40, "ð": 41, "ɡˌ": 42, "ˈ": 43, "fˈ": 44, "i": 45, "s": 46, "ʃ": 47,
    "wˈ": 48, "ðˈ": 49, "ɹˈ": 50, "lˈ": 51, "ɡ": 52, "oː": 53, "mˈ": 54, "e": 55,
    "ɑː": 56, "nˈ": 57, "m": 58, "θˌ": 59, "sˈ": 60, "f": 61, "ɔː": 62, "hˌ": 63,
    "b": 64, "jˈ": 65, "ɐ": 66, "ʒˈ": 67, "θ": 68, "bˈ": 69, "ɾ": 70, "ɜː": 71,
    "ʌˈ": 72, "ʃˌ": 73, "bˌ": 74, "kˈ": 75, "ɔ": 76, "zˈ": 77, "ᵻ": 78, "kˌ": 79,
    "vˈ": 80, "fˌ": 81, "ʒ": 82, "ʃˈ": 83, "ɹˌ": 84, "tˌ": 85, "pˈ": 86, "ðˌ": 87,
    "sˌ": 88, "nˌ": 89, "lˌ": 90, "\u0329": 91, "ʔ": 92, "vˌ": 93, "ɪˈ": 94, "\"": 95,
    "ɪˌ": 96, "ʒˌ": 97, "uːˌ": 98, "ʊˈ": 99, "jˌ": 100, "uːˈ": 101, "iːˈ": 102, "zˌ": 103,
    ".ˈ": 104, "…": 105, "ŋˌ": 106, "ɐˌ": 107, "—ˈ": 108, "iˌ": 109, "iːˌ": 110, "ɛː": 111,
    ")": 112, ")ˈ": 113, "(": 114, "u": 115, "-": 116, "ɖˈ": 117, "iˈ": 118, "ʰˈ": 119,
    "ɟˈ": 120, "\u0303": 121, "eː": 122, "ɾˈ": 123, "r": 124, "ʰ": 125, "-ˌ": 126, "ɫ": 127,
    "q": 128, "—": 129, "ʊˌ": 130, "aː": 131, "cˈ": 132, "…ˈ": 133, "c": 134, "ɳ": 135,
    "ɐˈ": 136, "x": 137, "ʔˌ": 138, ".ˌ": 139, "ɑ": 140, "?ˈ": 141, "\u0329ˈ": 142, "\"ˈ": 143,
    ",ˈ": 144, "ŋˈ": 145, "əˌ": 146, "!ˈ": 147, "\"ˌ": 148, "?ˌ": 149, ",ˌ": 150, "—ˌ": 151,
    "\u0329ˌ": 152, "əˈ": 153, "!ˌ": 154, "ɬ": 155, "ʲ": 156, "¡": 157, "ɯ": 158, "qˌ": 159,
    "ʑ": 160, "ʑˈ": 161, "¿": 162, "ɑːˈ": 163, "iːː": 164, "ɛˈ": 165, "¡ˈ": 166, "æˈ": 167,
    "ç": 168, "ɾˌ": 169, "ᵻˈ": 170, "xˈ": 171, "ɔːˈ": 172, ";": 173, "ɬˌ": 174, ":": 175,
    "ʔˈ": 176, "ɑːˌ": 177, "ɬˈ": 178, "”": 179, "“": 180, "“ˈ": 181, "“ˌ": 182, ";ˈ": 183,
    ";ˌ": 184, ":ˈ": 185, "1": 186, "rˈ": 187, "qˈ": 188, "ᵻˌ": 189, "ä": 190, "\u031eˌ": 191,
    "\u031e": 192, "ũˌ": 193, "ʑˌ": 194, "ᵝ": 195, "ɽ": 196, "ʲˌ": 197, "ᵝˌ": 198, "ũ": 199,
    "ũˈ": 200, "äˌ": 201, "ɕ": 202, "ɕˌ": 203, "ɽˌ": 204, "çˌ": 205, "…ˌ": 206, "\u031eˈ": 207,
    "äˈ": 208, "ɽˈ": 209, "ɸˌ": 210, "ɴ": 211, "ɸˈ": 212, "ɕˈ": 213, "ɸ": 214, "ᵝˈ": 215,
    "ʲˈ": 216, "ĩ": 217, "çˈ": 218, "ĩˌ": 219, "oˌ": 220, "eˈ": 221, "ʍ": 222, "eˌ": 223,
    "uˌ": 224, "ʍˌ": 225, "uˈ": 226, "oˈ": 227, "aˈ": 228,
}


def bpe_tokenizer_path() -> Path:
    """Path of the packaged `tokenizer.json`."""
    return Path(str(resources.files(__package__).joinpath(TOKENIZER_FILE)))


class BPETokenizer:
    """The llama releases' phoneme BPE (`tokenizers.Tokenizer.from_file`)."""

    def __init__(self, path: str | Path | None = None):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise FrontEndError(f"the 'tokenizers' package is required: pip install tokenizers ({e})") from e
        self.path = Path(path) if path is not None else bpe_tokenizer_path()
        if not self.path.is_file():
            raise FrontEndError(f"tokenizer file not found: {self.path}")
        self._tok = Tokenizer.from_file(str(self.path))

    def encode(self, phonemes: str) -> list[int]:
        """`[1] + ids + [2]` for a phoneme string (special tokens come from the file's post-processor)."""
        if not isinstance(phonemes, str):
            raise TypeError(f"phonemes must be a str, got {type(phonemes).__name__}")
        return list(self._tok.encode(phonemes).ids)

    def tokens(self, phonemes: str) -> list[str]:
        """The token strings of `encode` (for inspection)."""
        return list(self._tok.encode(phonemes).tokens)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._tok.get_vocab(with_added_tokens=True))

    @property
    def vocab_size(self) -> int:
        """Number of distinct ids (256: the 265 entries share some ids)."""
        return len(set(self.get_vocab().values()))


class NaiveTokenizer:
    """Character tokenizer with the reference's fixed table; marks ˈ ˌ ː join the symbol before them.

    Rules (reproducing the reference's output exactly):
    * the string is cut into single characters, and every ˈ, ˌ or ː that is not the first character is
      appended to the piece before it (so "nˌɑːt" -> "nˌ", "ɑː", "t"; a leading mark stays alone);
    * a space becomes two " " tokens, except a space directly followed by a mark: it gives one " "
      token and the mark then stands alone (" ˈæ" -> " ", "ˈ", "æ"). This is an artefact of the
      reference's join/split on spaces, kept so ids match;
    * the result is wrapped as `<s>` ... `</s>` (1 ... 2). An empty string gives [1, 3, 2].
    Symbols missing from the table raise `FrontEndError` (the reference would crash later on None).
    """

    def __init__(self, vocab: Mapping[str, int] | None = None):
        self.vocab: dict[str, int] = dict(NAIVE_VOCAB if vocab is None else vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    @staticmethod
    def pieces(phonemes: str) -> list[str]:
        """The symbols `encode` looks up, without `<s>`/`</s>`."""
        if not isinstance(phonemes, str):
            raise TypeError(f"phonemes must be a str, got {type(phonemes).__name__}")
        # Put a boundary between neighbouring characters unless the right one is a mark; spaces in the
        # text and boundaries are then the same character, and the empty fields between them are spaces.
        parts: list[str] = []
        for i, ch in enumerate(phonemes):
            if i > 0 and ch not in NAIVE_MODIFIERS:
                parts.append(" ")
            parts.append(ch)
        return [field if field else " " for field in "".join(parts).split(" ")]

    def encode(self, phonemes: str) -> list[int]:
        ids = [self.vocab["<s>"]]
        for pos, piece in enumerate(self.pieces(phonemes)):
            idx = self.vocab.get(piece)
            if idx is None:
                raise FrontEndError(
                    f"naive tokenizer: symbol {piece!r} "
                    f"({' '.join(f'U+{ord(c):04X}' for c in piece)}) at piece {pos} of {phonemes!r} "
                    "is not in its vocabulary"
                )
            ids.append(idx)
        ids.append(self.vocab["</s>"])
        return ids


@lru_cache(maxsize=None)
def _cached(kind: str):
    return BPETokenizer() if kind == "bpe" else NaiveTokenizer()


def get_tokenizer(kind: str = "bpe"):
    """A shared tokenizer: "bpe" (llama releases, the default) or "naive" (retnet release)."""
    if kind not in ("bpe", "naive"):
        raise ValueError(f"unknown tokenizer {kind!r}: expected 'bpe' or 'naive'")
    return _cached(kind)


def encode(phonemes: str, kind: str = "bpe") -> list[int]:
    """Token ids of a phoneme string with the BPE (default) or naive tokenizer, wrapped in 1 ... 2."""
    return get_tokenizer(kind).encode(phonemes)
