"""A model's logits on given tokens under any attention implementation and device count: the
parity checks against transformers and the perplexity of real text use it.

    fwd = Forward(cfg, params, impl="ring", layout="zigzag", num_devices=8)
    logits_BTV = fwd(tokens_BT)                    # natural token order in and out
    nll_BT = fwd.nll(tokens_BT)                    # of each next token: [B, T - 1]
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.mesh import make_mesh
from ringattn.nn.config import ModelConfig
from ringattn.nn.model import Transformer
from ringattn.parallel.layouts import from_layout, to_layout

ONE_DEVICE = ("dense", "blockwise")


def truncated(cfg: ModelConfig, params, num_layers):
    """(cfg, params) of the model's first `num_layers` layers (unscanned parameters)."""
    keep = {f"layer_{i}" for i in range(num_layers)}
    params = {k: v for k, v in params.items() if not k.startswith("layer_") or k in keep}
    return dataclasses.replace(cfg, num_layers=num_layers), params


@functools.cache
def _apply(model):
    return jax.jit(lambda p, *a: model.apply({"params": p}, *a))


class Forward:
    """The model `cfg` with attention `impl` (and `layout`) on the first `num_devices` devices
    (one for dense and blockwise): a callable from tokens [B, T] to float32 logits [B, T, V]."""

    def __init__(self, cfg: ModelConfig, params, *, impl="dense", layout="contiguous",
                 num_devices=1):  # fmt: skip
        attention = dataclasses.replace(cfg.attention, impl=impl, layout=layout)
        self.cfg = dataclasses.replace(cfg, attention=attention)
        self.n = 1 if impl in ONE_DEVICE else num_devices
        devices = jax.devices()[: self.n]
        self.mesh = None if impl in ONE_DEVICE else make_mesh(dict(context=self.n), devices)
        where = NamedSharding(self.mesh, P()) if self.mesh else devices[0]
        self.params = jax.device_put(params, where)
        self.apply = _apply(Transformer(self.cfg, self.mesh))

    def __call__(self, tokens_BT):
        tokens_BT = jnp.asarray(tokens_BT, jnp.int32)
        pos_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1], dtype=jnp.int32), tokens_BT.shape)
        layout = self.cfg.attention.layout
        tok, pos = (to_layout(x, layout, self.n) if self.mesh else x for x in (tokens_BT, pos_BT))
        logits = self.apply(self.params, tok, pos, jnp.ones_like(tok))
        return np.asarray(from_layout(logits, layout, self.n) if self.mesh else logits)

    def nll(self, tokens_BT):
        """NLL [B, T - 1] of each next token."""
        logits = self(tokens_BT)[:, :-1]
        targets = np.asarray(tokens_BT)[:, 1:]
        return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
