"""The train state, optimizer and the sharded train / eval steps (no I/O: `train.py` runs the loop).

Train state: a plain dict pytree (what orbax saves), every leaf a global `jax.Array` laid out by the mesh:

    {"step":      int32 []   steps taken (batches consumed, skipped ones included),
     "params":    float32 master weights of what trains: the model's param tree (`models.valle.init_params`), or
                  in a LoRA run (`train.lora`) {"lora": LoRA tree, "embeddings": *_emb tables (embeddings: true)}
                  while the frozen base is an input of the step (`Trainer.frozen`, never updated or saved),
     "opt_state": optax state (moments sharded like the params; none for `model.frozen_params` leaves),
     "bad_steps": int32 []   NaN/inf steps in a row (0 after a good step),
     "skipped":   int32 []   NaN/inf steps in total}

The optimised loss is `models.loss.loss(cfg, logits, batch, faithful_nan=False)`: the reference's joint loss
(or its per-segment split loss with `loss_factors`), except that a segment or item with no targets
contributes nothing instead of NaN (the reference would give NaN there and step on it). A step whose loss or
gradient is not finite is not applied: params and optimizer state stay as they were, `bad_steps` and `skipped`
count it, and the caller stops the run after `train.max_bad_steps` in a row.

Dropout is the reference's: attention dropout (`ModelConfig.attention_dropout_rate`: model.dropout on the XLA
path, 0 on a fused kernel) and token dropout (model.experimental.token_dropout_*) in training
(`deterministic=False`, rngs {"dropout": key}); the key is `fold_in(key(train.seed), step)`, so a resumed run
draws the same masks. Activations are constrained by logical axis names under the trainer's mesh
(`parallel.constrain`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from valle_jax import parallel, trainable
from valle_jax.config import Config, ConfigError, ModelConfig, Optimizer, TrainConfig, device_platform, runtime_config
from valle_jax.layout import Batch, as_batch
from valle_jax.models import loss as loss_lib
from valle_jax.models.lora import LoraError, init_lora, lora_context, lora_logical_axes, merge_lora, stack_loras
from valle_jax.models.valle import VALLE, init_params, logical_axes

State = dict[str, Any]

# ---------------------------------------------------------------------------------------------------------
# optimizer


def learning_rate(t: TrainConfig, count: Any, xp: Any = np) -> Any:
    """The schedule's value after `count` applied updates, over the array module `xp` (numpy for logging on the
    host, jax.numpy inside the step): linear warmup over the first `warmup_steps` updates (lr x (n+1)/warmup for
    update n: never 0, which Prodigy's step-size estimate cannot take), then cosine decay to
    `learning_rate x end_learning_rate_fraction` at `steps`, or constant."""
    lr, warm = float(t.learning_rate), max(int(t.warmup_steps), 0)
    c = xp.asarray(count, xp.float32)
    value = xp.asarray(lr, xp.float32)
    if t.schedule == "cosine":
        end = lr * float(t.end_learning_rate_fraction)
        span = max(int(t.steps), warm + 1) - warm
        frac = xp.clip((c - warm) / span, 0.0, 1.0)
        value = end + (lr - end) * 0.5 * (1.0 + xp.cos(np.pi * frac))
    if warm:
        value = value * xp.minimum((c + 1.0) / warm, 1.0)
    return value


def make_schedule(t: TrainConfig) -> optax.Schedule:
    """The learning-rate schedule as optax takes it (see `learning_rate`)."""
    return lambda count: learning_rate(t, count, jnp)


def schedule_value(t: TrainConfig, step: int) -> float:
    """The schedule's value after `step` updates, computed on the host (logging without device work)."""
    return float(learning_rate(t, step, np))


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (train.grad_clip > 0), then AdamW or Prodigy over the schedule.

    Prodigy (optax.contrib.prodigy) estimates the step size itself; its `learning_rate` is a multiplier of that
    estimate (1.0 is the usual value), still shaped by the warmup/cosine schedule."""
    schedule = make_schedule(t)
    if t.optimizer == Optimizer.ADAMW:
        opt = optax.adamw(schedule, b1=float(t.b1), b2=float(t.b2), weight_decay=float(t.weight_decay))
    else:
        opt = optax.contrib.prodigy(schedule, betas=(float(t.b1), float(t.b2)), weight_decay=float(t.weight_decay))
    if t.grad_clip and float(t.grad_clip) > 0:
        return optax.chain(optax.clip_by_global_norm(float(t.grad_clip)), opt)
    return opt


# ---------------------------------------------------------------------------------------------------------
# the trainer's compiled functions


def training_model_config(cfg: Config, platform: str | None = None) -> ModelConfig:
    """The model as trained on `platform` (default: JAX's backend): float32 master weights, compute dtype from
    train.compute_dtype, the attention path (`attention_impl: auto` resolved, config.resolve_attention), train.remat."""
    check_trainable(cfg.model)
    mcfg = runtime_config(cfg.model, cfg.train.compute_dtype, remat=cfg.train.remat, platform=platform)
    return dataclasses.replace(mcfg, param_dtype="float32")


def check_trainable(m: ModelConfig) -> None:
    """Refuse reference settings that this trainer would otherwise accept and ignore (issue 9, finding 9)."""
    x = m.experimental
    if x.tie_classifier_to_embedding:
        raise ConfigError("model.experimental.tie_classifier_to_embedding = True: expected False (the reference at the "
                          "ported commit never ties: its tying code is commented out, so its heads train untied)")  # fmt: skip
    if x.p_len_train != 0.05:
        raise ConfigError(f"model.experimental.p_len_train = {x.p_len_train!r}: expected 0.05 (the reference default; it "
                          "only drives the NAR-len ('len' capability) training task, which is not ported)")  # fmt: skip
    if x.token_dropout_rate > 0 and not m.dropout_token:
        raise ConfigError(f"model.experimental.token_dropout_rate = {x.token_dropout_rate!r}: token dropout needs the "
                          "dropout_token parameter (model.dropout_token = True)")  # fmt: skip


def batch_stats(cfg: ModelConfig, logits: jax.Array, batch: Batch, metrics: dict, lengths: jax.Array) -> dict:
    """Sums over the batch (so micro-batches add up): per level l, items, item-NLL sum, top-10 hits, targets."""
    if "item_nll" not in metrics:  # split loss: per-level figures come from the joint form (monitoring only)
        _, metrics = loss_lib.joint_loss(cfg, logits, batch, faithful_nan=False)
    Q = cfg.resp_levels
    onehot = (batch.level[:, None] == jnp.arange(Q)[None, :]).astype(jnp.float32)  # [B, Q]
    targets = metrics["item_targets"].astype(jnp.float32)
    hits = metrics["item_acc"] * targets
    return {
        "items": jnp.float32(batch.level.shape[0]),
        "tokens": lengths.sum().astype(jnp.float32),
        "padded_tokens": jnp.float32(logits.shape[0] * logits.shape[1]),
        "hits": hits.sum(),
        "targets": targets.sum(),
        "level_items": onehot.sum(0),
        "level_nll": (onehot * metrics["item_nll"][:, None]).sum(0),
        "level_hits": (onehot * hits[:, None]).sum(0),
        "level_targets": (onehot * targets[:, None]).sum(0),
    }


LossFn = Callable[[ModelConfig, jax.Array, Batch, jax.Array], tuple[jax.Array, dict]]


def default_loss(cfg: ModelConfig, logits: jax.Array, batch: Batch, step: jax.Array) -> tuple[jax.Array, dict]:
    """The optimised loss: the reference's, with empty segments contributing nothing (module docstring). `step`
    (the 0-based update index, -1 in eval) is unused here; a custom loss may schedule on it."""
    return loss_lib.loss(cfg, logits, batch, faithful_nan=False)


class Trainer:
    """Mesh, shardings, optimizer and the jitted init / train / eval functions for one run config.

    `mesh` defaults to `parallel.make_mesh(cfg.mesh)` over every device. `loss_fn(model_cfg, logits, batch, step)
    -> (loss, metrics)` replaces the optimised loss (`default_loss`): a custom objective, or a test's fault injection.
    """

    def __init__(self, cfg: Config, mesh: Mesh | None = None, loss_fn: LossFn | None = None):
        self.cfg = cfg
        self.mesh = mesh if mesh is not None else parallel.make_mesh(cfg.mesh)
        self.platform = device_platform(self.mesh.devices.flat[0])
        self.mcfg = training_model_config(cfg, self.platform)
        self.rules = parallel.axis_rules(cfg.mesh)
        self.model = VALLE(self.mcfg)
        self.loss_fn = loss_fn or default_loss
        self.lora = cfg.train.lora  # LoraConfig or None (valle_jax.trainable says what trains)

        self.replicated = parallel.replicated(self.mesh)
        self.batch_sharding = parallel.batch_sharding(self.mesh, self.rules)
        self.batch_divisor = parallel.batch_divisor(self.mesh, self.rules) * cfg.train.grad_accum
        base_shapes = jax.eval_shape(lambda: init_params(self.mcfg, jax.random.key(0)))
        self.base_sharding = parallel.param_shardings(base_shapes, logical_axes(self.mcfg), self.mesh, self.rules)
        if self.lora is None:  # full training: the state's params are the model's (model.frozen_params masked)
            self.mask = trainable.trains_mask(self.mcfg, base_shapes)
            self.tx = trainable.masked_optimizer(make_optimizer(cfg.train), self.mask)
            params_shapes, self.param_sharding = base_shapes, self.base_sharding
            self.frozen_shapes, self.frozen_sharding = {}, {}
        else:  # LoRA: the state's params are the LoRA (+ embeddings); the base is a frozen input of the step
            if self.mcfg.frozen_params:
                raise ConfigError("model.frozen_params with train.lora: a LoRA run trains only the LoRA (and the *_emb "
                                  "tables with train.lora.embeddings); drop one of the two")  # fmt: skip
            try:
                self.lora.validate(self.mcfg.resp_levels, where="train.lora")
            except LoraError as e:
                raise ConfigError(str(e)) from None
            self.mask = None
            self.tx = make_optimizer(cfg.train)
            lora_shapes = jax.eval_shape(lambda: init_lora(self.mcfg, self.lora, jax.random.key(0), base_shapes))
            lora_axes = lora_logical_axes(lora_shapes, logical_axes(self.mcfg))
            params_shapes = {trainable.LORA: lora_shapes}
            self.param_sharding = {trainable.LORA: parallel.param_shardings(lora_shapes, lora_axes, self.mesh, self.rules)}
            if self.lora.embeddings:
                paths = trainable.embedding_paths(base_shapes)
                params_shapes[trainable.EMBEDDINGS] = trainable.subtree(base_shapes, paths)
                self.param_sharding[trainable.EMBEDDINGS] = trainable.subtree(self.base_sharding, paths)
            self.frozen_shapes, self.frozen_sharding = base_shapes, self.base_sharding
        self.frozen: dict = {}  # the LoRA run's base params on the mesh (set_base)
        opt_shapes = jax.eval_shape(self.tx.init, params_shapes)
        self.opt_sharding = parallel.like_params_shardings(opt_shapes, params_shapes, self.param_sharding, self.mesh)
        r = self.replicated
        self.state_sharding = {"step": r, "params": self.param_sharding, "opt_state": self.opt_sharding,
                               "bad_steps": r, "skipped": r}  # fmt: skip
        shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_shapes, "opt_state": opt_shapes,
                  "bad_steps": jax.ShapeDtypeStruct((), jnp.int32), "skipped": jax.ShapeDtypeStruct((), jnp.int32)}  # fmt: skip
        self.abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_sharding)

        self._init = jax.jit(self._in_mesh(self._init_fn), in_shardings=(r, self.frozen_sharding),
                             out_shardings=self.state_sharding)  # fmt: skip
        self._from_params = jax.jit(self._in_mesh(self._from_params_fn), in_shardings=(self.param_sharding, r),
                                    out_shardings=self.state_sharding)  # fmt: skip
        self._model_params = jax.jit(self._in_mesh(self._model_params_fn), in_shardings=(self.param_sharding, self.frozen_sharding),
                                     out_shardings=self.base_sharding)  # fmt: skip
        self._steps: dict[int | None, tuple[Callable, Callable]] = {}
        self._train_step, self._eval_step = self.compiled_steps(None)

    def memory(self) -> dict:
        """Sizes of the train state: trained params and their bytes, optimizer-state bytes, frozen params (the
        LoRA run's base, or the model.frozen_params leaves)."""
        a = self.abstract_state
        if self.lora is not None:
            frozen = trainable.count(self.frozen_shapes)
        elif self.mask is not None:
            frozen = sum(int(x.size) for x, t in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(self.mask)) if not t)
        else:
            frozen = 0
        return {"trained_params": trainable.count(a["params"]) - (0 if self.lora is not None else frozen),
                "params_bytes": trainable.nbytes(a["params"]), "opt_state_bytes": trainable.nbytes(a["opt_state"]),
                "frozen_params": frozen}  # fmt: skip

    def compiled_steps(self, n_rows: int | None) -> tuple[Callable, Callable]:
        """(train step, eval step) jitted for batches whose model runs `n_rows` sequence rows (a bucket's length;
        None: as many as the batch's padded arrays assemble)."""
        if n_rows not in self._steps:
            r = self.replicated
            train = jax.jit(self._in_mesh(functools.partial(self._train_step_fn, n_rows=n_rows)),
                            in_shardings=(self.state_sharding, self.batch_sharding, self.frozen_sharding),
                            out_shardings=(self.state_sharding, r), donate_argnums=(0,))  # fmt: skip
            evaluate = jax.jit(self._in_mesh(functools.partial(self._eval_fn, n_rows=n_rows)),
                               in_shardings=(self.param_sharding, self.batch_sharding, self.frozen_sharding),
                               out_shardings=r)  # fmt: skip
            self._steps[n_rows] = (train, evaluate)
        return self._steps[n_rows]

    def _in_mesh(self, fn: Callable) -> Callable:
        """`fn` traced with the mesh set, so activations get their shardings (`parallel.constrain`)."""

        def traced(*args):
            with jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh):
                return fn(*args)

        return traced

    # ----- state -----
    def _new_state(self, params) -> State:
        zero = jnp.zeros((), jnp.int32)
        return {"step": zero, "params": params, "opt_state": self.tx.init(params), "bad_steps": zero, "skipped": zero}

    def _init_fn(self, rng, frozen):
        if self.lora is None:
            return self._new_state(init_params(self.mcfg, rng))
        params = {trainable.LORA: init_lora(self.mcfg, self.lora, rng, frozen)}
        if self.lora.embeddings:  # the trained tables start from the base's
            params[trainable.EMBEDDINGS] = trainable.subtree(frozen, trainable.embedding_paths(frozen))
        return self._new_state(params)

    def _model_params_fn(self, params, frozen):
        """The model's params as trained: the LoRA folded into the base (at every level), embeddings in place."""
        if self.lora is None:
            return params
        base = trainable.overlay(frozen, params.get(trainable.EMBEDDINGS))
        return merge_lora(base, params[trainable.LORA], self.lora, all_levels=True)

    def _from_params_fn(self, params, step):
        return {**self._new_state(jax.tree.map(lambda x: x.astype(jnp.float32), params)), "step": step}

    def init_state(self, params: dict | None = None) -> State:
        """Fresh state from `train.seed`, or from given params (numpy, e.g. an imported reference checkpoint).
        A LoRA run: `params` is the base (required), the LoRA starts fresh from `train.seed`."""
        if self.lora is not None:
            if params is None:
                raise ConfigError("train.lora needs a base model: set train.init_from (a model directory or a reference .sft/.pth)")
            self.set_base(params)
            return self._init(jax.random.key(self.cfg.train.seed), self.frozen)
        if params is None:
            return self._init(jax.random.key(self.cfg.train.seed), {})
        return self._from_params(self._place(params, self.abstract_state["params"]), jnp.zeros((), jnp.int32))

    def set_base(self, params: dict) -> None:
        """A LoRA run's frozen base (numpy params of the model config) onto the mesh, float32."""
        expected = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, jnp.float32, sharding=sh),
                                self.frozen_shapes, self.frozen_sharding)  # fmt: skip
        self.frozen = self._place(params, expected)

    def model_params(self, state: State) -> dict:
        """The full model params of a state (global arrays): a LoRA run's base with its LoRA merged in (at every
        level, as trained), else the state's own params (no copy)."""
        if self.lora is None:
            return state["params"]
        return self._model_params(state["params"], self.frozen)

    @staticmethod
    def _place(params: dict, expected: Any) -> dict:
        """numpy params (or global arrays already laid out as `expected`) -> float32 global arrays on the mesh."""
        same_tree = jax.tree.structure(params) == jax.tree.structure(expected)
        if same_tree and all(isinstance(a, jax.Array) and a.sharding == s.sharding and a.shape == s.shape
                             for a, s in zip(jax.tree.leaves(params), jax.tree.leaves(expected))):  # fmt: skip
            return jax.tree.map(lambda a: a.astype(jnp.float32), params)
        if not same_tree:
            raise ConfigError("init_from: the checkpoint's parameter tree does not match the model config")
        bad = [f"{jax.tree_util.keystr(k)} {np.shape(a)} != {s.shape}"
               for (k, a), s in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(expected))
               if tuple(np.shape(a)) != tuple(s.shape)]  # fmt: skip
        if bad:
            raise ConfigError(f"init_from: parameter shapes differ from the model config: {'; '.join(bad[:5])}")
        return jax.tree.map(
            lambda a, s: jax.make_array_from_callback(s.shape, s.sharding, lambda idx, a=a: np.asarray(a, np.float32)[idx]),
            params, expected,
        )  # fmt: skip

    def fresh_optimizer(self, params: dict, step: Any) -> State:
        """A state with these (global, sharded) params at `step` and a new optimizer state (`train.restore=params`)."""
        return self._from_params(params, jnp.asarray(step, jnp.int32))

    # ----- forward / loss -----
    def _forward(self, params, frozen, batch: Batch, key, deterministic: bool, step, n_rows: int | None = None):
        rngs = None if deterministic else {"dropout": key}
        if self.lora is None:
            model_params, stack = trainable.freeze(params, self.mask), None
        else:  # the reference trains a LoRA at every level (rvq_levels is an inference setting)
            model_params = trainable.overlay(jax.lax.stop_gradient(frozen), params.get(trainable.EMBEDDINGS))
            stack = stack_loras([(self.lora, params[trainable.LORA])], self.mcfg.resp_levels)
        dropout = 0.0 if deterministic or self.lora is None else float(self.lora.dropout)
        with nn.logical_axis_rules(self.rules), lora_context(stack, train=True, dropout=dropout):
            logits, lay = self.model.apply({"params": model_params}, batch, deterministic=deterministic, n_rows=n_rows,
                                           rngs=rngs)  # fmt: skip
        total, metrics = self.loss_fn(self.mcfg, logits, batch, step)
        return total, batch_stats(self.mcfg, logits, batch, metrics, lay.length)

    def _grads(self, params, frozen, batch: Batch, key, step, n_rows: int | None = None):
        A = self.cfg.train.grad_accum
        grad_fn = jax.value_and_grad(lambda p, b, k, s: self._forward(p, frozen, b, k, False, s, n_rows), has_aux=True)
        if A == 1:
            (total, stats), grads = grad_fn(params, batch, key, step)
            return total, stats, grads
        B = batch.text.shape[0]
        # micro-batch i = rows i, i+A, i+2A, ...: every device keeps its own rows (no data movement)
        micro = jax.tree.map(lambda x: jnp.swapaxes(x.reshape(B // A, A, *x.shape[1:]), 0, 1), batch)
        spec = parallel.batch_spec(self.mesh, self.rules)
        micro = jax.lax.with_sharding_constraint(micro, NamedSharding(self.mesh, P(None, *spec)))

        def body(carry, xs):
            mb, i = xs
            (l, s), g = grad_fn(params, Batch(*mb), jax.random.fold_in(key, i), step)
            return jax.tree.map(jnp.add, carry, (l, s, g)), None

        first = Batch(*jax.tree.map(lambda x: x[0], micro))
        shapes = jax.eval_shape(lambda: (*grad_fn(params, first, key, step)[0], params))
        zeros = jax.tree.map(lambda z: jnp.zeros(z.shape, z.dtype), shapes)
        (total, stats, grads), _ = jax.lax.scan(body, zeros, (tuple(micro), jnp.arange(A)))
        return total / A, stats, jax.tree.map(lambda g: g / A, grads)

    def _train_step_fn(self, state: State, batch: Batch, frozen: dict | None = None, n_rows: int | None = None):
        """One update, or none: a step whose loss or gradient is not finite keeps params and optimizer state; once
        `train.max_bad_steps` such steps are in a row the state is frozen (`stopped` in the metrics: the host,
        which reads metrics late to never wait on the device, then stops at exactly that step)."""
        if frozen is None:  # a full run has no frozen input (a LoRA run's step always gets its base)
            if self.lora is not None:
                raise ValueError("a LoRA run's train step needs the frozen base (Trainer.frozen)")
            frozen = {}
        step = state["step"]
        key = jax.random.fold_in(jax.random.key(self.cfg.train.seed), step)
        total, stats, grads = self._grads(state["params"], frozen, batch, key, step, n_rows)
        grad_norm = optax.tree.norm(grads)
        stopped = state["bad_steps"] >= self.cfg.train.max_bad_steps
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        apply = finite & ~stopped
        updates, new_opt = self.tx.update(grads, state["opt_state"], state["params"])
        new_params = optax.apply_updates(state["params"], updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
        bad = jnp.where(stopped, state["bad_steps"], jnp.where(finite, 0, state["bad_steps"] + 1)).astype(jnp.int32)
        new_state = {
            "step": jnp.where(stopped, step, step + 1),
            "params": keep(new_params, state["params"]),
            "opt_state": keep(new_opt, state["opt_state"]),
            "bad_steps": bad,
            "skipped": state["skipped"] + (~finite & ~stopped).astype(jnp.int32),
        }
        metrics = {"loss": total, "grad_norm": grad_norm, "finite": finite, "bad_steps": bad, "stopped": stopped,
                   "skipped": new_state["skipped"], "step": step + 1, **stats}  # fmt: skip
        return new_state, metrics

    def _eval_fn(self, params, batch: Batch, frozen: dict, n_rows: int | None = None):
        total, stats = self._forward(params, frozen, batch, None, True, jnp.int32(-1), n_rows)
        return {"loss": total, **stats}

    # ----- public steps -----
    def device_batch(self, local: dict | Batch) -> Batch:
        """This process's rows (numpy) -> the global, sharded Batch."""
        b = as_batch(local)
        global_rows = b.text.shape[0] * jax.process_count()
        if global_rows % self.batch_divisor:
            raise ConfigError(f"global batch of {global_rows} rows does not divide into {self.batch_divisor} "
                              "(batch shards of the mesh x train.grad_accum)")  # fmt: skip
        return parallel.global_batch(b, self.batch_sharding)

    def train_step(self, state: State, local_batch: dict | Batch) -> tuple[State, dict]:
        """One optimizer step on a host-local batch; returns (new state, metrics as device arrays). The given
        state's buffers are donated to the new one: do not use it again."""
        return self.compiled_steps(batch_rows(local_batch))[0](state, self.device_batch(local_batch), self.frozen)

    def attention_path(self, n_rows: int) -> str:
        """The attention computation a training step over `n_rows` rows runs (models.backbone.attention_path)."""
        from valle_jax.models.backbone import attention_path

        return attention_path(self.mcfg, n_rows, cached=False)

    def eval_step(self, state: State, local_batch: dict | Batch) -> dict:
        return self.compiled_steps(batch_rows(local_batch))[1](state["params"], self.device_batch(local_batch), self.frozen)

    def learning_rate(self, good_steps: int) -> float:
        """The schedule's value after `good_steps` applied updates (host-side, no device work)."""
        return schedule_value(self.cfg.train, good_steps)


def batch_rows(local: Any) -> int | None:
    """The sequence rows a pipeline batch asks the model to run (its `rows` entry: the bucket's length), or None."""
    if isinstance(local, dict) and "rows" in local:
        rows = np.asarray(local["rows"]).reshape(-1)
        return int(rows[0]) if rows.size else None
    return None


def summarize(stats: list[dict], resp_levels: int) -> dict:
    """Host-side: sum step statistics (numpy) -> loss/accuracy overall and per level (NaN-free: absent -> omitted)."""
    if not stats:
        return {}
    tot = {k: np.sum([np.asarray(s[k], np.float64) for s in stats], axis=0) for k in stats[0]
           if k not in ("finite", "step", "bad_steps", "skipped", "stopped")}  # fmt: skip
    out: dict[str, float] = {}
    if "loss" in tot:
        losses = [float(s["loss"]) for s in stats if bool(s.get("finite", True))]
        out["loss"] = float(np.mean(losses)) if losses else float("nan")
    out["acc"] = float(tot["hits"] / max(tot["targets"], 1.0))
    for lvl in range(resp_levels):
        n = float(tot["level_items"][lvl])
        if n > 0:
            out[f"loss_L{lvl}"] = float(tot["level_nll"][lvl] / n)
            out[f"acc_L{lvl}"] = float(tot["level_hits"][lvl] / max(tot["level_targets"][lvl], 1.0))
    out["tokens"] = float(tot["tokens"])
    out["padded_tokens"] = float(tot["padded_tokens"])
    return out
