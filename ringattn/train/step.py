"""Loss, the jitted train step and the evaluation step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.train.state import TrainState

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids", "answer_mask")


def batch_sharding(mesh, rules_batch_axes, context_axis="context"):
    """[B, T] arrays: rows over the batch axes, the sequence over the context axis."""
    return NamedSharding(mesh, P(tuple(rules_batch_axes) or None, context_axis))


def forward(model, params, batch):
    """(weighted mean cross-entropy, logits)."""
    logits_BTV = model.apply(
        {"params": params}, batch["inputs"], batch["positions"], batch["segment_ids"]
    )
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, batch["targets"])
    w_BT = batch["weights"].astype(jnp.float32)
    return jnp.sum(ce_BT * w_BT) / jnp.maximum(jnp.sum(w_BT), 1.0), logits_BTV


def exact_match(logits_BTV, batch):
    """(rows whose every answer token is the argmax, rows with an answer): the greedy decode of
    the answer is exactly right iff every teacher-forced answer prediction is."""
    mask_BT = batch["answer_mask"].astype(bool)
    right_BT = jnp.argmax(logits_BTV, axis=-1) == batch["targets"]
    has_answer_B = jnp.any(mask_BT, axis=1)
    correct_B = jnp.all(right_BT | ~mask_BT, axis=1) & has_answer_B
    return jnp.sum(correct_B), jnp.sum(has_answer_B)


def train_step(model, tx, state: TrainState, batch):
    (loss, logits), grads = jax.value_and_grad(functools.partial(forward, model), has_aux=True)(
        state.params, batch
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct, rows = exact_match(logits, batch)
    metrics = {
        "train/loss": loss,
        "train/accuracy": correct / jnp.maximum(rows, 1),
        "train/grad_norm": optax.global_norm(grads),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(model, params, batch):
    loss, logits = forward(model, params, batch)
    correct, rows = exact_match(logits, batch)
    return {"loss": loss, "correct": correct, "rows": rows}


def jit_train_step(model, tx, state_shardings, data_sharding, mesh):
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        functools.partial(train_step, model, tx),
        in_shardings=(state_shardings, data_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def jit_eval_step(model, param_shardings, data_sharding, mesh):
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        functools.partial(eval_step, model),
        in_shardings=(param_shardings, data_sharding),
        out_shardings=replicated,
    )
