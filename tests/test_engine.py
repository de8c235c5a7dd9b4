"""The synthesis engine at job scale: slots over devices, donated state, a decode loop without host round trips,
samplers in jobs (per-item mirostat, causal_size > 1, beam search), NAR NaN detection, fewer NAR levels decoded.

Fixture checkpoints are the reference's tiny models (tests/fixtures); items are random token ids and prompts.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import fixture_paths, heads_of
from valle_jax import generate as G
from valle_jax import parallel, pipeline, sampling
from valle_jax.convert import load_any
from valle_jax.layout import make_batch


def _model(name):
    ckpt, _ = fixture_paths(name)
    return load_any(ckpt, heads=heads_of(ckpt))


@pytest.fixture(scope="module")
def llama():
    return _model("llama_v5_split_sums_nonunified")


def _items(cfg, n, seed, max_tokens=(5, 18)):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = np.r_[1, rng.integers(4, 256, int(rng.integers(3, 14))), 2].astype(np.int32)
        prom = rng.integers(0, 1024, (int(rng.integers(2, 20)), cfg.resp_levels)).astype(np.int32)
        out.append((i, text, prom, int(rng.integers(*max_tokens))))
    return out


def _requests(cfg, n, seed, max_tokens=(5, 18)):
    return [pipeline.Request(i, [t], p, m) for i, t, p, m in _items(cfg, n, seed, max_tokens)]


# ----------------------------------------------------------------------------------------------------------------
# compiled programs: donation, no host transfer in the decode loop


def _cache_bytes(state):
    return sum(x.nbytes for x in jax.tree.leaves(state.cache))


def test_decode_and_insert_donate_the_state_and_the_loop_has_no_host_transfer(llama):
    cfg, params = llama
    sched = G.ARScheduler(cfg, params, slots=4, max_tokens=1024, text_bucket=16, prom_bucket=32, chunk=8)
    state = sched.state
    assert cfg.n_layers == 2
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    one_tensor = jax.tree.leaves(state.cache)[1].nbytes  # one layer's K
    assert one_tensor * 2 * cfg.n_layers + state.cache["index"].nbytes == _cache_bytes(state)
    job = sampling.features_of(sampling.ar_defaults(1, "cli"))  # what a job with the CLI's sampler compiles
    compiled = sched.programs.decode.lower(cfg, sched.params, state, sched.key, 8, job, None).compile()
    mem = compiled.memory_analysis()
    # every state buffer is an output alias of its input (updated in place) and the temporaries hold no second
    # cache (on CPU, XLA's attention dot copies one layer's K and V transposed at a time: about 2 tensors)
    assert mem.alias_size_in_bytes == state_bytes, (mem, state_bytes)
    assert mem.temp_size_in_bytes < 3 * one_tensor < _cache_bytes(state), (mem.temp_size_in_bytes, one_tensor)
    # the same program without donation copies: the check above can fail
    plain = jax.jit(G.decode, static_argnums=(0, 4, 5, 6)).lower(cfg, sched.params, state, sched.key, 8, job, None)
    assert plain.compile().memory_analysis().alias_size_in_bytes == 0

    every = sampling.features_of(sampling.ar_defaults(1, "cli", repetition_penalty=1.2, length_penalty=0.5, top_k=5,
                                                      top_p=0.9, min_temperature=0.5, dry_multiplier=0.5,
                                                      mirostat_tau=2.0))  # fmt: skip
    assert every == sampling.Features(dry_max_match=50)  # every sampler step compiled in
    for feats in (job, every):
        hlo = sched.programs.decode.lower(cfg, sched.params, state, sched.key, 8, feats, None).compile().as_text()
        whiles = [line for line in hlo.splitlines() if re.search(r"\bwhile\(", line)]
        assert whiles and all('"known_trip_count"' in line for line in whiles), "a loop with a data-dependent exit"
        for op in ("conditional(", "outfeed(", "infeed(", " send(", " recv(", "callback"):
            assert op not in hlo, f"{op} in the decode program"

    n = 2
    batch = make_batch([{"text": np.ones(16, np.int32), "prom": np.zeros((32, 8), np.int32),
                         "resp": np.zeros((1, 1), np.int32)}] * n)  # fmt: skip
    cache, logits, start = G.prefill(cfg, sched.params, batch)
    assert jax.tree.leaves(cache)[1].shape[1] < jax.tree.leaves(state.cache)[1].shape[1]  # prefix rows only
    sp = sampling.stack_params([sampling.ar_defaults(1)] * n)
    ins = sched.programs.insert.lower(state, jnp.arange(n), cache, logits, start, jnp.full((n,), 9), sp, 1).compile()
    mem = ins.memory_analysis()
    assert mem.alias_size_in_bytes == state_bytes and mem.temp_size_in_bytes < one_tensor, mem  # insert: no copy


def test_gated_sampler_would_put_conditionals_in_the_loop():
    """The check of the decode program above sees a per-step `cond`: the gated sampler inside a fixed loop."""

    def loop(logits, p, key):
        def body(i, carry):
            tok, key = carry
            key, sub = jax.random.split(key)
            return sampling.sample_ar(logits, tok, jnp.zeros(2, jnp.int32), p, sub).tokens, key

        return jax.lax.fori_loop(0, 4, body, (jnp.zeros((2, 1), jnp.int32), key))

    p = sampling.ar_defaults(2, top_k=3)
    hlo = jax.jit(loop).lower(jnp.zeros((2, 1, 16)), p, jax.random.key(0)).compile().as_text()
    assert "conditional(" in hlo


# ----------------------------------------------------------------------------------------------------------------
# devices


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama_v5_split_sums_nonunified", "retnet_v2"])
def test_eight_devices_give_the_tokens_of_one(name):
    """A job of mixed lengths (more items than slots: continuous batching) on 8 CPU devices (slots and NAR
    batches split over them) gives exactly the greedy codes of the same job on one device."""
    cfg, params = _model(name)
    assert len(jax.devices()) == 8
    models = pipeline.Models(cfg, params, cfg, params)
    settings = pipeline.Settings.greedy(slots=8, chunk=4)
    requests = _requests(cfg, 11, seed=5)

    def job(mesh):
        syn = pipeline.Synthesizer(models, settings, mesh=mesh)
        return {o.id: o.codes[0] for o in syn.run(requests, progress=False)}

    eight = parallel.make_mesh(None, jax.devices())
    one = G.single_device_mesh()
    many, single = job(eight), job(one)
    assert sorted(many) == sorted(single) == list(range(11))
    lengths = [len(single[i]) for i in range(11)]
    assert max(lengths) >= 8 and len(set(lengths)) > 2, lengths  # mixed lengths, not all stopped at once
    for i in range(11):
        np.testing.assert_array_equal(many[i], single[i], err_msg=f"{name} item {i}")
    sched = G.ARScheduler(cfg, params, slots=5, max_tokens=8, text_bucket=16, prom_bucket=32, mesh=eight)
    assert sched.slots == 8  # rounded up to the batch shards
    assert sched.state.tokens.sharding.spec == jax.sharding.PartitionSpec("data")


# ----------------------------------------------------------------------------------------------------------------
# samplers in jobs


def _scheduled(cfg, params, items, settings, slots=2, chunk=4, seed=3, max_tokens=24, **kw):
    sched = G.ARScheduler(cfg, params, slots=slots, max_tokens=max_tokens, text_bucket=16, prom_bucket=32, chunk=chunk,
                          seed=seed, **kw)  # fmt: skip
    for i, text, prom, n in items:
        sched.submit(i, text, prom, n, settings)
    return {i: raw for i, raw, _, _ in sched.run()}


def test_mirostat_per_item_in_the_scheduler(llama):
    """Mirostat in a job: each slot has its own mu and draws its own token, so an item's tokens do not depend on
    its neighbour; the reference's shared state (kept for parity) does mix them."""
    cfg, params = llama
    a, b, c = _items(cfg, 3, seed=7, max_tokens=(24, 25))
    own = sampling.ar_defaults(1, "cli", mirostat_tau=3.0, mirostat_eta=0.2, mirostat_shared=False)
    alone = _scheduled(cfg, params, [a], own, mirostat_shared=False)[0]
    with_b = _scheduled(cfg, params, [a, (1,) + b[1:]], own, mirostat_shared=False)
    with_c = _scheduled(cfg, params, [a, (1,) + c[1:]], own, mirostat_shared=False)
    assert len(alone) >= 6
    np.testing.assert_array_equal(with_b[0], alone)
    np.testing.assert_array_equal(with_c[0], alone)
    assert not np.array_equal(with_b[1], with_c[1])  # the neighbours themselves differ
    shared = sampling.ar_defaults(1, "cli", mirostat_tau=3.0, mirostat_eta=0.2, mirostat_shared=True)
    quirk = _scheduled(cfg, params, [a, (1,) + b[1:]], shared, mirostat_shared=True)
    n = min(len(quirk[0]), len(quirk[1]))
    np.testing.assert_array_equal(quirk[0][:n], quirk[1][:n])  # the reference: every slot takes the last one's token


