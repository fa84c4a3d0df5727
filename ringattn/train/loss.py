"""The language-modelling loss on final hidden states: weighted cross-entropy, an optional z-loss
(PaLM's `z * log(Z)^2`, which keeps the softmax normaliser near 1) and, for the accuracy metric,
whether each target is the argmax.

`plain` takes every token's logits [B, T, V] at once. `tiled` never holds them: it walks the
tokens in tiles of `chunk_size` per row (each spread over the devices that hold the sequence:
every device's share of a tile is a run of its own tokens) and maps each tile through the LM
head, [B, chunk, V] at a time. Its gradient is exact and computed in
the same pass (a custom_vjp): the loss is a sum over tokens, so d loss / d logits of a chunk is
known as soon as its logits are; the chunk's share of d hidden and d head weights is taken then,
and the logits are dropped. The backward only scales by the incoming cotangent: three matmuls
per token as in the plain path (logits, d hidden, d weights), none of them [tokens, V] in memory
(Wijmans et al. 2024, "Cut your losses"; Liger's fused linear cross-entropy).

On a mesh a tile is laid out one of two ways (`gather`). Split by tokens: each device takes its
own tokens of the tile, the vocabulary split as the model's logits are (over `tensor`); the
head's weights are gathered whole on every device (once), and every tile's share of d weights
is a [E, V / tensor] sum over the devices of the sequence. Gathered: each device takes every
token of the tile and a slice of the vocabulary split over the sequence's devices as well
(logical axis "loss_vocab"); the tile's hidden states are gathered (E per token) and its d hidden
summed back, while the weights and d weights stay in slices. Both hold as many logits per
device; the gathered layout moves and holds less when a tile has fewer tokens than a tensor
shard has vocabulary entries (ringattn/train/step.py picks it then).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from ringattn.nn.model import head


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """`chunk_size`: tokens of each row per tile of the tiled loss (0: the plain loss, every
    token's logits at once); `z_loss`: the coefficient of the z-loss (0: none)."""

    chunk_size: int = 0
    z_loss: float = 0.0

    def __post_init__(self):
        if not isinstance(self.chunk_size, int) or self.chunk_size < 0:
            raise ValueError(
                f"LossConfig: `chunk_size` must be an int >= 0, got {self.chunk_size!r}."
            )
        if not self.z_loss >= 0:
            raise ValueError(f"LossConfig: `z_loss` must be >= 0, got {self.z_loss!r}.")


class Losses(NamedTuple):
    total: jax.Array  # sum_t w_t (ce_t + z lse_t^2): the objective (divide by the weights' sum)
    ce: jax.Array  # sum_t w_t ce_t: a metric, without gradient
    right_BT: jax.Array  # bool: the target is the argmax (its first index on ties)


def plain(logits_BTV, targets_BT, weights_BT, z_loss=0.0):
    """Losses of every token's logits [B, T, V] (float32)."""
    lse_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    w_BT = weights_BT.astype(logits_BTV.dtype)
    ce_BT = lse_BT - target_BT
    total = jnp.sum(w_BT * (ce_BT + z_loss * lse_BT**2))
    right_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
    return Losses(total, jax.lax.stop_gradient(jnp.sum(w_BT * ce_BT)), right_BT)


def tiled(h_BTE, w_EV, targets_BT, weights_BT, *, chunk_size, z_loss=0.0, shards=1,
          constrain=None, gather=False):  # fmt: skip
    """Losses of hidden states h [B, T, E] under the LM head w [E, V] (ringattn.nn.model.head),
    `chunk_size` tokens of each row at a time (T a multiple of it; T when it is larger).

    `shards`: how many equal parts of T the devices hold (the context axis's size): tile j takes
    the j-th chunk_size / shards consecutive tokens of every part, so each device computes its
    share of every tile, from tokens that sit together in its memory (no copy to gather a tile
    when a device holds one row).

    `constrain(x, logical names)` (None: none) places the tiles' arrays on a mesh: the model's
    logical sharding constraint. `gather`: the tiles' layout on it (see the module docstring):
    every token of a tile on each device, the vocabulary split over the sequence's devices too;
    False: each device its own tokens of a tile (as the activations' sequence)."""
    b, t, e = h_BTE.shape
    c = min(chunk_size, t)
    if c < 1 or t % c:
        raise ValueError(
            f"loss: the tiled loss's `chunk_size` ({chunk_size}) must divide the sequence "
            f"length ({t}) (or be at least it)."
        )
    n = t // c
    s = shards if c % shards == 0 else 1

    def split(x):  # [B, T, ...] -> [n, B, c, ...]: of each of s parts, c / s tokens per tile
        x = jnp.moveaxis(x.reshape(b, s, n, c // s, *x.shape[2:]), 2, 0)
        return x.reshape(n, b, c, *x.shape[4:])

    weights = weights_BT.astype(jnp.promote_types(h_BTE.dtype, jnp.float32))  # the logits' dtype
    names = GATHERED if gather else SPLIT
    total, ce, right_NBc = _tiled(
        float(z_loss), constrain or _as_is, names, split(h_BTE), w_EV, split(targets_BT),
        split(weights),
    )  # fmt: skip
    right_BT = jnp.moveaxis(right_NBc.reshape(n, b, s, c // s), 0, 2).reshape(b, t)
    return Losses(total, jax.lax.stop_gradient(ce), right_BT)


def _as_is(x, names):
    del names
    return x


class Names(NamedTuple):
    """Logical axis names of a tile's hidden states, its logits and the head's weights."""

    hidden: tuple
    logits: tuple
    head: tuple


ACT = ("act_batch", "act_length", "act_embed")
HEAD = ("embed", "vocab")
SPLIT = Names(ACT, ("act_batch", "act_length", "act_vocab"), HEAD)
GATHERED = Names(("act_batch", None, "act_embed"), ("act_batch", None, "loss_vocab"),
                 (None, "loss_vocab"))  # fmt: skip


def _chunk(constrain, names, h_BcE, w_EV, targets_Bc):
    """(logits, lse, the target's logit, target == argmax) of one chunk. Elementwise ops and
    reductions over V only (no gather along V), so a vocabulary sharded over devices stays so."""
    h_BcE, w_EV = constrain(h_BcE, names.hidden), constrain(w_EV, names.head)
    logits_BcV = constrain(head(h_BcE, w_EV), names.logits)
    max_Bc = jnp.max(logits_BcV, axis=-1)
    lse_Bc = max_Bc + jnp.log(jnp.sum(jnp.exp(logits_BcV - max_Bc[..., None]), axis=-1))
    vocab_V = jnp.arange(logits_BcV.shape[-1], dtype=targets_Bc.dtype)
    hit_BcV = vocab_V == targets_Bc[..., None]
    target_Bc = jnp.sum(jnp.where(hit_BcV, logits_BcV, 0.0), axis=-1)
    # argmax == target: the target reaches the max and no smaller index does (argmax's tie rule).
    tops_BcV = logits_BcV >= max_Bc[..., None]
    earlier = jnp.any(tops_BcV & (vocab_V < targets_Bc[..., None]), axis=-1)
    return logits_BcV, hit_BcV, lse_Bc, target_Bc, (target_Bc >= max_Bc) & ~earlier


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tiled(z_loss, constrain, names, h_NBcE, w_EV, targets_NBc, weights_NBc):
    def body(sums, xs):
        h, targets, weights = xs
        _, _, lse, target, right = _chunk(constrain, names, h, w_EV, targets)
        ce = lse - target
        sums = (
            sums[0] + jnp.sum(weights * (ce + z_loss * lse**2)),
            sums[1] + jnp.sum(weights * ce),
        )
        return sums, right

    zero = jnp.zeros((), weights_NBc.dtype)
    (total, ce), right = jax.lax.scan(body, (zero, zero), (h_NBcE, targets_NBc, weights_NBc))
    return total, ce, right


def _tiled_fwd(z_loss, constrain, names, h_NBcE, w_EV, targets_NBc, weights_NBc):
    dt = h_NBcE.dtype

    def body(carry, xs):
        total, ce_sum, dw_EV = carry
        h, targets, weights = xs
        logits, hit, lse, target, right = _chunk(constrain, names, h, w_EV, targets)
        ce = lse - target
        loss = ce + z_loss * lse**2  # per token: the weights' gradient
        # d loss / d logits = w_t ((1 + 2 z lse_t) softmax - onehot(target)).
        p = jnp.exp(logits - lse[..., None])
        dlogits = weights[..., None] * ((1 + 2 * z_loss * lse)[..., None] * p - hit)
        dlogits = dlogits.astype(dt)
        w = constrain(w_EV, names.head).astype(dt)
        dh = constrain(jnp.einsum("bcv,ev->bce", dlogits, w), ACT)  # summed over V's devices
        h = constrain(h, names.hidden)
        dw = jnp.einsum("bce,bcv->ev", h, dlogits, preferred_element_type=dw_EV.dtype)
        dw_EV = constrain(dw_EV + constrain(dw, names.head), names.head)
        carry = (total + jnp.sum(weights * loss), ce_sum + jnp.sum(weights * ce), dw_EV)
        return carry, (right, dh, loss)

    zero = jnp.zeros((), weights_NBc.dtype)
    dw0 = jnp.zeros(w_EV.shape, jnp.promote_types(w_EV.dtype, jnp.float32))
    dw0 = constrain(dw0, names.head)
    (total, ce, dw), (right, dh, loss) = jax.lax.scan(
        body, (zero, zero, dw0), (h_NBcE, targets_NBc, weights_NBc)
    )
    return (total, ce, right), (dh, constrain(dw, HEAD).astype(w_EV.dtype), loss)


def _tiled_bwd(z_loss, constrain, names, residuals, cotangents):
    del z_loss, constrain, names
    dh, dw, loss = residuals
    g = cotangents[0]  # of `total`; `ce` and `right` are metrics (stop_gradient outside)
    scale = lambda x: (g * x).astype(x.dtype)  # noqa: E731
    return scale(dh), scale(dw), None, scale(loss)


_tiled.defvjp(_tiled_fwd, _tiled_bwd)
