"""Synthesis throughput, measured as a job runs it: one JSON line per measurement.

    python tools/bench_synth.py [--config configs/ar+nar-llama-8.yaml | --checkpoint C] [--set model.dim=256 ...]
        [--batch 1 8 64 256] [--steps 450] [--no-stop] [--sampler greedy cli] [--dtype bfloat16]
        [--job 256 --job-slots 64 --codec vocos] [--compare-full] [--devices N] [--tpu-aot v5e:2x4]

Random weights unless --checkpoint is given (speed does not depend on the values). Lines (`bench` field):

* `synth_ar` (per batch size and sampler): `prefill_seconds` (the AR prefixes of the batch into the cache,
  `prefill_rows_per_s`), then `ar_seconds` / `ar_tokens_per_s` / `ms_per_step`: decoding alone (the chunked
  decode loop over a filled state, prefill excluded), with `greedy` or the CLI preset sampler (`cli`: what a job
  runs by default). `ar_tokens_per_s` of batch 1 greedy is the headline AR figure.
* `synth_nar` (per batch size): every NAR level for the batch of `--steps` frames.
* `synth_full` (with --compare-full): the reference's full-recompute loop (`ar_generate_full`) against the
  cached loop on the same batch, both end to end (prefill included) and per generated token.
* `synth_job` (with --job N): the real pipeline (`pipeline.Synthesizer.run`): N items of mixed lengths
  (`--steps` / 8 .. `--steps` tokens), continuous batching over `--job-slots` slots split over the devices, NAR
  batches, codec decoding overlapped (with --codec: a random-weight codec of the real architecture in its sidecar,
  warm), as `audio_seconds_per_s` (seconds of audio per wall second; = realtime factor). The job runs once to
  compile and warm up, then is timed.
  With --job-loras N the items use N random LoRA files (rank --lora-rank), round robin: the voices share the
  slots and NAR batches (`loras` in the line); compare with N = 0 for the cost of serving several LoRAs at once.
* `synth_aot` (with --tpu-aot TOPOLOGY, no TPU needed): the decode chunk and the NAR pass lowered and compiled for
  that TPU slice with libtpu, slots over all its chips: compiled memory per device and XLA's cost analysis.

`--no-stop` makes the stop token unreachable so every item decodes exactly --steps tokens.
`--checkpoint X --batch 1 --steps 150 --no-stop` prints a `synth_ar` line with `ar_tokens_per_s`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.tpu_aot import HBM_GIB, NO_LIBTPU, chip_of, cost_fields, memory_fields, tpu_devices  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def block_stop(cfg, params):
    """Make the stop token unreachable (fixed-length decoding for timing)."""
    import jax.numpy as jnp

    head = params["classifiers"]["proj_0"] if cfg.experimental.split_classifiers else params["classifier"]
    head["bias"] = jnp.asarray(head["bias"]).at[cfg.stop_token].set(-1e9)
    return params


def requests_for(cfg, n: int, text_len: int, prom_frames: int, max_tokens, seed: int = 0):
    import numpy as np

    from valle_jax import pipeline

    rng = np.random.default_rng(seed)
    tokens = np.broadcast_to(np.asarray(max_tokens), (n,))
    return [pipeline.Request(i, [np.r_[1, rng.integers(4, cfg.text_tokens, text_len - 2), 2].astype(np.int32)],
                             rng.integers(0, 1024, (prom_frames, cfg.resp_levels)).astype(np.int32), int(tokens[i]))
            for i in range(n)]  # fmt: skip


def load(args):
    """(cfg, params) as the benchmark runs them: compute dtype, attention, overrides, random or loaded weights."""
    import jax
    import jax.numpy as jnp

    from valle_jax.config import load_yaml, runtime_config
    from valle_jax.models.valle import init_params

    if args.checkpoint:
        from valle_jax.convert import load_any

        cfg, params = load_any(args.checkpoint, heads=args.heads)
    else:
        cfg, params = load_yaml(args.config), None
    if args.set:
        cfg = cfg.override(args.set)
    cfg = runtime_config(cfg, args.dtype, args.attention)
    if params is None:
        params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: jnp.asarray(a, args.dtype), params)
    if args.no_stop:
        params = block_stop(cfg, params)
    return cfg, params


def sampler(name: str, n: int):
    from valle_jax import sampling

    if name == "greedy":
        return sampling.make_params(n, temperature=0.0, mirostat_shared=False)
    return sampling.stack_params([sampling.ar_defaults(1, name, mirostat_shared=False)] * n)


def best_of(repeat: int, fn):
    """(result of the last call, best wall seconds over `repeat` calls); fn blocks until its work is done."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


