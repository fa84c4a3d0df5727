"""Measurements of chunked prefill (decode/chunked.py) behind experiments/decode_benchmark.py:
pass_kv, pass_q and decode for chunks against caches of several lengths on n devices, side by
side in one run (tokens/s of the chunk, compiled temporaries per device), the cost model's
choice against the measured winner; and, compiled only, the memory of a 1M-token cache over many
devices; and, on a whole model, a prompt's next-token distribution prefilled whole and in chunks.

One attention layer (the kernel's work and the strategies' traffic; the rest of a model is the
same whatever the strategy), float32, a striped cache holding positions 0 .. P - 1 and a chunk at
P ... P + c - 1 in the striped layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from ringattn.bench import timing
from ringattn.bench.hardware import HARDWARE
from ringattn.decode import cache as cache_lib
from ringattn.decode import prefill as prefill_lib
from ringattn.decode import sharded
from ringattn.evals import generate as gen
from ringattn.parallel import costs
from ringattn.parallel.layouts import to_layout


@dataclasses.dataclass(frozen=True)
class Shape:
    """The attention layer measured."""

    heads: int = 4
    kv_heads: int = 1
    head_dim: int = 64
    dtype: str = "float32"
    layout: str = "striped"


def _mesh(n):
    return jax.make_mesh((n,), ("context",), devices=jax.devices()[:n])


def filled_cache(shape: Shape, mesh, cached, slots, seed=0):
    """A striped cache of `slots` slots holding random K/V at positions 0 .. cached - 1."""
    n = mesh.shape["context"]
    dtype = jnp.dtype(shape.dtype)
    cache = cache_lib.init_cache(
        "full", 1, slots, shape.kv_heads, shape.head_dim, dtype, cache_layout="striped",
        num_shards=n,
    )  # fmt: skip
    pos = np.arange(cached, dtype=np.int32)
    slot = np.asarray(cache_lib.slots(cache, pos[None]))[0]
    rng = np.random.default_rng(seed)
    k, v = (np.zeros(cache.k.shape, dtype) for _ in range(2))
    k[0, slot] = rng.standard_normal((cached, shape.kv_heads, shape.head_dim))
    v[0, slot] = rng.standard_normal((cached, shape.kv_heads, shape.head_dim))
    held = np.full(cache.pos.shape, -1, np.int32)
    held[0, slot] = pos
    cache = dataclasses.replace(cache, k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(held))
    return sharded.shard_cache(cache, mesh)


def chunk(shape: Shape, n, cached, length, seed=1):
    """(q, k, v, positions) of a chunk at positions cached ..., in the layout's order."""
    rng = np.random.default_rng(seed)
    dt = jnp.dtype(shape.dtype)
    q = rng.standard_normal((1, length, shape.heads, shape.head_dim)).astype(dt)
    k, v = rng.standard_normal((2, 1, length, shape.kv_heads, shape.head_dim)).astype(dt)
    pos = (cached + np.arange(length, dtype=np.int32))[None]
    return tuple(to_layout(jnp.asarray(x), shape.layout, n) for x in (q, k, v, pos))


@functools.cache
def _program(mesh, strategy, layout, bound):
    return jax.jit(
        functools.partial(
            prefill_lib.prefill_on_mesh,
            mesh=mesh,
            layout=layout,
            strategy=strategy,
            cache_bound=bound,
        ),
        donate_argnums=4,
    )


