"""The sharded train step: an objective's loss, gradient accumulation, AdamW, jit with shardings.

``Trainer`` holds everything static about a run (model config, optimizer, mesh, rules)
and exposes ``init_state`` and a jitted ``step(state, batch) -> (state, metrics)``
whose inputs and outputs carry ``NamedSharding``s derived from the logical-axis rules:
parameters and optimizer state sharded FSDP-style (``embed`` over ``fsdp``, heads and
MLP over ``tensor``), the batch over ``data`` x ``fsdp``; the state buffers are donated.
The objectives (next-token, masked SFT, DPO) are ``jaxlm.objectives``; the run loop (data,
checkpoints, logging, ``init_from``) lives in ``jaxlm.loop``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding

from jaxlm import model as model_lib
from jaxlm import sharding as sharding_lib
from jaxlm.config import ModelConfig
from jaxlm.objectives import MODEL_INPUTS, DPOConfig, next_token_loss, objective_loss, sequence_logprobs, step_metrics
from jaxlm.optim import OptimizerConfig, learning_rate_schedule, make_optimizer

Array = jax.Array
Batch = dict[str, Array]


@struct.dataclass
class TrainState:
    step: Array  # [] int32
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Static parts of training; build with ``Trainer.create``."""

    model_config: ModelConfig
    optimizer_config: OptimizerConfig
    total_steps: int
    mesh: Mesh
    rules: sharding_lib.LogicalRules = sharding_lib.RULES
    grad_accum: int = 1
    z_loss: float = 0.0
    objective: str = "lm"  # jaxlm.objectives.OBJECTIVES
    dpo: DPOConfig = DPOConfig()

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.optimizer_config, self.total_steps)

    # -- shardings -------------------------------------------------------------------
    def param_shardings(self) -> Any:
        return sharding_lib.param_shardings(self.model_config, self.mesh, self.rules)

    def state_shardings(self) -> TrainState:
        params_sh = self.param_shardings()
        abstract_params = model_lib.param_shapes(self.model_config)
        abstract_opt = jax.eval_shape(self.optimizer.init, abstract_params)
        replicated = sharding_lib.replicated(self.mesh)
        opt_sh = optax.tree_map_params(
            self.optimizer,
            lambda _, sh: sh,
            abstract_opt,
            params_sh,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
        return TrainState(step=replicated, params=params_sh, opt_state=opt_sh)

    def batch_shardings(self, batch_example: dict[str, Any]) -> dict[str, NamedSharding]:
        return {
            k: sharding_lib.batch_sharding(self.mesh, self.rules, ndim=len(jnp.shape(v))) for k, v in batch_example.items()
        }

    # -- state -----------------------------------------------------------------------
    def init_state(self, seed: int) -> TrainState:
        """Parameters and optimizer state created directly in their shardings."""

        def init(key):
            params = model_lib.init_params(self.model_config, key)
            return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params))

        jitted = jax.jit(init, out_shardings=self.state_shardings())
        with sharding_lib.activation_sharding(self.mesh, self.rules):
            return jitted(jax.random.key(seed))

    def state_from_params(self, params: Any) -> TrainState:
        """Step 0 with the given parameters (``init_from``) and a fresh optimizer state."""

        def init(p):
            return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=self.optimizer.init(p))

        state_sh = self.state_shardings()
        jitted = jax.jit(init, in_shardings=(state_sh.params,), out_shardings=state_sh)
        with sharding_lib.activation_sharding(self.mesh, self.rules):
            return jitted(jax.device_put(params, state_sh.params))

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and shardings of the state (for checkpoint restore)."""
        shapes = jax.eval_shape(
            lambda: TrainState(
                step=jnp.zeros((), jnp.int32),
                params=model_lib.param_shapes(self.model_config),
                opt_state=self.optimizer.init(model_lib.param_shapes(self.model_config)),
            )
        )
        return jax.tree.map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_shardings()
        )

    # -- step ------------------------------------------------------------------------
    def _loss(self, params: Any, batch: Batch) -> tuple[Array, dict[str, Array]]:
        return objective_loss(self.objective, self.model_config, params, batch, z_loss=self.z_loss, dpo=self.dpo)

    def _step(self, state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Array]]:
        accum = self.grad_accum
        grad_fn = jax.grad(self._loss, has_aux=True)
        model_batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS[self.objective]}

        if accum == 1:
            grads, aux = grad_fn(state.params, model_batch)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), model_batch)
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            aux0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: self._loss(state.params, jax.tree.map(lambda x: x[0], micro))[1]))

            def body(carry, mb):
                g_sum, a_sum = carry
                g, a = grad_fn(state.params, mb)
                return (jax.tree.map(jnp.add, g_sum, g), jax.tree.map(jnp.add, a_sum, a)), None

            (grads, aux), _ = jax.lax.scan(body, (zeros, aux0), micro)

        count = jnp.maximum(aux["count"], 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        schedule = learning_rate_schedule(self.optimizer_config, self.total_steps)
        metrics = {
            **step_metrics(self.objective, aux),
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    def jit_step(self, batch_example: dict[str, Any]):
        """The compiled step for batches shaped like ``batch_example`` (state donated)."""
        state_sh = self.state_shardings()
        batch_sh = self.batch_shardings(batch_example)
        replicated = sharding_lib.replicated(self.mesh)
        jitted = jax.jit(
            self._step,
            in_shardings=(state_sh, batch_sh),
            out_shardings=(state_sh, replicated),
            donate_argnums=(0,),
        )

        def step(state: TrainState, batch: Batch):
            with sharding_lib.activation_sharding(self.mesh, self.rules):
                return jitted(state, batch)

        return step

    def jit_eval_loss(self, batch_example: dict[str, Any]):
        """Compiled held-out loss: returns (ce_sum, n_tokens) for one batch."""
        batch_sh = self.batch_shardings(batch_example)
        replicated = sharding_lib.replicated(self.mesh)

        def loss(params, batch):
            model_batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS["lm"]}
            _, aux = next_token_loss(self.model_config, params, model_batch)
            return aux["ce_sum"], aux["n_tokens"]

        jitted = jax.jit(loss, in_shardings=(self.param_shardings(), batch_sh), out_shardings=replicated)

        def run(params, batch):
            with sharding_lib.activation_sharding(self.mesh, self.rules):
                return jitted(params, batch)

        return run

    def jit_sequence_logprobs(self, batch_example: dict[str, Any]):
        """Compiled ``objectives.sequence_logprobs`` for DPO's reference: (params, tokens,
        segment_ids, loss_mask) -> [B] summed log-probs of the masked tokens."""
        batch_sh = self.batch_shardings(batch_example)
        jitted = jax.jit(
            lambda params, tokens, segments, mask: sequence_logprobs(self.model_config, params, tokens, segments, mask),
            in_shardings=(self.param_shardings(), batch_sh["tokens"], batch_sh["tokens"], batch_sh["tokens"]),
            out_shardings=sharding_lib.replicated(self.mesh),
        )

        def run(params, tokens, segments, mask):
            with sharding_lib.activation_sharding(self.mesh, self.rules):
                return jitted(params, tokens, segments, mask)

        return run
