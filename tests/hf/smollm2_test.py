"""SmolLM2-135M-Instruct, a real pretrained Llama, imported from its GGUF file: our tokenizer's
ids are transformers'; our tensors and logits on real text (a standard-library source file) are
transformers' own GGUF loader's, under every attention implementation; decoding with the
sequence-sharded cache equals the full forward pass. The default tests run the first
`FEW` layers; one slow test runs all 30.

The model comes from `python experiments/fetch_model.py` (the install step of .ci/run), found in
$RINGATTN_SMOLLM2 or ~/.cache/ringattn/smollm2; without it these tests skip."""

import argparse
import dataclasses
import functools
import os
import typing

import jax
import numpy as np
import pytest

from ringattn.evals import generate as gen
from ringattn.evals.logits import Forward
from ringattn.hf import fetch
from ringattn.hf.gguf_import import open_gguf
from ringattn.hf.tokenizer import load_tokenizer
from ringattn.nn.model import Transformer
from ringattn.run.load import load_run

FEW, T = 2, 480  # layers and tokens of the default tests (480: 16 zigzag chunks, 3 shards)
if not (fetch.is_imported() and os.path.exists(fetch.gguf_path())):
    pytest.skip(
        f"SmolLM2 not fetched into {fetch.default_dir()} (python experiments/fetch_model.py)",
        allow_module_level=True,
    )
torch = pytest.importorskip("torch", reason="needs torch and transformers ('.[hf]')")
transformers = pytest.importorskip("transformers", reason="needs transformers ('.[hf]')")
pytest.importorskip("gguf", reason="transformers' GGUF loader needs gguf ('.[hf]')")

# (impl, layout, devices): Ulysses splits the 9 query / 3 KV heads, so it runs on 3 devices.
IMPLS = {
    "dense": ("dense", "contiguous", 1),
    "blockwise": ("blockwise", "contiguous", 1),
    "ring_zigzag_8": ("ring", "zigzag", 8),
    "allgather_8": ("allgather", "contiguous", 8),
    "ulysses_3": ("ulysses", "contiguous", 3),
}


@functools.cache
def hf_model():
    """transformers' model of the GGUF file (its own loader, which dequantises to float32)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        fetch.default_dir(), gguf_file=fetch.GGUF_NAME, dtype=torch.float32,
        attn_implementation="eager",
    ).eval()  # fmt: skip


@functools.cache
def hf_few_layers():
    """transformers' Llama of the file's first FEW layers, built from the tensors our GGUF
    reader gives (bit for bit the gguf package's: tests/hf/gguf_test.py; the slow test below
    compares them all with transformers' own loader), without loading all 30 layers."""
    hf, checkpoint, _ = open_gguf(fetch.gguf_path())
    config = transformers.LlamaConfig(**{**hf, "num_hidden_layers": FEW})
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    names = [n for n, _ in model.named_parameters()]
    state = {n: torch.as_tensor(checkpoint.tensor(n)) for n in names if n != "lm_head.weight"}
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config)  # its buffers, off meta
    return model.eval()


@functools.cache
def ours(num_layers=None):
    """(cfg, params) of the imported run; with `num_layers`, its first layers only."""
    overrides = {"model.num_layers": num_layers} if num_layers else None
    run = load_run(fetch.run_dir(), overrides=overrides, num_devices=1)
    return run.model_cfg, jax.device_get(run.params)


def text_tokens(module, length):
    with open(module.__file__, encoding="utf-8") as f:
        ids = load_tokenizer(fetch.run_dir()).encode(f.read())
    assert len(ids) >= length
    return ids[None, :length]


def logits_of(model, tokens):
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(tokens, np.int64))).logits.numpy()


@functools.cache
def few_layer_reference():
    tokens = text_tokens(argparse, T)
    return tokens, logits_of(hf_few_layers(), tokens)


def relative_error(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_tokenizer_ids_equal_transformers():
    """Ours splits digits from what precedes them as llama.cpp does for this file's pre-tokenizer
    type ("smollm": \\p{N} first, then GPT-2's regex); transformers' GGUF loader skips that split.
    With it added, the ids are the same; without, on argparse.py too (no digit after spaces)."""
    from tokenizers import pre_tokenizers

    ref = transformers.AutoTokenizer.from_pretrained(fetch.default_dir(), gguf_file=fetch.GGUF_NAME)
    tok = load_tokenizer(fetch.run_dir())
    fast = ref.backend_tokenizer
    as_is = {}
    for module in (argparse, typing):
        with open(module.__file__, encoding="utf-8") as f:
            text = f.read()
        as_is[module] = np.asarray(fast.encode(text).ids)
    digits = pre_tokenizers.Digits(individual_digits=True)
    fast.pre_tokenizer = pre_tokenizers.Sequence([digits, fast.pre_tokenizer])
    for module in (argparse, typing):
        with open(module.__file__, encoding="utf-8") as f:
            text = f.read()
        ids = tok.encode(text)
        np.testing.assert_array_equal(ids, fast.encode(text).ids)
        assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode(open(argparse.__file__).read()), as_is[argparse])
    assert len(tok.encode(open(typing.__file__).read())) == len(as_is[typing]) - 2  # "    1."
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    prompt = tok.apply_chat_template(chat)
    assert prompt == ref.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok.encode(prompt, add_special_tokens=False)
    np.testing.assert_array_equal(ids, fast.encode(prompt, add_special_tokens=False).ids)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (1, 2, 49152)


