"""A padded batch of items with different lengths and levels gives each item the logits it gets alone."""

import jax
import numpy as np
import pytest

from conftest import fixture_paths, heads_of
from valle_jax.convert import load_any
from valle_jax.layout import make_batch
from valle_jax.models.valle import VALLE, head_width


@pytest.mark.parametrize("name", ["llama_v5_split_sums_nonunified", "llama_v5_single_unified", "dac_llama_9"])
def test_padded_mixed_batch_equals_items_alone(name):
    ckpt, npz = fixture_paths(name)
    ref = np.load(npz)
    cfg, params = load_any(ckpt, heads=heads_of(ckpt))
    model = VALLE(cfg)
    apply = jax.jit(lambda p, b: model.apply({"params": p}, b))
    rng = np.random.default_rng(0)
    items = []
    for i, level in enumerate([0, 3, 1, 0, cfg.resp_levels - 1]):
        t, p, r = 12 - i, 20 - 3 * i, 16 - 2 * i
        prom = ref["prom"][:p] if i != 2 else ref["prom"][:0]  # item 2: no prompt at all
        items.append({"text": ref["text"][:t], "prom": prom, "resp": rng.integers(0, 1024, (r, max(level, 1))), "level": level})
    batch = make_batch(items, pad_to={"text": 16, "prom": 24, "resp": 20})  # extra padding on every segment
    logits, lay = apply(params, batch)
    logits = np.asarray(logits)
    for i, it in enumerate(items):
        alone, lay1 = apply(params, make_batch([it]))
        n = int(lay1.length[0])
        assert int(lay.length[i]) == n
        w = head_width(cfg, it["level"])
        np.testing.assert_allclose(logits[i, :n, :w], np.asarray(alone)[0, :n, :w], atol=2e-5, rtol=0)
        assert np.all(logits[i, n:] == 0)  # padding rows are masked like the reference's
        assert not np.asarray(lay.valid)[i, n:].any()
