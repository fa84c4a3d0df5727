"""Measurements behind experiments/retrieval_benchmark.py: what a decode step reads and how long
it takes with a full cache, a sink + window cache and a retrieval cache holding the same context.

The caches are filled with random K/V at positions 0 .. length - 1 (what a step reads and costs
does not depend on the values), so that 32K tokens need no 32K-token prefill on a CPU. Each
timed call is `steps` decode steps of the whole model (one lax.scan, the caches donated and fed
back), the kinds taking turns round after round (ringattn.bench.timing).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ringattn.bench import reads, timing
from ringattn.decode import attend as attend_lib
from ringattn.decode import cache as cache_lib
from ringattn.decode import retrieval
from ringattn.evals import generate as gen
from ringattn.nn.config import AttentionConfig, ModelConfig


def specs(held, num_sinks=4, window=252, page_size=64, top_pages=12, host=False, dense_layers=0):
    """{name: CacheSpec}: full and retrieval holding `held` tokens, and sink + window attending
    to as many tokens per step as retrieval (num_sinks + window + top_pages x page_size) does in
    the layers above its `dense_layers`; with `host`, also the retrieval cache with its pages in
    host memory."""
    attended = num_sinks + window + top_pages * page_size
    pages = dict(page_size=page_size, top_pages=top_pages, dense_layers=dense_layers)
    out = dict(
        full=gen.CacheSpec("full", max_len=held),
        sink_window=gen.CacheSpec("sink_window", num_sinks=num_sinks, window=attended - num_sinks),
        retrieval=gen.CacheSpec(
            "retrieval", max_len=held, num_sinks=num_sinks, window=window, **pages
        ),
    )
    if host:
        out["retrieval_host"] = dataclasses.replace(out["retrieval"], host_pages=True)
    return out


def _update(cache):
    return retrieval.update if cache.kind == "retrieval" else cache_lib.update


@functools.partial(jax.jit, donate_argnums=0)
def _fill(cache, k, v, pos):
    return _update(cache)(cache, k, v, pos)


def filled(cfg: ModelConfig, spec, length, seed=0, chunk=1024):
    """One cache per layer holding random K/V at positions 0 .. length - 1."""
    caches = gen.init_caches(cfg, spec, 1)
    rng = np.random.default_rng(seed)
    out = []
    for cache in caches:
        for start in range(0, length, chunk):
            t = min(chunk, length - start)
            k = rng.standard_normal((1, t, cfg.num_kv_heads, cfg.head_dim)).astype(np.float32)
            pos = np.arange(start, start + t, dtype=np.int32)[None]
            cache = _fill(cache, k, -k, pos)
        out.append(cache)
    return out


def bytes_per_token(cfg: ModelConfig, spec, length):
    """Bytes of the caches one decode step reads (every layer), from the compiled program of one
    layer's attention (bench/reads.py: gathers and slices read what they return). Pages in host
    memory are read alike (and brought to the device): measured in device memory."""
    if spec.kind == "retrieval":
        spec = dataclasses.replace(spec, host_pages=False)
    layers = {}  # the layers' distinct caches (a retrieval cache's dense layers read more)
    for cache in jax.eval_shape(lambda: gen.init_caches(cfg, spec, 1)):
        layers.setdefault(getattr(cache, "top_pages", None), [cache, 0])[1] += 1
    q = jax.ShapeDtypeStruct((1, 1, cfg.num_heads, cfg.head_dim), jnp.float32)
    pos = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    attend = retrieval.attend if spec.kind == "retrieval" else attend_lib.attend
    total = 0
    for cache, count in layers.values():
        hlo = jax.jit(attend).trace(q, pos, cache).lower().compile().as_text()
        total += count * sum(reads.parameter_reads(hlo, "cache").values())
    return total


def decode_times(cfg: ModelConfig, params, length, caches_by_name, steps=8, rounds=3):
    """{name: seconds per decoded token} of `steps`-step decode calls after `length` cached
    tokens, the caches of each name taking turns for `rounds` rounds (after one warm-up): they
    must hold length + (rounds + 1) x steps tokens."""
    cfg = dataclasses.replace(cfg, attention=AttentionConfig(impl="dense"))
    model = gen.decoding_model(cfg)
    loop = jax.jit(
        functools.partial(gen.decode_loop, model, num_steps=steps, temperature=0.0, top_k=0),
        donate_argnums=1,
    )
    state = dict(caches_by_name)
    start = {name: length for name in state}

    def call(name):
        def run():
            token = jnp.ones((1,), jnp.int32)
            pos = jnp.full((1,), start[name], jnp.int32)
            tokens, state[name] = loop(params, state[name], token, pos, jax.random.key(0))
            start[name] += steps
            return tokens

        return run

    seconds = timing.interleaved({n: call(n) for n in state}, rounds, warmup=1)
    return {name: s / steps for name, s in seconds.items()}


def cache_bytes(caches):
    """Bytes held by the caches of every layer."""
    return sum(cache_lib.cache_bytes(c) for c in caches)
