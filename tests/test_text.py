"""Text front end: espeak-ng phonemizer, BPE tokenizer (spec 8.2 vectors), naive tokenizer, facade."""

from __future__ import annotations

import ctypes.util
import hashlib
import json

import pytest

from valle_jax import text as T

SPEC_PHONEMES = "ˈaɪ wɪl nˌɑːt ˈæsk ɐ sˈɛkənd tˈaɪm"
SPEC_BPE_IDS = [1, 97, 4, 128, 26, 4, 186, 4, 89, 33, 25, 4, 48, 4, 134, 25, 52, 86, 4, 34, 97, 27, 2]
SPEC_BPE_TOKENS = ["ˈaɪ", " ", "wɪ", "l", " ", "nˌɑːt", " ", "ˈæ", "s", "k", " ", "ɐ", " ",
                   "sˈɛ", "k", "ə", "nd", " ", "t", "ˈaɪ", "m"]
ESPEAK_SENTENCE = "Hello world, this is a test."
ESPEAK_PHONEMES = "həlˈoʊ wˈɜːld, ðɪs ɪz ɐ tˈɛst."
# sha256 of /work/shared/reference/tokenizer.json (reference data/tokenizer.json, unchanged).
TOKENIZER_SHA256 = "3d46deba434c649ba901b28d17f6a3d6ba1142e63d8ddee140fe2c1c82aa035d"
# sha256 of json.dumps(sorted(table.items()), ensure_ascii=False) for the reference NaiveTokenizer table.
NAIVE_TABLE_SHA256 = "76af6cd3f9f7ce86dfd37bf95a651534732edc6b81adb2e77caac238467021ee"


@pytest.fixture
def fresh_backends():
    T.clear_backend_cache()
    yield
    T.clear_backend_cache()


# ---------------------------------------------------------------- BPE tokenizer


def test_packaged_tokenizer_file_is_the_reference_one():
    data = T.bpe_tokenizer_path().read_bytes()
    assert hashlib.sha256(data).hexdigest() == TOKENIZER_SHA256


def test_bpe_spec_vectors():
    tok = T.get_tokenizer("bpe")
    assert tok.encode(SPEC_PHONEMES) == SPEC_BPE_IDS
    assert tok.tokens(SPEC_PHONEMES)[1:-1] == SPEC_BPE_TOKENS
    assert tok.encode(" ") == [1, 4, 2]
    assert T.encode(" ") == [1, 4, 2]
    assert tok.encode("") == [1, 2]


def test_bpe_vocab_and_aliases():
    tok = T.get_tokenizer("bpe")
    vocab = tok.get_vocab()
    assert len(vocab) == 265
    assert set(vocab.values()) == set(range(256))
    assert tok.vocab_size == 256
    specials = {"<unk>": 0, "<bos>": 1, "</eos>": 2, "<mask>": 3}
    for sym, idx in specials.items():
        assert vocab[sym] == idx
    aliases = {"ᵝ": 0, "ä": 16, "ĩ": 23, "ɴ": 28, "\u031e": 29, "ɸ": 30, "ɽ": 32, "ũ": 35, "ʍ": 37}
    for sym, idx in aliases.items():
        assert tok.encode(sym) == [1, idx, 2], sym
    singles = {" ": 4, "!": 5, ",": 9, ".": 11, "?": 15, "a": 16, "z": 39, "ɡ": 57, "ˈ": 72, "ˌ": 73, "ː": 74}
    for sym, idx in singles.items():
        assert tok.encode(sym) == [1, idx, 2], sym
    assert tok.encode("Q") == [1, 0, 2]  # not in the vocabulary -> <unk>, as in the reference


# ---------------------------------------------------------------- naive tokenizer


def test_naive_table_is_the_reference_one():
    vocab = T.NAIVE_VOCAB
    assert len(vocab) == 229
    assert sorted(set(vocab.values())) == list(range(1, 229))
    assert vocab["<s>"] == 1 and vocab["</s>"] == 2 and vocab[" "] == 3
    assert vocab["?"] == vocab["p"] == 7
    assert vocab["aˈ"] == 228
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    assert digest == NAIVE_TABLE_SHA256


def test_naive_hand_vector():
    # "həlˈoʊ wˈɜːld." -> h ə lˈ o ʊ ' ' ' ' wˈ ɜː l d .   (space doubled; marks join the symbol before)
    #                  ids 38 34 51 28 23 3 3 48 71 18 13 4, wrapped in 1 ... 2
    tok = T.NaiveTokenizer()
    assert tok.pieces("həlˈoʊ wˈɜːld.") == ["h", "ə", "lˈ", "o", "ʊ", " ", " ", "wˈ", "ɜː", "l", "d", "."]
    assert tok.encode("həlˈoʊ wˈɜːld.") == [1, 38, 34, 51, 28, 23, 3, 3, 48, 71, 18, 13, 4, 2]