def test_mirostat_with_causal_size_4_appends_one_token_per_step():
    """llama-x4 with mirostat: one token per step as the reference appends (no -1 placeholders in the history),
    the KV-cached scheduler equal to the reference's full-recompute loop."""
    cfg, params = _model("llama_x4")
    items = _items(cfg, 2, seed=8, max_tokens=(12, 13))
    sp = sampling.ar_defaults(2, "cli", mirostat_tau=3.0, mirostat_eta=0.2, mirostat_shared=False)
    one = jax.tree.map(lambda x: x[:1], sp)
    # max 48 tokens = 12 steps of the loop (max_steps // causal_size, as the reference); mirostat: 1 token each
    got = _scheduled(cfg, params, [(i, t, p, 48) for i, t, p, _ in items], one, chunk=12, max_tokens=48,
                     mirostat_shared=False)  # fmt: skip
    batch = make_batch([{"text": t, "prom": p, "resp": np.zeros((1, 1), np.int32)} for _, t, p, _ in items],
                       pad_to={"text": 16, "prom": 32})  # fmt: skip
    full = G.ar_generate_full(cfg, params, batch, 48, key=jax.random.key(3), sampling_params=sp)
    for i in range(2):
        n = int(full.n_raw[i])
        assert 0 < n <= 12 and len(got[i]) == n, (n, len(got[i]))  # 12 steps, one token each
        assert (got[i] >= 0).all()
        np.testing.assert_array_equal(got[i], np.asarray(full.tokens[i, :n]))


