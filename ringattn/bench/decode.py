"""Measurements behind experiments/decode_benchmark.py: decode tokens/s with the cache sharded
over n devices against one device, and the bytes and logits error of bf16 / int8 caches."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringattn.decode import cache as cache_lib
from ringattn.evals import generate as gen
from ringattn.mesh import make_mesh
from ringattn.nn.config import AttentionConfig, ModelConfig
from ringattn.nn.model import Transformer
from ringattn.run.load import load_run


def model_and_params(workdir=None, config=None):
    """(ModelConfig, params) of a trained run, or of `config`'s model at random."""
    if workdir:
        run = load_run(workdir, num_devices=1)
        return run.model_cfg, gen.decoding_params(run.model_cfg, run.params)
    cfg = ModelConfig.from_config(config.model)
    return cfg, random_params(cfg)


def random_params(cfg: ModelConfig, seed=0):
    dense = dataclasses.replace(cfg, attention=AttentionConfig(impl="dense"), scan_layers=False)
    tokens = np.zeros((1, 8), np.int32)
    init = jax.jit(Transformer(dense).init)
    return nn.unbox(init(jax.random.key(seed), tokens, tokens, tokens + 1))["params"]


def on_devices(cfg: ModelConfig, params, n):
    """(cfg, mesh, params) decoding on the first n devices: one device runs plain (blockwise
    prefill, the whole cache local); n > 1 run ring prefill and the cache sharded over n."""
    devices = jax.devices()[:n]
    if n == 1:
        cfg = dataclasses.replace(
            cfg, attention=dataclasses.replace(cfg.attention, impl="blockwise")
        )
        return cfg, None, jax.device_put(params, devices[0])
    cfg = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="ring"))
    mesh = make_mesh(dict(context=n), devices)
    return cfg, mesh, jax.device_put(params, NamedSharding(mesh, P()))


def decode_throughput(
    cfg, params, n, cache_len, batch=1, steps=64, repeats=3, seed=0, cache="full", num_sinks=4
):
    """Best of `repeats`: prefill a random prompt of cache_len - steps tokens, decode `steps`;
    `cache` "full" or "sink_window" (`num_sinks` + the rest of cache_len: StreamingLLM's)."""
    cfg, mesh, params = on_devices(cfg, params, n)
    rng = np.random.default_rng(seed)
    prompt_len = cache_len - steps
    prompts = list(rng.integers(32, 127, (batch, prompt_len)))
    spec = gen.CacheSpec("full", max_len=cache_len)
    if cache == "sink_window":
        spec = gen.CacheSpec(cache, num_sinks=num_sinks, window=cache_len - num_sinks)
    model = gen.decoding_model(cfg, mesh)
    best = None
    for _ in range(repeats):
        caches = gen.init_caches(cfg, spec, batch, mesh)
        out = gen.generate(
            model, params, gen.prompt_batch(prompts, gen.pad_multiple(cfg, mesh)), caches, steps + 1
        )
        if best is None or out["tokens_per_s"] > best["tokens_per_s"]:
            best = out
    per_device = cache_lib.cache_bytes(best["caches"][0]) * cfg.num_layers / n
    return dict(
        devices=n,
        cache=cache,
        cache_len=cache_len,
        batch=batch,
        prompt_len=prompt_len,
        prefill_s=best["prefill_s"],
        prefill_tokens_per_s=batch * prompt_len / best["prefill_s"],
        decode_tokens_per_s=best["tokens_per_s"],
        ms_per_step=1e3 / best["tokens_per_s"] * batch,
        cache_mib_per_device=per_device / 2**20,
        platform=jax.devices()[0].platform,
    )


def cache_dtype_errors(cfg, params, cache_len=1024, chunk=64, seed=0):
    """Per cache dtype: bytes of all layers' caches and the error of teacher-forced decode
    logits (a chunk of `chunk` tokens after a prompt) against a float32 cache."""
    cfg = dataclasses.replace(cfg, attention=AttentionConfig(impl="dense"))
    model = gen.decoding_model(cfg)
    tokens = np.random.default_rng(seed).integers(32, 127, (1, cache_len)).astype(np.int32)
    chunk = min(chunk, cache_len // 2)
    prompt = cache_len - chunk
    positions = np.arange(prompt, cache_len, dtype=np.int32)[None]

    @jax.jit
    def logits(params, caches):
        batch = gen.prompt_batch([tokens[0, :prompt]])
        _, caches = gen.prefill(model, params, batch, caches, cache_bound=0)
        out, _ = model.apply(
            {"params": params},
            tokens[:, prompt:],
            positions,
            caches,
            method=Transformer.decode,
        )
        return out

    rows, ref = [], None
    for name, dtype, quantize in (
        ("float32", "float32", False),
        ("bfloat16", "bfloat16", False),
        ("int8", "bfloat16", True),
    ):
        spec = gen.CacheSpec("full", max_len=cache_len, dtype=dtype, quantize=quantize)
        caches = gen.init_caches(cfg, spec, 1)
        out = np.asarray(logits(params, caches))
        ref = out if ref is None else ref
        err = np.abs(out - ref)
        rows.append(
            dict(
                cache=name,
                bytes=sum(cache_lib.cache_bytes(c) for c in caches),
                max_abs_logit_err=float(err.max()),
                rel_logit_err=float(err.max() / np.abs(ref).max()),
                argmax_agreement=float(np.mean(out.argmax(-1) == ref.argmax(-1))),
            )
        )
    bf16 = rows[1]["bytes"]
    for r in rows:
        r["bytes_vs_bf16"] = r["bytes"] / bf16
    return rows


def markdown(throughput, dtypes):
    lines = [
        "| devices | cache tokens | prefill s | decode tokens/s | ms/step | cache MiB/device |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in throughput:
        lines.append(
            f"| {r['devices']} | {r['cache_len']} | {r['prefill_s']:.2f} | "
            f"{r['decode_tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | "
            f"{r['cache_mib_per_device']:.2f} |"
        )
    lines += [
        "",
        "| cache | bytes | vs bf16 | max abs logit err | rel err | argmax agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in dtypes:
        lines.append(
            f"| {r['cache']} | {r['bytes']} | {r['bytes_vs_bf16']:.3f} | "
            f"{r['max_abs_logit_err']:.2e} | {r['rel_logit_err']:.2e} | "
            f"{r['argmax_agreement']:.3f} |"
        )
    return "\n".join(lines)
