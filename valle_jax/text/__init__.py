"""Text front end: text -> espeak-ng IPA phonemes -> phoneme token ids (spec section 8.1-8.2).

    >>> fe = TextFrontEnd("bpe", "en")
    >>> fe.ids("Hello world.\\nSecond line!")   # one id list per non-blank line
"""

from __future__ import annotations

from .phonemize import (
    ESPEAK_INSTALL_COMMAND,
    EspeakNotFoundError,
    FrontEndError,
    UnsupportedLanguageError,
    clear_backend_cache,
    espeak_available,
    espeak_language,
    get_backend,
    phonemize,
    split_lines,
)
from .tokenizer import (
    BOS_ID,
    EOS_ID,
    NAIVE_VOCAB,
    BPETokenizer,
    NaiveTokenizer,
    bpe_tokenizer_path,
    encode,
    get_tokenizer,
)

__all__ = [
    "BOS_ID",
    "EOS_ID",
    "ESPEAK_INSTALL_COMMAND",
    "NAIVE_VOCAB",
    "BPETokenizer",
    "EspeakNotFoundError",
    "FrontEndError",
    "NaiveTokenizer",
    "TextFrontEnd",
    "UnsupportedLanguageError",
    "bpe_tokenizer_path",
    "clear_backend_cache",
    "encode",
    "espeak_available",
    "espeak_language",
    "get_backend",
    "get_tokenizer",
    "phonemize",
    "split_lines",
]


class TextFrontEnd:
    """Text to token ids the way the reference's `TTS.inference` does it, one id list per line.

    `tokenizer`: "bpe" (llama releases, `tokenizer.json`) or "naive" (retnet release).
    `language`: a language code for espeak-ng ("en" means "en-us").
    """

    def __init__(self, tokenizer: str = "bpe", language: str = "en"):
        self.tokenizer_kind = tokenizer
        self.tokenizer = get_tokenizer(tokenizer)
        self.language = language
        espeak_language(language)  # reject e.g. Japanese early; espeak itself is checked on first use

    def phonemes(self, text: str) -> list[str]:
        """Phoneme string of each non-blank line of `text`."""
        return [phonemize(line, self.language) for line in split_lines(text)]

    def ids(self, text: str) -> list[list[int]]:
        """Token ids (wrapped in 1 ... 2) of each non-blank line of `text`."""
        return [self.tokenizer.encode(p) for p in self.phonemes(text)]
