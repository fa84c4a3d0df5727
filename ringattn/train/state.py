"""Train state, optimizer and the shardings of both, from the model's logical axis names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct

from ringattn.run.directory import read_config
from ringattn.run.params import init_boxed, restore_model_params, shardings_of


@struct.dataclass
class TrainState:
    step: jax.Array
    params: dict
    opt_state: optax.OptState


def make_optimizer(
    *, learning_rate, warmup_steps, total_steps, min_lr_ratio, weight_decay, b1, b2, grad_clip
):
    """AdamW with linear warmup, cosine decay to min_lr_ratio * learning_rate, global-norm clip.
    Weight decay applies to matrices only (not to norm scales)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1),
        end_value=learning_rate * min_lr_ratio,
    )
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731
    tx = optax.chain(
        optax.clip_by_global_norm(grad_clip),
        optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay, mask=decay_mask),
    )
    return tx, schedule


def _init_boxed(model, tx, rng, batch, seq_len):
    """The state with parameters (and their optimizer moments) still in logical-axis boxes."""
    params = init_boxed(model.cfg, rng, batch, seq_len)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))


def state_shardings(model, tx, mesh, rules, batch=1, seq_len=8):
    """(abstract state with shardings, shardings) without allocating anything."""
    boxed = jax.eval_shape(lambda r: _init_boxed(model, tx, r, batch, seq_len), jax.random.key(0))
    shardings = shardings_of(boxed, mesh, rules)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        nn.unbox(boxed),
        shardings,
    )
    return abstract, shardings


def init_state(model, tx, mesh, rules, rng, batch=1, seq_len=8):
    """A fresh state, created directly in its shardings (never whole on one device)."""
    _, shardings = state_shardings(model, tx, mesh, rules, batch, seq_len)
    init = lambda r: nn.unbox(_init_boxed(model, tx, r, batch, seq_len))  # noqa: E731
    return jax.jit(init, out_shardings=shardings)(rng)


def state_from_run(directory, model, tx, abstract_state):
    """A train state at step 0 with the parameters of `directory`'s newest readable checkpoint
    (as `model`'s config has them: ringattn/run/params.py) and a fresh optimizer state, all in
    `abstract_state`'s shardings."""
    stored = read_config(directory)
    step, params = restore_model_params(directory, model.cfg, model.mesh, stored)
    print(f"init_from: parameters of checkpoint {step} in {directory}; step 0, fresh optimizer")
    shardings = jax.tree.map(lambda x: x.sharding, abstract_state)
    params = jax.device_put(params, shardings.params)
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
    zero = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
    return TrainState(zero, params, opt_state)
