"""index.html: a self-contained evaluation report (one file that opens from disk: no server, no network).

One row per item: id, text, transcript, WER, CER, SIM, seconds, audio players for the output and the prompt,
a waveform + spectrogram picture of the output; a header with the summary and the models; columns sortable
by clicking their heading (a few lines of inline JavaScript).  Audio is FLAC in data: URIs (media="embed") or
files under DIR/media/ beside the page (media="files", for big jobs).
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PICTURE_WIDTH = 480
WAVE_ROWS = 48
SPEC_ROWS = 96
SPEC_MAX_HZ = 8000.0


def picture_png(wave: np.ndarray, rate: int) -> bytes:
    """A PNG: the waveform (min/max per column) above a log-magnitude spectrogram (0 to 8 kHz, 80 dB range)."""
    from matplotlib import colormaps
    from PIL import Image

    wave = np.asarray(wave, np.float32)
    width = PICTURE_WIDTH
    cols = np.array_split(wave, width) if len(wave) >= width else [wave[i : i + 1] for i in range(len(wave))]
    top = np.full((WAVE_ROWS, width, 3), 255, np.uint8)
    peak = max(float(np.abs(wave).max()), 1e-6) if wave.size else 1.0
    half = (WAVE_ROWS - 1) / 2
    for x, c in enumerate(cols[:width]):
        lo, hi = float(c.min()) / peak, float(c.max()) / peak
        y0, y1 = int(round(half - hi * half)), int(round(half - lo * half))
        top[y0 : y1 + 1, x] = (40, 90, 160)

    n_fft = 512 if rate <= 24000 else 1024
    padded = np.pad(wave, (n_fft // 2, n_fft // 2))
    starts = np.linspace(0, max(len(padded) - n_fft, 0), width).astype(int)
    frames = np.stack([padded[s : s + n_fft] if s + n_fft <= len(padded) else np.pad(padded[s:], (0, s + n_fft - len(padded))) for s in starts])
    mag = np.abs(np.fft.rfft(frames * np.hanning(n_fft), axis=1)).T  # [bins, width]
    keep = max(2, int(min(SPEC_MAX_HZ, rate / 2) / (rate / n_fft)))
    db = 20 * np.log10(mag[:keep] + 1e-6)
    db = np.clip((db - (db.max() - 80.0)) / 80.0, 0.0, 1.0)
    rows = np.linspace(keep - 1, 0, SPEC_ROWS)  # low frequencies at the bottom
    spec = np.stack([np.interp(rows, np.arange(keep), db[:, x]) for x in range(width)], axis=1)
    bottom = (colormaps["magma"](spec)[..., :3] * 255).astype(np.uint8)
    image = np.concatenate([top, np.full((2, width, 3), 200, np.uint8), bottom], axis=0)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def flac_bytes(wave: np.ndarray, rate: int) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(wave, np.float32), -1.0, 1.0), rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def data_uri(mime: str, payload: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(payload).decode('ascii')}"


class MediaSink:
    """Where the report's audio goes: inline data: URIs, or files under out_dir/media/ (relative links)."""

    def __init__(self, out_dir: Path, mode: str):
        self.out_dir, self.mode = Path(out_dir), mode

    def audio(self, name: str, wave: np.ndarray, rate: int) -> str:
        payload = flac_bytes(wave, rate)
        if self.mode == "embed":
            return data_uri("audio/flac", payload)
        from valle_jax.fileio import atomic_write

        safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
        atomic_write(self.out_dir / "media" / f"{safe}.flac", lambda f: f.write(payload))
        return f"media/{safe}.flac"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _num_attr(value: Any) -> str:
    return "" if value is None else repr(float(value))


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em;margin:0 0 .3em}
#summary{display:flex;flex-wrap:wrap;gap:.4em 1.6em;margin:.5em 0}
#summary div{background:#f3f5f8;padding:.3em .7em;border-radius:4px}
#summary b{display:block;font-size:1.3em}
.models{color:#555;font-size:.9em}
table{border-collapse:collapse;width:100%;margin-top:1em}
th,td{border-bottom:1px solid #ddd;padding:.35em .5em;vertical-align:top;text-align:left}
th button{font:inherit;font-weight:bold;background:none;border:none;cursor:pointer;padding:0}
th[aria-sort=ascending] button::after{content:" ▲"}
th[aria-sort=descending] button::after{content:" ▼"}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.text,td.transcript{max-width:22em}
tr.error td{background:#fff3f3}
.err{color:#b00}
audio{width:14em;display:block;margin-bottom:.3em}
.lbl{font-size:.8em;color:#666}
img.pic{display:block;width:240px;image-rendering:auto}
"""

_SCRIPT = """
(function(){
  var table=document.getElementById('items'), body=table.tBodies[0];
  function key(row,k,type){var v=row.getAttribute('data-'+k);
    if(type==='text')return v||'';
    return (v===null||v==='')?null:parseFloat(v);}
  table.querySelectorAll('th[data-key]').forEach(function(th){
    th.querySelector('button').addEventListener('click',function(){
      var k=th.getAttribute('data-key'), type=th.getAttribute('data-type');
      var asc=th.getAttribute('aria-sort')!=='ascending';
      table.querySelectorAll('th[data-key]').forEach(function(o){o.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){var x=key(a,k,type),y=key(b,k,type);
        if(x===null&&y===null)return 0; if(x===null)return 1; if(y===null)return -1;  // missing values last
        var c=(type==='text')?x.localeCompare(y):(x-y); return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
})();
"""

COLUMNS = (("id", "id", "text"), ("wer", "WER", "number"), ("cer", "CER", "number"),
           ("sim", "SIM", "number"), ("seconds", "seconds", "number"))  # fmt: skip


def render(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The page.  Each row dict: the metrics.jsonl record plus `output_src`, `prompt_srcs`, `picture_src`."""
    stats = [("items", summary.get("n_items")), ("evaluated", summary.get("n")), ("errors", summary.get("n_errors")),
             ("WER mean", summary.get("wer_mean")), ("WER corpus", summary.get("wer_corpus")),
             ("CER mean", summary.get("cer_mean")), ("SIM mean", summary.get("sim_mean")),
             ("audio seconds", summary.get("seconds_total"))]  # fmt: skip
    head = "".join(f"<div>{html.escape(k)}<b>{_fmt(v)}</b></div>" for k, v in stats)
    models = []
    for role, m in (summary.get("models") or {}).items():
        if isinstance(m, dict):
            bits = [m.get("name") or m.get("source"), m.get("package") and f"{m['package']} {m.get('package_version')}",
                    m.get("library"), m.get("sha256") and f"sha256 {m['sha256'][:16]}…"]  # fmt: skip
            models.append(f"<div><b>{html.escape(role)}</b>: {html.escape(' · '.join(str(b) for b in bits if b))}</div>")
    header_cells = "".join(
        f'<th data-key="{k}" data-type="{t}"><button type="button">{html.escape(label)}</button></th>'
        if k == "id" else "" for k, label, t in COLUMNS
    )
    header_cells += "<th>text</th><th>transcript</th>"
    header_cells += "".join(
        f'<th data-key="{k}" data-type="{t}"><button type="button">{html.escape(label)}</button></th>'
        for k, label, t in COLUMNS if k != "id"
    )
    header_cells += "<th>audio</th><th>waveform and spectrogram</th>"
    body = []
    for r in rows:
        attrs = " ".join(f'data-{k}="{_num_attr(r.get(k))}"' for k, _l, t in COLUMNS if t == "number")
        error = r.get("error")
        players = []
        if r.get("output_src"):
            players.append(f'<span class="lbl">output</span><audio class="output" controls preload="metadata" src="{r["output_src"]}"></audio>')
        for i, src in enumerate(r.get("prompt_srcs") or []):
            players.append(f'<span class="lbl">prompt{f" {i + 1}" if i else ""}</span>'
                           f'<audio class="prompt" controls preload="metadata" src="{src}"></audio>')
        picture = (f'<img class="pic" alt="waveform and spectrogram of {html.escape(r["id"])}" src="{r["picture_src"]}">'
                   if r.get("picture_src") else "")  # fmt: skip
        transcript = html.escape(r.get("transcript") or "")
        if error:
            transcript += f'<div class="err">{html.escape(error)}</div>'
        body.append(
            f'<tr class="item{" error" if error else ""}" data-id="{html.escape(r["id"])}" {attrs}>'
            f'<td>{html.escape(r["id"])}</td><td class="text">{html.escape(r.get("text") or "")}</td>'
            f'<td class="transcript">{transcript}</td>'
            + "".join(f'<td class="num {k}">{_fmt(r.get(k), 2 if k == "seconds" else 3)}</td>' for k, _l, t in COLUMNS if t == "number")
            + f'<td class="players">{"".join(players)}</td><td>{picture}</td></tr>'
        )
    source = html.escape(str(summary.get("source", "")))
    summary_json = json.dumps(summary).replace("</", "<\\/")  # safe inside <script>
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>valle_jax evaluation: {source}</title><style>{_STYLE}</style></head><body>"
        f'<header><h1>valle_jax evaluation</h1><div class="models">{source} · '
        f'normalisation {html.escape(str(summary.get("normalisation", "")))} · {html.escape(str(summary.get("created", "")))}</div>'
        f'<div id="summary">{head}</div><div class="models">{"".join(models)}</div></header>'
        f'<table id="items"><thead><tr>{header_cells}</tr></thead><tbody>{"".join(body)}</tbody></table>'
        f'<script type="application/json" id="summary-json">{summary_json}</script>'
        f"<script>{_SCRIPT}</script></body></html>\n"
    )
