"""Audio samples during training: at each eval a few held-out utterances are synthesized from the current
parameters (greedy AR, then the NAR levels) and written to `run_dir/samples/<step>/<n>.wav`.

The codec is the dataset's own (dataset.json: kind and, for demo corpora, the random-codec seed). Without codec
weights the codes are written instead (`<n>.codes.npy`) and the reason is printed once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

MAX_SAMPLE_FRAMES = 300  # 4 s at 75 fps: enough to hear the voice, cheap on a CPU


def write_samples(cfg: Any, model_cfg: Any, params: dict, run_dir: Path, step: int, say=print) -> list[Path]:
    """Synthesize `cfg.train.eval_samples` utterances of the eval split; returns the files written."""
    import jax
    import jax.numpy as jnp

    from valle_jax.data.pipeline import make_iterator
    from valle_jax.generate import ar_generate, nar_generate
    from valle_jax.models.valle import Batch

    n = int(cfg.train.eval_samples)
    if n <= 0 or cfg.data.path == "synthetic" or not model_cfg.causal:
        return []
    settings = json.loads((Path(cfg.data.path) / "dataset.json").read_text()) if (Path(cfg.data.path) / "dataset.json").is_file() else {}
    batch = next(iter(make_iterator(cfg, "eval")), None)
    if batch is None:
        return []
    b = Batch(**{k: np.asarray(batch[k])[:n] for k in Batch._fields})
    b = b._replace(level=np.zeros_like(b.level))
    mcfg = model_cfg.override({"dtype": "float32"})
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    steps = int(min(MAX_SAMPLE_FRAMES, max(8, int(np.max(b.resp_len)) * 3 // 2)))
    res = jax.jit(lambda p, bb: ar_generate(mcfg, p, bb, steps))(params, b)
    lengths = np.maximum(np.asarray(res.length), 1)
    level0 = np.asarray(res.tokens)[:, :steps] % mcfg.audio_tokens
    codes = np.asarray(jax.jit(lambda p, bb, l0: nar_generate(mcfg, p, bb, l0))(params, b._replace(resp_len=jnp.asarray(lengths)), jnp.asarray(level0)))
    out_dir = Path(run_dir) / "samples" / str(step)
    out_dir.mkdir(parents=True, exist_ok=True)
    clips = [np.clip(codes[i, : lengths[i]], 0, mcfg.audio_tokens - 1).astype(np.int16) for i in range(len(lengths))]
    written: list[Path] = []
    try:
        from valle_jax.codec import CodecClient, CodecError, MissingWeightsError, write_wav

        seed = settings.get("random_codec")
        kw = {"random_seed": int(seed)} if seed is not None else {}
        with CodecClient(settings.get("codec", model_cfg.codec), **kw) as codec:
            for i, audio in enumerate(codec.decode(clips)):
                written.append(write_wav(out_dir / f"{i}.wav", audio, codec.sample_rate))
    except (MissingWeightsError, CodecError) as e:
        say(f"eval samples: no audio ({e}); writing codes instead")
        for i, c in enumerate(clips):
            np.save(out_dir / f"{i}.codes.npy", c)
            written.append(out_dir / f"{i}.codes.npy")
    return written