# ---------------------------------------------------------------------------------------------------------------
# AR: prefill and decode apart


def bench_ar(cfg, params, B: int, name: str, args, mesh, rules, base: dict) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from valle_jax import generate as G
    from valle_jax import pipeline, sampling
    from valle_jax.layout import bucket, prefix_rows

    C = cfg.causal_size
    n_iter = max(1, args.steps // C)
    n_chunks = -(-n_iter // min(args.chunk, n_iter))
    chunk = -(-n_iter // n_chunks)
    reqs = requests_for(cfg, B, args.text_len, args.prompt_frames, args.steps)
    T, Pp = bucket(args.text_len), bucket(args.prompt_frames)
    batch = pipeline.request_batch([r.lines[0] for r in reqs], [r.prom for r in reqs], pad_to={"text": T, "prom": Pp})
    cache_len = prefix_rows(cfg, T, Pp) + n_iter * C + C
    sp = sampler(name, B)
    feats = sampling.features_of(sp)
    template = G.empty_state(cfg, B, n_iter * C, cache_len, sp)
    progs = G.programs(cfg, template, mesh, rules)
    params = G.place_params(cfg, params, mesh, rules)
    batch = G.place_batch(batch, mesh, rules)
    sp = G.place_batch(sp, mesh, rules)
    limit = jnp.full((B,), n_iter * C, jnp.int32)

    def do_prefill():
        out = progs.prefill(cfg, params, batch)
        jax.block_until_ready(out)
        return out

    do_prefill()  # compile
    (cache, logits, start), prefill_s = best_of(args.repeat, do_prefill)
    start_rows = int(np.asarray(start).max())

    def filled():
        state = jax.device_put(G.empty_state(cfg, B, n_iter * C, cache_len, sp), progs.state_sharding)
        state = progs.insert(state, jnp.arange(B), cache, logits, start, limit, sp, 1)
        return jax.block_until_ready(state)

    def do_decode(state):
        key = jax.random.key(0)
        for i in range(n_chunks):
            attend = G.attend_length(start_rows + (i + 1) * chunk * C, cache_len) if args.attend else None
            state, key = progs.decode(cfg, params, state, key, chunk, feats, attend)
        return jax.block_until_ready(state)

    do_decode(filled())  # compile every variant
    best, tokens = float("inf"), 0
    for _ in range(args.repeat):
        state = filled()
        t0 = time.perf_counter()
        state = do_decode(state)
        dt = time.perf_counter() - t0
        if dt < best:
            best, tokens = dt, int(np.asarray(state.count).sum())
    emit(dict(base, bench="synth_ar", batch=B, sampler=name, prefill_seconds=round(prefill_s, 5),
              prefill_rows_per_s=round(B * prefix_rows(cfg, T, Pp) / prefill_s, 1), decode_steps=n_iter,
              ar_tokens=tokens, ar_seconds=round(best, 5), ar_tokens_per_s=round(tokens / best, 1),
              ms_per_step=round(1000 * best / n_iter, 4)))  # fmt: skip


def bench_nar(cfg, params, B: int, args, mesh, rules, base: dict) -> None:
    import jax
    import numpy as np

    from valle_jax import generate as G
    from valle_jax import pipeline
    from valle_jax.layout import bucket

    reqs = requests_for(cfg, B, args.text_len, args.prompt_frames, args.steps)
    rng = np.random.default_rng(3)
    level0 = [rng.integers(0, 1024, args.steps).astype(np.int32) for _ in reqs]
    pad = {"text": bucket(args.text_len), "prom": bucket(args.prompt_frames), "resp": bucket(args.steps)}
    nb = G.place_batch(pipeline.request_batch([r.lines[0] for r in reqs], [r.prom for r in reqs], level0, pad_to=pad),
                       mesh, rules)  # fmt: skip
    params = G.place_params(cfg, params, mesh, rules)
    run = lambda: jax.block_until_ready(pipeline.nar_codes(cfg, params, nb, nb.resp[..., 0]))  # noqa: E731
    run()
    _, nar_s = best_of(args.repeat, run)
    frames = B * args.steps
    emit(dict(base, bench="synth_nar", batch=B, levels=cfg.resp_levels - 1, frames=frames, nar_seconds=round(nar_s, 5),
              nar_frames_per_s=round(frames / nar_s, 1)))  # fmt: skip


def bench_full(cfg, params, B: int, args, base: dict) -> None:
    """The reference's full-recompute loop against the cached loop, same batch and steps, both end to end."""
    import jax
    import numpy as np

    from valle_jax import pipeline
    from valle_jax.generate import ar_generate_full
    from valle_jax.layout import bucket

    reqs = requests_for(cfg, B, args.text_len, args.prompt_frames, args.steps)
    pad = {"text": bucket(args.text_len), "prom": bucket(args.prompt_frames)}
    batch = pipeline.request_batch([r.lines[0] for r in reqs], [r.prom for r in reqs], pad_to=pad)
    full = jax.jit(lambda p, b: ar_generate_full(cfg, p, b, args.steps))
    cached = lambda: jax.block_until_ready(pipeline.ar_codes(cfg, params, batch, args.steps))  # noqa: E731
    reference = lambda: jax.block_until_ready(full(params, batch))  # noqa: E731
    cached(), reference()
    res, cached_s = best_of(args.repeat, cached)
    ref, full_s = best_of(1, reference)
    n = int(np.asarray(res.n_raw).sum())
    assert n == int(np.asarray(ref.n_raw).sum()), "the two loops generated different numbers of tokens"
    emit(dict(base, bench="synth_full", batch=B, tokens=n, cached_seconds=round(cached_s, 4),
              cached_tokens_per_s=round(n / cached_s, 1), full_recompute_seconds=round(full_s, 4),
              full_recompute_tokens_per_s=round(n / full_s, 1), cached_speedup=round(full_s / cached_s, 2)))  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# the real job


def random_loras(cfg, params, n: int, rank: int) -> list[str]:
    """n LoRA files with random nonzero adapters (the reference's format) in a temporary folder."""
    import tempfile

    import jax
    import numpy as np

    from valle_jax.lora_files import write_lora
    from valle_jax.models.lora import LoraConfig, init_lora

    folder = Path(tempfile.mkdtemp(prefix="bench_loras_"))
    lcfg = LoraConfig(rank=rank, alpha=rank)
    out = []
    for k in range(n):
        lp = init_lora(cfg, lcfg, jax.random.key(k), params)
        lp = jax.tree.map(lambda x, k=k: np.asarray(jax.random.normal(jax.random.key(k + x.size), x.shape)) * 0.01, lp)
        out.append(str(write_lora(folder / f"voice{k}.lora.sft", lcfg, lp)))
    return out


def bench_job(cfg, params, args, mesh, rules, base: dict) -> None:
    import numpy as np

    from valle_jax import pipeline

    rng = np.random.default_rng(1)
    lengths = rng.integers(max(1, args.steps // 8), args.steps + 1, args.job)
    reqs = requests_for(cfg, args.job, args.text_len, args.prompt_frames, lengths, seed=2)
    if args.job_loras:  # items of N voices, round robin: N random LoRA files, stacked in one job
        loras = random_loras(cfg, params, args.job_loras, args.lora_rank)
        reqs = [dataclasses.replace(r, lora=loras[i % len(loras)]) for i, r in enumerate(reqs)]
    models = pipeline.Models(cfg, params, cfg, params)
    settings = pipeline.Settings(slots=args.job_slots, chunk=args.chunk, max_ar_steps=args.steps,
                                 ar={"temperature": 0.0} if args.job_sampler == "greedy" else {})  # fmt: skip
    codec = None
    if args.codec:
        from valle_jax.codec import CodecClient

        codec = CodecClient(args.codec, random_seed=0, batch_size=64, device=args.codec_device).start()
    try:
        syn = pipeline.Synthesizer(models, settings, codec, mesh=mesh, rules=rules)
        fps = syn.spec.frames_per_second

        def run():
            t0 = time.perf_counter()
            frames = audio = 0.0
            for out in syn.run(reqs, progress=False):
                frames += len(out.codes[0])
                audio += out.seconds if codec is not None else len(out.codes[0]) / fps
            return frames, audio, time.perf_counter() - t0

        run()  # compile and warm the codec
        frames, audio, wall = run()
        emit(dict(base, bench="synth_job", items=args.job, slots=args.job_slots, sampler=args.job_sampler,
                  loras=args.job_loras, lora_rank=args.lora_rank if args.job_loras else None,
                  codec=args.codec, codec_device=codec.device if codec is not None else None, frames=int(frames),
                  audio_seconds=round(audio, 2), wall_seconds=round(wall, 3), audio_seconds_per_s=round(audio / wall, 2),
                  ar_tokens_per_s=round(frames / wall, 1)))  # fmt: skip
    finally:
        if codec is not None:
            codec.close()


# ---------------------------------------------------------------------------------------------------------------
# TPU ahead-of-time compile


def tpu_aot(args) -> int:
    base = {"bench": "synth_aot", "topology": args.tpu_aot, "config": args.config, "set": args.set, "slots": args.batch,
            "steps": args.steps, "chunk": args.chunk}  # fmt: skip
    devices, why = tpu_devices(args.tpu_aot)
    if devices is None:
        emit({**base, "ok": False, "why": why})
        return 0 if why == NO_LIBTPU else 1
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from valle_jax import generate as G
    from valle_jax import parallel, sampling
    from valle_jax.config import load_yaml, runtime_config
    from valle_jax.layout import Batch, bucket, prefix_rows
    from valle_jax.models.valle import init_params, logical_axes

    cfg = load_yaml(args.config)
    if args.set:
        cfg = cfg.override(args.set)
    cfg = runtime_config(cfg, "bfloat16", "xla")
    mesh = parallel.make_mesh(None, devices)
    rules = parallel.axis_rules()
    B = args.batch[-1]
    C = cfg.causal_size
    T, Pp, R = bucket(args.text_len), bucket(args.prompt_frames), bucket(args.steps)
    cache_len = prefix_rows(cfg, T, Pp) + args.steps + C

    def abstract(tree, shardings):
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

    p_shapes = jax.eval_shape(lambda: jax.tree.map(lambda a: a.astype(jnp.bfloat16), init_params(cfg, jax.random.key(0))))
    p_abs = abstract(p_shapes, parallel.param_shardings(p_shapes, logical_axes(cfg), mesh, rules))
    sp = sampling.stack_params([sampling.ar_defaults(1, "cli", mirostat_shared=False)] * B)
    state_shapes = jax.eval_shape(lambda: G.empty_state(cfg, B, args.steps, cache_len, sp))
    progs = G.programs(cfg, state_shapes, mesh, rules)
    state_abs = abstract(state_shapes, progs.state_sharding)
    key_abs = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=NamedSharding(mesh, P()))
    batch_sh = NamedSharding(mesh, parallel.batch_spec(mesh, rules))
    shapes = {"text": (B, T), "prom": (B, Pp, cfg.resp_levels), "resp": (B, R, cfg.resp_levels)}
    batch_abs = Batch(**{f: jax.ShapeDtypeStruct(shapes.get(f, (B,)), jnp.int32, sharding=batch_sh) for f in Batch._fields})
    nar_features = sampling.features_of(sampling.nar_defaults(1, "cli"))
    nar = jax.jit(lambda p, b, sp: G.nar_generate(cfg, p, b, b.resp[..., 0], sampling_params=sp, features=nar_features))
    nsp_abs = abstract(jax.eval_shape(lambda: sampling.nar_defaults(B, "cli")),
                       jax.tree.map(lambda _: batch_sh, sampling.nar_defaults(B, "cli")))  # fmt: skip
    programs = {
        "decode_chunk": lambda: progs.decode.lower(cfg, p_abs, state_abs, key_abs, args.chunk,
                                                   sampling.features_of(sp), None),  # fmt: skip
        "nar_pass": lambda: nar.lower(p_abs, batch_abs, nsp_abs),
    }
    chip = chip_of(args.tpu_aot)
    status = 0
    for name, lower in programs.items():
        t0 = time.perf_counter()
        try:
            compiled = lower().compile()
        except Exception as e:  # noqa: BLE001
            emit({**base, "program": name, "ok": False, "why": f"{type(e).__name__}: {str(e)[:2000]}"})
            status = 1
            continue
        hlo = compiled.as_text()
        emit({**base, "program": name, "ok": True, "device_kind": devices[0].device_kind, "n_devices": len(devices),
              "mesh": dict(mesh.shape), "model": cfg.name, "dim": cfg.d_model, "layers": cfg.n_layers,
              "compile_s": round(time.perf_counter() - t0, 2), **memory_fields(compiled, digits=4),
              "hbm_gib": HBM_GIB.get(chip), **cost_fields(compiled),
              "conditionals": hlo.count("conditional("), "host_transfers": sum(hlo.count(op) for op in
                                                                                   ("outfeed(", "infeed(", " send(", " recv("))})  # fmt: skip
    return status


# ---------------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ar+nar-llama-8.yaml"))
    ap.add_argument("--checkpoint")
    ap.add_argument("--heads", type=int, help="attention heads when the checkpoint does not say (tiny fixtures)")
    ap.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="model config overrides (dim=256 ...)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64, 256])
    ap.add_argument("--steps", type=int, default=450, help="AR tokens per item (450 = 6 s of audio)")
    ap.add_argument("--chunk", type=int, default=32, help="decode steps per compiled call (the job's --chunk)")
    ap.add_argument("--text-len", type=int, default=48)
    ap.add_argument("--prompt-frames", type=int, default=225, help="prompt length (225 = 3 s)")
    ap.add_argument("--no-stop", action="store_true")
    ap.add_argument("--sampler", nargs="+", default=["greedy", "cli"], choices=["greedy", "cli", "inference", "forward"])
    ap.add_argument("--no-attend", dest="attend", action="store_false", help="decode attention over the whole cache")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="xla", choices=["xla", "cudnn"])
    ap.add_argument("--no-nar", dest="nar", action="store_false")
    ap.add_argument("--compare-full", action="store_true", help="also time the reference's full-recompute loop")
    ap.add_argument("--job", type=int, default=0, help="items in a real pipelined job (0 = skip)")
    ap.add_argument("--job-slots", type=int, default=64)
    ap.add_argument("--job-sampler", default="cli", choices=["greedy", "cli"])
    ap.add_argument("--job-loras", type=int, default=0, help="the job's items use this many LoRAs (round robin)")
    ap.add_argument("--lora-rank", type=int, default=128)
    ap.add_argument("--codec", choices=["encodec", "vocos", "dac"], help="decode the job's audio (random weights)")
    ap.add_argument("--codec-device", default="auto")
    ap.add_argument("--devices", type=int, default=0, help="local devices for the slots (0 = all)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--tpu-aot", metavar="TOPOLOGY", help="compile only, for a TPU slice such as v5e:2x4 (libtpu)")
    args = ap.parse_args(argv)
    if args.tpu_aot:
        return tpu_aot(args)
    if args.codec:
        from valle_jax.codec import share_gpu_with_codec

        share_gpu_with_codec(args.codec_device)  # before JAX starts
    import jax

    from valle_jax import parallel

    cfg, params = load(args)
    local = jax.local_devices()
    mesh = parallel.synthesis_mesh(args.devices or None)
    rules = parallel.axis_rules()
    base = {"device": local[0].device_kind, "backend": jax.default_backend(), "devices": mesh.devices.size,
            "model": cfg.name, "dim": cfg.d_model, "layers": cfg.n_layers, "dtype": args.dtype, "steps": args.steps,
            "no_stop": args.no_stop}  # fmt: skip
    for B in args.batch:
        for name in args.sampler:
            bench_ar(cfg, params, B, name, args, mesh, rules, base)
        if args.nar:
            bench_nar(cfg, params, B, args, mesh, rules, base)
        if args.compare_full:
            bench_full(cfg, params, B, args, base)
    if args.job:
        bench_job(cfg, params, args, mesh, rules, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