def measure(shape: Shape, n, cached, length, strategies=("pass_kv", "pass_q", "decode"),
            repeats=3, hardware=None):  # fmt: skip
    """One row: per strategy the best of `repeats` timed runs (compilation excluded; the
    strategies take turns, so that a noisy moment does not fall on one of them) and the compiled
    temporaries per device; the measured winner and the cost model's choice."""
    mesh = _mesh(n)
    slots = -(-(cached + length) // n) * n
    args = chunk(shape, n, cached, length)
    row = dict(devices=n, chunk=length, cached=cached, ratio=length / max(cached, 1))
    compiled = {}
    for strategy in strategies:
        fn = _program(mesh, strategy, shape.layout, cached)
        compiled[strategy] = fn.lower(*args, filled_cache(shape, mesh, cached, slots)).compile()
        mem = compiled[strategy].memory_analysis()
        row[f"{strategy}_temp_mib"] = (mem.temp_size_in_bytes if mem else float("nan")) / 2**20
    fresh = {s: lambda: (*args, filled_cache(shape, mesh, cached, slots)) for s in strategies}
    best = timing.interleaved(compiled, repeats, best=True, fresh_args=fresh)
    for strategy in strategies:
        row[f"{strategy}_s"] = best[strategy]
        row[f"{strategy}_tokens_per_s"] = length / best[strategy]
    row["winner"] = min(strategies, key=lambda s: row[f"{s}_s"])
    est = estimates(shape, n, cached, length, slots, hardware)
    row["model_choice"] = min(strategies, key=lambda s: est[s].time_s)
    row["model_agrees"] = row["model_choice"] == row["winner"]
    # How much slower the model's choice ran than the winner (1: it is the winner).
    row["choice_vs_best"] = row[f"{row['model_choice']}_s"] / row[f"{row['winner']}_s"]
    row["model_s"] = {s: est[s].time_s for s in strategies}
    row["why"] = est[row["model_choice"]].why
    # What an H100's constants (the cost model's defaults, asynchronous hops) would choose.
    default = estimates(shape, n, cached, length, slots, HARDWARE["cuda"])
    row["default_hardware_choice"] = min(strategies, key=lambda s: default[s].time_s)
    return row


def estimates(shape: Shape, n, cached, length, slots, hardware=None):
    return costs.estimate_costs(
        batch=1, q_len=length, kv_len=length, num_heads=shape.heads,
        num_kv_heads=shape.kv_heads, head_dim=shape.head_dim, dtype=shape.dtype,
        mesh_axis_sizes={"x": n}, axis_name="x", causal=True, local_window_size=None,
        layout=shape.layout, hardware=hardware, cached_len=cached, cache_layout="striped",
        cache_slots=slots,
    )  # fmt: skip


def calibrate(n, shape: Shape = Shape(), length=2048):
    """costs.Hardware for this machine as n devices see it: attention FLOP/s of one device
    (one device's share of a whole-mesh decode-strategy run: a chunk of `length` against 8 times
    as many cached tokens) and the bytes/s of a ring hop (length / 32 MiB a device)."""
    mib = max(1, length // 32)
    mesh = _mesh(n)
    cached = 8 * length
    slots = cached + length
    args = chunk(shape, n, cached, length)
    fn = _program(mesh, "decode", shape.layout, cached).lower(
        *args, filled_cache(shape, mesh, cached, slots)
    )
    fresh = {"decode": lambda: (*args, filled_cache(shape, mesh, cached, slots))}
    best = timing.interleaved({"decode": fn.compile()}, 2, best=True, fresh_args=fresh)["decode"]
    flops = estimates(shape, n, cached, length, slots)["decode"].flops  # the busiest device's
    hop_s = lambda size, times: _hop_seconds(mesh, size, times)  # noqa: E731
    latency = hop_s(256, 20)  # 1 KiB a device: the fixed cost of a hop
    link = mib * 2**20 / max(hop_s(mib * 2**18, 5) - latency, 1e-9)
    # XLA:CPU runs a collective between the simulated devices' computations, never beside them.
    overlap = jax.devices()[0].platform != "cpu"
    return costs.Hardware(flops / best, link, latency, overlap)


def _hop_seconds(mesh, floats, times):
    """Seconds of one ring hop of `floats` f32 a device (the mean of `times`)."""
    n = mesh.shape["context"]
    x = jax.device_put(
        jnp.zeros((n, floats), jnp.float32), jax.sharding.NamedSharding(mesh, jax.P("context"))
    )
    hop = jax.jit(
        jax.shard_map(
            lambda x: jax.lax.ppermute(x, "context", [(i, (i + 1) % n) for i in range(n)]),
            mesh=mesh, in_specs=jax.P("context"), out_specs=jax.P("context"),
        )
    )  # fmt: skip
    x = jax.block_until_ready(hop(x))
    t0 = time.perf_counter()
    for _ in range(times):
        x = hop(x)
    jax.block_until_ready(x)
    return (time.perf_counter() - t0) / times


def dry_run(cache_len, num_devices, chunk_len, shape: Shape):
    """Compiled (never run) chunk steps against a cache of `cache_len` tokens on each device
    count: the cache per device and each strategy's temporaries per device."""
    rows = []
    dt = jnp.dtype(shape.dtype)
    for n in num_devices:
        mesh = _mesh(n)
        abstract = jax.eval_shape(
            functools.partial(
                cache_lib.init_cache, "full", 1, cache_len, shape.kv_heads, shape.head_dim, dt,
                cache_layout="striped", num_shards=n,
            )
        )  # fmt: skip
        shardings = sharded.cache_sharding(abstract, mesh)  # donated: updated in place
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
        )
        q = jax.ShapeDtypeStruct((1, chunk_len, shape.heads, shape.head_dim), dt)
        kv = jax.ShapeDtypeStruct((1, chunk_len, shape.kv_heads, shape.head_dim), dt)
        pos = jax.ShapeDtypeStruct((1, chunk_len), jnp.int32)
        row = dict(devices=n, cache_len=cache_len, chunk=chunk_len)
        row["cache_mib_per_device"] = cache_lib.cache_bytes(abstract) / n / 2**20
        for strategy in ("pass_kv", "pass_q", "decode"):
            fn = _program(mesh, strategy, shape.layout, None)
            t0 = time.perf_counter()
            mem = fn.lower(q, kv, kv, pos, abstract).compile().memory_analysis()
            row[f"{strategy}_temp_mib"] = mem.temp_size_in_bytes / 2**20
            row[f"{strategy}_compile_s"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def markdown(rows, dry):
    out = []
    if rows:
        out += [
            "| devices | cached | chunk | chunk/cache | pass_kv tok/s | pass_q tok/s | "
            "decode tok/s | temp MiB/dev kv / q / decode | winner | model | choice / best | "
            "model, H100-like |",
            "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- | ---: | --- |",
        ]
        for r in rows:
            tps = " | ".join(
                f"{r[f'{s}_tokens_per_s']:.0f}" for s in ("pass_kv", "pass_q", "decode")
            )
            mem = " / ".join(f"{r[f'{s}_temp_mib']:.1f}" for s in ("pass_kv", "pass_q", "decode"))
            out.append(
                f"| {r['devices']} | {r['cached']} | {r['chunk']} | {r['ratio']:.3g} | {tps} | "
                f"{mem} | {r['winner']} | {r['model_choice']} | {r['choice_vs_best']:.3f} | "
                f"{r['default_hardware_choice']} |"
            )
    if dry:
        out += [
            "",
            "| devices | cache tokens | chunk | cache MiB/dev | temp MiB/dev pass_kv / pass_q / "
            "decode |",
            "| ---: | ---: | ---: | ---: | --- |",
        ]
        for r in dry:
            mem = " / ".join(f"{r[f'{s}_temp_mib']:.1f}" for s in ("pass_kv", "pass_q", "decode"))
            out.append(
                f"| {r['devices']} | {r['cache_len']} | {r['chunk']} | "
                f"{r['cache_mib_per_device']:.1f} | {mem} |"
            )
    return "\n".join(out)


def chunked_vs_whole(model_cfg, params, mesh, tokens, chunk, strategy):
    """The next-token distribution after `tokens` prefilled whole (context-parallel attention
    over the prompt) and in chunks of `chunk` against the sharded cache (`strategy`): the largest
    log-probability difference, KL(whole || chunked), whether the argmax and top-10 agree, and
    both prefill times (compilation excluded)."""
    attention = dataclasses.replace(model_cfg.attention, prefill=strategy)
    cfg = dataclasses.replace(model_cfg, attention=attention)
    model = gen.decoding_model(cfg, mesh)
    batch = gen.prompt_batch([tokens], gen.pad_multiple(cfg, mesh))
    spec = gen.CacheSpec("full", max_len=batch["tokens"].shape[1])
    pre = jax.jit(functools.partial(gen.prefill, model), static_argnums=3)
    out = {}
    for name, run in (
        ("whole", lambda c: pre(params, batch, c, 0)),
        ("chunked", lambda c: gen.prefill_in_chunks(pre, params, batch, c, chunk)),
    ):
        jax.block_until_ready(run(gen.init_caches(cfg, spec, 1, mesh)))  # compiles
        caches = gen.init_caches(cfg, spec, 1, mesh)
        t0 = time.perf_counter()
        logits, _ = jax.block_until_ready(run(caches))
        out[f"{name}_s"] = time.perf_counter() - t0
        out[name] = np.asarray(jax.nn.log_softmax(logits[0].astype(jnp.float32)), np.float64)
    whole, chunked = out.pop("whole"), out.pop("chunked")
    top = lambda x: set(np.argsort(x)[-10:].tolist())  # noqa: E731
    return dict(
        tokens=len(tokens), chunk=chunk, strategy=strategy, devices=mesh.size,
        max_abs_logprob_diff=float(np.abs(whole - chunked).max()),
        kl=float(np.sum(np.exp(whole) * (whole - chunked))),
        same_argmax=bool(whole.argmax() == chunked.argmax()), same_top10=top(whole) == top(chunked),
        **out,
    )  # fmt: skip


def sweep(devices, caches, chunks, calibration=2048, dry_cache=0, dry_devices=(8,), dry_chunk=8192):
    """experiments/decode_benchmark.py's chunked prefill: a row per (cached tokens, chunk) on
    `devices` devices, with the cost model's constants measured on this machine by a run of
    `calibration` tokens (0: its defaults); with `dry_cache` tokens, the dry run of a Llama-3-8B
    layer over each of `dry_devices`. Rows are printed as they come, then a markdown table;
    returns {prefill, prefill_dry_run[, prefill_hardware]}."""
    rows, dry, hardware = [], [], None
    if chunks and caches:
        if calibration:
            hardware = calibrate(devices, length=calibration)
            print(f"calibrated: {hardware}", flush=True)
        for cached in caches:
            for length in chunks:
                rows.append(measure(Shape(), devices, cached, length, hardware=hardware))
                print(json.dumps(rows[-1]), flush=True)
    if dry_cache:
        shape = Shape(heads=32, kv_heads=8, head_dim=128, dtype="bfloat16")
        dry = dry_run(dry_cache, dry_devices, dry_chunk, shape)
        for r in dry:
            print(json.dumps(r), flush=True)
    if rows or dry:
        print(markdown(rows, dry))
    out = dict(prefill=rows, prefill_dry_run=dry)
    if hardware is not None:
        out["prefill_hardware"] = dataclasses.asdict(hardware)
    return out


def check_run(workdir, text_file, num_tokens, chunk, strategies):
    """A run's next-token distribution after the first `num_tokens` tokens of `text_file` (its
    tokenizer's), prefilled whole and in chunks of `chunk` with each of `strategies`, on all
    devices (chunked_vs_whole): a row per strategy, printed as it comes."""
    from ringattn.hf.tokenizer import load_tokenizer
    from ringattn.run.load import load_run

    workdir = os.path.expanduser(workdir)
    run = load_run(workdir)
    with open(os.path.expanduser(text_file), encoding="utf-8") as f:
        tokens = load_tokenizer(workdir).encode(f.read())[:num_tokens]
    params = gen.decoding_params(run.model_cfg, run.params)
    rows = []
    for strategy in strategies:
        rows.append(chunked_vs_whole(run.model_cfg, params, run.mesh, tokens, chunk, strategy))
        print(json.dumps(rows[-1]), flush=True)
    return rows
