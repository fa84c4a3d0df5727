"""The objective, the jitted train step and the evaluation step."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.mesh import mesh_axes_for
from ringattn.nn.layers import constrain
from ringattn.nn.model import Transformer
from ringattn.train import loss as loss_lib
from ringattn.train.loss import LossConfig
from ringattn.train.state import TrainState

PLAIN = LossConfig()  # every token's logits at once
BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids", "answer_mask")


def batch_sharding(mesh, rules_batch_axes, context_axis="context"):
    """[B, T] arrays: rows over the batch axes, the sequence over the context axis."""
    return NamedSharding(mesh, P(tuple(rules_batch_axes) or None, context_axis))


def forward(model, params, batch, loss_config=PLAIN):
    """(the objective: weighted mean cross-entropy + z-loss, (mean cross-entropy, right_BT)),
    from the model's final hidden states through its LM head (ringattn/train/loss.py: tiled
    when loss_config.chunk_size > 0, so that no [tokens, vocab] logits exist)."""
    variables = {"params": params}
    h_BTE = model.apply(
        variables,
        batch["inputs"],
        batch["positions"],
        batch["segment_ids"],
        method=Transformer.hidden,
    )
    targets_BT, weights_BT = batch["targets"], batch["weights"]
    if loss_config.chunk_size:
        w_EV = model.apply(variables, method=Transformer.head_weights)
        out = loss_lib.tiled(
            h_BTE, w_EV, targets_BT, weights_BT, chunk_size=loss_config.chunk_size,
            z_loss=loss_config.z_loss, shards=_shards(model), constrain=_constrainer(model),
            gather=gathers_tiles(model, loss_config.chunk_size, h_BTE.shape[1]),
        )  # fmt: skip
    else:
        logits_BTV = model.apply(variables, h_BTE, method=Transformer.head)
        out = loss_lib.plain(logits_BTV, targets_BT, weights_BT, loss_config.z_loss)
    denominator = jnp.maximum(jnp.sum(batch["weights"].astype(out.total.dtype)), 1.0)
    return out.total / denominator, (out.ce / denominator, out.right_BT)


@functools.cache
def _constrainer(model):
    """(x, logical names) -> x constrained to the model's mesh (one function per model: the
    tiled loss's custom_vjp takes it as a static argument)."""
    return lambda x, names: constrain(x, names, model.cfg, model.mesh)


def gathers_tiles(model, chunk_size, seq_len):
    """Whether the tiled loss gathers each tile's tokens, the vocabulary split over the
    sequence's devices too (ringattn/train/loss.py): on a mesh that splits the sequence, when
    the vocabulary splits evenly over those devices and the tensor ones ("loss_vocab") and a
    tile has fewer tokens than a tensor shard has vocabulary entries (gathering the tile's
    hidden states then moves and holds less than gathering the head's weights)."""
    if model.mesh is None or _shards(model) == 1:
        return False
    cfg = model.cfg

    def size(name):
        return math.prod(model.mesh.shape[a] for a in mesh_axes_for(cfg.rules, name))

    return (
        size("loss_vocab") > size("act_vocab")
        and cfg.vocab_size % size("loss_vocab") == 0
        and min(chunk_size, seq_len) * size("act_vocab") < cfg.vocab_size
    )


def _shards(model):
    """How many parts of the sequence the devices hold: the mesh's context-axis size."""
    axes = mesh_axes_for(model.cfg.rules, "act_length")
    return math.prod(model.mesh.shape[a] for a in axes) if model.mesh is not None else 1


def exact_match(right_BT, batch):
    """(rows whose every answer token is the argmax, rows with an answer, answer tokens that
    are the argmax, answer tokens): the greedy decode of the answer is exactly right iff every
    teacher-forced answer prediction is; the token counts are next-token accuracy (what a text
    task's rows, never exactly right, are measured by). `right_BT`: the target is the argmax
    (ringattn/train/loss.py)."""
    mask_BT = batch["answer_mask"].astype(bool)
    has_answer_B = jnp.any(mask_BT, axis=1)
    correct_B = jnp.all(right_BT | ~mask_BT, axis=1) & has_answer_B
    return jnp.sum(correct_B), jnp.sum(has_answer_B), jnp.sum(right_BT & mask_BT), jnp.sum(mask_BT)


def train_step(model, tx, loss_config, state: TrainState, batch):
    grad_fn = jax.value_and_grad(
        functools.partial(forward, model, loss_config=loss_config), has_aux=True
    )
    (objective, (loss, right_BT)), grads = grad_fn(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    correct, rows, right, tokens = exact_match(right_BT, batch)
    metrics = {
        "train/loss": loss,
        "train/accuracy": correct / jnp.maximum(rows, 1),
        "train/token_accuracy": right / jnp.maximum(tokens, 1),
        "train/grad_norm": optax.global_norm(grads),
    }
    if loss_config.z_loss:
        metrics["train/z_loss"] = objective - loss
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_step(model, loss_config, params, batch):
    _, (loss, right_BT) = forward(model, params, batch, loss_config)
    correct, rows, right, tokens = exact_match(right_BT, batch)
    return {"loss": loss, "correct": correct, "rows": rows, "right": right, "tokens": tokens}


def jit_train_step(model, tx, state_shardings, data_sharding, mesh, loss_config=PLAIN):
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        functools.partial(train_step, model, tx, loss_config),
        in_shardings=(state_shardings, data_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


def jit_eval_step(model, param_shardings, data_sharding, mesh, loss_config=PLAIN):
    replicated = NamedSharding(mesh, P())
    return jax.jit(
        functools.partial(eval_step, model, loss_config),
        in_shardings=(param_shardings, data_sharding),
        out_shardings=replicated,
    )
