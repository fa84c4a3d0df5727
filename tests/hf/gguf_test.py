"""GGUF import on files written here with the gguf package's own writer: our dequantisation is
the package's (gguf.quants.dequantize) bit for bit for every type, the q/k rows come back in
Hugging Face's order, a tiny Llama written with every tensor type gives transformers' logits
(transformers' own GGUF loader), and what we cannot represent is refused by name."""

import numpy as np
import pytest

from configs import default
from ringattn.evals.logits import Forward
from ringattn.hf import dequant
from ringattn.hf.gguf_import import import_gguf, open_gguf, unpermute_rows
from ringattn.hf.tokenizer import files_from_gguf
from ringattn.run.load import load_run

gguf = pytest.importorskip("gguf", reason="needs the gguf package (pip install -e '.[gguf]')")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402
from gguf.quants import quantize as gguf_quantize  # noqa: E402

V, E, F, H, K, D, L = 64, 64, 96, 4, 2, 16, 2  # vocabulary, width, MLP, heads, KV heads, ...
QUANTIZABLE = ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")  # the package quantizes these
KINDS = ("F32", "F16", *QUANTIZABLE)
# K-quant super-blocks: the byte offsets of their float16 scales (ggml's block_q*_K).
K_SCALES = dict(Q2_K=(80, 82), Q3_K=(108,), Q4_K=(0, 2), Q5_K=(0, 2), Q6_K=(208,))


def llama_cpp_rows(w, heads):
    """llama.cpp's converter's q/k row order (its `permute`), written from its description."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def encoded(x, kind):
    """(data, GGML type) of float32 `x` as the writer stores it."""
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F32":
        return x, qtype
    if kind == "F16":
        return x.astype(np.float16), qtype
    return gguf_quantize(x, qtype), qtype


@pytest.mark.parametrize("kind", KINDS)
def test_dequantize_equals_the_gguf_package(kind):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 512)) * rng.uniform(0.01, 3, (4, 1))).astype(np.float32)
    data, qtype = encoded(x, kind)
    ours = dequant.dequantize(data, kind, x.shape)
    theirs = gguf_dequantize(data, qtype).reshape(x.shape)
    np.testing.assert_array_equal(ours, theirs)
    lossy = dict(F32=0, F16=1e-3, BF16=1e-2, Q8_0=1e-2, Q5_0=7e-2, Q5_1=7e-2)
    assert np.abs(ours - x).max() <= lossy.get(kind, 0.15) * np.abs(x).max()  # a real decoding


def test_dequantize_random_blocks_and_refusals():
    """Arbitrary bytes (every bit pattern of quants and high bits) with finite scales."""
    rng = np.random.default_rng(1)
    for kind, size in dequant.LEGACY.items():
        blocks = rng.integers(0, 256, (64, size), dtype=np.uint8)
        blocks[:, :4] = rng.standard_normal((64, 2)).astype(np.float16).view(np.uint8)
        qtype = gguf.GGMLQuantizationType[kind]
        want = gguf_dequantize(blocks, qtype).reshape(2, 1024)
        np.testing.assert_array_equal(dequant.dequantize(blocks, kind, (2, 1024)), want)
    for kind, offsets in K_SCALES.items():
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]][1]
        blocks = rng.integers(0, 256, (4, size), dtype=np.uint8)
        for o in offsets:
            blocks[:, o : o + 2] = rng.standard_normal((4, 1)).astype(np.float16).view(np.uint8)
        want = gguf_dequantize(blocks, gguf.GGMLQuantizationType[kind]).reshape(4, 256)
        got = dequant.dequantize(blocks, kind, (4, 256))
        np.testing.assert_array_equal(got, want)
        assert np.isfinite(got).all() and np.abs(got).max() > 0
    with pytest.raises(ValueError, match="IQ2_XXS is not supported"):
        dequant.dequantize(np.zeros(66, np.uint8), "IQ2_XXS", (256,))
    with pytest.raises(ValueError, match="whole blocks"):
        dequant.dequantize(np.zeros(34, np.uint8), "Q8_0", (1, 16))


def test_unpermute_rows_inverts_llama_cpp():
    w = np.arange(6 * 16 * 3, dtype=np.float32).reshape(6 * 16, 3)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_rows(w, 6), 6), w)
    assert not np.array_equal(llama_cpp_rows(w, 6), w)


def tiny_llama(rng):
    """HF-named float32 tensors of a tiny random Llama (untied)."""
    t = {"model.embed_tokens.weight": (V, E), "lm_head.weight": (V, E), "model.norm.weight": (E,)}
    for i in range(L):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": (E,), p + "post_attention_layernorm.weight": (E,)}
        t |= {p + "self_attn.q_proj.weight": (H * D, E), p + "self_attn.k_proj.weight": (K * D, E)}
        t |= {p + "self_attn.v_proj.weight": (K * D, E), p + "self_attn.o_proj.weight": (E, H * D)}
        t |= {p + "mlp.gate_proj.weight": (F, E), p + "mlp.up_proj.weight": (F, E)}
        t |= {p + "mlp.down_proj.weight": (E, F)}
    return {
        n: (rng.normal(1, 0.2, s) if len(s) == 1 else rng.normal(0, 0.3, s)).astype(np.float32)
        for n, s in t.items()
    }


GGUF_NAMES = dict(
    embed_tokens="token_embd", lm_head="output", norm="output_norm", input_layernorm="attn_norm",
    post_attention_layernorm="ffn_norm", q_proj="attn_q", k_proj="attn_k", v_proj="attn_v",
    o_proj="attn_output", gate_proj="ffn_gate", up_proj="ffn_up", down_proj="ffn_down",
)  # fmt: skip


def gguf_name(hf_name):
    parts = hf_name.split(".")
    layer = f"blk.{parts[2]}." if parts[1] == "layers" else ""
    return f"{layer}{GGUF_NAMES[parts[-2]]}.weight"


def write_gguf(path, tensors, arch="llama", kinds=KINDS, **extra):
    """A GGUF file of HF-named `tensors` (q/k rows in llama.cpp's order), the matrices cycling
    through `kinds`; metadata as llama.cpp's converter writes it."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L), w.add_context_length(128), w.add_embedding_length(E)
    w.add_feed_forward_length(F), w.add_head_count(H), w.add_head_count_kv(K)
    w.add_rope_freq_base(500.0), w.add_layer_norm_rms_eps(1e-5), w.add_rope_dimension_count(D)
    w.add_vocab_size(V), w.add_tokenizer_model("gpt2"), w.add_tokenizer_pre("default")
    vocab = ["<s>", "</s>", "Ġ", *"abcdefghijklmnopqrstuvwxyz", "ab", "Ġa"]
    vocab += [f"t{i}" for i in range(V - len(vocab))]
    w.add_token_list(vocab), w.add_token_types([3, 3] + [1] * (V - 2))
    w.add_token_merges(["a b", "Ġ a"]), w.add_bos_token_id(0), w.add_eos_token_id(1)
    types = {str: gguf.GGUFValueType.STRING, float: gguf.GGUFValueType.FLOAT32}
    for key, value in extra.items():
        w.add_key_value(key, value, types.get(type(value), gguf.GGUFValueType.UINT32))
    for j, (name, x) in enumerate(tensors.items()):
        heads = {"q_proj": H, "k_proj": K}.get(name.split(".")[-2])
        x = llama_cpp_rows(x, heads) if heads else x
        if x.ndim == 1:
            w.add_tensor(gguf_name(name), x)
        else:
            data, qtype = encoded(x, kinds[j % len(kinds)])
            w.add_tensor(gguf_name(name), data, raw_dtype=qtype)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()


def test_tiny_llama_logits_equal_transformers_gguf_loader(tmp_path):
    torch = pytest.importorskip("torch", reason="needs torch and transformers ('.[hf]')")
    transformers = pytest.importorskip("transformers", reason="needs transformers ('.[hf]')")
    write_gguf(tmp_path / "tiny.gguf", tiny_llama(np.random.default_rng(0)))
    hf, checkpoint, _ = open_gguf(str(tmp_path / "tiny.gguf"))
    assert {checkpoint.kind(n) for n in checkpoint.names()} == set(KINDS)
    import_gguf(str(tmp_path / "tiny.gguf"), str(tmp_path / "run"), default.get_config("test"))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="tiny.gguf", dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokens = np.random.default_rng(1).integers(0, V, (2, 24)).astype(np.int32)
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits.numpy()
    run = load_run(str(tmp_path / "run"), num_devices=1)
    ours = Forward(run.model_cfg, run.params)(tokens)
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"tiny GGUF (all types): max |ours - transformers| / max |transformers| = {err:.1e}")
    assert err < 1e-5, err
    assert np.std(theirs) > 0.5


