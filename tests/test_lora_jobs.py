"""Several LoRAs in one synthesis job (issue 13, deliver 5): items of different LoRAs (and none) share the AR
slots and the NAR batches (each slot's LoRA index in the decode state), and each item gets the tokens it gets
alone; a LoRA file is loaded once per job and checked against the base; `--lora` for the whole job.

Base: the reference's LoRA fixture model (tests/fixtures/lora_llama.sft); LoRAs: the reference's fixture LoRA
and a second one with random nonzero adapters written by our exporter; items are random token ids and prompts."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import FIXTURES
from valle_jax import pipeline
from valle_jax.codec.files import write_codes
from valle_jax.config import ConfigError
from valle_jax.convert import load_any
from valle_jax.lora_files import read_lora, write_lora
from valle_jax.models.lora import LoraConfig, init_lora, merge_lora

MANIFEST = json.loads((FIXTURES / "lora_fixtures.json").read_text())["lora_llama"]
BASE = FIXTURES / MANIFEST["checkpoint"]
LORA_A = FIXTURES / MANIFEST["lora"]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    cfg, params = load_any(BASE, heads=MANIFEST["dims"]["heads"])
    lcfg = LoraConfig(rank=4, alpha=8)
    lp = init_lora(cfg, lcfg, jax.random.key(7), params)
    lp = jax.tree.map(lambda x: np.asarray(jax.random.normal(jax.random.key(x.size), x.shape)) * 0.5, lp)  # B != 0
    lora_b = write_lora(tmp_path_factory.mktemp("loras") / "b.lora.sft", lcfg, lp)
    return pipeline.Models(cfg, params, cfg, params), str(LORA_A), str(lora_b)


def requests(cfg, loras):
    rng = np.random.default_rng(0)
    text = np.r_[1, rng.integers(4, 256, 9), 2].astype(np.int32)  # one text and prompt: the LoRA makes the difference
    prom = rng.integers(0, 1024, (12, cfg.resp_levels)).astype(np.int32)
    return [pipeline.Request(i, [text], prom, 10, lora=lora) for i, lora in enumerate(loras)]


def codes_of(models, settings, reqs):
    outs = list(pipeline.Synthesizer(models, settings).run(reqs, progress=False))
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return {o.id: o.codes[0] for o in outs}


def test_two_loras_and_none_in_one_batch_give_each_item_its_tokens_alone(job):
    models, a, b = job
    settings = pipeline.Settings.greedy(slots=4, chunk=4, max_nar_levels=3)
    reqs = requests(models.cfg, [a, b, None, b, a])  # 5 lines over 4 slots: the slots refill across LoRAs
    together = codes_of(models, settings, reqs)
    for r in reqs[:3]:  # alone, on the base with the LoRA merged into it (no LoRA machinery at all)
        merged = models
        if r.lora is not None:
            lcfg, lp, _ = read_lora(r.lora, models.cfg, models.params)
            params = merge_lora(models.params, lp, lcfg)
            merged = pipeline.Models(models.cfg, params, models.cfg, params)
        alone = codes_of(merged, settings, [dataclasses.replace(r, lora=None)])[r.id]
        assert np.array_equal(together[r.id], alone), r.id
    assert np.array_equal(together[3], together[1]) and np.array_equal(together[4], together[0])
    # each LoRA changes what is made (same text and prompt): A, B and the base differ pairwise, at level 0 and above
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert not np.array_equal(together[i][:, 0], together[j][:, 0]) or not np.array_equal(together[i], together[j]), (i, j)


def test_lora_files_load_once_per_job_checked_against_the_base_and_job_wide_lora(job, tmp_path):
    models, a, b = job
    syn = pipeline.Synthesizer(models, pipeline.Settings.greedy(slots=2, chunk=4, max_nar_levels=1, lora=a))
    assert list(syn._loras) == [str(LORA_A.resolve())]  # --lora loaded at start
    codes = write_codes(tmp_path / "p.enc", np.random.default_rng(1).integers(0, 1024, (20, 8)))
    assert syn.request("x", {"text": "hi", "codes": str(codes)}).lora == str(LORA_A.resolve())  # the job's LoRA
    assert syn.request("y", {"text": "hi", "codes": str(codes), "lora": b}).lora == str(Path(b).resolve())
    assert syn.request("z", {"text": "hi", "codes": str(codes), "lora": None}).lora is None  # the base alone
    key = syn.load_lora(b)
    assert syn.load_lora(b) == key and len(syn._loras) == 2
    first = syn._loras[key]
    syn.load_lora(b)
    assert syn._loras[key] is first  # not read again
    with pytest.raises(pipeline.ItemError, match="no such file"):
        syn.load_lora(tmp_path / "missing.sft")
    with pytest.raises(pipeline.ItemError, match="not a LoRA file"):
        syn.load_lora(BASE)
    with pytest.raises(ConfigError, match="--lora: lora .*no such file"):
        pipeline.Synthesizer(models, pipeline.Settings(lora=str(tmp_path / "nope.sft")))
    with pytest.raises(pipeline.ItemError, match="field 'lora'"):
        pipeline.check_item({"text": "hi", "codes": "c.enc", "lora": 3})
