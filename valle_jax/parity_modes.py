"""What `tools/parity.py --greedy` / `--loss` write, in the fixture layout (tests/fixtures/README.md 5-6)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from valle_jax.config import ModelConfig
from valle_jax.generate import ar_generate, nar_generate
from valle_jax.models.valle import make_batch

DEFAULT_MAX_STEPS = 26  # the fixtures' default (fixtures.json -> defaults.max_steps)


def manifest_max_steps(inputs_path: str | Path | None) -> int | None:
    """max_steps of the variant whose npz is `inputs_path`, from a fixtures.json beside it."""
    if inputs_path is None:
        return None
    manifest = Path(inputs_path).parent / "fixtures.json"
    if not manifest.is_file():
        return None
    data = json.loads(manifest.read_text())
    for v in data.get("variants", {}).values():
        if v.get("npz") == Path(inputs_path).name and "ar_greedy" in v:
            return int(v["ar_greedy"]["max_steps"])
    return data.get("defaults", {}).get("max_steps")


def greedy_outputs(cfg: ModelConfig, params: dict, inputs: dict, max_steps: int | None) -> dict[str, np.ndarray]:
    """`ar_greedy` (cut at the first stop), `ar_greedy_raw` (every appended token) and `nar_greedy` (from the true
    level 0, each level fed the previously generated columns), all int64, at temperature 0."""
    max_steps = max_steps or DEFAULT_MAX_STEPS
    batch = make_batch([{"text": inputs["text"], "prom": inputs["prom"], "resp": np.asarray(inputs["resp"])[:, :1], "level": 0}])
    out = {}
    if cfg.causal:
        res = jax.jit(lambda p, b: ar_generate(cfg, p, b, max_steps))(params, batch)
        out["ar_greedy"] = np.asarray(res.tokens[0, : int(res.length[0])], np.int64)
        out["ar_greedy_raw"] = np.asarray(res.tokens[0, : int(res.n_raw[0])], np.int64)
    if cfg.has_nar and cfg.resp_levels > 1:
        level0 = jnp.asarray(np.asarray(inputs["resp"])[None, :, 0])
        codes = jax.jit(lambda p, b, l0: nar_generate(cfg, p, b, l0))(params, batch, level0)
        out["nar_greedy"] = np.asarray(codes[0], np.int64)
    return out


def loss_outputs(cfg: ModelConfig, params: dict, inputs: dict) -> dict[str, np.ndarray]:
    """`loss_s{k}_joint_nll` and `loss_s{k}_split_{text,prom,resp}` for every `loss_s{k}_levels` set of the inputs,
    on the two-item batch `loss_batch_*`, with factors `loss_factor_*` (NaN where the reference gives NaN)."""
    from valle_jax.models import loss as L
    from valle_jax.models.valle import VALLE

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
        levels = [int(x) for x in inputs[f"loss_s{s}_levels"]]
        batch = L.training_batch(cfg, items, levels)
        logits, _ = model.apply({"params": params}, batch)
        joint, _ = L.joint_loss(cfg, logits, batch)
        out[f"loss_s{s}_joint_nll"] = np.float32(joint)
        _, split = L.split_loss(cfg, logits, batch, factors)
        for name in factors:
            if name in split:
                out[f"loss_s{s}_split_{name}"] = np.float32(split[name])
    return out