def test_beam_search_in_the_scheduler(llama):
    """Beam width 2 in a job: each item takes 2 slots; its result is the one-shot beam search of that item alone
    (row 0 of its 2 beams), whatever else shares the slots."""
    cfg, params = llama
    items = _items(cfg, 3, seed=9, max_tokens=(12, 13))  # one max_steps: one compiled one-shot loop
    sp = sampling.ar_defaults(1, "cli", beam_width=2, mirostat_shared=False)
    got = _scheduled(cfg, params, items, sp, slots=4, beam_width=2, mirostat_shared=False)
    for i, text, prom, n in items:
        batch = make_batch([{"text": text, "prom": prom, "resp": np.zeros((1, 1), np.int32)}] * 2,
                           pad_to={"text": 16, "prom": 32})  # fmt: skip
        res = G.ar_generate(cfg, params, batch, n, sampling_params=sampling.ar_defaults(2, "cli", beam_width=2),
                            features=sampling.features_of(sp))  # fmt: skip
        np.testing.assert_array_equal(got[i], np.asarray(res.tokens[0, : int(res.n_raw[0])]))
    x4 = _model("llama_x4")
    with pytest.raises(pipeline.ConfigError, match="causal_size 1"):
        pipeline.Synthesizer(pipeline.Models(*x4, *x4), pipeline.Settings(beam_width=2))


