"""The decoder-only LM: token embedding, N pre-norm blocks (attention + SwiGLU), final norm,
logits (tied or untied). Pure functional Flax: `init` / `apply` on positions and segment ids,
so layouts and packed documents need nothing special."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from ringattn.nn.config import ModelConfig
from ringattn.nn.layers import Attention, Mlp, RMSNorm, constrain, param
from ringattn.nn.remat import checkpoint_keeping_bits

REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    # Recompute the block, but keep its input in host memory rather than on the device: with
    # scanned layers that input ([layers, B, T, E], the whole model's saved activations) is
    # what remat "full" keeps on the device. Lowers for TPU and CUDA (pinned_host memory).
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=("block_input",),
        offload_src="device",
        offload_dst="pinned_host",
    ),
}
ACT = ("act_batch", "act_length", "act_embed")


class Block(nn.Module):
    """Pre-norm decoder block. Returns (x, None) so that nn.scan can stack it. `window`: its
    attention's local_window_size (keys to a query's left; None: global)."""

    cfg: ModelConfig
    mesh: object = None
    window: int | None = None

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT, cache=None, prefill=True,
                 cache_bound=None):  # fmt: skip
        """(x, None), or (x, the updated cache) when given a KV cache (see Attention)."""
        cfg, mesh = self.cfg, self.mesh
        x_BTE = checkpoint_name(x_BTE, "block_input")  # what remat "offload" keeps on the host
        h = RMSNorm(cfg, name="attn_norm")(x_BTE)
        attn = Attention(cfg, mesh, self.window, name="attn")
        if cache is None:
            a_BTE = attn(h, positions_BT, segment_ids_BT)
        else:
            a_BTE, cache = attn(h, positions_BT, segment_ids_BT, cache, prefill, cache_bound)
        x_BTE = x_BTE + a_BTE
        x_BTE = constrain(x_BTE, ACT, cfg, mesh)
        x_BTE = x_BTE + Mlp(cfg, mesh, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x_BTE))
        return constrain(x_BTE, ACT, cfg, mesh), cache


class RematBlock(nn.Module):
    """A Block under remat "full" in scanned layers: recomputed in the backward from its input,
    which is saved as raw bits (ringattn/nn/remat.py: else XLA's CPU compiler holds a float32
    copy of every layer's input). Its parameters are the Block's, at the same paths."""

    cfg: ModelConfig
    mesh: object = None
    window: int | None = None

    def setup(self):
        self.block = Block(self.cfg, self.mesh, self.window)
        nn.share_scope(self, self.block)

    def __call__(self, x_BTE, positions_BT, segment_ids_BT):
        if self.is_initializing():
            return self.block(x_BTE, positions_BT, segment_ids_BT)
        block = Block(self.cfg, self.mesh, self.window, parent=None)

        def f(params, x_BTE, positions_BT, segment_ids_BT):
            return block.apply({"params": params}, x_BTE, positions_BT, segment_ids_BT)[0]

        run = checkpoint_keeping_bits(f)
        return run(self.variables["params"], x_BTE, positions_BT, segment_ids_BT), None


class BlockGroup(nn.Module):
    """`global_every` consecutive blocks (local ones, then a global one): the unit a scan over
    layers repeats when local and global layers alternate (Gemma 2)."""

    cfg: ModelConfig
    mesh: object = None

    @nn.compact
    def __call__(self, x_BTE, positions_BT, segment_ids_BT):
        block = _block_class(self.cfg)
        for i in range(self.cfg.attention.global_every):
            window = self.cfg.layer_window(i)
            x_BTE, _ = block(self.cfg, self.mesh, window, name=f"block_{i}")(
                x_BTE, positions_BT, segment_ids_BT
            )
        return x_BTE, None


def _block_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return Block
    if cfg.remat == "full" and cfg.scan_layers:
        return RematBlock
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


def _scanned(cfg: ModelConfig, mesh):
    """The layers as one scanned module: every layer alike, or groups of `global_every`."""
    windows = {cfg.layer_window(i) for i in range(cfg.num_layers)}
    if len(windows) == 1:
        body, length, args = _block_class(cfg), cfg.num_layers, (cfg, mesh, windows.pop())
    else:
        body, length, args = BlockGroup, cfg.num_layers // cfg.attention.global_every, (cfg, mesh)
    stack = nn.scan(
        body,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast),
        length=length,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return stack(*args, name="layers")


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
        if cfg.scan_layers:
            self.layers = _scanned(cfg, self.mesh)
        else:
            block = _block_class(cfg)
            self.layers = [
                block(cfg, self.mesh, cfg.layer_window(i), name=f"layer_{i}")
                for i in range(cfg.num_layers)
            ]
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.unembedding = param(
                self, "unembedding", (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg
            )

    def embed(self, tokens_BT):
        x_BTE = jnp.take(self.embedding, tokens_BT, axis=0).astype(self.cfg.dtype)
        return constrain(x_BTE, ACT, self.cfg, self.mesh)

    def trunk(self, x_BTE, positions_BT, segment_ids_BT):
        """The layers on embedded inputs (no final norm)."""
        if self.cfg.scan_layers:
            x_BTE, _ = self.layers(x_BTE, positions_BT, segment_ids_BT)
        else:
            for layer in self.layers:
                x_BTE, _ = layer(x_BTE, positions_BT, segment_ids_BT)
        return x_BTE

    def hidden(self, tokens_BT, positions_BT, segment_ids_BT):
        """The final hidden states [B, T, d_model] (after the final norm): what `head` maps to
        logits. The training loss takes these and `head_weights` (ringattn/train/loss.py), so
        that it never holds every token's logits at once."""
        x_BTE = self.trunk(self.embed(tokens_BT), positions_BT, segment_ids_BT)
        return self.final_norm(x_BTE)

    def head_weights(self):
        """The LM head's matrix [d_model, vocab] in the activations' dtype: the untied
        unembedding, or the tied embedding transposed (scaled unless the model is Hugging
        Face's: scale_tied_logits=False)."""
        if self.cfg.tie_embeddings:
            # Tied: scale like an untied lecun-normal projection (the table has unit variance).
            scale = jnp.sqrt(self.cfg.d_model) if self.cfg.scale_tied_logits else 1.0
            w_EV = self.embedding.T / jnp.asarray(scale, self.embedding.dtype)
        else:
            w_EV = self.unembedding
        return w_EV.astype(self.cfg.dtype)

    def head(self, h_BTE):
        """Logits [..., vocab] in float32 of final hidden states (`hidden`) [..., d_model]."""
        logits = head(h_BTE, self.head_weights())
        if logits.ndim != 3:
            return logits
        names = ("act_batch", "act_length", "act_vocab")
        return constrain(logits, names, self.cfg, self.mesh)

    def from_embeddings(self, x_BTE, positions_BT, segment_ids_BT):
        """Logits [B, T, vocab] in float32 from embedded inputs."""
        return self.logits(self.trunk(x_BTE, positions_BT, segment_ids_BT))

    def logits(self, x_BTE):
        """Logits of the last layer's outputs (before the final norm)."""
        return self.head(self.final_norm(x_BTE))

    def __call__(self, tokens_BT, positions_BT, segment_ids_BT):
        return self.from_embeddings(self.embed(tokens_BT), positions_BT, segment_ids_BT)

    def prefill(self, tokens_BT, positions_BT, segment_ids_BT, caches, cache_bound=None,
                logits_index=None):  # fmt: skip
        """(logits, caches): the tokens (a prompt, or a chunk of one) through the model, every
        layer's K/V written into its cache (padding: position -1, segment 0). Any token order:
        the caches place tokens by position.

        `logits_index` (int [B, k], indices along T): logits [B, k, vocab] of those tokens only,
        the LM head applied to nothing else (a prompt needs its last token's); None: [B, T,
        vocab], every token's.

        `cache_bound` (static): every position the caches hold is below it. 0 (empty caches):
        the prompt's attention is the configured (context-parallel) attention, and with a window
        cache it should fit in the window. Otherwise (None: the caches may hold anything) each
        token also attends to what the caches hold: a full cache takes the tokens as a chunk
        (ringattn/decode/chunked.py: pass-KV, pass-Q or decode on a mesh; packed segments of the
        chunk each see the cached context), a window cache as decode steps would."""
        x_BTE, caches = self._cached(
            tokens_BT, positions_BT, segment_ids_BT, caches, True, cache_bound
        )
        if logits_index is not None:
            x_BTE = select_tokens(x_BTE, logits_index)
        return self.logits(x_BTE), caches

    def decode(self, tokens_Bt, positions_Bt, caches):
        """(logits [B, t, vocab], caches): t new tokens per row (t = 1: one decode step) written
        into the caches and attended to them (position -1: padding, not written)."""
        x_BtE, caches = self._cached(tokens_Bt, positions_Bt, None, caches, prefill=False)
        return self.logits(x_BtE), caches

    def _cached(self, tokens_BT, positions_BT, segment_ids_BT, caches, prefill, cache_bound=None):
        """(the last layer's outputs, the updated caches)."""
        if self.cfg.scan_layers or self.cfg.remat != "none":
            raise ValueError(
                "Transformer: decoding runs the layers in a loop without remat; build the model "
                "with scan_layers=False, remat='none' (ringattn.evals.generate.decoding_model "
                f"does), got scan_layers={self.cfg.scan_layers}, remat={self.cfg.remat!r}."
            )
        if len(caches) != self.cfg.num_layers:
            raise ValueError(
                f"Transformer: `caches` must hold one cache per layer ({self.cfg.num_layers}), "
                f"got {len(caches)}."
            )
        x_BTE = self.embed(tokens_BT)
        new = []
        for layer, cache in zip(self.layers, caches, strict=True):
            x_BTE, cache = layer(x_BTE, positions_BT, segment_ids_BT, cache, prefill, cache_bound)
            new.append(cache)
        return x_BTE, new


def head(h_BTE, w_EV):
    """The LM head: logits [..., V] of hidden states [..., E] (after the final norm) and the
    head's matrix [E, V], multiplied in the hidden states' dtype; float32 (float64 for float64
    hidden states)."""
    logits = jnp.einsum("...e,ev->...v", h_BTE, w_EV.astype(h_BTE.dtype))
    return logits.astype(jnp.promote_types(h_BTE.dtype, jnp.float32))


def select_tokens(x_BTE, index_Bk):
    """x_BTE[b, index_Bk[b, j]] as [B, k, E], by a masked sum over T rather than a gather, so
    that a sequence sharded over devices is reduced, never gathered whole on one."""
    index_Bk = jnp.asarray(index_Bk)
    if index_Bk.ndim != 2 or index_Bk.shape[0] != x_BTE.shape[0]:
        raise ValueError(
            f"logits_index: must be int [B={x_BTE.shape[0]}, k] indices along T, got shape "
            f"{index_Bk.shape}."
        )
    hit_BkT = index_Bk[:, :, None] == jnp.arange(x_BTE.shape[1])[None, None]
    return jnp.sum(jnp.where(hit_BkT[..., None], x_BTE[:, None], 0), axis=2).astype(x_BTE.dtype)
