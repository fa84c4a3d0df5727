"""Hugging Face checkpoints -> run directories -> Hugging Face: our logits are transformers' own
on tiny random Llama / Mistral models (skipped without torch and transformers: pip install -e
'.[hf]'); import -> export -> import is the identity; bad checkpoints fail with clear errors."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import linen as nn
from safetensors.numpy import save_file

from configs import default
from ringattn.hf import config as hf_config
from ringattn.hf.convert import export_checkpoint, import_checkpoint
from ringattn.nn.config import ModelConfig
from ringattn.nn.model import Transformer
from ringattn.run.checkpoint import Checkpointer
from ringattn.run.load import load_run

T = 24  # tokens per row: past the scalings' original lengths and the window
NEEDS = "needs torch and transformers (pip install -e '.[hf]')"

CASES = {
    # Llama 3.1's rope scaling, GQA, untied, head_dim != hidden / heads.
    "llama3_gqa_untied": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
        rope_scaling=dict(
            rope_type="llama3",
            factor=4.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "tied_mha": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "yarn": dict(
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=100.0,
        max_position_embeddings=32,  # = factor x original, as HF expects
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=8),
    ),
    "mistral_window": dict(
        model_type="mistral", num_attention_heads=4, num_key_value_heads=2, sliding_window=5
    ),
}


def base_config():
    """The training config an import gets: the tests' tiny recipe (ring, zigzag, 8 devices)."""
    return default.get_config("test")


def tiny(model_type="llama", **extra):
    return (
        dict(
            model_type=model_type,
            vocab_size=96,
            hidden_size=32,
            intermediate_size=80,
            num_hidden_layers=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
        )
        | extra
    )


def hf_model(directory, fields):
    """A random transformers model of `fields`, saved with save_pretrained; the model."""
    torch = pytest.importorskip("torch", reason=NEEDS)
    transformers = pytest.importorskip("transformers", reason=NEEDS)
    fields = dict(fields)
    kind = fields.pop("model_type")
    cls = transformers.MistralConfig if kind == "mistral" else transformers.LlamaConfig
    config = cls(**fields, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger than HF's init (std 0.02), so that every part shows
        for name, p in model.named_parameters():
            p.normal_(1.0, 0.2) if name.endswith("norm.weight") else p.normal_(0.0, 0.3)
    model.save_pretrained(directory)
    return model


def hf_logits(model, tokens):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens)).logits.numpy()


def our_logits(workdir, tokens):
    """Logits of the run in `workdir` (dense attention, one device)."""
    run = load_run(workdir, overrides={"model.attention.impl": "dense"}, num_devices=1)
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
    model = Transformer(run.model_cfg)
    apply = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    return np.asarray(apply(run.params, tokens, positions, np.ones_like(tokens)))


def relative_error(ours, theirs):
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def tokens_for(vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, (2, T)).astype(np.int32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    fields = tiny(**CASES[case])
    model = hf_model(tmp_path / "hf", fields)
    import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"), base_config())
    tokens = tokens_for(fields["vocab_size"])
    theirs = hf_logits(model, tokens)
    ours = our_logits(str(tmp_path / "run"), tokens)
    err = relative_error(ours, theirs)
    print(f"{case}: max |ours - HF| / max |HF| = {err:.2e}")
    assert err < 1e-4, err
    assert np.std(theirs) > 0.5  # logits that would show a wrong weight or rotation


def test_our_tied_model_exports_to_transformers(tmp_path):
    """Our tied model (logits / sqrt(d_model)) exports untied, and HF computes our logits."""
    transformers = pytest.importorskip("transformers", reason=NEEDS)
    pytest.importorskip("torch", reason=NEEDS)
    config = base_config()
    cfg = ModelConfig.from_config(config.model)
    assert cfg.tie_embeddings and cfg.scale_tied_logits
    tokens = tokens_for(cfg.vocab_size)
    dense = Transformer(
        ModelConfig.from_config({**config.model.to_dict(), "attention": {"impl": "dense"}})
    )
    params = nn.unbox(dense.init(jax.random.key(0), tokens, tokens, tokens)["params"])
    write_run(tmp_path / "ours", config, params)
    hf = export_checkpoint(str(tmp_path / "ours"), str(tmp_path / "hf"))
    assert not hf["tie_word_embeddings"] and hf["architectures"] == ["LlamaForCausalLM"]
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager"
    ).eval()
    err = relative_error(our_logits(str(tmp_path / "ours"), tokens), hf_logits(model, tokens))
    print(f"our tied model exported: max |ours - HF| / max |HF| = {err:.2e}")
    assert err < 1e-4, err


def write_run(workdir, config, params):
    ckpt = Checkpointer(str(workdir), async_save=False)
    ckpt.save(0, {"params": params}, {})
    ckpt.close()
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json())


# ---------------------------------------------------------------------------------------------
# Synthetic checkpoints (numpy only): the round trip and the errors.


