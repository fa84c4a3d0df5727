"""Hugging Face `config.json` <-> our model config, for LlamaForCausalLM and MistralForCausalLM.

What we cannot represent is rejected with the HF field's name (biases, other activations, partial
rotary, unknown RoPE types, quantized weights ...). RoPE parameters are read in both of HF's
spellings: `rope_theta` + `rope_scaling` (transformers 4) and `rope_parameters` (5); we write the
first, which both read. HF's tied Llama logits are x @ embedding^T: scale_tied_logits=False.
"""

from __future__ import annotations

import math

from ringattn.nn.config import ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# HF field -> the only value we can represent (None: absent is fine too).
REQUIRED = {
    "attention_bias": False,
    "mlp_bias": False,
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "partial_rotary_factor": 1.0,
    "quantization_config": None,
}
# Fields we rebuild on export; every other field of an imported config.json is written back as is.
OURS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
    "sliding_window",
    "torch_dtype",
    "dtype",
)


def _error(field, expected, got):
    return ValueError(f"Hugging Face config: `{field}` must be {expected}, got {got!r}.")


def model_fields(hf: dict) -> dict:
    """Our `model` config fields (configs/default.py's names; nested dicts for rope and
    attention) of a Hugging Face config.json dict. dtypes and the attention implementation are
    not the checkpoint's to say: the caller sets them."""
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _error("model_type", f"one of {sorted(ARCHITECTURES)}", model_type)
    for arch in hf.get("architectures") or [ARCHITECTURES[model_type]]:
        if arch not in ARCHITECTURES.values():
            raise _error("architectures", f"in {sorted(ARCHITECTURES.values())}", arch)
    for field, allowed in REQUIRED.items():
        value = hf.get(field)
        if value is not None and value != allowed:
            raise _error(field, "absent" if allowed is None else repr(allowed), value)
    heads = int(hf["num_attention_heads"])
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        d_model=int(hf["hidden_size"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        mlp_dim=int(hf["intermediate_size"]),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        scale_tied_logits=False,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=rope_fields(hf),
    )
    window = hf.get("sliding_window") if model_type == "mistral" else None
    if window is not None:  # every layer local: HF's window counts the query, ours does not
        if int(window) < 1:
            raise _error("sliding_window", "None or >= 1", window)
        fields["attention"] = dict(local_window_size=int(window) - 1, global_every=0)
    return fields


def _need(params, key):
    if params.get(key) is None:
        raise _error(f"rope_scaling.{key}", "set for this rope_type", None)
    return params[key]


def rope_fields(hf: dict) -> dict:
    """Our RopeConfig fields of HF's RoPE parameters, with the values HF's own rope functions
    (transformers.modeling_rope_utils) would use, defaults included."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta") or hf.get("rope_theta") or 10_000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ROPE_TYPES:
        raise _error("rope_scaling.rope_type", f"one of {ROPE_TYPES}", kind)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise _error("rope_scaling.partial_rotary_factor", "1.0", params["partial_rotary_factor"])
    if kind == "default":
        return dict(theta=theta, scaling="none", factor=1.0)
    if kind == "linear":
        return dict(theta=theta, scaling="linear", factor=float(_need(params, "factor")))
    original = int(params.get("original_max_position_embeddings") or hf["max_position_embeddings"])
    if kind == "llama3":
        return dict(
            theta=theta,
            scaling="llama3",
            factor=float(_need(params, "factor")),
            original_len=original,
            low_freq_factor=float(_need(params, "low_freq_factor")),
            high_freq_factor=float(_need(params, "high_freq_factor")),
        )
    if not params.get("truncate", True):
        raise _error("rope_scaling.truncate", "true (YaRN's rounded correction range)", False)
    factor = params.get("factor")
    if factor is None:  # HF: the extension ratio of the position tables
        factor = hf["max_position_embeddings"] / original
    factor = float(factor)
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None and mscale and mscale_all_dim and factor > 1:
        # DeepSeek's form: a ratio of two YaRN temperatures.
        attention_factor = (0.1 * mscale * math.log(factor) + 1) / (
            0.1 * mscale_all_dim * math.log(factor) + 1
        )
    return dict(
        theta=theta,
        scaling="yarn",
        factor=factor,
        original_len=original,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=float(attention_factor or 0.0),
    )


def hf_config(cfg: ModelConfig, dtype: str, template: dict | None = None) -> dict:
    """A Hugging Face config.json dict for our model `cfg` with weights in `dtype`: `template`'s
    fields (an imported model's config.json) with ours rewritten."""
    if cfg.tie_embeddings and cfg.scale_tied_logits:
        raise ValueError(
            "hf_config: a tied model with `scale_tied_logits` has no HF form as tied; export it "
            "untied (ringattn/hf/weights.py writes lm_head = embedding / sqrt(d_model))."
        )
    window = cfg.attention.local_window_size
    if window is not None and cfg.attention.global_every:
        every = cfg.attention.global_every
        raise _error("model.attention.global_every (ours)", "0 (Mistral's form)", every)
    for name in ("logits_soft_cap", "sinks"):
        if getattr(cfg.attention, name, None):
            raise _error(f"model.attention.{name} (ours)", "unset to export", True)
    if getattr(cfg, "v_head_dim", None) not in (None, 0, cfg.head_dim):
        raise _error("model.v_head_dim (ours)", "head_dim to export", cfg.v_head_dim)
    template = dict(template or {})
    windowed = window is not None
    model_type = "mistral" if windowed or template.get("model_type") == "mistral" else "llama"
    out = {k: v for k, v in template.items() if k not in OURS}
    out.update(
        architectures=[ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_act="silu",
        torch_dtype=dtype,
        **hf_rope(cfg),
    )
    if model_type == "mistral":
        out["sliding_window"] = window + 1 if windowed else None
    else:
        out.setdefault("attention_bias", False)
        out.setdefault("mlp_bias", False)
    out.setdefault("max_position_embeddings", int(cfg.rope.original_len * cfg.rope.factor))
    return out


def hf_rope(cfg: ModelConfig) -> dict:
    """`rope_theta` and `rope_scaling` (transformers 4's spelling, which 5 also reads)."""
    r = cfg.rope
    if r.scaling == "none":
        return dict(rope_theta=r.theta, rope_scaling=None)
    if r.scaling == "linear":
        scaling = dict(rope_type="linear", factor=r.factor)
    elif r.scaling == "llama3":
        scaling = dict(
            rope_type="llama3",
            factor=r.factor,
            original_max_position_embeddings=r.original_len,
            low_freq_factor=r.low_freq_factor,
            high_freq_factor=r.high_freq_factor,
        )
    elif r.scaling == "yarn":
        scaling = dict(
            rope_type="yarn",
            factor=r.factor,
            original_max_position_embeddings=r.original_len,
            beta_fast=r.beta_fast,
            beta_slow=r.beta_slow,
        )
        if r.attention_factor:
            scaling["attention_factor"] = r.attention_factor
    else:
        raise _error("model.rope.scaling (ours)", "none, linear, llama3 or yarn", r.scaling)
    return dict(rope_theta=r.theta, rope_scaling=scaling)