def test_nan_in_the_nar_is_an_item_error(llama):
    cfg, params = llama
    bad = jax.tree.map(lambda x: x, params)
    bad["classifiers"]["proj_3"]["bias"] = jnp.full_like(bad["classifiers"]["proj_3"]["bias"], jnp.nan)  # level 3
    models = pipeline.Models(cfg, bad, cfg, bad)
    requests = _requests(cfg, 3, seed=10)
    outs = list(pipeline.Synthesizer(models, pipeline.Settings.greedy(slots=2, chunk=4)).run(requests, progress=False))
    assert len(outs) == 3 and all(o.error and "NAR" in o.error for o in outs), [o.error for o in outs]
    fine = list(pipeline.Synthesizer(models, pipeline.Settings.greedy(slots=2, chunk=4, max_nar_levels=2)).run(
        requests, progress=False))  # levels 1-2 only: the NaN head is never used
    assert all(o.error is None and o.codes[0].shape[1] == 3 for o in fine)


def test_codec_decodes_the_levels_made():
    from valle_jax.codec import codec_spec

    assert codec_spec("encodec").decode_levels(3) == 3 and codec_spec("dac").decode_levels(9) == 9
    assert codec_spec("vocos").decode_levels(3) == 2 and codec_spec("vocos").decode_levels(8) == 8
    with pytest.raises(ValueError, match="decodes 2, 4, 8, 16"):
        codec_spec("vocos").decode_levels(1)


@pytest.mark.slow
def test_fewer_nar_levels_are_decoded_as_made(llama):
    """max_nar_levels 2: the codec decodes the 3 levels made (EnCodec sums the levels it is given), not 8 levels
    with zeros for the missing ones; Vocos takes 2 of them (its bandwidths are 2/4/8/16 levels)."""
    from valle_jax.codec import CodecClient

    cfg, params = llama
    models = pipeline.Models(cfg, params, cfg, params)
    requests = _requests(cfg, 2, seed=12, max_tokens=(10, 14))
    with CodecClient("encodec", random_seed=0) as codec:
        settings = pipeline.Settings.greedy(slots=2, chunk=4, max_nar_levels=2)
        outs = list(pipeline.Synthesizer(models, settings, codec).run(requests, progress=False))
        assert len(outs) == 2 and all(o.error is None for o in outs), [o.error for o in outs]
        for o in outs:
            codes = o.codes[0]
            assert codes.shape[1] == 3 and len(codes) >= 2
            np.testing.assert_array_equal(o.audio, codec.decode([codes])[0])
            zero_filled = codec.decode([np.pad(codes, ((0, 0), (0, 5)))])[0]
            assert o.audio.shape == zero_filled.shape and not np.array_equal(o.audio, zero_filled)  # deterministic decode
    with CodecClient("vocos", random_seed=0) as vocos:
        syn = pipeline.Synthesizer(models, settings, vocos)
        assert syn.decode_levels == 2
        [audio] = vocos.decode([outs[0].codes[0][:, :2]])
        assert audio.shape == (len(outs[0].codes[0]) * 320,) and np.isfinite(audio).all()
        with pytest.raises(pipeline.ConfigError, match="max_nar_levels 0"):
            pipeline.Synthesizer(models, pipeline.Settings.greedy(max_nar_levels=0), vocos)


def test_synthesis_mesh_takes_local_devices():
    assert parallel.synthesis_mesh().devices.size == len(jax.local_devices()) == 8
    mesh = parallel.synthesis_mesh(2)
    assert mesh.devices.size == 2 and dict(mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 1}
    with pytest.raises(parallel.ConfigError, match="9: this process has 8"):
        parallel.synthesis_mesh(9)
