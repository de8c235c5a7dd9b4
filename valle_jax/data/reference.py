"""Import of the reference's already quantised datasets, without re-encoding (spec reference-model.md 8.4).

Two layouts:

* `.enc` / `.dac` files (np.save of a pickled {"codes": uint16 [1, Q, T], "metadata": {...}}, read without
  running pickled code by valle_jax.codec.read_codes) in `training/data/{group}/{speaker}/{id}.enc`, with the
  transcripts in `training/metadata/{group}/{speaker}.json` ({id: {text, phonemes, language, duration}}),
  in a side file `{id}.json` beside the codes, or in the codes file's own metadata (looked up in that order).
  The speaker is named `{group}_{speaker}` (the reference's default getter); the id is
  `{group}/{speaker}/{id}`.  Phonemes found there are tokenized as they are; a transcript without phonemes
  is phonemized with espeak-ng.
* the HDF5 file `training/data.h5`: groups `{type}/{speaker path}/{id}` holding the datasets `audio`
  (int16 [T, Q]) and `text` (uint8 token ids incl. BOS/EOS) and the attributes text, phonemes, language,
  duration.  `training` items go to the train split and `validation` items to the eval split; `noise` is not
  speech and is skipped.  The stored token ids are kept exactly (`text_ids="keep"`, the default) or rebuilt
  from the phonemes with this run's tokenizer (`text_ids="retokenize"`); when the file's `symmap` differs from
  the tokenizer's vocabulary that is reported.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from valle_jax.codec.specs import CODEC_SPECS

from .prepare import AudioLimits, PrepareError, Rejected, _progress, clean_text, text_to_ids
from .records import DatasetWriter, Utterance

__all__ = ["import_reference", "import_codes_tree", "import_hdf5"]

log = logging.getLogger(__name__)


def _num(x: Any) -> float | None:
    try:
        v = float(np.asarray(x).reshape(-1)[0]) if np.ndim(x) else float(x)
    except (TypeError, ValueError, IndexError):
        return None
    return v if np.isfinite(v) and v > 0 else None


def _str(x: Any) -> str | None:
    if x is None:
        return None
    if isinstance(x, bytes):
        return x.decode("utf-8", "replace")
    if isinstance(x, np.ndarray):
        return _str(x.reshape(-1)[0]) if x.size else None
    return str(x)


def _check_duration(duration: float, limits: AudioLimits) -> None:
    if duration < limits.min_duration:
        raise Rejected(f"too short: {duration:.3f} s < min_duration {limits.min_duration} s")
    if duration > limits.max_duration:
        raise Rejected(f"too long: {duration:.3f} s > max_duration {limits.max_duration} s")


def _text_and_ids(text: str | None, phonemes: str | None, language: str, tokenizer: str) -> tuple[str, str, np.ndarray]:
    from valle_jax.text import FrontEndError, get_tokenizer

    text = clean_text(text or "")
    if phonemes and phonemes.strip():
        try:
            ids = np.asarray(get_tokenizer(tokenizer).encode(phonemes), np.int64)
        except FrontEndError as e:
            raise Rejected(f"tokenizer: {e}") from None
        return text, phonemes, ids
    if not text:
        raise Rejected("empty transcript (no text and no phonemes)")
    phonemes, ids = text_to_ids(text, language, tokenizer)
    return text, phonemes, ids


# ----------------------------------------------------------------------------------------------- .enc / .dac


def _find_codes_root(src: Path) -> tuple[Path, Path | None]:
    """(data folder, metadata folder or None) for `training/`, `training/data/` or any folder of groups."""
    if (src / "data").is_dir():
        return src / "data", (src / "metadata") if (src / "metadata").is_dir() else None
    if src.name == "data" and (src.parent / "metadata").is_dir():
        return src, src.parent / "metadata"
    return src, None


def _codes_files(data_dir: Path) -> Iterator[tuple[str, str, Path]]:
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file() and p.suffix in (".enc", ".dac")):
        rel = path.relative_to(data_dir).parts
        if len(rel) >= 3:
            group, speaker = rel[-3], rel[-2]
        elif len(rel) == 2:
            group, speaker = "", rel[-2]
        else:
            group, speaker = "", "default"
        yield group, speaker, path


def import_codes_tree(src, writer: DatasetWriter, *, codec: str, tokenizer: str, language: str,
                      limits: AudioLimits, progress: bool = True) -> int:  # fmt: skip
    """Import every .enc/.dac below `src` (see the module docstring); returns the number found."""
    from valle_jax.codec import CodecFileError, read_codes

    data_dir, meta_dir = _find_codes_root(Path(src))
    suffix = ".dac" if codec == "dac" else ".enc"
    files = list(_codes_files(data_dir))
    other = [p for _, _, p in files if p.suffix != suffix]
    if other:
        log.warning("%d %s file(s) do not match --codec %s and are skipped", len(other), other[0].suffix, codec)
    files = [f for f in files if f[2].suffix == suffix]
    if not files:
        raise PrepareError(f"{src}: no {suffix} files found (expected training/data/{{group}}/{{speaker}}/{{id}}{suffix})")
    levels = writer.settings["levels"]
    fps = CODEC_SPECS[codec].reference_fps
    speaker_meta: dict[Path, dict] = {}
    bar = _progress(len(files), "import", progress)
    try:
        for group, speaker, path in files:
            bar.update(1)
            stem = path.stem
            uid = "/".join(p for p in (group, speaker, stem) if p)
            if writer.is_done(uid):
                continue
            try:
                codes, file_meta = read_codes(path)
                if codes.shape[1] < levels:
                    raise Rejected(f"codes have {codes.shape[1]} levels, the dataset needs {levels}")
                info: dict[str, Any] = {}
                if meta_dir is not None:
                    mpath = meta_dir / group / f"{speaker}.json" if group else meta_dir / f"{speaker}.json"
                    if mpath not in speaker_meta:
                        try:
                            speaker_meta[mpath] = json.loads(mpath.read_text(encoding="utf-8")) if mpath.is_file() else {}
                        except (OSError, json.JSONDecodeError) as e:
                            log.warning("%s: unreadable metadata (%s)", mpath, e)
                            speaker_meta[mpath] = {}
                    m = speaker_meta[mpath]
                    info = m.get(stem) or m.get(path.name) or {}
                side = path.with_suffix(".json")
                if not info and side.is_file():
                    try:
                        info = json.loads(side.read_text(encoding="utf-8"))
                    except (OSError, json.JSONDecodeError) as e:
                        raise Rejected(f"side file {side.name} unreadable ({e})") from None
                merged = {**file_meta, **{k: v for k, v in info.items() if v is not None}}
                lang = _str(merged.get("language")) or language
                text, phonemes, ids = _text_and_ids(_str(merged.get("text")), _str(merged.get("phonemes")), lang, tokenizer)
                duration = _num(info.get("duration")) or codes.shape[0] / fps
                _check_duration(duration, limits)
            except (Rejected, CodecFileError) as e:
                writer.reject(uid, str(path), str(e.reason if isinstance(e, CodecFileError) else e))
                continue
            writer.add(Utterance(uid, f"{group}_{speaker}" if group else speaker, text, phonemes, lang, ids,
                                 codes[:, :levels], duration, source=str(path)))  # fmt: skip
    finally:
        bar.close()
    return len(files)


# ----------------------------------------------------------------------------------------------- HDF5

_H5_SPLITS = {"training": "train", "validation": "eval"}


def import_hdf5(path, writer: DatasetWriter, *, tokenizer: str, language: str, limits: AudioLimits,
                text_ids: str = "keep", progress: bool = True, say: Callable[[str], None] = print) -> int:  # fmt: skip
    """Import a reference data.h5 (see the module docstring); returns the number of utterances found."""
    try:
        import h5py
    except ImportError as e:
        raise PrepareError("importing data.h5 needs h5py: pip install h5py") from e
    from valle_jax.text import get_tokenizer

    if text_ids not in ("keep", "retokenize"):
        raise PrepareError(f"text_ids must be keep or retokenize, got {text_ids!r}")
    levels = writer.settings["levels"]
    fps = writer.settings["frames_per_second"]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise PrepareError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        if "symmap" in f:
            try:
                raw = f["symmap"][()]
                symmap = json.loads(_str(raw) or "{}")
            except (ValueError, TypeError) as e:
                symmap = None
                say(f"import: {path}: unreadable symmap ({e})")
            vocab = get_tokenizer(tokenizer).get_vocab()
            if symmap is not None and symmap != vocab:
                differ = sorted(k for k in set(symmap) | set(vocab) if symmap.get(k) != vocab.get(k))
                say(f"import: NOTE the file's symmap differs from the {tokenizer} tokenizer's vocabulary in "
                    f"{len(differ)} entries (e.g. {differ[:5]}); " +
                    ("its token ids are kept as stored (text_ids=retokenize rebuilds them from the phonemes)"
                     if text_ids == "keep" else "ids are rebuilt from the phonemes"))  # fmt: skip
        entries: list[tuple[str, str, Any]] = []
        skipped_types = []

        def collect(kind: str, group, prefix: list[str]) -> None:
            for name, node in group.items():
                if not isinstance(node, h5py.Group):
                    continue
                if "audio" in node:
                    entries.append((kind, "/".join(prefix), name))
                else:
                    collect(kind, node, prefix + [name])

        for kind in f:
            if not isinstance(f[kind], h5py.Group):
                continue
            if kind not in _H5_SPLITS:
                skipped_types.append(kind)
                continue
            collect(kind, f[kind], [])
        if skipped_types:
            say(f"import: skipping group(s) {', '.join(skipped_types)} of {path} (not training/validation speech)")
        bar = _progress(len(entries), "import", progress)
        try:
            for kind, spath, name in entries:
                bar.update(1)
                uid = f"{spath}/{name}" if spath else name
                if writer.is_done(uid):
                    continue
                where = f"{path}:{kind}/{uid}"
                node = f[kind][uid]
                try:
                    codes = np.asarray(node["audio"][()])
                    if codes.ndim != 2 or codes.shape[0] == 0 or not np.issubdtype(codes.dtype, np.integer):
                        raise Rejected(f"audio dataset has shape {codes.shape} and dtype {codes.dtype}, expected int16 [T, Q]")
                    if codes.shape[1] < levels:
                        raise Rejected(f"codes have {codes.shape[1]} levels, the dataset needs {levels}")
                    attrs = dict(node.attrs)
                    lang = _str(attrs.get("language")) or language
                    text = clean_text(_str(attrs.get("text")) or "")
                    phonemes = _str(attrs.get("phonemes")) or ""
                    if text_ids == "keep" and "text" in node:
                        ids = np.asarray(node["text"][()]).astype(np.int64).reshape(-1)
                        if ids.size == 0:
                            raise Rejected("empty text dataset")
                    else:
                        text, phonemes, ids = _text_and_ids(text, phonemes, lang, tokenizer)
                    duration = _num(attrs.get("duration")) or codes.shape[0] / fps
                    _check_duration(duration, limits)
                except Rejected as e:
                    writer.reject(uid, where, str(e))
                    continue
                writer.add(Utterance(uid, spath.replace("/", "_") or "default", text, phonemes, lang, ids,
                                     codes[:, :levels].astype(np.int16), duration, source=where,
                                     split=_H5_SPLITS[kind]))  # fmt: skip
        finally:
            bar.close()
    return len(entries)


def import_reference(src, out, *, codec: str | None = None, tokenizer: str = "bpe", language: str = "en",
                     eval_fraction: float = 0.02, limits: AudioLimits = AudioLimits(), shard_size: int = 512,
                     text_ids: str = "keep", retry_rejected: bool = False, progress: bool = True,
                     say: Callable[[str], None] | None = None) -> dict:  # fmt: skip
    """Import a reference dataset: `src` is a data.h5 file or a folder of .enc/.dac files (module docstring).
    `codec` defaults to what the files are (.dac -> dac, otherwise encodec; give vocos to mark .enc codes
    for the Vocos decoder)."""
    from .prepare import codec_settings

    say = say or (lambda s: print(s, file=sys.stderr, flush=True))
    src = Path(src)
    is_h5 = src.is_file() and src.suffix.lower() in (".h5", ".hdf5")
    if not src.exists():
        raise PrepareError(f"{src}: not found")
    if codec is None:
        if is_h5:
            codec = "encodec"
        else:
            data_dir, _ = _find_codes_root(src)
            has_dac = next(data_dir.rglob("*.dac"), None) is not None
            has_enc = next(data_dir.rglob("*.enc"), None) is not None
            codec = "dac" if has_dac and not has_enc else "encodec"
    settings = {**codec_settings(codec, None), "tokenizer": tokenizer, "source": f"reference import of {src}"}
    if is_h5:
        settings["text_ids"] = text_ids
    with DatasetWriter(out, settings, shard_size=shard_size, eval_fraction=eval_fraction,
                       retry_rejected=retry_rejected) as writer:  # fmt: skip
        if is_h5:
            found = import_hdf5(src, writer, tokenizer=tokenizer, language=language, limits=limits,
                                text_ids=text_ids, progress=progress, say=say)  # fmt: skip
        elif src.is_dir():
            found = import_codes_tree(src, writer, codec=codec, tokenizer=tokenizer, language=language,
                                      limits=limits, progress=progress)  # fmt: skip
        else:
            raise PrepareError(f"{src}: expected a data.h5 file or a folder with .enc/.dac files")
        meta = writer.close()
    assert meta is not None
    say(f"import: {found} utterances found in {src}; added {writer.added}, skipped {writer.rejected_now}; dataset "
        f"now holds {meta['counts']['train']} train + {meta['counts']['eval']} eval utterances")  # fmt: skip
    if writer.reasons:
        say("import: skipped because: " + ", ".join(f"{n} {why}" for why, n in writer.reasons.most_common()))
    return {"found": found, "added": writer.added, "rejected_now": writer.rejected_now,
            "rejected_reasons": dict(writer.reasons), "counts": meta["counts"],
            "settings": settings, "out": str(out)}  # fmt: skip

