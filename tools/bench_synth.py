"""Synthesis throughput: one JSON line per measurement.

    python tools/bench_synth.py [--config configs/ar+nar-llama-8.yaml | --checkpoint C] [--batch 1 8 64]
        [--steps 450] [--no-stop] [--dtype bfloat16] [--codec encodec] [--compare-full] [--mixed 64]

Random weights unless --checkpoint is given (speed does not depend on the values). Each batch size gives a
line with `ar_tokens_per_s` (tokens generated per second by the KV-cached AR loop), `nar_seconds` (all NAR
levels for the batch), `codec_seconds` (decoding the batch to audio in the sidecar, random-weight codec of
the real architecture) and `audio_seconds_per_s` (seconds of audio per wall second, AR + NAR + codec in
sequence). `--compare-full` adds the reference's no-cache loop and the speed-up of the cached one.
`--mixed N` runs a job of N items of mixed lengths through the slot scheduler with and without continuous
batching. `--no-stop` makes the stop token unreachable so every item decodes exactly --steps tokens.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from valle_jax import pipeline  # noqa: E402
from valle_jax.config import load_yaml, runtime_config  # noqa: E402
from valle_jax.generate import ar_generate_full  # noqa: E402
from valle_jax.layout import bucket  # noqa: E402
from valle_jax.models.valle import init_params  # noqa: E402


def block_stop(cfg, params):
    """Make the stop token unreachable (fixed-length decoding for timing)."""
    head = params["classifiers"]["proj_0"] if cfg.experimental.split_classifiers else params["classifier"]
    head["bias"] = jnp.asarray(head["bias"]).at[cfg.stop_token].set(-1e9)
    return params


def requests_for(cfg, n: int, text_len: int, prom_frames: int, max_tokens: int, seed: int = 0) -> list[pipeline.Request]:
    rng = np.random.default_rng(seed)
    return [pipeline.Request(i, [np.r_[1, rng.integers(4, cfg.text_tokens, text_len - 2), 2].astype(np.int32)],
                             rng.integers(0, 1024, (prom_frames, cfg.resp_levels)).astype(np.int32), max_tokens)
            for i in range(n)]  # fmt: skip


def timed(fn, *args, repeat: int = 2):
    out = fn(*args)
    jax.block_until_ready(out)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, time.perf_counter() - t0)
    return out, best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "ar+nar-llama-8.yaml"))
    ap.add_argument("--checkpoint")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--steps", type=int, default=450, help="AR tokens per item (450 = 6 s of audio)")
    ap.add_argument("--text-len", type=int, default=48)
    ap.add_argument("--prompt-frames", type=int, default=225, help="prompt length (225 = 3 s)")
    ap.add_argument("--no-stop", action="store_true")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    ap.add_argument("--codec", choices=["encodec", "vocos", "dac"], help="also time decoding to audio (random weights)")
    ap.add_argument("--compare-full", action="store_true", help="also time the reference's full-recompute loop")
    ap.add_argument("--mixed", type=int, default=0, help="items in a mixed-length job (0 = skip)")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)

    if args.checkpoint:
        from valle_jax.convert import load_any

        cfg, params = load_any(args.checkpoint)
    else:
        cfg, params = load_yaml(args.config), None
    cfg = runtime_config(cfg, args.dtype, args.attention)
    if params is None:
        params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: jnp.asarray(a, args.dtype), params)
    if args.no_stop:
        params = block_stop(cfg, params)
    device = jax.devices()[0].device_kind
    base = {"bench": "synth", "device": device, "backend": jax.default_backend(), "model": cfg.name, "dim": cfg.d_model,
            "layers": cfg.n_layers, "dtype": args.dtype, "steps": args.steps, "no_stop": args.no_stop}  # fmt: skip
    codec = None
    if args.codec:
        from valle_jax.codec import CodecClient

        codec = CodecClient(args.codec, random_seed=0, batch_size=64).start()

    fps = cfg.codec_spec.frames_per_second
    pad = {"text": bucket(args.text_len), "prom": bucket(args.prompt_frames)}
    for B in args.batch:
        reqs = requests_for(cfg, B, args.text_len, args.prompt_frames, args.steps)
        batch = pipeline.request_batch([r.lines[0] for r in reqs], [r.prom for r in reqs], pad_to=pad)
        res, ar_s = timed(lambda p, b: pipeline.ar_codes(cfg, p, b, args.steps), params, batch, repeat=args.repeat)
        n_tokens = int(np.asarray(res.n_raw).sum())
        line = dict(base, batch=B, ar_tokens=n_tokens, ar_seconds=round(ar_s, 4), ar_tokens_per_s=round(n_tokens / ar_s, 1))
        if args.compare_full:
            full = jax.jit(lambda p, b: ar_generate_full(cfg, p, b, args.steps))
            _, full_s = timed(full, params, batch, repeat=1)
            line.update(full_recompute_seconds=round(full_s, 4), cached_speedup=round(full_s / ar_s, 2))
        level0 = [pipeline.level0(t[:n], cfg) for t, n in zip(np.asarray(res.tokens), np.asarray(res.n_raw))]
        R = bucket(args.steps)
        nb = pipeline.request_batch([r.lines[0] for r in reqs], [r.prom for r in reqs], level0, pad_to={**pad, "resp": R})
        codes, nar_s = timed(lambda p, b: pipeline.nar_codes(cfg, p, b, b.resp[..., 0]), params, nb, repeat=args.repeat)
        line.update(nar_seconds=round(nar_s, 4))
        total = ar_s + nar_s
        if codec is not None:
            clips = [pipeline.codec_codes(c[: max(len(t), 1)], cfg) for c, t in zip(np.asarray(codes), level0)]
            t0 = time.perf_counter()
            codec.decode(clips)
            codec_s = time.perf_counter() - t0
            line.update(codec=args.codec, codec_seconds=round(codec_s, 4))
            total += codec_s
        audio = n_tokens / fps
        line.update(audio_seconds=round(audio, 2), audio_seconds_per_s=round(audio / total, 2),
                    realtime_factor=round(audio / total, 2))  # fmt: skip
        print(json.dumps(line), flush=True)

    if args.mixed:
        rng = np.random.default_rng(1)
        lengths = rng.integers(args.steps // 8, args.steps + 1, args.mixed)
        reqs = requests_for(cfg, args.mixed, args.text_len, args.prompt_frames, args.steps, seed=2)
        for r, n in zip(reqs, lengths):
            r.max_tokens = int(n)
        models = pipeline.Models(cfg, params, cfg, params)
        slots = max(args.batch)
        for continuous in (True, False):
            settings = pipeline.Settings.greedy(slots=slots, chunk=16, continuous=continuous, max_ar_steps=args.steps)

            def run():
                return sum(len(o.codes[0]) for o in pipeline.Synthesizer(models, settings).run(reqs, progress=False))

            run()  # compile
            t0 = time.perf_counter()
            n_tokens = run()
            dt = time.perf_counter() - t0
            print(json.dumps(dict(base, bench="synth_job", items=args.mixed, slots=slots, continuous=continuous,
                                  tokens=n_tokens, seconds=round(dt, 3), ar_tokens_per_s=round(n_tokens / dt, 1),
                                  items_per_s=round(args.mixed / dt, 3))), flush=True)  # fmt: skip
    if codec is not None:
        codec.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
