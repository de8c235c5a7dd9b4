"""VALL-E around a backbone: embeddings (version 2/3 and 5 rules), sequence assembly, position ids, heads.

Spec reference-model.md sections 2 and 4. A batch is right-padded to static shapes; per-item lengths and
target levels are arrays, so one compiled program serves items of different lengths and levels.

Shapes: B batch, T/P/R padded text/prompt/response lengths, Q code columns, S sequence rows, D model dim,
V output width (the widest head).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from valle_jax import layout
from valle_jax.config import ModelConfig
from valle_jax.layout import Batch, RowLayout
from valle_jax.models import backbone as backbones
from valle_jax.parallel import constrain

RESIDUAL = ("batch", "length", "embed")  # logical axes of the assembled sequence (see models/llama.py)

Array = jax.Array


def audio_weights(cfg: ModelConfig, level_B: Array, n_tables: int, kind: str, n_cols: int) -> list[Array]:
    """Weight [B] of each code column k in the prompt/response embedding of target level L (spec 2.3).

    kind "prom": column k is read through table P_k. kind "resp": column k through table R_{k+1} (NAR);
    the AR table R_0 is handled by the caller. The version-5 sums rule keeps the reference's off-by-one:
    levels 0..L-2 only for L >= 2.
    """
    L = level_B[:, None]
    k = jnp.arange(n_tables)[None, :]
    if cfg.version >= 5:
        if cfg.experimental.audio_embedding_sums:
            w = jnp.where(L >= 2, k <= L - 2, k == 0)
        else:
            w = k == jnp.maximum(L - 1, 0)
        if kind == "resp":
            w = w & (L >= 1)
    else:  # AudioEmbedding_Old: complete sums; the AR prompt sums every level it is given
        if kind == "prom":
            w = jnp.where(L == 0, k < n_cols, k < L)
        else:
            w = (k < L) & (L >= 1)
    return [w[:, i].astype(jnp.float32) for i in range(n_tables)]


def _level_range(levels: tuple[int, ...], fallback: tuple[int, int]) -> tuple[int, int]:
    return (int(levels[0]), int(levels[1])) if levels else fallback


def token_dropout_error(cfg: ModelConfig, resp_BRQ: Array, level_B: Array, key: Array) -> Array:
    """The reference's `token_dropout_error` (training, ar_nar.py): for an item whose target level L lies in
    `token_dropout_rvq_levels` (empty: [0, resp_levels - 1]), each input code of the levels below L is moved by +1
    or -1 (equally likely) with probability `token_dropout_error`, then clamped to [1, audio_tokens - 2] (the
    reference's [1, 1022]). Only inputs change: the targets (level L) are read from the untouched batch."""
    lo, hi = _level_range(cfg.experimental.token_dropout_rvq_levels, (0, cfg.resp_levels - 1))
    hit_key, sign_key = jax.random.split(key)
    L = level_B[:, None, None]
    below = jnp.arange(resp_BRQ.shape[-1])[None, None, :] < L
    on = below & (L >= lo) & (L <= hi) & (jax.random.uniform(hit_key, resp_BRQ.shape) < cfg.experimental.token_dropout_error)
    step = jnp.where(jax.random.bernoulli(sign_key, 0.5, resp_BRQ.shape), 1, -1)
    moved = jnp.clip(resp_BRQ + step, 1, cfg.audio_tokens - 2)
    return jnp.where(on, moved, resp_BRQ).astype(resp_BRQ.dtype)


def token_dropout_rows(cfg: ModelConfig, n_rows: int, level_B: Array, resp_len_B: Array, key: Array) -> Array:
    """[B, R] rows of the response embedding that the reference's `token_dropout_rate` replaces by `dropout_token`
    (training, base.py): items whose target level L lies in `token_dropout_rvq_levels` (empty: [1, resp_levels]),
    each row with probability `token_dropout_rate`, never the stop token (the last row of a level-0 item)."""
    lo, hi = _level_range(cfg.experimental.token_dropout_rvq_levels, (1, cfg.resp_levels))
    L = level_B[:, None]
    rows = jnp.arange(n_rows)[None, :]
    eligible = (L >= lo) & (L <= hi) & (rows < resp_len_B[:, None] - (L == 0).astype(resp_len_B.dtype))
    return eligible & (jax.random.uniform(key, (level_B.shape[0], n_rows)) < cfg.experimental.token_dropout_rate)


def _embed_table(rows: int, dim: int, cfg: ModelConfig, name: str, axes=("vocab", "table_embed")) -> nn.Embed:
    # "table_embed" (replicated by the default rules), not "embed" (fsdp): a lookup's gradient is batch-sharded,
    # and turning it into an fsdp-sharded table gradient made XLA replicate it ("involuntary full
    # rematerialization"); the tables are a few percent of the parameters.
    return nn.Embed(
        rows,
        dim,
        dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0), axes),
        name=name,
    )


