"""The model's configuration: frozen dataclasses, built from a config's `model` field (a
ConfigDict or dict) by `ModelConfig.from_config`, so nothing else in nn/ reads configs."""

from __future__ import annotations

import dataclasses

from ringattn import deprecation
from ringattn.attention.kernels.dispatch import KERNELS
from ringattn.mesh import DEFAULT_RULES
from ringattn.nn.rope import RopeConfig

IMPLS = ("dense", "blockwise", "ring", "allgather", "ulysses", "auto")
REMAT = ("none", "full", "dots", "dots_no_batch", "offload")
PREFILL = ("pass_kv", "pass_q", "decode", "auto")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    impl: str = "ring"  # dense | blockwise | ring | allgather | ulysses | auto
    layout: str = "contiguous"  # token order of the batch: contiguous | zigzag | striped
    axis: str = "context"  # the mesh axis the sequence is split over
    block_q: int | None = None  # the XLA kernel's tiles; None: the platform's default
    block_k: int | None = None
    head_chunks: int = 1  # allgather: gather K/V this many KV-head chunks at a time
    logits_soft_cap: float = 0.0  # > 0: logits become c tanh(s / c) (Gemma 2: 50); 0: none
    sinks: bool = False  # a learned sink logit per query head and layer (gpt-oss)
    # w: a local layer's query at position i sees the keys at i - w .. i (w to its left, as
    # jax.nn.dot_product_attention's `local_window_size`; Hugging Face's Mistral `sliding_window`
    # is w + 1); None: every layer attends globally.
    local_window_size: int | None = None
    # With a window: 0 makes every layer local (Mistral); k makes layers i with (i + 1) % k == 0
    # global and the others local (Gemma 2: 2, alternating local then global; 1: all global).
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
        for name in ("logits_soft_cap", "local_window_size", "global_every"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
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
    remat: str = "none"  # none | full | dots | dots_no_batch | offload (full, input on the host)
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
        if self.scan_layers and self.attention.local_window_size is not None and every:
            if self.num_layers % every:
                raise ValueError(
                    f"ModelConfig: scanned layers repeat a group of `global_every` ({every}) "
                    f"layers, so `num_layers` ({self.num_layers}) must be a multiple of it."
                )

    @property
    def value_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    def layer_window(self, i: int) -> int | None:
        """Layer i's `local_window_size` (keys to a query's left; None: global), from
        `attention.local_window_size` and `attention.global_every`."""
        a = self.attention
        if a.local_window_size is None or (a.global_every and (i + 1) % a.global_every == 0):
            return None
        return a.local_window_size

    @classmethod
    def from_config(cls, model) -> ModelConfig:
        """The ModelConfig of a config's `model` field (a ConfigDict or dict). A field that is
        None or absent takes the dataclass's default; `rule_overrides` (logical axis -> mesh
        axes) replaces those entries of DEFAULT_RULES; a deprecated `attention.sliding_window`
        is read as `local_window_size = sliding_window - 1` (see `upgrade`)."""
        fields = {k: v for k, v in upgrade(model).items() if v is not None}
        fields["rope"] = RopeConfig(**_given(fields.get("rope")))
        fields["attention"] = AttentionConfig(**_given(fields.get("attention")))
        overrides = {k: _axes(v) for k, v in dict(fields.pop("rule_overrides", {})).items()}
        unknown = set(overrides) - {name for name, _ in DEFAULT_RULES}
        if unknown:
            raise ValueError(f"model.rule_overrides: unknown logical axes {sorted(unknown)}.")
        fields["rules"] = tuple((name, overrides.get(name, axes)) for name, axes in DEFAULT_RULES)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(fields) - known:
            raise ValueError(
                f"ModelConfig.from_config: unknown model fields {sorted(set(fields) - known)}; "
                f"the fields are {sorted(known - {'rules'})} and rule_overrides."
            )
        return cls(**fields)


def upgrade(model) -> dict:
    """A config's `model` field as nested plain dicts, with the deprecated
    `attention.sliding_window` s (tokens seen, the query included; 0: none) replaced by
    `local_window_size` = s - 1 (None for 0), with a DeprecationWarning."""
    model = _plain(model)
    attention = model.get("attention") or {}
    if "sliding_window" in attention:
        attention = dict(attention)
        old = attention.pop("sliding_window")
        if attention.get("local_window_size") is not None and old is not None:
            raise ValueError(
                "model.attention: give `local_window_size` only, not also the deprecated "
                f"`sliding_window` (got {attention['local_window_size']!r} and {old!r})."
            )
        deprecation.warn(
            "model.attention.sliding_window (s tokens seen)",
            "model.attention.local_window_size = s - 1 (keys to a query's left)",
        )
        if attention.get("local_window_size") is None:
            attention["local_window_size"] = old - 1 if old else None
        model = {**model, "attention": attention}
    return model


def _plain(x):
    """ConfigDicts (and dicts of them) as nested dicts."""
    x = x.to_dict() if hasattr(x, "to_dict") else x
    return {k: _plain(v) for k, v in x.items()} if isinstance(x, dict) else x


def _given(fields):
    return {k: v for k, v in (fields or {}).items() if v is not None}


def _axes(axes):
    return tuple(axes) if isinstance(axes, (list, tuple)) else axes
