"""Hugging Face config.json <-> our model config: the fields, what is rejected, and our RoPE
(inverse frequencies and cos/sin scale) against transformers' own rope functions."""

import dataclasses

import numpy as np
import pytest

from ringattn.hf import config as hf_config
from ringattn.nn.config import ModelConfig
from ringattn.nn.rope import RopeConfig, inverse_frequencies


def llama(**extra):
    return (
        dict(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            vocab_size=100,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            rms_norm_eps=1e-5,
            max_position_embeddings=512,
            rope_theta=500_000.0,
            tie_word_embeddings=True,
            attention_bias=False,
            mlp_bias=False,
            hidden_act="silu",
            bos_token_id=7,
        )
        | extra
    )


LLAMA3 = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
ROPES = {
    "default": None,
    "linear": dict(rope_type="linear", factor=2.5),
    "llama3": LLAMA3,
    "yarn": dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
    "yarn_no_original": dict(type="yarn", factor=4.0),
    "yarn_betas": dict(rope_type="yarn", factor=8.0, beta_fast=16, beta_slow=2),
    "yarn_attention_factor": dict(rope_type="yarn", factor=4.0, attention_factor=0.9),
    "yarn_mscale": dict(rope_type="yarn", factor=16.0, mscale=0.707, mscale_all_dim=1.0),
}


def test_fields():
    f = hf_config.model_fields(llama(rope_scaling=LLAMA3))
    assert (f["vocab_size"], f["num_layers"], f["d_model"], f["mlp_dim"]) == (100, 2, 64, 96)
    assert (f["num_heads"], f["num_kv_heads"], f["head_dim"]) == (4, 2, 24)
    assert f["tie_embeddings"] and not f["scale_tied_logits"] and f["norm_eps"] == 1e-5
    assert f["rope"] == dict(
        theta=500_000.0,
        scaling="llama3",
        factor=8.0,
        original_len=64,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
    )
    ModelConfig(**{**f, "rope": RopeConfig(**f["rope"])})  # a valid config
    # head_dim and KV heads default as in HF; transformers 5's rope_parameters spelling.
    hf = llama(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4))
    del hf["head_dim"], hf["num_key_value_heads"], hf["rope_theta"]
    f = hf_config.model_fields(hf)
    assert (f["head_dim"], f["num_kv_heads"]) == (16, 4)
    assert f["rope"] == dict(theta=1e4, scaling="linear", factor=2.0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("attention_bias", True),
        ("mlp_bias", True),
        ("hidden_act", "gelu"),
        ("model_type", "gemma"),
        ("architectures", ["LlamaForSequenceClassification"]),
        ("quantization_config", {"quant_method": "gptq"}),
        ("rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
        ("rope_scaling", {"rope_type": "longrope", "factor": 2.0}),
        ("rope_scaling", {"rope_type": "yarn", "factor": 2.0, "truncate": False}),
        ("rope_scaling", {"rope_type": "llama3", "factor": 2.0}),
        ("partial_rotary_factor", 0.5),
    ],
)
def test_unrepresentable_configs_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"`{field}"):
        hf_config.model_fields(llama(**{field: value}))


def test_export_round_trip_and_refusals():
    yarn = dict(ROPES["yarn_attention_factor"], original_max_position_embeddings=32)
    hf = llama(rope_scaling=yarn)
    f = hf_config.model_fields(hf)
    cfg = ModelConfig(**{**f, "rope": RopeConfig(**f["rope"])})
    out = hf_config.hf_config(cfg, "bfloat16", template=hf)
    assert out["bos_token_id"] == 7 and out["torch_dtype"] == "bfloat16"  # the template's kept
    assert hf_config.model_fields(out) == f
    assert out["rope_scaling"]["attention_factor"] == 0.9
    with pytest.raises(ValueError, match="scale_tied_logits"):
        hf_config.hf_config(dataclasses.replace(cfg, scale_tied_logits=True), "float32")
    ntk = dataclasses.replace(cfg, rope=RopeConfig(scaling="ntk", factor=2.0))
    with pytest.raises(ValueError, match="rope.scaling"):
        hf_config.hf_config(ntk, "float32")


@pytest.mark.parametrize("name", sorted(ROPES))
def test_rope_matches_transformers(name):
    """Our inverse frequencies and cos/sin scale, from the mapped RopeConfig, are transformers'
    (ROPE_INIT_FUNCTIONS on the same config), for every scaling we import."""
    pytest.importorskip("torch", reason="needs torch (pip install -e '.[hf]')")
    transformers = pytest.importorskip("transformers", reason="needs transformers ('.[hf]')")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = llama(rope_scaling=ROPES[name])
    ours, scale = inverse_frequencies(24, RopeConfig(**hf_config.model_fields(hf)["rope"]))
    config = transformers.LlamaConfig(**{k: v for k, v in hf.items() if k != "architectures"})
    kind = config.rope_parameters["rope_type"]
    if kind == "default":
        theirs, their_scale = config.rope_parameters["rope_theta"], 1.0
        theirs = 1.0 / theirs ** (np.arange(0, 24, 2) / 24)
    else:
        theirs, their_scale = ROPE_INIT_FUNCTIONS[kind](config, "cpu")
        theirs = theirs.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-6)  # theirs are float32
    np.testing.assert_allclose(scale, their_scale, rtol=1e-12)


def test_mistral_window_is_our_local_window_size_plus_one():
    """HF's `sliding_window` counts the query itself; our local_window_size (jax's) does not."""
    hf = llama(model_type="mistral", architectures=["MistralForCausalLM"], sliding_window=4096)
    f = hf_config.model_fields(hf)
    assert f["attention"] == dict(local_window_size=4095, global_every=0)
    cfg = ModelConfig.from_config(f)
    assert cfg.layer_window(0) == 4095
    out = hf_config.hf_config(cfg, "float32", template=hf)
    assert out["sliding_window"] == 4096 and hf_config.model_fields(out) == f
    # No window (HF's null): global layers, exported as null.
    f = hf_config.model_fields({**hf, "sliding_window": None})
    assert "attention" not in f
    out = hf_config.hf_config(ModelConfig.from_config(f), "float32", template=hf)
    assert out["model_type"] == "mistral" and out["sliding_window"] is None
    with pytest.raises(ValueError, match="`sliding_window` must be None or >= 1"):
        hf_config.model_fields({**hf, "sliding_window": 0})
