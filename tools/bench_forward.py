"""Teacher-forced forward throughput: one JSON line per configuration.

    python tools/bench_forward.py [--config configs/ar+nar-llama-8.yaml | --checkpoint C] [--batch 16] [--length 1100]
        [--dtype bfloat16] [--attention auto|xla|cudnn|splash] [--level 0] [--iters 10]

Random weights unless --checkpoint is given (speed does not depend on the values). Tokens/s counts every row of
every item (batch x length) per forward pass.
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
from valle_jax.models.valle import VALLE, Batch, init_params  # noqa: E402


def synthetic_batch(cfg, batch: int, length: int, level: int, seed: int = 0) -> Batch:
    """Text 10%, prompt 20%, response the rest of `length` rows, as in a typical training item."""
    rng = np.random.default_rng(seed)
    extra = 4 if cfg.has_rvq_token else 2
    t, p = max(2, length // 10), max(1, length // 5)
    r = max(1, length - t - p - extra)
    q = cfg.resp_levels
    return Batch(
        text=jnp.asarray(rng.integers(4, cfg.text_tokens, (batch, t)), jnp.int32), text_len=jnp.full((batch,), t, jnp.int32),
        prom=jnp.asarray(rng.integers(0, 1024, (batch, p, q)), jnp.int32), prom_len=jnp.full((batch,), p, jnp.int32),
        resp=jnp.asarray(rng.integers(0, 1024, (batch, r, q)), jnp.int32), resp_len=jnp.full((batch,), r, jnp.int32),
        level=jnp.full((batch,), level, jnp.int32),
    )  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "ar+nar-llama-8.yaml"))
    ap.add_argument("--checkpoint", help="reference .sft/.pth or model directory (overrides --config)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=1100)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--attention", default="auto", choices=["auto", "xla", "cudnn", "splash"],
                    help="auto: cuDNN on GPU, splash on TPU, XLA on CPU")
    ap.add_argument("--level", type=int, default=0)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)

    if args.checkpoint:
        from valle_jax.convert import load_any

        cfg, params = load_any(args.checkpoint)
    else:
        cfg = load_yaml(args.config)
        params = None
    from valle_jax.config import runtime_config
    from valle_jax.models.backbone import attention_path

    cfg = runtime_config(cfg, args.dtype, args.attention)
    path = attention_path(cfg, args.length, cached=False)
    if params is None:
        params = init_params(cfg, jax.random.key(0))
    params = jax.tree.map(lambda a: jnp.asarray(a, args.dtype), params)  # weights in the compute dtype (inference)
    batch = synthetic_batch(cfg, args.batch, args.length, args.level)
    model = VALLE(cfg)
    fwd = jax.jit(lambda p, b: model.apply({"params": p}, b)[0])
    t0 = time.perf_counter()
    fwd(params, batch).block_until_ready()
    compile_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        fwd(params, batch).block_until_ready()
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        fwd(params, batch).block_until_ready()
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    rows = args.batch * args.length
    print(json.dumps({
        "bench": "forward", "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "model": cfg.name, "dim": cfg.d_model, "layers": cfg.n_layers, "heads": cfg.n_heads, "params": n_params,
        "batch": args.batch, "length": args.length, "dtype": args.dtype, "attention": path, "level": args.level,
        "compile_s": round(compile_s, 3), "step_s": round(step, 6), "tokens_per_s": round(rows / step, 1),
        "tflops": round(2 * n_params * rows / step / 1e12, 3),
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
