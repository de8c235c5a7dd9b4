"""Prove a conversion: run valle_jax on a fixture-layout npz and write what the reference writes.

    python tools/parity.py --checkpoint CKPT(.sft|.pth|DIR) --inputs IN.npz --out OUT.npz [--levels 0,1,2]
        [--retnet-mode parallel|chunkwise] [--heads N] [--tol 2e-5] [--greedy [--max-steps N]] [--loss]
        [--lora LORA.(sft|pth)]

Reads `text` [T], `prom` [P, levels], `resp` [R, levels] (tests/fixtures/README.md section 3) and writes
`logits_L{l}` [S, V]: the whole-sequence logits of one teacher-forced pass for level l (section 4), V = the
width of that level's head. Levels default to those the input file already holds reference logits for,
else 0, 1, 2 and the last level the model has. When IN.npz holds the reference's `logits_L{l}`, the max
absolute difference per level is printed and the exit status is 1 if any exceeds --tol. With --lora the
logits are computed with that reference LoRA file applied; without it, inputs that also hold the reference's
LoRA-free logits `logits_base_L{l}` (a LoRA fixture) are compared against those.

`--greedy` writes `ar_greedy` (cut at the first stop), `ar_greedy_raw` (every appended token) and `nar_greedy`
(from the true level 0), through the synthesis pipeline's stages; `--loss` writes `loss_s{k}_joint_nll` and
`loss_s{k}_split_{text,prom,resp}` (tests/fixtures/README.md sections 5-6).

A fixtures manifest (`fixtures.json` or `lora_fixtures.json`, as in tests/fixtures) beside the checkpoint or the
inputs supplies what weights cannot say: the tiny fixtures' head count (`--heads`) and the AR steps of their
greedy outputs.
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
from valle_jax.fileio import atomic_write  # noqa: E402
from valle_jax.layout import make_batch, training_batch  # noqa: E402
from valle_jax.models.valle import VALLE, head_width  # noqa: E402

DEFAULT_MAX_STEPS = 26  # the fixtures' default (fixtures.json -> defaults.max_steps)


def fixture_facts(checkpoint: str | Path, inputs: str | Path) -> dict:
    """{"heads", "max_steps"} of a fixture from a `fixtures.json` manifest beside it (empty when none)."""
    facts: dict = {}
    manifests = [p.parent / name for p in (Path(checkpoint), Path(inputs)) for name in ("fixtures.json", "lora_fixtures.json")]
    for manifest in manifests:
        if not manifest.is_file():
            continue
        data = json.loads(manifest.read_text())
        for v in data.get("variants", data).values():
            if not isinstance(v, dict):
                continue
            if v.get("checkpoint") == Path(checkpoint).name and "heads" not in facts:
                facts["heads"] = v.get("dims", {}).get("heads")
            if v.get("npz") == Path(inputs).name and "ar_greedy" in v and "max_steps" not in facts:
                facts["max_steps"] = int(v["ar_greedy"]["max_steps"])
        if facts.get("max_steps") is None:
            facts["max_steps"] = data.get("defaults", {}).get("max_steps")
    return {k: v for k, v in facts.items() if v is not None}


def greedy_outputs(cfg: ModelConfig, params: dict, inputs: dict, max_steps: int | None) -> dict[str, np.ndarray]:
    """`ar_greedy`, `ar_greedy_raw` and `nar_greedy` (each level fed the previously generated columns), int64."""
    from valle_jax import pipeline

    max_steps = max_steps or DEFAULT_MAX_STEPS
    resp = np.asarray(inputs["resp"])
    batch = pipeline.request_batch([inputs["text"]], [inputs["prom"]], [resp[:, :1]])
    out = {}
    if cfg.causal:
        res = pipeline.ar_codes(cfg, params, batch, max_steps)
        raw = np.asarray(res.tokens[0, : int(res.n_raw[0])])
        out["ar_greedy"] = pipeline.level0(raw, cfg).astype(np.int64)
        out["ar_greedy_raw"] = raw.astype(np.int64)
    if cfg.has_nar and cfg.resp_levels > 1:
        codes = pipeline.nar_codes(cfg, params, batch, resp[None, :, 0])
        out["nar_greedy"] = np.asarray(codes[0], np.int64)
    return out


def loss_outputs(cfg: ModelConfig, params: dict, inputs: dict) -> dict[str, np.ndarray]:
    """`loss_s{k}_joint_nll` and `loss_s{k}_split_{text,prom,resp}` for every `loss_s{k}_levels` set of the inputs,
    on the two-item batch `loss_batch_*`, with factors `loss_factor_*` (NaN where the reference gives NaN)."""
    from valle_jax.models import loss as L

    n_items = len([k for k in inputs if k.startswith("loss_batch_text_")])
    if n_items == 0:
        raise SystemExit("--loss: the inputs hold no loss_batch_text_{i} arrays")
    items = [{"text": inputs[f"loss_batch_text_{i}"], "prom": inputs[f"loss_batch_prom_{i}"],
              "resp": inputs[f"loss_batch_resp_{i}"]} for i in range(n_items)]  # fmt: skip
    factors = {name: float(inputs[f"loss_factor_{name}"]) for name in ("text", "prom", "resp") if f"loss_factor_{name}" in inputs}
    model = VALLE(cfg)
    out = {}
    sets = sorted(int(k[len("loss_s") : -len("_levels")]) for k in inputs if k.startswith("loss_s") and k.endswith("_levels"))
    for s in sets:
        batch = training_batch(cfg, items, [int(x) for x in inputs[f"loss_s{s}_levels"]])
        logits, _ = model.apply({"params": params}, batch)
        joint, _ = L.joint_loss(cfg, logits, batch)
        out[f"loss_s{s}_joint_nll"] = np.float32(joint)
        _, split = L.split_loss(cfg, logits, batch, factors)
        for name in factors:
            if name in split:
                out[f"loss_s{s}_split_{name}"] = np.float32(split[name])
    return out


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
    ap.add_argument("--heads", type=int, help="attention heads when they cannot be found (default: a fixtures.json beside the file, else dim/64)")
    ap.add_argument("--tol", type=float, default=2e-5, help="max abs logit difference accepted when the inputs hold reference logits")
    ap.add_argument("--greedy", action="store_true", help="also write ar_greedy, ar_greedy_raw, nar_greedy")
    ap.add_argument("--max-steps", type=int, help="AR steps for --greedy (default: fixtures.json beside the inputs, else 26)")
    ap.add_argument("--loss", action="store_true", help="also write the loss_* values of the inputs' loss batches")
    ap.add_argument("--lora", help="reference LoRA file (.sft/.pth) applied to the model (logits only)")
    args = ap.parse_args(argv)

    overrides = {"retnet_mode": args.retnet_mode} if args.retnet_mode else {}
    facts = fixture_facts(args.checkpoint, args.inputs)
    cfg, params = load_any(args.checkpoint, heads=args.heads or facts.get("heads"), overrides=overrides, dtype=np.float32)
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
    if args.greedy:
        out.update(greedy_outputs(cfg, params, inputs, args.max_steps or facts.get("max_steps")))
    if args.loss:
        out.update(loss_outputs(cfg, params, inputs))

    atomic_write(args.out, lambda f: np.savez(f, **out))

    report, worst = {}, 0.0
    for key, value in out.items():
        parallel_key = key.replace("logits_", "logits_parallel_")  # a RetNet fixture's parallel-form logits
        ref_key = parallel_key if args.retnet_mode == "parallel" and parallel_key in inputs else key
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
