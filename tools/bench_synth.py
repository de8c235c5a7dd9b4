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

from valle_jax.config import load_yaml  # noqa: E402
from valle_jax.generate import ARScheduler, ar_generate, ar_generate_full, bucket, nar_generate  # noqa: E402
from valle_jax.models.valle import init_params, make_batch  # noqa: E402

FPS = 75.0


def block_stop(cfg, params):
    """Make the stop token unreachable (fixed-length decoding for timing)."""
    head = params["classifiers"]["proj_0"] if cfg.experimental.split_classifiers else params["classifier"]
    head["bias"] = jnp.asarray(head["bias"]).at[cfg.stop_token].set(-1e9)
    return params


def items_for(cfg, n: int, text_len: int, prom_frames: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"text": np.r_[1, rng.integers(4, cfg.text_tokens, text_len - 2), 2], "prom": rng.integers(0, 1024, (prom_frames, cfg.resp_levels)),
             "resp": np.zeros((1, 1), np.int32)} for _ in range(n)]  # fmt: skip


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
    cfg = cfg.override({"dtype": args.dtype, "attention_impl": args.attention})
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

    for B in args.batch:
        batch = make_batch(items_for(cfg, B, args.text_len, args.prompt_frames),
                           pad_to={"text": bucket(args.text_len), "prom": bucket(args.prompt_frames)})  # fmt: skip
        ar = jax.jit(lambda p, b: ar_generate(cfg, p, b, args.steps))
        res, ar_s = timed(ar, params, batch, repeat=args.repeat)
        n_tokens = int(np.asarray(res.n_raw).sum())
        line = dict(base, batch=B, ar_tokens=n_tokens, ar_seconds=round(ar_s, 4), ar_tokens_per_s=round(n_tokens / ar_s, 1))
        if args.compare_full:
            full = jax.jit(lambda p, b: ar_generate_full(cfg, p, b, args.steps))
            _, full_s = timed(full, params, batch, repeat=1)
            line.update(full_recompute_seconds=round(full_s, 4), cached_speedup=round(full_s / ar_s, 2))
        R = bucket(args.steps)
        level0 = jnp.asarray(np.asarray(res.tokens)[:, :R] % 1024)
        nb = make_batch([{"text": it["text"], "prom": it["prom"], "resp": np.zeros((args.steps, 1), np.int32)}
                         for it in items_for(cfg, B, args.text_len, args.prompt_frames)],
                        pad_to={"text": bucket(args.text_len), "prom": bucket(args.prompt_frames), "resp": R})  # fmt: skip
        nar = jax.jit(lambda p, b, l0: nar_generate(cfg, p, b, l0))
        codes, nar_s = timed(nar, params, nb, level0[:, :R] if level0.shape[1] >= R else jnp.pad(level0, ((0, 0), (0, R - level0.shape[1]))),
                             repeat=args.repeat)  # fmt: skip
        line.update(nar_seconds=round(nar_s, 4))
        total = ar_s + nar_s
        if codec is not None:
            clips = [np.asarray(c[: args.steps]).astype(np.int16) for c in np.asarray(codes)]
            t0 = time.perf_counter()
            codec.decode(clips)
            codec_s = time.perf_counter() - t0
            line.update(codec=args.codec, codec_seconds=round(codec_s, 4))
            total += codec_s
        audio = n_tokens / FPS
        line.update(audio_seconds=round(audio, 2), audio_seconds_per_s=round(audio / total, 2),
                    realtime_factor=round(audio / total, 2))  # fmt: skip
        print(json.dumps(line), flush=True)

    if args.mixed:
        rng = np.random.default_rng(1)
        lengths = rng.integers(args.steps // 8, args.steps + 1, args.mixed)
        items = items_for(cfg, args.mixed, args.text_len, args.prompt_frames, seed=2)
        slots = max(args.batch)
        for continuous in (True, False):
            def run():
                s = ARScheduler(cfg, params, slots=slots, max_tokens=args.steps, text_bucket=bucket(args.text_len),
                                prom_bucket=bucket(args.prompt_frames), chunk=16, continuous=continuous)  # fmt: skip
                for i, (it, n) in enumerate(zip(items, lengths)):
                    s.submit(i, it["text"], it["prom"], int(n))
                return sum(len(raw) for _, raw, _, _ in s.run())
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
