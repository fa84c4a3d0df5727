"""The model's configuration: frozen dataclasses, built from an ml_collections config by the
trainer, so nothing in nn/ reads configs."""

from __future__ import annotations

import dataclasses

from ringattn.attention.kernels.dispatch import KERNELS
from ringattn.mesh import DEFAULT_RULES
from ringattn.nn.rope import RopeConfig

IMPLS = ("dense", "blockwise", "ring", "allgather", "ulysses", "auto")
REMAT = ("none", "full", "dots", "dots_no_batch")
PREFILL = ("pass_kv", "pass_q", "decode", "auto")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    impl: str = "ring"  # dense | blockwise | ring | allgather | ulysses | auto
    layout: str = "contiguous"  # token order of the batch: contiguous | zigzag | striped
    axis: str = "context"  # the mesh axis the sequence is split over
    block_q: int = 512
    block_k: int = 512
    head_chunks: int = 1  # allgather: gather K/V this many KV-head chunks at a time
    logits_soft_cap: float = 0.0  # > 0: logits become c tanh(s / c) (Gemma 2: 50); 0: none
    sinks: bool = False  # a learned sink logit per query head and layer (gpt-oss)
    # > 0: local layers' queries see the last `sliding_window` tokens, themselves included
    # (Hugging Face's Mistral `sliding_window`); 0: every layer attends globally.
    sliding_window: int = 0
    # With a window: 0 makes every layer local (Mistral); k makes layers i with (i + 1) % k == 0
    # global and the others local (Gemma 2: 2, alternating local then global).
    global_every: int = 0
    # A prompt chunk against a sharded cache that holds tokens (ringattn/decode/chunked.py):
    # pass_kv | pass_q | decode | auto (the cost model's choice per call).
    prefill: str = "auto"
    # The single-device kernel (ringattn/attention/kernels/dispatch.py): auto (the platform's
    # first that passes its probe on every process) | xla | pallas_gpu | cudnn | pallas_tpu
    # (pinned: no probe chooses). Speed only: results agree to rounding.
    kernel: str = "auto"

    def __post_init__(self):
        if self.impl not in IMPLS:
            raise ValueError(f"AttentionConfig: `impl` must be one of {IMPLS}, got {self.impl!r}.")
        if self.kernel not in KERNELS:
            raise ValueError(
                f"AttentionConfig: `kernel` must be one of {KERNELS}, got {self.kernel!r}."
            )
        if self.prefill not in PREFILL:
            raise ValueError(
                f"AttentionConfig: `prefill` must be one of {PREFILL}, got {self.prefill!r}."
            )
        for name in ("logits_soft_cap", "sliding_window", "global_every"):
            if getattr(self, name) < 0:
                raise ValueError(
                    f"AttentionConfig: `{name}` must be >= 0, got {getattr(self, name)!r}."
                )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 32
    v_head_dim: int = 0  # values' head dim when it is not head_dim (MLA-style); 0: head_dim
    mlp_dim: int = 512
    mlp_chunk_size: int = 0  # > 0: SwiGLU over the sequence this many tokens at a time
    tie_embeddings: bool = True
    # Tied logits: x @ embedding^T / sqrt(d_model) (our unit-variance table, scaled like an untied
    # projection) when True; x @ embedding^T as is (Hugging Face's Llama) when False.
    scale_tied_logits: bool = True
    remat: str = "none"  # none | full | dots | dots_no_batch
    scan_layers: bool = False  # one compiled layer body for all layers (fast compiles)
    dtype: str = "float32"  # activations
    param_dtype: str = "float32"
    norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    attention: AttentionConfig = AttentionConfig()
    rules: tuple = DEFAULT_RULES

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig: `num_heads` ({self.num_heads}) must be a multiple of "
                f"`num_kv_heads` ({self.num_kv_heads})."
            )
        if self.remat not in REMAT:
            raise ValueError(f"ModelConfig: `remat` must be one of {REMAT}, got {self.remat!r}.")
        every = self.attention.global_every
        if self.scan_layers and self.attention.sliding_window and every:
            if self.num_layers % every:
                raise ValueError(
                    f"ModelConfig: scanned layers repeat a group of `global_every` ({every}) "
                    f"layers, so `num_layers` ({self.num_layers}) must be a multiple of it."
                )

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def layer_window(self, i: int) -> int | None:
        """The window layer i attends within (None: global), from `attention.sliding_window`
        and `attention.global_every`."""
        a = self.attention
        if not a.sliding_window or (a.global_every and (i + 1) % a.global_every == 0):
            return None
        return a.sliding_window