def test_naive_spec_sentence():
    # Leading ˈ stays alone (43); "nˌɑːt" -> nˌ ɑː t; a space followed by a mark gives ONE space token
    # and a lone mark (" ˈæsk" -> ' ' ˈ æ s k), every other space gives two.
    tok = T.get_tokenizer("naive")
    assert tok.pieces(SPEC_PHONEMES) == [
        "ˈ", "a", "ɪ", " ", " ", "w", "ɪ", "l", " ", " ", "nˌ", "ɑː", "t", " ", "ˈ", "æ", "s", "k",
        " ", " ", "ɐ", " ", " ", "sˈ", "ɛ", "k", "ə", "n", "d", " ", " ", "tˈ", "a", "ɪ", "m",
    ]
    assert tok.encode(SPEC_PHONEMES) == [
        1, 43, 27, 21, 3, 3, 30, 21, 18, 3, 3, 89, 56, 24, 3, 43, 19, 46, 40,
        3, 3, 66, 3, 3, 60, 20, 40, 34, 25, 13, 3, 3, 15, 27, 21, 58, 2,
    ]


def test_naive_edge_cases():
    tok = T.NaiveTokenizer()
    assert tok.pieces("ɑːˈ") == ["ɑːˈ"]          # several marks all join
    assert tok.encode("ɑːˈ") == [1, 163, 2]
    assert tok.encode("ˌ") == [1, 10, 2]          # leading mark alone
    assert tok.encode("") == [1, 3, 2]            # the reference's split turns "" into one space
    assert tok.encode("a  b") == [1, 27, 3, 3, 3, 3, 64, 2]  # n spaces -> 2n space tokens
    assert tok.encode("ä\u031e") == [1, 190, 192, 2]


def test_naive_unknown_symbol_is_a_clear_error():
    with pytest.raises(T.FrontEndError, match=r"'g'.*U\+0067"):
        T.NaiveTokenizer().encode("ɡæg")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        T.get_tokenizer("sentencepiece")


# ---------------------------------------------------------------- phonemizer


def test_espeak_sentence():
    # Needs the espeak-ng system package; fails (not skips) without it: apt-get install -y espeak-ng
    assert T.phonemize(ESPEAK_SENTENCE) == ESPEAK_PHONEMES
    assert T.phonemize(ESPEAK_SENTENCE, "en-us") == ESPEAK_PHONEMES


def test_backend_cached_per_language():
    assert T.espeak_language("en") == "en-us"
    assert T.espeak_language("de") == "de"
    assert T.get_backend("en") is T.get_backend("en-us")
    assert T.get_backend("de") is not T.get_backend("en")


def test_split_lines():
    assert T.split_lines("one\ntwo") == ["one", "two"]
    assert T.split_lines("one\n\n  \ntwo\r\nthree\n") == ["one", "two", "three"]
    assert T.split_lines("") == []
    assert T.split_lines("single line.") == ["single line."]


def test_japanese_is_unsupported():
    with pytest.raises(T.UnsupportedLanguageError, match="Japanese"):
        T.phonemize("こんにちは", "ja")
    with pytest.raises(T.UnsupportedLanguageError, match="Japanese"):
        T.TextFrontEnd("bpe", "ja-jp")


def test_unknown_language(fresh_backends):
    with pytest.raises(T.UnsupportedLanguageError, match="xx-nope"):
        T.phonemize("hello", "xx-nope")


def test_missing_espeak_is_reported(monkeypatch, fresh_backends):
    from phonemizer.backend.espeak.wrapper import EspeakWrapper

    real = ctypes.util.find_library

    def no_espeak(name):
        return None if "espeak" in name else real(name)

    # phonemizer's real lookup: set_library() override, then $PHONEMIZER_ESPEAK_LIBRARY, then find_library.
    monkeypatch.setattr(ctypes.util, "find_library", no_espeak)
    monkeypatch.delenv("PHONEMIZER_ESPEAK_LIBRARY", raising=False)
    monkeypatch.setattr(EspeakWrapper, "_ESPEAK_LIBRARY", None)
    assert not T.espeak_available()
    with pytest.raises(T.EspeakNotFoundError) as info:
        T.phonemize(ESPEAK_SENTENCE)
    assert isinstance(info.value, T.FrontEndError) and isinstance(info.value, RuntimeError)
    assert "apt-get install -y espeak-ng" in str(info.value)
    assert T.ESPEAK_INSTALL_COMMAND == "apt-get install -y espeak-ng"


# ---------------------------------------------------------------- facade


def test_front_end_ids_bpe():
    fe = T.TextFrontEnd("bpe", "en")
    text = ESPEAK_SENTENCE + "\n\nI will not ask a second time.\n"
    phonemes = fe.phonemes(text)
    assert len(phonemes) == 2 and phonemes[0] == ESPEAK_PHONEMES
    ids = fe.ids(text)
    assert ids == [T.encode(p) for p in phonemes]
    for line in ids:
        assert line[0] == 1 and line[-1] == 2 and all(0 < i < 256 for i in line)
    # every character of the espeak output is in the BPE vocabulary (no <unk>)
    assert 0 not in ids[0] and 0 not in ids[1]
    assert fe.ids("\n \n") == []


def test_front_end_ids_naive():
    fe = T.TextFrontEnd("naive", "en")
    (ids,) = fe.ids(ESPEAK_SENTENCE)
    assert ids == T.NaiveTokenizer().encode(ESPEAK_PHONEMES)
    assert ids[:6] == [1, 38, 34, 51, 28, 23]