def test_refusals_name_what_is_unsupported(tmp_path):
    tensors = tiny_llama(np.random.default_rng(0))
    write_gguf(tmp_path / "moe.gguf", tensors, **{"llama.expert_count": 8})
    with pytest.raises(ValueError, match="expert_count"):
        open_gguf(str(tmp_path / "moe.gguf"))
    scaled = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    write_gguf(tmp_path / "linear.gguf", tensors, **scaled)
    hf, _, _ = open_gguf(str(tmp_path / "linear.gguf"))
    assert hf["rope_scaling"] == dict(rope_type="linear", factor=4.0)
    assert (hf["rope_theta"], hf["num_key_value_heads"], hf["tie_word_embeddings"]) == (
        500,
        K,
        False,
    )
    write_gguf(tmp_path / "yarn.gguf", tensors, **{"llama.rope.scaling.type": "yarn"})
    with pytest.raises(ValueError, match="rope.scaling.type.*yarn"):
        open_gguf(str(tmp_path / "yarn.gguf"))
    write_gguf(tmp_path / "neox.gguf", tensors, arch="gptneox")
    with pytest.raises(ValueError, match="general.architecture.*gptneox"):
        open_gguf(str(tmp_path / "neox.gguf"))
    with pytest.raises(ValueError, match="tokenizer.ggml.model.*'llama'"):
        files_from_gguf({"tokenizer.ggml.model": "llama"})  # SentencePiece
    with pytest.raises(ValueError, match="tokenizer.ggml.pre.*'llama-bpe'"):
        files_from_gguf({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "llama-bpe"})
    del tensors["model.layers.1.mlp.up_proj.weight"]
    write_gguf(tmp_path / "missing.gguf", tensors)
    with pytest.raises(ValueError, match="missing"):
        import_gguf(str(tmp_path / "missing.gguf"), str(tmp_path / "r"), default.get_config("test"))
