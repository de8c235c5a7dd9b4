"""Audio samples during training: at each eval a few held-out utterances are synthesized from the current
parameters (greedy AR, then the NAR levels, through `valle_jax.pipeline`) and written to
`run_dir/samples/<step>/<n>.wav`.

The codec is the dataset's own (dataset.json: kind and, for demo corpora, the random-codec seed). Without codec
weights the codes are written instead (`<n>.codes.npy`) and the reason is printed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

MAX_SAMPLE_FRAMES = 300  # 4 s at 75 fps: enough to hear the voice, cheap on a CPU


def write_samples(cfg: Any, model_cfg: Any, params: dict, run_dir: Path, step: int, say=print) -> list[Path]:
    """Synthesize `cfg.train.eval_samples` utterances of the eval split; returns the files written."""
    import jax.numpy as jnp

    from valle_jax.checkpoint import cast_tree
    from valle_jax.codec import CodecClient, CodecError, MissingWeightsError, write_wav
    from valle_jax.config import runtime_config
    from valle_jax.data.pipeline import make_iterator
    from valle_jax.layout import as_batch
    from valle_jax.pipeline import Models, Request, Settings, Synthesizer

    n = int(cfg.train.eval_samples)
    if n <= 0 or cfg.data.path == "synthetic" or not model_cfg.causal:
        return []
    meta = Path(cfg.data.path) / "dataset.json"
    dataset = json.loads(meta.read_text()) if meta.is_file() else {}
    first = next(iter(make_iterator(cfg, "eval")), None)
    if first is None:
        return []
    b = as_batch(first)
    n = min(n, len(b.text))
    steps = int(min(MAX_SAMPLE_FRAMES, max(8, int(np.max(b.resp_len[:n])) * 3 // 2)))
    requests = [Request(i, [b.text[i, : b.text_len[i]]], b.prom[i, : b.prom_len[i]], steps) for i in range(n)]
    mcfg = runtime_config(model_cfg, "float32")
    params = cast_tree(params, jnp.float32, jnp.asarray)
    models = Models(mcfg, params, mcfg, params)
    settings = Settings.greedy(slots=n, max_ar_steps=steps)
    out_dir = Path(run_dir) / "samples" / str(step)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    seed = dataset.get("random_codec")
    try:
        with CodecClient(dataset.get("codec", str(model_cfg.codec)), **({"random_seed": int(seed)} if seed is not None else {})) as codec:
            for out in Synthesizer(models, settings, codec).run(requests, progress=False):
                if out.error:
                    say(f"eval sample {out.id}: {out.error}")
                else:
                    written.append(write_wav(out_dir / f"{out.id}.wav", out.audio, codec.sample_rate))
    except (MissingWeightsError, CodecError) as e:
        say(f"eval samples: no audio ({e}); writing codes instead")
        for out in Synthesizer(models, settings, None).run(requests, progress=False):
            np.save(out_dir / f"{out.id}.codes.npy", out.codes[0])
            written.append(out_dir / f"{out.id}.codes.npy")
    return sorted(written)
