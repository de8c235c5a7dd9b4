"""Text normalisation for WER/CER, and the edit distances themselves (pure Python, no model).

One English normalisation ("english-v1"), applied to both the reference text and the ASR transcript before
they are compared, so that spelling conventions do not count as errors:

1. Unicode NFKC; curly quotes and dashes made plain; lower case.
2. Common abbreviations spelled out: mr -> mister, mrs -> missus, dr -> doctor, st -> saint (before a
   capitalised name only), vs -> versus, etc -> et cetera; `&` -> and, `%` -> percent, `$N` -> N dollars,
   `£N` -> N pounds, `€N` -> N euros.
3. Numbers spelled out: thousands separators dropped ("1,000" -> 1000); ordinals ("21st" -> twenty first);
   plurals ("1980s" -> nineteen eighties);
   decimals ("3.5" -> three point five); four-digit numbers 1100-1999 and 2010-2099 read as years
   ("1995" -> nineteen ninety five, "2024" -> twenty twenty four); every other integer read in full
   ("2005" -> two thousand five, "110" -> one hundred ten, no "and").
4. Hyphens and every punctuation mark become a space; apostrophes inside words are kept ("don't"),
   others dropped; runs of spaces collapse to one.

Other languages get steps 1 and 4 only (numbers and abbreviations are language specific).

WER = word edits (substitutions + deletions + insertions) / reference words; CER the same over the
characters of the normalised strings, spaces included.  Both can exceed 1 (many insertions).
"""

from __future__ import annotations

import re
import unicodedata

NORMALISATION = "english-v1"

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_WORDS = {
    "one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth", "nine": "ninth",
    "twelve": "twelfth",
}  # fmt: skip
_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "vs": "versus", "etc": "et cetera"}
_PLAIN = str.maketrans({"‘": "'", "’": "'", "ʼ": "'", "“": '"', "”": '"', "–": "-", "—": "-", "‐": "-"})


def number_words(n: int) -> str:
    """An integer >= 0 in English words, without "and": 110 -> "one hundred ten"."""
    if n < 0:
        return "minus " + number_words(-n)
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    if n < 1000:
        hundreds, rest = divmod(n, 100)
        return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_words(rest))
    for scale, name in _SCALES:
        if n >= scale:
            high, rest = divmod(n, scale)
            return number_words(high) + " " + name + ("" if rest == 0 else " " + number_words(rest))
    raise AssertionError("unreachable")


def year_words(n: int) -> str:
    """A year as spoken: 1995 -> "nineteen ninety five", 1900 -> "nineteen hundred", 1905 -> "nineteen oh five"."""
    high, low = divmod(n, 100)
    if low == 0:
        return number_words(high) + " hundred"
    if low < 10:
        return number_words(high) + " oh " + _ONES[low]
    return number_words(high) + " " + number_words(low)


def ordinal_words(n: int) -> str:
    words = number_words(n).split()
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def _plural(words: str) -> str:
    return words[:-1] + "ies" if words.endswith("y") else words + "s"


def _integer_words(digits: str) -> str:
    n = int(digits)
    if len(digits) == 4 and (1100 <= n <= 1999 or 2010 <= n <= 2099):
        return year_words(n)
    if len(digits) > 1 and digits.startswith("0"):  # "007": read digit by digit
        return " ".join(_ONES[int(d)] for d in digits)
    return number_words(n)


def _spell_numbers(text: str) -> str:
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,000,000 -> 1000000
    text = re.sub(r"[$](\d+(?:\.\d+)?)", r"\1 dollars", text)
    text = re.sub(r"£(\d+(?:\.\d+)?)", r"\1 pounds", text)
    text = re.sub(r"€(\d+(?:\.\d+)?)", r"\1 euros", text)
    text = re.sub(r"(\d)\s*%", r"\1 percent", text)
    text = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: " " + ordinal_words(int(m.group(1))) + " ", text)
    text = re.sub(r"\b(\d+)'?s\b", lambda m: " " + _plural(_integer_words(m.group(1))) + " ", text)  # the 1980s
    text = re.sub(
        r"(\d+)\.(\d+)",
        lambda m: f" {_integer_words(m.group(1))} point {' '.join(_ONES[int(d)] for d in m.group(2))} ",
        text,
    )
    return re.sub(r"\d+", lambda m: " " + _integer_words(m.group(0)) + " ", text)


def normalize_text(text: str, language: str = "en") -> str:
    """The normalisation described in the module docstring; returns words separated by single spaces."""
    text = unicodedata.normalize("NFKC", text).translate(_PLAIN)
    english = language.split("-")[0].lower() == "en"
    if english:
        text = re.sub(r"\bSt\.?\s+(?=[A-Z])", "saint ", text)  # "St. John" -> saint; "Main St." stays
        text = text.lower()
        text = re.sub(r"\b(" + "|".join(_ABBREVIATIONS) + r")\b\.?", lambda m: _ABBREVIATIONS[m.group(1)], text)
        text = text.replace("&", " and ")
        text = _spell_numbers(text)
    else:
        text = text.lower()
    text = re.sub(r"[^\w\s']|_", " ", text)  # punctuation and hyphens -> space
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)  # apostrophes only inside words
    return " ".join(text.split())


def edit_distance(ref: list | str, hyp: list | str) -> int:
    """Levenshtein distance (unit costs) between two sequences."""
    if len(ref) < len(hyp):
        ref, hyp = hyp, ref
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        current = [i]
        for j, h in enumerate(hyp, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1]


def error_counts(reference: str, hypothesis: str, language: str = "en") -> dict[str, int]:
    """Word and character edits of `hypothesis` against `reference`, both normalised here.

    Raises ValueError when the reference normalises to nothing (WER would be undefined)."""
    ref, hyp = normalize_text(reference, language), normalize_text(hypothesis, language)
    if not ref:
        raise ValueError(f"the text {reference!r} is empty after normalisation: WER is undefined")
    return {
        "word_errors": edit_distance(ref.split(), hyp.split()),
        "words": len(ref.split()),
        "char_errors": edit_distance(ref, hyp),
        "chars": len(ref),
    }


def wer(reference: str, hypothesis: str, language: str = "en") -> float:
    c = error_counts(reference, hypothesis, language)
    return c["word_errors"] / c["words"]


def cer(reference: str, hypothesis: str, language: str = "en") -> float:
    c = error_counts(reference, hypothesis, language)
    return c["char_errors"] / c["chars"]