def hf_shapes(c):
    """HF's tensor names and shapes for config `c`, written out independently of our mapping."""
    e, h, k, m = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], 0
    d, m = c["head_dim"], c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], e), "model.norm.weight": (e,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (c["vocab_size"], e)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (e,),
            p + "post_attention_layernorm.weight": (e,),
            p + "self_attn.q_proj.weight": (h * d, e),
            p + "self_attn.k_proj.weight": (k * d, e),
            p + "self_attn.v_proj.weight": (k * d, e),
            p + "self_attn.o_proj.weight": (e, h * d),
            p + "mlp.gate_proj.weight": (m, e),
            p + "mlp.up_proj.weight": (m, e),
            p + "mlp.down_proj.weight": (e, m),
        }
    return shapes


SYNTHETIC = dict(
    architectures=["LlamaForCausalLM"],
    bos_token_id=5,
    head_dim=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    rope_theta=500_000.0,
    tie_word_embeddings=False,
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=32,
    ),
)


def synthetic_checkpoint(directory, config, tensors=None, sharded=False):
    """config.json and bf16 random tensors (or `tensors`); two files and an index if sharded."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    if tensors is None:
        rng = np.random.default_rng(0)
        tensors = {
            name: rng.standard_normal(shape).astype(ml_dtypes.bfloat16)
            for name, shape in hf_shapes(config).items()
        }
    if not sharded:
        save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return tensors
    names = sorted(tensors)
    files = {f"model-0000{i + 1}-of-00002.safetensors": names[i::2] for i in range(2)}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, os.path.join(directory, file))
    weight_map = {n: file for file, part in files.items() for n in part}
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return tensors


def read_checkpoint(directory):
    from ringattn.hf.weights import Checkpoint

    c = Checkpoint(str(directory))
    return {name: c.tensor(name)[:] for name in c.names()}


def test_import_export_import_is_the_identity(tmp_path):
    original = synthetic_checkpoint(tmp_path / "hf", tiny(**SYNTHETIC), sharded=True)
    base = base_config()
    base.model.scan_layers = True  # layers stacked: each device reads its block of every layer
    config = import_checkpoint(str(tmp_path / "hf"), str(tmp_path / "run"), base)
    assert config.model.param_dtype == "bfloat16" and config.model.rope.scaling == "llama3"
    # Exported in three files (and their index); the tokenizer-side files kept.
    with open(tmp_path / "run" / "hf" / "tokenizer.json", "w") as f:
        f.write("{}")
    hf = export_checkpoint(str(tmp_path / "run"), str(tmp_path / "out"), max_file_bytes=30_000)
    assert os.path.exists(tmp_path / "out" / "model.safetensors.index.json")
    assert os.path.exists(tmp_path / "out" / "tokenizer.json")
    exported = read_checkpoint(tmp_path / "out")
    assert sorted(exported) == sorted(original)
    for name, x in original.items():
        assert exported[name].dtype == x.dtype and exported[name].shape == x.shape, name
        np.testing.assert_array_equal(exported[name].view(np.uint16), x.view(np.uint16), name)
    with open(tmp_path / "hf" / "config.json") as f:
        assert hf_config.model_fields(hf) == hf_config.model_fields(json.load(f))
    assert hf["bos_token_id"] == 5 and hf["torch_dtype"] == "bfloat16"

    import_checkpoint(str(tmp_path / "out"), str(tmp_path / "again"), base_config())
    first = load_run(str(tmp_path / "run"), num_devices=1)
    again = load_run(str(tmp_path / "again"), num_devices=1)
    assert first.model_cfg.scan_layers and not again.model_cfg.scan_layers
    stacked = first.params["layers"]
    for i in range(2):
        layer = jax.tree.map(lambda x, i=i: x[i], stacked)
        jax.tree.map(np.testing.assert_array_equal, layer, again.params[f"layer_{i}"])
    assert again.params["embedding"].dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "damage, error, match",
    [
        ("missing", ValueError, "missing, e.g. \\['model.layers.1.mlp.up_proj.weight'\\]"),
        ("shape", ValueError, "'model.norm.weight' must have shape \\(32,\\).*got \\(31,\\)"),
        ("bias", ValueError, "no place for.*q_proj.bias"),
        ("config", ValueError, "`attention_bias` must be False"),
        ("no weights", FileNotFoundError, "model.safetensors"),
    ],
)
def test_bad_checkpoints(tmp_path, damage, error, match):
    config = tiny(**SYNTHETIC)
    tensors = synthetic_checkpoint(tmp_path / "good", config)
    if damage == "missing":
        del tensors["model.layers.1.mlp.up_proj.weight"]
    elif damage == "shape":
        tensors["model.norm.weight"] = tensors["model.norm.weight"][:31]
    elif damage == "bias":
        tensors["model.layers.0.self_attn.q_proj.bias"] = tensors["model.norm.weight"]
    elif damage == "config":
        config["attention_bias"] = True
    synthetic_checkpoint(tmp_path / "bad", config, tensors)
    if damage == "no weights":
        os.remove(tmp_path / "bad" / "model.safetensors")
    with pytest.raises(error, match=match):
        import_checkpoint(str(tmp_path / "bad"), str(tmp_path / "run"), base_config())
