"""A llama.cpp GGUF file (Llama architecture) -> one of our run directories.

Read with the `gguf` package (llama.cpp's own reader, `pip install -e '.[gguf]'`): the metadata
becomes a Hugging Face config.json dict (so ringattn/hf/config.py's checks and mapping apply
unchanged), the tensors are dequantised to float32 (ringattn/hf/dequant.py) under their Hugging
Face names, and convert.write_run writes the same run directory as the safetensors import.
llama.cpp's converter permutes the rows of q/k so that RoPE rotates adjacent pairs (2i, 2i + 1)
of each head; HF's and our rotate-half RoPE pairs (i, i + D/2), so the rows are put back. The
tokenizer (vocabulary, merges, special tokens, chat template) goes to `<run>/hf/`.
"""

from __future__ import annotations

import functools
import os

from ringattn.hf import dequant

ARCHITECTURE = "llama"
# GGUF tensor names -> Hugging Face's (blk.{i}. -> model.layers.{i}.).
TOP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
ROPE_SCALINGS = ("none", "linear")  # llama.cpp's YaRN keys (beta, attention factor) are not mapped


def _error(what, expected, got):
    return ValueError(f"GGUF: {what} must be {expected}, got {got!r}.")


def hf_name(name):
    """The Hugging Face name of GGUF tensor `name` (None: not a Llama tensor)."""
    if name in TOP:
        return TOP[name]
    head, _, rest = name.partition(".")
    layer, _, tail = rest.partition(".")
    if head == "blk" and layer.isdigit() and tail in LAYER:
        return f"model.layers.{layer}.{LAYER[tail]}"
    return None


