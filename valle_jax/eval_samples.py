"""Audio samples during training: at each eval a few held-out utterances are synthesized from the current
parameters (greedy AR, then the NAR levels, through `valle_jax.pipeline`) and written to
`run_dir/samples/<step>/<n>.wav`, with the voice prompt each was given (`<n>.prompt.wav`, its codes decoded).

With `train.eval_metrics` the samples are also evaluated (`valle_jax.evaluate`: WER/CER of an ASR transcript
against the utterance's text, SIM-O between sample and prompt) into `run_dir/samples/<step>/eval/` (metrics.jsonl,
summary.json, index.html); the means go to the run's logs. The caller keeps one started `evaluate.Evaluator`
for the whole run, so the models load once.

The codec is the dataset's own (dataset.json: kind and, for demo corpora, the random-codec seed). Without codec
weights the codes are written instead (`<n>.codes.npy`) and the reason is printed (no metrics then).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MAX_SAMPLE_FRAMES = 300  # 4 s at 75 fps: enough to hear the voice, cheap on a CPU


@dataclass
class Samples:
    """What one eval wrote: files, and with metrics the evaluation summary (None when not evaluated)."""

    files: list[Path] = field(default_factory=list)
    metrics: dict | None = None
    note: str | None = None  # why there are no metrics (no audio, models missing)


def write_samples(cfg: Any, model_cfg: Any, params: dict, run_dir: Path, step: int, say=print,
                  evaluator: Any = None) -> Samples:  # fmt: skip
    """Synthesize `cfg.train.eval_samples` utterances of the eval split (and evaluate them with `evaluator`, a
    started valle_jax.evaluate.Evaluator, when given)."""
    import jax.numpy as jnp

    from valle_jax.checkpoint import cast_tree
    from valle_jax.codec import CodecClient, CodecError, MissingWeightsError, write_wav
    from valle_jax.config import runtime_config
    from valle_jax.data.pipeline import DataPipeline
    from valle_jax.layout import as_batch
    from valle_jax.pipeline import Models, Request, Settings, Synthesizer

    n = int(cfg.train.eval_samples)
    if n <= 0 or cfg.data.path == "synthetic" or not model_cfg.causal:
        return Samples()
    meta = Path(cfg.data.path) / "dataset.json"
    dataset = json.loads(meta.read_text()) if meta.is_file() else {}
    eval_data = DataPipeline(cfg, "eval")
    b = as_batch(eval_data.batch(0))
    _, _, rows = eval_data.batch_items(0)
    texts = [eval_data.items[i]["text"] for i in rows]
    n = min(n, len(b.text))
    steps = int(min(MAX_SAMPLE_FRAMES, max(8, int(np.max(b.resp_len[:n])) * 3 // 2)))
    requests = [Request(i, [b.text[i, : b.text_len[i]]], b.prom[i, : b.prom_len[i]], steps) for i in range(n)]
    mcfg = runtime_config(model_cfg, "float32")
    params = cast_tree(params, jnp.float32, jnp.asarray)
    models = Models(mcfg, params, mcfg, params)
    settings = Settings.greedy(slots=n, max_ar_steps=steps)
    out_dir = Path(run_dir) / "samples" / str(step)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = Samples()
    items: list[dict] = []
    seed = dataset.get("random_codec")
    try:
        with CodecClient(dataset.get("codec", str(model_cfg.codec)), **({"random_seed": int(seed)} if seed is not None else {})) as codec:
            prompts = [b.prom[i, : b.prom_len[i]] for i in range(n)]
            with_prompt = [i for i in range(n) if len(prompts[i])]
            prompt_wavs = dict(zip(with_prompt, codec.decode([prompts[i] for i in with_prompt]))) if with_prompt else {}
            for r in Synthesizer(models, settings, codec).run(requests, progress=False):
                if r.error:
                    say(f"eval sample {r.id}: {r.error}")
                    continue
                wav = write_wav(out_dir / f"{r.id}.wav", r.audio, codec.sample_rate)
                prompt = ()
                if r.id in prompt_wavs:
                    prompt = (str(write_wav(out_dir / f"{r.id}.prompt.wav", prompt_wavs[r.id], codec.sample_rate)),)
                out.files.append(wav)
                items.append({"id": str(r.id), "text": texts[r.id], "audio": str(wav), "prompt": list(prompt)})
    except (MissingWeightsError, CodecError) as e:
        say(f"eval samples: no audio ({e}); writing codes instead")
        out.note = f"no audio: {e}"
        for r in Synthesizer(models, settings, None).run(requests, progress=False):
            np.save(out_dir / f"{r.id}.codes.npy", r.codes[0])
            out.files.append(out_dir / f"{r.id}.codes.npy")
    out.files.sort()
    if evaluator is not None and items:
        from valle_jax.evaluate import evaluate_items

        out.metrics = evaluate_items(items, out_dir / "eval", evaluator.settings.replace(progress=False),
                                     evaluator=evaluator, source=f"training eval samples @ {step}", say=say)  # fmt: skip
    return out


def metrics_record(summary: dict) -> dict:
    """The log fields of an evaluation summary: WER, CER and SIM-O means (null where not measured)."""
    return {"wer": summary.get("wer_mean"), "cer": summary.get("cer_mean"), "sim": summary.get("sim_mean"),
            "eval_items": summary.get("n_items", summary.get("n"))}  # fmt: skip
