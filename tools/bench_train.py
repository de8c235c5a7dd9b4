"""Training-step throughput: one JSON line per run (tokens/s, step time, MFU, the attention path that ran, memory).

    python tools/bench_train.py [--config configs/ar+nar-llama-8.yaml] [--batch 16] [--length 1080]
        [--mesh data=-1,fsdp=1,tensor=1] [--dtype bfloat16] [--attention auto|xla|cudnn|splash] [--remat none|full|dots]
        [--grad-accum 1] [--optimizer adamw|prodigy] [--steps 10] [--warmup 3] [--profile DIR]
        [--peak-tflops 989 | --peak h200-measured] [section.key=value ...]
    python tools/bench_train.py --tpu-aot v5e:2x4 [...]   # compile for a TPU topology from this machine (needs libtpu)
    PYTHONPATH=DIR JAX_PLATFORMS=cpu python tools/bench_train.py --tpu-aot v4:2x2x1   # v4-8 (4 megacore chips)

MFU is reported twice: against a matmul peak measured in the same run (`matmul_tflops_measured`: an N^3 matmul in
the compute dtype, N = --matmul-n) and against the vendor's dense peak (`mfu_vendor`). `attention` names the path
the compiled step runs (models.backbone.attention_path); `attention_kernel_in_hlo` checks the compiled program for the
fused kernel's call (cuDNN fMHA on GPU, the splash Pallas kernel on TPU). Memory: the compiled step's own
figures (arguments, temporaries), the device's peak where it reports one, this process's peak RSS, and the bytes of
the parameters and of the optimizer state per device, and `opt_state_bytes` (the whole optimizer state, all
devices together). A LoRA run (`train.lora.rank=128` etc. as overrides, on a random base) trains and holds
optimizer state for the LoRA only: compare its `opt_state_bytes` with a full run's; `model.frozen_params=[...]`
shrinks it by the frozen parameters' moments.

The real train step of `python -m valle_jax.train` (valle_jax.train_state.Trainer: float32 master weights,
AdamW, clipping, NaN guard, dropout) on synthetic batches: every item is `--length` rows (text 10%, prompt
20%, response the rest), levels drawn as in training. Tokens/s counts every row of every item.

MFU = achieved model FLOP/s / (devices x peak). Model FLOPs per token = 6 x (matmul weights touched per token:
attention, MLP and one output head) + 12 x layers x length x dim (attention scores and values, no causal
discount), the usual convention (PaLM appendix B). The peak is --peak-tflops, or --peak NAME from PEAK_TFLOPS,
or guessed from the device kind (dense bf16 figures of the vendors; `h200-measured` is the 788 TFLOP/s that a
bf16 8192^3 matmul reached on the project's H200).

--tpu-aot TOPOLOGY (e.g. v5e:2x2, v4:2x2x1): lower and compile the step for that TPU slice with libtpu's
compile-only client and report the compiled memory per chip against the chip's HBM (does it fit?); runs
nothing. Without libtpu it prints one JSON line saying why. It also reports XLA's cost analysis (FLOPs, bytes
accessed) and a roofline estimate of tokens/s from the chip's peak FLOP/s and HBM bandwidth (on paper). XLA counts
a Pallas kernel's operands and results once and none of its FLOPs, so on the splash path the roofline adds the
kernel's own work (`splash_kernel_cost`: its causal FLOPs, and the key/value and query tiles it reads again for
every tile pair it visits), reported apart as `attention_kernel_*_est`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from tools.tpu_aot import HBM_GBPS, HBM_GIB, NO_LIBTPU, chip_of, cost_fields, memory_fields, tpu_devices  # noqa: E402

PEAK_TFLOPS = {  # dense bf16, per device
    "h100": 989.0,
    "h200": 989.0,
    "h200-measured": 788.0,  # bf16 8192^3 matmul on the project's H200 (spec/stack.md)
    "a100": 312.0,
    "l4": 121.0,
    "v4": 275.0,
    "v5e": 197.0,
    "v5p": 459.0,
    "v6e": 918.0,
}


def guess_peak(device_kind: str) -> float | None:
    k = device_kind.lower()
    for needle, name in (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), (" l4", "l4"), ("v5 lite", "v5e"),
                         ("v5e", "v5e"), ("v5p", "v5p"), ("v6", "v6e"), ("v4", "v4")):  # fmt: skip
        if needle in k:
            return PEAK_TFLOPS[name]
    return None


def model_flops_per_token(mcfg, length: int) -> float:
    D, L, F = mcfg.d_model, mcfg.n_layers, mcfg.ffn_dim
    H, K, Dh = mcfg.n_heads, mcfg.n_kv_heads, mcfg.head_dim
    per_layer = D * H * Dh + 2 * D * K * Dh + H * Dh * D + 3 * D * F
    head = D * max(mcfg.head_widths)
    return 6.0 * (L * per_layer + head) + 12.0 * L * length * D


def splash_kernel_cost(mcfg, batch: int, length: int, n_devices: int) -> dict:
    """What XLA's cost analysis does not see of the splash kernel, per device: the FLOPs of the tile pairs it
    visits (causal: the blocks on and below the diagonal; forward QK^T and PV, fused backward recomputing QK^T plus
    dP, dV, dQ, dK: 4 + 10 matmuls of t x t x Dh per pair and head) and the tile reads beyond one read of each
    operand (forward: a key and a value tile per pair; backward: a query, an output-gradient tile and two float32
    row statistics per pair), for every layer. Work is split evenly over the devices (batch and heads)."""
    from valle_jax.models.llama import SPLASH_BLOCK, splash_tile

    rows = -(-length // SPLASH_BLOCK) * SPLASH_BLOCK
    t, Dh = splash_tile(rows), mcfg.head_dim
    n = rows // t
    pairs = n * (n + 1) // 2
    heads = batch * mcfg.n_heads * mcfg.n_layers / n_devices  # (item, head, layer) triples per device
    itemsize = 2 if mcfg.dtype in ("bfloat16", "float16") else 4
    flops = heads * pairs * 14 * t * t * Dh
    extra = heads * (pairs - n) * (2 * 2 * t * Dh * itemsize + 2 * t * 4)
    return {"attention_kernel_tflops_per_device_est": round(flops / 1e12, 4),
            "attention_kernel_extra_gbytes_per_device_est": round(extra / 1e9, 3), "splash_tile": t}


def synthetic_items(cfg, batch: int, length: int, seed: int = 0) -> dict:
    """A host batch whose every item fills `length` rows exactly (response bucket includes the stop row)."""
    from valle_jax.layout import extra_rows, training_batch

    m = cfg.model
    t, p = max(2, length // 10), max(1, length // 5)
    r = max(2, length - t - p - extra_rows(m))
    rng = np.random.default_rng(seed)
    levels = rng.choice(np.asarray(m.training_levels), size=batch)
    items = [{"text": rng.integers(1, m.text_tokens, t), "prom": rng.integers(0, m.audio_tokens, (p, m.resp_levels)),
              "resp": rng.integers(0, m.audio_tokens, (r - 1, m.resp_levels))} for _ in range(batch)]  # fmt: skip
    b = training_batch(m, items, [int(x) for x in levels], {"text": t, "prom": p, "resp": r})
    return {k: np.asarray(v, np.int32) for k, v in b._asdict().items()}


def parse_mesh(text: str):
    from valle_jax.config import MeshConfig

    sizes = {k.strip(): int(v) for k, v in (part.split("=") for part in filter(None, text.split(",")))}
    return MeshConfig(**sizes)


def build_config(args):
    import dataclasses

    from valle_jax.config import load_config

    cfg = load_config(args.config, args.overrides)
    train = dataclasses.replace(cfg.train, compute_dtype=args.dtype, remat=args.remat, grad_accum=args.grad_accum,
                                optimizer=args.optimizer, warmup_steps=0)  # fmt: skip
    model = dataclasses.replace(cfg.model, attention_impl=args.attention)
    if args.attention in ("cudnn", "splash"):  # a fused kernel cannot drop attention probabilities
        model = dataclasses.replace(model, attention_dropout=0.0)
    return dataclasses.replace(cfg, train=train, mesh=parse_mesh(args.mesh), model=model)


def kernel_in_hlo(text: str, path: str) -> bool | None:
    """Does the compiled program call the fused attention kernel of `path`? (None: nothing to look for.)"""
    t = text.lower()
    if path == "cudnn":
        return "cudnn$fmha" in t or "__cudnn$fmha" in t or "cudnn_fmha" in t
    if path == "splash":
        # the Mosaic kernel's call; interpret mode (a program compiled for a non-TPU platform) has splash op names
        # in its metadata but no tpu_custom_call
        return "tpu_custom_call" in t and ("splash" in t or "flash" in t)
    return None


def state_bytes_per_device(abstract_tree) -> int:
    """Bytes one device holds of a sharded abstract tree (ShapeDtypeStructs with shardings)."""
    import jax

    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
        total += int(np.prod(shape)) * np.dtype(leaf.dtype).itemsize
    return total


def measure_matmul_tflops(dtype: str, n: int, device=None, reps: int = 5) -> float:
    """TFLOP/s of an n x n x n matmul in `dtype` on one device: the peak MFU is measured against."""
    import jax
    import jax.numpy as jnp

    device = device or jax.devices()[0]
    a = jax.device_put(jnp.ones((n, n), dtype), device)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2.0 * n**3 / min(times) / 1e12


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def tpu_aot(args) -> int:
    base = {"mode": "tpu-aot", "topology": args.tpu_aot, "config": args.config, "batch": args.batch, "length": args.length}
    devices, why = tpu_devices(args.tpu_aot)
    if devices is None:
        emit({**base, "ok": False, "why": why})
        return 0 if why == NO_LIBTPU else 1
    import jax

    from valle_jax import parallel
    from valle_jax.models.valle import Batch
    from valle_jax.train_state import Trainer

    cfg = build_config(args)
    kind = devices[0].device_kind
    mesh = parallel.make_mesh(cfg.mesh, devices)
    trainer = Trainer(cfg, mesh=mesh)
    host = synthetic_items(cfg, args.batch, args.length)
    abstract_batch = Batch(*(jax.ShapeDtypeStruct(host[k].shape, host[k].dtype, sharding=trainer.batch_sharding) for k in Batch._fields))
    t0 = time.perf_counter()
    try:
        abstract_frozen = jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, jax.numpy.float32, sharding=sh),
                                       trainer.frozen_shapes, trainer.frozen_sharding)  # a LoRA run's base  # fmt: skip
        compiled = trainer._train_step.lower(trainer.abstract_state, abstract_batch, abstract_frozen).compile()
    except Exception as e:  # noqa: BLE001
        emit({**base, "ok": False, "device_kind": kind, "why": f"compile failed: {type(e).__name__}: {str(e)[:2000]}"})
        return 1
    compile_s = time.perf_counter() - t0
    mem = memory_fields(compiled)
    cost = cost_fields(compiled)
    chip = chip_of(args.tpu_aot)
    hbm = HBM_GIB.get(chip) if chip else None
    memory = trainer.memory()
    n_params = memory["trained_params"] + memory["frozen_params"]
    tokens = args.batch * args.length
    model_tflops = model_flops_per_token(trainer.mcfg, args.length) * tokens / 1e12
    path = trainer.attention_path(args.length)
    roofline = {}
    kernel = splash_kernel_cost(trainer.mcfg, args.batch, args.length, len(devices)) if path == "splash" else {}
    if chip and cost.get("hlo_tflops_per_device"):
        # on paper: the step takes at least the longer of its FLOPs at peak and its bytes at HBM bandwidth
        tflops = cost["hlo_tflops_per_device"] + kernel.get("attention_kernel_tflops_per_device_est", 0.0)
        gbytes = cost["hlo_gbytes_accessed_per_device"] + kernel.get("attention_kernel_extra_gbytes_per_device_est", 0.0)
        t_flops, t_bytes = tflops / PEAK_TFLOPS[chip], gbytes / HBM_GBPS[chip]
        t = max(t_flops, t_bytes)
        roofline = {"roofline_step_s": round(t, 5), "roofline_bound": "compute" if t_flops >= t_bytes else "memory",
                    "roofline_tokens_per_s": round(tokens / t, 0),
                    "roofline_mfu": round(model_tflops / len(devices) / t / PEAK_TFLOPS[chip], 4),
                    "peak_tflops_per_chip": PEAK_TFLOPS[chip], "hbm_gbps_per_chip": HBM_GBPS[chip]}  # fmt: skip
    emit({**base, "ok": True, "device_kind": kind, "n_devices": len(devices), "mesh": dict(mesh.shape),
          "compute_dtype": cfg.train.compute_dtype, "remat": cfg.train.remat, "params_M": round(n_params / 1e6, 2),
          "attention": path, "attention_kernel_in_hlo": kernel_in_hlo(compiled.as_text(), path),
          "attention_dropout": trainer.mcfg.attention_dropout_rate, "compile_s": round(compile_s, 2), **mem,
          "hbm_gib": hbm, "fits": (mem["memory_per_device_gib"] < hbm) if hbm else None,
          "params_gib_per_device": round(state_bytes_per_device(trainer.abstract_state["params"]) / 2**30, 3),
          "opt_state_gib_per_device": round(state_bytes_per_device(trainer.abstract_state["opt_state"]) / 2**30, 3),
          "opt_state_bytes": memory["opt_state_bytes"], "trained_params_M": round(memory["trained_params"] / 1e6, 4),
          "model_tflops_per_step": round(model_tflops, 3), **cost, **kernel, **roofline})  # fmt: skip
    return 0


def bench(args) -> int:
    import resource

    import jax

    from valle_jax.train_state import Trainer

    cfg = build_config(args)
    trainer = Trainer(cfg)
    host = synthetic_items(cfg, args.batch, args.length)
    dev = jax.devices()[0]
    if trainer.lora is not None:  # a LoRA run: on a random base made on the mesh (train.lora.rank=... overrides)
        from valle_jax.models.valle import init_params

        make_base = jax.jit(lambda k: init_params(trainer.mcfg, k), out_shardings=trainer.frozen_sharding)
        state = trainer.init_state(make_base(jax.random.key(0)))
    else:
        state = trainer.init_state()
    batch = trainer.device_batch(host)  # time the compiled step alone (no host-to-device copy)
    frozen = trainer.frozen
    t0 = time.perf_counter()
    compiled = trainer._train_step.lower(state, batch, frozen).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        state, m = compiled(state, batch, frozen)
    jax.block_until_ready(state)  # (--warmup 0: nothing has run yet)
    if args.profile:
        jax.profiler.start_trace(args.profile)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch, frozen)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    if args.profile:
        jax.profiler.stop_trace()
    step_s = float(np.median(times))
    tokens = args.batch * args.length
    n = jax.device_count()
    flops_tok = model_flops_per_token(trainer.mcfg, args.length)
    achieved = flops_tok * tokens / step_s
    vendor = args.peak_tflops or (PEAK_TFLOPS[args.peak] if args.peak else guess_peak(dev.device_kind))
    measured = measure_matmul_tflops(trainer.mcfg.dtype, args.matmul_n) if args.matmul_n else None
    stats = {}
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU has none
        stats = {}
    path = trainer.attention_path(args.length)
    mem = trainer.memory()
    n_params = mem["trained_params"] + mem["frozen_params"]
    lora = cfg.train.lora
    emit({"mode": "run", "config": args.config, "device": dev.device_kind, "platform": dev.platform, "n_devices": n,
          "mesh": dict(trainer.mesh.shape), "batch": args.batch, "length": args.length, "compute_dtype": trainer.mcfg.dtype,
          "attention": path, "attention_kernel_in_hlo": kernel_in_hlo(compiled.as_text(), path),
          "attention_dropout": trainer.mcfg.attention_dropout_rate, "remat": cfg.train.remat,
          "grad_accum": cfg.train.grad_accum, "optimizer": str(cfg.train.optimizer), "params_M": round(n_params / 1e6, 2),
          "compile_s": round(compile_s, 2), "step_time_s": round(step_s, 5), "step_time_min_s": round(min(times), 5),
          "tokens_per_step": tokens, "tokens_per_s": round(tokens / step_s, 1),
          "model_gflops_per_token": round(flops_tok / 1e9, 4), "tflops_per_device": round(achieved / n / 1e12, 3),
          "matmul_n": args.matmul_n, "matmul_tflops_measured": round(measured, 3) if measured else None,
          "mfu": round(achieved / (n * measured * 1e12), 4) if measured else None,
          "peak_tflops_vendor": vendor, "mfu_vendor": round(achieved / (n * vendor * 1e12), 4) if vendor else None,
          "peak_memory_gib": round(stats["peak_bytes_in_use"] / 2**30, 3) if "peak_bytes_in_use" in stats else None,
          "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
          **memory_fields(compiled), **cost_fields(compiled),
          "params_gib_per_device": round(state_bytes_per_device(trainer.abstract_state["params"]) / 2**30, 3),
          "opt_state_gib_per_device": round(state_bytes_per_device(trainer.abstract_state["opt_state"]) / 2**30, 3),
          "lora": None if lora is None else {"rank": lora.rank, "alpha": lora.alpha, "embeddings": lora.embeddings},
          "trained_params_M": round(mem["trained_params"] / 1e6, 4), "frozen_params_M": round(mem["frozen_params"] / 1e6, 4),
          "opt_state_bytes": mem["opt_state_bytes"], "trained_params_bytes": mem["params_bytes"],
          "loss": float(m["loss"]), "finite": bool(m["finite"])})  # fmt: skip
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "ar+nar-llama-8.yaml"))
    ap.add_argument("--batch", type=int, default=16, help="global batch (items)")
    ap.add_argument("--length", type=int, default=1080, help="rows per item")
    ap.add_argument("--mesh", default="data=-1,fsdp=1,tensor=1")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "splash"],
                    help="auto: cuDNN on GPU, splash on TPU, XLA on CPU (config.resolve_attention)")
    ap.add_argument("--matmul-n", type=int, default=None,
                    help="size of the matmul whose TFLOP/s is the measured peak (default 8192 on accelerators, 2048 on CPU; 0 = skip)")
    ap.add_argument("--profile", metavar="DIR", help="write a jax.profiler trace of the timed steps to DIR")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "prodigy"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, help="peak TFLOP/s per device for MFU")
    ap.add_argument("--peak", choices=sorted(PEAK_TFLOPS), help="named peak (see PEAK_TFLOPS)")
    ap.add_argument("--tpu-aot", metavar="TOPOLOGY", help="compile only, for a TPU topology such as v5e:2x2 or v4:2x2x1")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = ap.parse_args(argv)
    if args.matmul_n is None and not args.tpu_aot:
        import jax

        args.matmul_n = 2048 if jax.default_backend() == "cpu" else 8192
    return tpu_aot(args) if args.tpu_aot else bench(args)


if __name__ == "__main__":
    sys.exit(main())
