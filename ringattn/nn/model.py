"""The decoder-only LM: token embedding, N pre-norm blocks (attention + SwiGLU), final norm,
logits (tied or untied). Pure functional Flax: `init` / `apply` on positions and segment ids,
so layouts and packed documents need nothing special."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from ringattn.nn.config import ModelConfig
from ringattn.nn.layers import Attention, Mlp, RMSNorm, constrain, param

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
ACT = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
    """Pre-norm decoder block. Returns (x, None) so that nn.scan can stack it."""

    cfg: ModelConfig
    mesh: object = None

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT):
        cfg, mesh = self.cfg, self.mesh
        h = RMSNorm(cfg, name="attn_norm")(x_BTE)
        x_BTE = x_BTE + Attention(cfg, mesh, name="attn")(h, positions_BT, segment_ids_BT)
        x_BTE = constrain(x_BTE, ACT, cfg, mesh)
        x_BTE = x_BTE + Mlp(cfg, mesh, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BTE))
        return constrain(x_BTE, ACT, cfg, mesh), None


def _block_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return Block
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
    cfg: ModelConfig
    mesh: object = None  # a (data, fsdp, tensor, context) mesh; None: one device, no sharding

    def setup(self):
        cfg = self.cfg
        self.embedding = param(
            self,
            "embedding",
            (cfg.vocab_size, cfg.d_model),
            ("vocab", "embed"),
            cfg,
            nn.initializers.normal(1.0),
        )
        block = _block_class(cfg)
        if cfg.scan_layers:
            stack = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast),
                length=cfg.num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            self.layers = stack(cfg, self.mesh, name="layers")
        else:
            self.layers = [block(cfg, self.mesh, name=f"layer_{i}") for i in range(cfg.num_layers)]
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.unembedding = param(
                self, "unembedding", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg
            )

    def embed(self, tokens_BT):
        x_BTE = jnp.take(self.embedding, tokens_BT, axis=0).astype(self.cfg.dtype)
        return constrain(x_BTE, ACT, self.cfg, self.mesh)

    def from_embeddings(self, x_BTE, positions_BT, segment_ids_BT):
        """Logits [B, T, vocab] in float32 from embedded inputs."""
        if self.cfg.scan_layers:
            x_BTE, _ = self.layers(x_BTE, positions_BT, segment_ids_BT)
        else:
            for layer in self.layers:
                x_BTE, _ = layer(x_BTE, positions_BT, segment_ids_BT)
        x_BTE = self.final_norm(x_BTE)
        if self.cfg.tie_embeddings:
            # Tied: scale like an untied lecun-normal projection (the table has unit variance).
            w_EV = self.embedding.T / jnp.sqrt(self.cfg.d_model).astype(self.embedding.dtype)
        else:
            w_EV = self.unembedding
        logits = jnp.einsum("bte,ev->btv", x_BTE, w_EV.astype(self.cfg.dtype))
        names = ("act_batch", "act_length", "act_vocab")
        return constrain(logits.astype(jnp.float32), names, self.cfg, self.mesh)

    def __call__(self, tokens_BT, positions_BT, segment_ids_BT):
        return self.from_embeddings(self.embed(tokens_BT), positions_BT, segment_ids_BT)