@pytest.mark.slow
def test_tensors_equal_transformers_gguf_loader():
    """Every tensor our reader gives (dequantised, q/k rows unpermuted) is transformers' own, and
    the run's parameters are those tensors in our layout."""
    _, checkpoint, _ = open_gguf(fetch.gguf_path())
    state = {k: v.numpy() for k, v in hf_model().state_dict().items()}
    assert checkpoint.names() == set(state) - {"lm_head.weight"}  # tied
    for name in sorted(checkpoint.names()):
        np.testing.assert_array_equal(checkpoint.tensor(name), state[name], err_msg=name)
    cfg, params = ours()
    np.testing.assert_array_equal(params["embedding"], state["model.embed_tokens.weight"])
    for i in (0, cfg.num_layers - 1):
        p, a = params[f"layer_{i}"], f"model.layers.{i}.self_attn."
        for our_name, name, heads in (("query", "q_proj", 9), ("key", "k_proj", 3)):
            w = state[a + name + ".weight"].reshape(heads, 64, 576).transpose(2, 0, 1)
            np.testing.assert_array_equal(p["attn"][our_name], w)
        down = state[f"model.layers.{i}.mlp.down_proj.weight"]
        np.testing.assert_array_equal(p["mlp"]["down"], down.T)


@pytest.mark.parametrize("name", sorted(IMPLS))
def test_few_layers_logits_equal_transformers(name):
    impl, layout, n = IMPLS[name]
    tokens, theirs = few_layer_reference()
    cfg, params = ours(FEW)
    got = Forward(cfg, params, impl=impl, layout=layout, num_devices=n)(tokens)
    err = relative_error(got, theirs)
    print(f"SmolLM2 first {FEW} layers, {T} tokens of argparse.py, {name}: {err:.1e}")
    assert err < 1e-4, err


def test_sharded_cache_decode_equals_full_forward():
    """Ring (zigzag) prefill of 248 tokens over 8 devices, then 3 decode steps against the cache
    sharded along the sequence: the logits of the full forward pass at those positions. (Few
    steps: under the tests' -O0 XLA flags a decode step's matrix-vector products take seconds.)"""
    tokens, _ = few_layer_reference()
    cfg, params = ours(FEW)
    want = Forward(cfg, params)(tokens[:, :256])[0, 247:251]
    ring = Forward(cfg, params, impl="ring", layout="zigzag", num_devices=8)
    model = gen.decoding_model(ring.cfg, ring.mesh)
    caches = gen.init_caches(ring.cfg, gen.CacheSpec("full", max_len=256), 1, ring.mesh)
    batch = gen.prompt_batch([tokens[0, :248]], gen.pad_multiple(ring.cfg, ring.mesh))
    pre = jax.jit(functools.partial(gen.prefill, model, cache_bound=0))
    logits, caches = pre(ring.params, batch, caches)
    got = [np.asarray(logits[0])]
    step = jax.jit(
        lambda p, t, pos, c: model.apply({"params": p}, t, pos, c, method=Transformer.decode)
    )
    for t in range(248, 251):
        logits, caches = step(ring.params, tokens[:, t : t + 1], np.array([[t]], np.int32), caches)
        got.append(np.asarray(logits[0, 0]))
    assert caches[0].k.sharding.spec[1] == "context"
    err = relative_error(np.stack(got), want)
    print(f"SmolLM2 first {FEW} layers, sharded-cache decode vs full forward: {err:.1e}")
    assert err < 1e-4, err


@pytest.mark.slow
def test_full_model_logits_and_perplexity_equal_transformers():
    """All 30 layers, 1024 tokens of argparse.py, ring attention (zigzag) over 8 devices."""
    tokens = text_tokens(argparse, 1024)
    theirs = logits_of(hf_model(), tokens)
    cfg, params = ours()
    fwd = Forward(cfg, params, impl="ring", layout="zigzag", num_devices=8)
    got = fwd(tokens)
    err = relative_error(got, theirs)
    ppl = float(np.exp(fwd.nll(tokens).mean()))
    ref_nll = torch.nn.functional.cross_entropy(
        torch.as_tensor(theirs[0, :-1]), torch.as_tensor(tokens[0, 1:], dtype=torch.int64)
    )
    ref_ppl = float(np.exp(ref_nll.item()))
    print(f"SmolLM2, ring/zigzag x8: logits {err:.1e}, perplexity {ppl:.4f} vs {ref_ppl:.4f}")
    assert err < 1e-4, err
    assert abs(ppl - ref_ppl) < 1e-4 * ref_ppl
    assert 5 < ppl < 20  # a real language model on Python source


@pytest.mark.slow
def test_generate_answers_in_text():
    """What the README shows: greedy decoding after "The capital of France is" (plain text) and
    after the chat template (stopping at its end-of-turn token) says Paris."""
    cfg, params = ours()
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="blockwise"))
    tok = load_tokenizer(fetch.run_dir())
    model = gen.decoding_model(cfg)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    prompts = [tok.encode("The capital of France is"), tok.encode(chat, add_special_tokens=False)]
    batch = gen.prompt_batch(prompts)
    caches = gen.init_caches(cfg, gen.CacheSpec("full", max_len=batch["tokens"].shape[1] + 8), 2)
    out = gen.generate(model, params, batch, caches, 8)
    plain, answer = (tok.decode(gen.until_eos(t, tok.eos_id)) for t in out["tokens"])
    assert plain.startswith(" Paris."), plain
    assert answer == "The capital of France is Paris.", answer
