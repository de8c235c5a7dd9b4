"""Prove a conversion: run valle_jax on a fixture-layout npz and write what the reference writes.

    python tools/parity.py --checkpoint CKPT(.sft|.pth|DIR) --inputs IN.npz --out OUT.npz [--levels 0,1,2]
        [--retnet-mode parallel|chunkwise] [--heads N] [--tol 2e-5] [--lora LORA.(sft|pth)]

Reads `text` [T], `prom` [P, levels], `resp` [R, levels] (tests/fixtures/README.md section 3) and writes
`logits_L{l}` [S, V]: the whole-sequence logits of one teacher-forced pass for level l (section 4), V = the
width of that level's head. Levels default to those the input file already holds reference logits for,
else 0, 1, 2 and the last level the model has. When IN.npz holds the reference's `logits_L{l}`, the max
absolute difference per level is printed and the exit status is 1 if any exceeds --tol. With --lora the
logits are computed with that reference LoRA file applied; without it, inputs that also hold the reference's
LoRA-free logits `logits_base_L{l}` (a LoRA fixture) are compared against those.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from valle_jax.config import ModelConfig  # noqa: E402
from valle_jax.convert import load_any  # noqa: E402
from valle_jax.models.valle import VALLE, head_width, make_batch  # noqa: E402


def model_levels(cfg: ModelConfig) -> list[int]:
    levels = ([0] if cfg.causal else []) + (list(range(1, cfg.resp_levels)) if cfg.has_nar else [])
    return levels


def default_levels(cfg: ModelConfig, inputs: dict) -> list[int]:
    stored = sorted(int(k[len("logits_L") :]) for k in inputs if k.startswith("logits_L") and k[len("logits_L") :].isdigit())
    if stored:
        return stored
    wanted = {0, 1, 2, cfg.resp_levels - 1}
    return [l for l in model_levels(cfg) if l in wanted]


def teacher_forced_logits(cfg: ModelConfig, params: dict, text, prom, resp, levels: list[int], lora=None) -> dict[str, np.ndarray]:
    """`logits_L{l}` of the fixture layout: batch of one, resp[:, :1] for the AR, resp[:, :l] for level l.
    `lora`: a `models.lora.LoraStack` of one LoRA, applied to the item."""
    from valle_jax.models.lora import apply_model

    model = VALLE(cfg)
    apply = jax.jit(lambda p, lo, b: apply_model(model, p, lo, None, b)[0])
    out = {}
    for level in levels:
        if level not in model_levels(cfg):
            raise SystemExit(f"--levels: level {level} is not a level of this model (has {model_levels(cfg)})")
        # All response columns are passed: level l reads only columns < l (the others get weight 0, exactly), so
        # one compiled program serves every level.
        batch = make_batch([{"text": text, "prom": prom, "resp": np.asarray(resp), "level": level}])
        logits = np.asarray(apply(params, lora, batch))[0]
        out[f"logits_L{level}"] = logits[:, : head_width(cfg, level)].astype(np.float32)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="reference .sft/.pth or a valle_jax model directory")
    ap.add_argument("--inputs", required=True, help="npz with text, prom, resp (fixture layout)")
    ap.add_argument("--out", required=True, help="npz to write")
    ap.add_argument("--levels", help="comma-separated RVQ levels (default: see above)")
    ap.add_argument("--retnet-mode", choices=["parallel", "chunkwise"], help="RetNet form (default: the reference's, chunkwise)")
    ap.add_argument("--heads", type=int, help="attention heads when they cannot be found (default: fixtures.json beside the file, else dim/64)")
    ap.add_argument("--tol", type=float, default=2e-5, help="max abs logit difference accepted when the inputs hold reference logits")
    ap.add_argument("--greedy", action="store_true", help="also write ar_greedy, ar_greedy_raw, nar_greedy")
    ap.add_argument("--max-steps", type=int, help="AR steps for --greedy (default: fixtures.json beside the inputs, else 26)")
    ap.add_argument("--loss", action="store_true", help="also write the loss_* values of the inputs' loss batches")
    ap.add_argument("--lora", help="reference LoRA file (.sft/.pth) applied to the model (logits only)")
    args = ap.parse_args(argv)

    overrides = {"retnet_mode": args.retnet_mode} if args.retnet_mode else {}
    cfg, params = load_any(args.checkpoint, heads=args.heads, overrides=overrides, dtype=np.float32)
    inputs = dict(np.load(args.inputs))
    for key in ("text", "prom", "resp"):
        if key not in inputs:
            raise SystemExit(f"{args.inputs}: missing array {key!r} (expected the tests/fixtures npz layout)")
    levels = [int(x) for x in args.levels.split(",")] if args.levels else default_levels(cfg, inputs)
    lora = None
    if args.lora:
        from valle_jax.lora_files import read_lora
        from valle_jax.models.lora import stack_loras

        if args.greedy or args.loss:
            raise SystemExit("--lora: only teacher-forced logits are computed with a LoRA (not --greedy/--loss)")
        lora = stack_loras([read_lora(args.lora, cfg, params)[:2]], cfg.resp_levels)
    out = teacher_forced_logits(cfg, params, inputs["text"], inputs["prom"], inputs["resp"], levels, lora)
    if args.greedy or args.loss:
        from valle_jax import parity_modes

        if args.greedy:
            steps = args.max_steps or parity_modes.manifest_max_steps(args.inputs)
            out.update(parity_modes.greedy_outputs(cfg, params, inputs, steps))
        if args.loss:
            out.update(parity_modes.loss_outputs(cfg, params, inputs))

    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp.npz")
    np.savez(tmp, **out)
    tmp.replace(args.out)

    report, worst = {}, 0.0
    parallel = cfg.arch_type == "retnet" and cfg.retnet_mode == "parallel"
    for key, value in out.items():
        ref_key = key.replace("logits_", "logits_parallel_") if parallel and key.startswith("logits_") else key
        if not args.lora and ref_key.replace("logits_", "logits_base_") in inputs:  # a LoRA fixture, run without it
            ref_key = ref_key.replace("logits_", "logits_base_")
        if ref_key in inputs and key.startswith("logits_"):
            ref = inputs[ref_key]
            diff = float(np.abs(value - ref).max()) if ref.shape == value.shape else float("inf")
            report[ref_key] = diff
            worst = max(worst, diff)
        elif key in inputs and key.startswith("loss_"):  # loss scalars: 1e-5 relative, NaN where the reference has NaN
            same = np.allclose(value, inputs[key], rtol=1e-5, atol=0, equal_nan=True)
            report[key] = "equal" if same else f"DIFFERENT ({float(value)} vs {float(inputs[key])})"
        elif key in inputs:
            report[key] = "equal" if np.array_equal(np.asarray(value), inputs[key]) else "DIFFERENT"
    print(json.dumps({"checkpoint": args.checkpoint, **({"lora": args.lora} if args.lora else {}), "levels": levels,
                      "written": sorted(out), "compared": report}))  # fmt: skip
    failed = worst > args.tol or any(str(v).startswith("DIFFERENT") for v in report.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