class AudioTables(nn.Module):
    """`proms_emb` / `resps_emb`: one table per RVQ level (`embeddings_{k}`)."""

    cfg: ModelConfig
    rows: tuple[int, ...]

    def setup(self):
        self.embeddings = [_embed_table(r, self.cfg.d_model, self.cfg, f"embeddings_{k}") for k, r in enumerate(self.rows)]

    def __call__(self, k: int, codes: Array) -> Array:
        # Clamp: a column whose weight is 0 may hold ids of another table (the stop token 1024 in column 0 of a
        # training batch), and an out-of-range gather would give NaN, and NaN * 0 = NaN.
        return self.embeddings[k](jnp.minimum(codes, self.rows[k] - 1))


class Classifiers(nn.Module):
    """Split heads `classifiers.proj.{l}`: narrower heads are right-padded with -inf columns (spec 4)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.proj = [
            nn.Dense(
                w, dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=backbones.dense_dot_general(cfg),
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), name=f"proj_{l}",
            )
            for l, w in enumerate(cfg.l_tokens)
        ]  # fmt: skip

    def __call__(self, h_BSD: Array, level_B: Array, uniform_level: bool = False) -> Array:
        """`uniform_level`: every item has level level_B[0] (generation): one head is used for the whole batch
        instead of a per-item [B, D, V] gather of head weights (the general, mixed-level training case)."""
        widths = self.cfg.l_tokens
        V = max(widths)
        if self.is_initializing():
            return jnp.stack([jnp.pad(p(h_BSD), ((0, 0), (0, 0), (0, V - w)), constant_values=-jnp.inf)
                              for p, w in zip(self.proj, widths)]).max(0)  # fmt: skip
        kernels = jnp.stack([jnp.pad(p.variables["params"]["kernel"], ((0, 0), (0, V - w))) for p, w in zip(self.proj, widths)])
        biases = jnp.stack(
            [jnp.pad(p.variables["params"]["bias"].astype(jnp.float32), (0, V - w), constant_values=-jnp.inf)
             for p, w in zip(self.proj, widths)]
        )  # fmt: skip
        if uniform_level:
            logits = jnp.einsum("bsd,dv->bsv", h_BSD, kernels[level_B[0]].astype(self.cfg.dtype), preferred_element_type=jnp.float32)
            return logits + biases[level_B[0]]
        # each item's head as a one-hot product over the stacked heads (exact: 1 x w + 0 x others), whose gradient is
        # a matmul too; a gather kernels[level_B] made its backward a scatter-add of B [D, V] kernels into L slots
        onehot = (level_B[:, None] == jnp.arange(len(widths))[None, :]).astype(kernels.dtype)
        kernel_BDV = jnp.einsum("bl,ldv->bdv", onehot, kernels, precision=jax.lax.Precision.HIGHEST).astype(self.cfg.dtype)
        logits = jnp.einsum("bsd,bdv->bsv", h_BSD, kernel_BDV, preferred_element_type=jnp.float32)
        return logits + biases[level_B][:, None, :]


class VALLE(nn.Module):
    """The reference's `Base` for the tts task: embed, backbone, heads. Parameters mirror its state dict."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        D = cfg.d_model
        vec = lambda name: self.param(name, nn.with_logical_partitioning(nn.initializers.normal(1.0), ("embed",)), (D,), cfg.param_dtype)  # noqa: E731
        self.text_emb = _embed_table(cfg.text_tokens, D, cfg, "text_emb")
        self.sep = vec("sep")
        if cfg.dropout_token:
            self.dropout_token = vec("dropout_token")
        self.proms_emb = AudioTables(cfg, (cfg.audio_tokens,) * cfg.resp_levels, name="proms_emb")
        self.resps_emb = AudioTables(cfg, tuple(cfg.l_tokens), name="resps_emb")
        if cfg.version >= 3:
            if cfg.langs > 0:
                self.langs_emb = _embed_table(cfg.langs, D, cfg, "langs_emb", ("table", "table_embed"))
            if cfg.tasks > 0:
                self.tasks_emb = _embed_table(cfg.tasks, D, cfg, "tasks_emb", ("table", "table_embed"))
        if cfg.version >= 4 and cfg.tones > 0:
            self.tones_emb = _embed_table(cfg.tones, D, cfg, "tones_emb", ("table", "table_embed"))
        if cfg.has_rvq_token:
            self.rvq_l_emb = _embed_table(cfg.resp_levels, D, cfg, "rvq_l_emb", ("table", "table_embed"))
        self.model = backbones.get(cfg.arch_type).decoder(cfg)
        if cfg.experimental.split_classifiers:
            self.classifiers = Classifiers(cfg)
        else:
            self.classifier = nn.Dense(
                cfg.n_resp_tokens, dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=backbones.dense_dot_general(cfg),
                kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "vocab")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
            )  # fmt: skip

    # ----- embeddings -----
    def embed_prom(self, prom_BPQ: Array, level_B: Array) -> Array:
        n_tables = min(self.cfg.resp_levels, prom_BPQ.shape[-1])
        w = audio_weights(self.cfg, level_B, n_tables, "prom", prom_BPQ.shape[-1])
        return sum(w[k][:, None, None] * self.proms_emb(k, prom_BPQ[..., k]) for k in range(n_tables))

    def embed_resp(self, resp_BRQ: Array, level_B: Array, resp_len_B: Array | None = None,
                   deterministic: bool = True) -> Array:  # fmt: skip
        cfg = self.cfg
        x = cfg.experimental
        if not deterministic and x.token_dropout_error > 0:
            resp_BRQ = token_dropout_error(cfg, resp_BRQ, level_B, self.make_rng("dropout"))
        ar = (level_B == 0).astype(jnp.float32)[:, None, None]
        out = ar * self.resps_emb(0, resp_BRQ[..., 0])
        if cfg.has_nar:
            n_tables = min(cfg.resp_levels - 1, resp_BRQ.shape[-1])
            w = audio_weights(cfg, level_B, n_tables, "resp", resp_BRQ.shape[-1])
            out = out + sum(w[k][:, None, None] * self.resps_emb(k + 1, resp_BRQ[..., k]) for k in range(n_tables))
        if not deterministic and x.token_dropout_rate > 0 and resp_len_B is not None:
            drop = token_dropout_rows(cfg, resp_BRQ.shape[1], level_B, resp_len_B, self.make_rng("dropout"))
            out = jnp.where(drop[..., None], self.dropout_token.astype(out.dtype), out)
        return out

    def embed(self, batch: Batch, n_rows: int | None = None, deterministic: bool = True) -> tuple[Array, RowLayout]:
        """Assemble text · sep · rvq · sep · prom · sep · resp (version 5; no rvq segment before it). In training
        (`deterministic` False) the reference's token dropout applies to the response (spec 2.4)."""
        cfg = self.cfg
        n_rows = n_rows or layout.batch_rows(cfg, batch)
        B = batch.text.shape[0]
        embs = [self.text_emb(batch.text)]
        if cfg.has_rvq_token:
            embs.append(self.rvq_l_emb(batch.level)[:, None, :])
        embs += [self.embed_prom(batch.prom, batch.level),
                 self.embed_resp(batch.resp, batch.level, batch.resp_len, deterministic)]  # fmt: skip
        lengths, has_sep = layout.segment_lengths(cfg, batch, jnp)
        lay = layout.row_layout(cfg, batch, n_rows, jnp)
        # Each segment's rows are scattered to their own sequence rows (start + j): unique destinations, so the
        # backward pass is a plain gather. (Gathering sequence rows from the segments instead, as before, made the
        # backward a scatter-add with many duplicate indices: every row outside a segment hit its clipped index.)
        # Padding rows of a segment go to one extra row, dropped at the end.
        x = jnp.zeros((B, n_rows + 1, cfg.d_model), jnp.float32)
        start = jnp.zeros((B,), jnp.int32)
        place = jax.vmap(lambda x1, rows1, emb1: x1.at[rows1].set(emb1))
        for emb_BND, n_B, sep_B in zip(embs, lengths, has_sep):
            j = jnp.arange(emb_BND.shape[1], dtype=jnp.int32)[None, :]
            rows = jnp.where(j < n_B[:, None], start[:, None] + j, n_rows)
            x = place(x, rows, constrain(emb_BND.astype(jnp.float32), RESIDUAL))
            start = start + n_B.astype(jnp.int32) + sep_B.astype(jnp.int32)
        x = jnp.where(lay.is_sep[..., None], self.sep.astype(jnp.float32), x[:, :n_rows])
        return constrain(x.astype(cfg.dtype), RESIDUAL), lay

    def embed_ar_tokens(self, tokens_BC: Array) -> Array:
        """Embedding of newly generated level-0 tokens (AR table R_0, which holds the stop row)."""
        return self.resps_emb(0, tokens_BC).astype(self.cfg.dtype)

    def backbone(self, x_BSD: Array, positions_BS: Array, valid_BS: Array, state: Any = None,
                 deterministic: bool = True, step: bool = False) -> tuple[Array, Any]:  # fmt: skip
        """Hidden states [B, S, D]; with `state` (the backbone's incremental state: a KV cache, a retention
        state) the rows extend each item's prefix; `step` marks a decode step (models/backbone.py)."""
        return self.model(x_BSD, positions_BS, valid_BS, state, deterministic=deterministic, step=step)

    def logits(self, h_BSD: Array, level_B: Array, uniform_level: bool = False) -> Array:
        """Float32 logits [B, S, V]; split heads choose each item's head by its target level
        (`uniform_level`: all items share level_B[0], one head for the batch)."""
        if self.cfg.experimental.split_classifiers:
            return self.classifiers(h_BSD, level_B, uniform_level)
        return self.classifier(h_BSD).astype(jnp.float32)

    def __call__(self, batch: Batch, deterministic: bool = True, n_rows: int | None = None,
                 uniform_level: bool = False) -> tuple[Array, RowLayout]:  # fmt: skip
        """Teacher-forced pass: logits of every row (zero on padding rows, as the reference's mask).
        `uniform_level`: the caller guarantees every item has the same level (see `logits`)."""
        if self.is_initializing():  # tables the tts path never reads still exist in every checkpoint
            for name in ("langs_emb", "tasks_emb", "tones_emb"):
                if hasattr(self, name):
                    getattr(self, name)(jnp.zeros((1,), jnp.int32))
            for k in range(self.cfg.resp_levels):
                self.proms_emb(k, jnp.zeros((1,), jnp.int32))
                self.resps_emb(k, jnp.zeros((1,), jnp.int32))
        x, lay = self.embed(batch, n_rows, deterministic)
        h, _ = self.backbone(x, lay.positions, lay.valid, None, deterministic)
        logits = constrain(self.logits(h, batch.level, uniform_level), ("batch", "length", "vocab"))
        return jnp.where(lay.valid[..., None], logits, 0.0), lay


def head_width(cfg: ModelConfig, level: int) -> int:
    """Width of the real logits of a level (1025 with the stop column; 1024 for split NAR heads)."""
    return cfg.l_tokens[level] if cfg.experimental.split_classifiers else cfg.n_resp_tokens


def init_params(cfg: ModelConfig, rng: Array, boxed: bool = False) -> dict:
    """Fresh parameters for `cfg` (plain nested dict, or boxed with logical axis names)."""
    model = VALLE(cfg)
    batch = layout.make_batch([{"text": [1, 2], "prom": [[0] * cfg.resp_levels], "resp": [[0] * cfg.resp_levels], "level": 0}])
    variables = model.init(rng, batch)
    params = variables["params"]
    return params if boxed else nn.unbox(params)


def logical_axes(cfg: ModelConfig) -> dict:
    """Logical axis names of every parameter (the same tree as the params, leaves are PartitionSpecs)."""
    boxed = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), boxed=True))
    return nn.get_partition_spec(boxed)