def unpermute_rows(w, num_heads):
    """Undo llama.cpp's q/k row order: per head, rows (i, half) stored as [D/2, 2] go back to
    [2, D/2], so that row pair (i, i + D/2) rotates together again."""
    rows = w.shape[0]
    return w.reshape(num_heads, rows // num_heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)


class Metadata:
    """The key-value fields of a GGUF file as Python values."""

    def __init__(self, reader):
        self.fields = {name: field.contents() for name, field in reader.fields.items()}

    def get(self, key, default=None):
        return self.fields.get(key, default)

    def need(self, key):
        if key not in self.fields:
            raise _error(f"metadata `{key}`", "present", None)
        return self.fields[key]


def hf_config(meta: Metadata, tensor_names) -> dict:
    """A Hugging Face LlamaForCausalLM config.json dict of the GGUF metadata."""
    arch = meta.need("general.architecture")
    if arch != ARCHITECTURE:
        raise _error("`general.architecture`", f"{ARCHITECTURE!r} (Llama family)", arch)
    p = f"{arch}."
    if meta.get(p + "expert_count"):
        experts = meta.fields[p + "expert_count"]
        raise _error(f"`{p}expert_count` (mixture of experts)", "absent or 0", experts)
    if "rope_freqs.weight" in tensor_names:  # Llama 3's scaling, as frequency factors
        raise _error("tensor `rope_freqs.weight` (Llama 3 RoPE)", "absent", "present")
    heads = int(meta.need(p + "attention.head_count"))
    hidden = int(meta.need(p + "embedding_length"))
    head_dim = int(meta.get(p + "attention.key_length") or hidden // heads)
    rope_dims = int(meta.get(p + "rope.dimension_count") or head_dim)
    if rope_dims != head_dim:
        what = f"`{p}rope.dimension_count` (partial rotary)"
        raise _error(what, f"head_dim {head_dim}", rope_dims)
    tokens = meta.get("tokenizer.ggml.tokens") or ()
    hf = dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        vocab_size=int(meta.get(p + "vocab_size") or len(tokens)),
        hidden_size=hidden,
        intermediate_size=int(meta.need(p + "feed_forward_length")),
        num_hidden_layers=int(meta.need(p + "block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(meta.get(p + "attention.head_count_kv") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(meta.need(p + "attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(meta.need(p + "context_length")),
        tie_word_embeddings="output.weight" not in tensor_names,
        rope_theta=float(meta.get(p + "rope.freq_base") or 10_000.0),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
    )
    scaling = meta.get(p + "rope.scaling.type") or "none"
    if scaling not in ROPE_SCALINGS:
        raise _error(f"`{p}rope.scaling.type`", f"one of {ROPE_SCALINGS}", scaling)
    if scaling == "linear":
        hf["rope_scaling"] = dict(
            rope_type="linear", factor=float(meta.need(p + "rope.scaling.factor"))
        )
    for key in ("bos_token_id", "eos_token_id"):
        if meta.get(f"tokenizer.ggml.{key}") is not None:
            hf[key] = int(meta.get(f"tokenizer.ggml.{key}"))
    return hf


class GGUFCheckpoint:
    """A GGUF file's tensors under Hugging Face names, with weights.Checkpoint's interface
    (names, shape, dtype, tensor) so that weights.load_params reads it: each tensor is
    dequantised to float32 (and q/k rows put in HF's order) when first asked for, and the last
    few are kept, as every device reads its block of the same tensor in turn."""

    def __init__(self, path, reader=None, num_heads=None, num_kv_heads=None):
        from gguf import GGUFReader

        self.directory = path  # named in weights.check's errors
        self.reader = reader or GGUFReader(path)
        self._by_name, unknown = {}, []
        for t in self.reader.tensors:
            name = hf_name(t.name)
            if name is None:
                unknown.append(t.name)
            self._by_name[name or t.name] = t
        if unknown:
            expected = f"in {sorted(TOP)} or blk.N.{{{', '.join(LAYER)}}}"
            raise _error("tensor names", expected, unknown[:3])
        self.heads = {"q_proj": num_heads, "k_proj": num_kv_heads}
        self.tensor = functools.lru_cache(maxsize=4)(self._tensor)

    def names(self):
        return set(self._by_name)

    def shape(self, name):
        return tuple(int(n) for n in reversed(self._by_name[name].shape))

    def dtype(self, name):
        del name
        return "float32"

    def kind(self, name):
        return self._by_name[name].tensor_type.name

    def _tensor(self, name):
        t = self._by_name[name]
        w = dequant.dequantize(t.data, t.tensor_type.name, self.shape(name))
        proj = name.rsplit(".", 2)[-2]
        if proj in self.heads:
            w = unpermute_rows(w, self.heads[proj])
        return w


def open_gguf(path):
    """(HF config dict, GGUFCheckpoint, Metadata) of the GGUF file at `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF: no file {path}.")
    from gguf import GGUFReader

    reader = GGUFReader(path)
    meta = Metadata(reader)
    names = {t.name for t in reader.tensors}
    hf = hf_config(meta, names)
    checkpoint = GGUFCheckpoint(path, reader, hf["num_attention_heads"], hf["num_key_value_heads"])
    bad = sorted({checkpoint.kind(n) for n in checkpoint.names()} - set(dequant.SUPPORTED))
    if bad:
        raise _error("tensor types", f"among {dequant.SUPPORTED}", bad)
    return hf, checkpoint, meta


def import_gguf(path, workdir, base, *, param_dtype="float32", devices=None):
    """Convert the GGUF file at `path` into a run directory `workdir` (config.json, parameters,
    `hf/` with config.json and the tokenizer); `base` is the training config the run gets. The
    run's `seq_len` is the model's trained context. Returns the config."""
    from ringattn.hf import convert
    from ringattn.hf import tokenizer as tokenizer_lib

    hf, checkpoint, meta = open_gguf(path)
    files = tokenizer_lib.files_from_gguf(meta.fields)  # before the heavy work: it may refuse
    base = base.copy_and_resolve_references()
    with base.unlocked():
        base.seq_len, base.curriculum = hf["max_position_embeddings"], ()
    config = convert.write_run(hf, checkpoint, workdir, base, param_dtype, devices)
    convert.write_hf_files(workdir, hf, files)
    return config
