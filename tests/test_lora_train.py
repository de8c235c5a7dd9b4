"""LoRA training and frozen parameters (issue 13, deliver 4): only the LoRA (plus embeddings when asked) gets
gradients and optimizer state, the base stays bit-identical, checkpoints hold the LoRA and a pointer to the base,
resume is bit-exact and refuses another base, the export is the reference's LoRA file; `model.frozen_params`
freezes parameters by their reference names with the same masking.

Bases are random-initialised tiny models (configs/train-tiny.yaml, configs/demo.yaml), written by
`checkpoint.save_model_dir` / `convert.export_reference`; the demo corpus is prepared by the real CLI (espeak-ng,
seeded random EnCodec as in test_train_demo.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from conftest import ROOT, cli_env
from valle_jax.checkpoint import TrainCheckpoints, flat_shapes, save_model_dir
from valle_jax.config import ConfigError, load_config
from valle_jax.convert import export_reference, read_safetensors
from valle_jax.lora_files import read_lora
from valle_jax.models.valle import init_params
from valle_jax.trainable import content_hash

TINY = ROOT / "configs" / "train-tiny.yaml"
DEMO = ROOT / "configs" / "demo.yaml"
TIMEOUT = 600


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return cli_env(tmp_path_factory)


def random_base(config: Path, out: Path, seed: int) -> tuple[Path, dict]:
    """A random-initialised model of `config` exported as a reference .sft (the import path of a release)."""
    cfg = load_config(config)
    params = jax.tree.map(np.asarray, init_params(cfg.model, jax.random.key(seed)))
    model_dir = save_model_dir(out.with_suffix(".dir"), cfg.model, params, {}, force=True)
    return export_reference(model_dir, out, dtype="float32", force=True), params


def train_cli(env: dict, config: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "valle_jax.train", "--config", str(config), f"train.run_dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


# ---------------------------------------------------------------------------------------------------------
# the demo corpus: a LoRA learns its speaker


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_demo")
    data = root / "data"
    subprocess.run([sys.executable, "-m", "valle_jax.prepare", "demo", str(data), "--sentences", "8", "--speakers", "1",
                    "--no-progress"], check=True, cwd=ROOT, timeout=TIMEOUT, capture_output=True)  # fmt: skip
    base, _ = random_base(DEMO, root / "base.sft", seed=0)
    return data, base


def speaker_loss(cfg, params: dict, lora: tuple | None, split: str) -> float:
    """Mean loss over a split's batches of the demo speaker, with the LoRA file's adapters applied or not."""
    from valle_jax.data.pipeline import make_iterator
    from valle_jax.layout import as_batch
    from valle_jax.models.lora import apply_model, stack_loras
    from valle_jax.models.loss import loss
    from valle_jax.models.valle import VALLE

    model = VALLE(cfg.model)
    stack = stack_loras([lora], cfg.model.resp_levels) if lora else None

    @jax.jit
    def batch_loss(params, stack, batch):
        logits, _ = apply_model(model, params, stack, None, batch, train=True)  # train: every level, no dropout
        return loss(cfg.model, logits, batch, faithful_nan=False)[0]

    it = make_iterator(cfg, split, 0, 1)
    losses = []
    for _ in range(2):
        b = next(it, None)
        if b is None:
            break
        losses.append(float(batch_loss(params, stack, as_batch({k: v for k, v in b.items() if k != "rows"}))))
    assert losses, split
    return float(np.mean(losses))


@pytest.mark.slow
def test_lora_trained_on_the_demo_corpus_lowers_its_speakers_loss_and_leaves_the_base_alone(demo, env, tmp_path):
    from valle_jax.convert import load_reference

    data, base = demo
    base_hash = content_hash(base)
    run_dir = tmp_path / "run"
    # the README's LoRA training command as written there (configs/lora-llama-8.yaml), on the demo speaker and a tiny
    # base: the data and run dir replaced, a tiny run's settings added
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "-m valle_jax.train --config configs/lora-llama-8.yaml" in l)
    args = line.split("#")[0].split()[3:]  # after `.venv/bin/python -m valle_jax.train`
    args = [f"data.path={data}" if a.startswith("data.path=") else f"train.run_dir={run_dir}" if a.startswith("train.run_dir=")
            else a for a in args]  # fmt: skip
    overrides = [f"train.init_from={base}", "model.heads=4", "train.lora={rank: 8, alpha: 16}", "train.steps=8",
                 "train.learning_rate=0.02", "train.warmup_steps=1", "train.save_every=100", "train.eval_every=0",
                 "train.log_every=4", "data.batch_tokens=3072", "data.length_buckets=[768]"]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "valle_jax.train", *args, *overrides], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=TIMEOUT)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "M params (LoRA rank 8, alpha 16; 1.80M frozen)" in r.stdout, r.stdout[-2000:]
    # the base is untouched and only pointed at
    assert content_hash(base) == base_hash
    assert json.loads((run_dir / "base.json").read_text()) == {"path": str(base), "sha256": base_hash}
    assert not (run_dir / "model").exists() and not (run_dir / "model.sft").exists()
    # the checkpoint holds the LoRA and its moments only, and the base pointer
    ckpts = TrainCheckpoints(run_dir)
    try:
        saved = flat_shapes(ckpts.state_metadata(8))
        assert ckpts.read_meta(8)["base"]["sha256"] == base_hash
    finally:
        ckpts.close()
    big = {k: s for k, s in saved.items() if s}
    assert big and all(k.split("/")[-1] in ("lora_A", "lora_B") for k in big), sorted(big)[:5]
    assert not any("embedding" in k or k.endswith("kernel") for k in saved)
    # the export is the reference's LoRA file; with it the speaker's loss is lower than the base's
    cfg = load_config(DEMO, [f"data.path={data}", "data.length_buckets=[768]", "data.batch_tokens=3072"])
    mcfg, params, _ = load_reference(base, heads=cfg.model.heads)
    lcfg, lp, info = read_lora(run_dir / "lora.sft", mcfg, params)
    assert (lcfg.rank, lcfg.alpha, info["container"]) == (8, 16, "sft")
    assert all(x.dtype == np.float16 for x in jax.tree.leaves(lp))  # the config's export dtype, as the reference
    assert all(k.split(".")[-1] in ("lora_A", "lora_B") for k in read_safetensors(run_dir / "lora.sft")[0])
    for split in ("train", "eval"):
        before = speaker_loss(cfg, params, None, split)
        after = speaker_loss(cfg, params, (lcfg, lp), split)
        assert after < before - 0.1, (split, before, after)


# ---------------------------------------------------------------------------------------------------------
# resume, another base, remat (subprocesses, synthetic data)


@pytest.mark.slow
def test_lora_resume_is_bit_identical_and_another_base_is_refused(env, tmp_path):
    base, _ = random_base(TINY, tmp_path / "base.sft", seed=1)
    common = [f"train.init_from={base}", "train.lora={rank: 4, alpha: 8, embeddings: true}", "train.remat=full",
              "train.save_every=4", "train.eval_every=0", "train.log_every=1", "train.learning_rate=0.01"]  # fmt: skip
    run_dir = tmp_path / "run"
    r = train_cli(env, TINY, run_dir, *common, "train.steps=6")  # checkpoints 4 and 6
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    whole = read_safetensors(run_dir / "lora.sft")[0]
    shutil.copy(run_dir / "model.sft", tmp_path / "whole_model.sft")
    # as if killed after checkpoint 4: its last checkpoint and its export gone; the rerun resumes from 4
    shutil.rmtree(run_dir / "checkpoints" / "6")
    for p in ("lora.sft", "model.sft"):
        (run_dir / p).unlink()
    shutil.rmtree(run_dir / "model")
    r = train_cli(env, TINY, run_dir, *common, "train.steps=6")
    assert r.returncode == 0 and "resumed from checkpoint 4" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    split = read_safetensors(run_dir / "lora.sft")[0]
    assert list(whole) == list(split) and all(np.array_equal(whole[k], split[k]) for k in whole)
    assert any(np.abs(v).max() > 0 for k, v in whole.items() if k.endswith("lora_B"))  # it trained
    # embeddings: true -> the trained *_emb tables go into run_dir/model (+ model.sft), everything else bit-identical
    ref = read_safetensors(base)[0]
    trained = read_safetensors(tmp_path / "whole_model.sft")[0]
    assert list(trained) == list(ref)
    resumed = read_safetensors(run_dir / "model.sft")[0]
    assert all(np.array_equal(trained[k], resumed[k]) for k in trained)
    changed = {k for k in ref if not np.array_equal(ref[k], trained[k])}
    assert changed and all("_emb" in k for k in changed), sorted(changed)
    # a resume against another base is refused before any work, naming both (the CLI makes it one line, exit 2)
    from valle_jax.train import train

    other, _ = random_base(TINY, tmp_path / "other.sft", seed=2)
    cfg = load_config(TINY, [*common, f"train.run_dir={run_dir}", f"train.init_from={other}", "train.steps=8"])
    with pytest.raises(ConfigError, match="a LoRA only fits the base it was trained on") as e:
        train(cfg, progress=False)
    assert str(base) in str(e.value) and str(other) in str(e.value)


# ---------------------------------------------------------------------------------------------------------
# what trains, what the optimizer holds (in-process, 8 fake devices)


def synthetic_batch(cfg):
    from valle_jax.data.synthetic import make_iterator

    return next(make_iterator(cfg, "train", 0, 1))


def test_lora_optimizer_state_is_only_the_loras_and_sharded_steps_leave_the_base_bit_identical():
    from valle_jax.train_state import Trainer

    cfg = load_config(TINY, ["train.lora={rank: 4, alpha: 8}", "mesh.data=4", "mesh.fsdp=2", "train.learning_rate=0.01",
                             "train.warmup_steps=1"])  # fmt: skip
    trainer = Trainer(cfg)
    full = Trainer(load_config(TINY, ["mesh.data=4", "mesh.fsdp=2"]))
    lora_shapes = flat_shapes(trainer.abstract_state["params"])
    lora_size = sum(int(np.prod(s)) for s in lora_shapes.values())
    # llama targets: q, v, o, gate, up, down in each of 2 layers, an A and a B each
    assert len(lora_shapes) == 2 * 6 * 2 and all(k.split("/")[-1] in ("lora_A", "lora_B") for k in lora_shapes)
    opt = flat_shapes(trainer.abstract_state["opt_state"])
    moments = {k: s for k, s in opt.items() if s}  # everything but counts
    assert sum(int(np.prod(s)) for s in moments.values()) == 2 * lora_size  # AdamW: mu and nu of the LoRA only
    mem, full_mem = trainer.memory(), full.memory()
    assert mem["opt_state_bytes"] == 4 * 2 * lora_size + 4 * len(opt.keys() - moments.keys())
    assert mem["trained_params"] == lora_size and mem["frozen_params"] == full_mem["trained_params"]
    assert mem["opt_state_bytes"] * 50 < full_mem["opt_state_bytes"], (mem, full_mem)

    base = jax.tree.map(np.asarray, init_params(trainer.mcfg, jax.random.key(3)))
    state = trainer.init_state(base)
    a = state["params"]["lora"]["model"]["layers_0"]["mlp"]["up_proj"]["lora_A"]
    assert len(a.sharding.device_set) == 8 and "fsdp" in str(a.sharding.spec), a.sharding
    batch = synthetic_batch(cfg)
    losses = []
    for _ in range(3):
        state, m = trainer.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0], losses
    held = flatten_dict(jax.tree.map(np.asarray, trainer.frozen))
    flat_base = flatten_dict(base)
    assert held.keys() == flat_base.keys() and all(np.array_equal(held[k], flat_base[k]) for k in held)
    # the base is not even in the train state
    assert set(state["params"]) == {"lora"}
    with pytest.raises(ConfigError, match="train.init_from"):
        Trainer(cfg).init_state(None)


def test_frozen_params_get_no_update_and_no_optimizer_state():
    """The reference's `frozen_params`: parameters whose state-dict name is in the list are not updated."""
    from valle_jax.convert import params_key
    from valle_jax.train_state import Trainer

    names = ["classifiers.proj.1.weight", "model.layers.0.mlp.up_proj.weight", "text_emb.weight"]  # all in use
    cfg = load_config(TINY, [f"model.frozen_params={json.dumps(names)}", "train.learning_rate=0.01", "train.warmup_steps=1"])
    trainer, full = Trainer(cfg), Trainer(load_config(TINY))
    base = jax.tree.map(np.asarray, init_params(trainer.mcfg, jax.random.key(4)))
    flat_base = flatten_dict(base)
    frozen_paths = {p for p in flat_base if params_key(p) in names}
    assert len(frozen_paths) == 3
    frozen_size = sum(flat_base[p].size for p in frozen_paths)
    assert full.memory()["opt_state_bytes"] - trainer.memory()["opt_state_bytes"] == 2 * 4 * frozen_size
    state = trainer.init_state(base)
    batch = synthetic_batch(cfg)
    for _ in range(2):
        state, m = trainer.train_step(state, batch)
    assert np.isfinite(float(m["loss"]))
    after = flatten_dict(jax.tree.map(np.asarray, state["params"]))
    changed = {params_key(p) for p in flat_base if not np.array_equal(after[p], flat_base[p])}
    assert not changed & set(names), changed & set(names)
    # their neighbours train (the synthetic batch has levels 1, 2 and 6: classifier 1 is in use)
    assert {"classifiers.proj.1.bias", "model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
            "resps_emb.embeddings.1.weight"} <= changed, sorted(changed)
    assert len(changed) > len(flat_base) // 2
    bad = load_config(TINY, ["model.frozen_params=[classifier.proj.0.weight]"])
    with pytest.raises(ConfigError, match=r"model.frozen_params: 'classifier.proj.0.weight' is no parameter"):
        Trainer(bad)
    with pytest.raises(ConfigError, match="model.frozen_params with train.lora"):
        Trainer(load_config(TINY, ["model.frozen_params=[text_emb.weight]", "train.lora.rank=4"]))


def test_train_lora_config_is_validated():
    cfg = load_config(TINY, ["train.lora.rank=8"])
    assert (cfg.train.lora.rank, cfg.train.lora.alpha, cfg.train.lora.dropout, cfg.train.lora.embeddings) == (8, 128, 0.1, False)
    with pytest.raises(ConfigError, match="train.lora: unknown field"):
        load_config(TINY, ["train.lora={rnk: 8}"])
    with pytest.raises(ConfigError, match="rank = 0"):
        load_config(TINY, ["train.lora={rank: 0}"])
