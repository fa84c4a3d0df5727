"""Measuring for experiments/benchmark.py: inputs, compiling once, timing in turns (timing.py), the
rows, printed as they come (attention_report.py); the configuration and the implementations are
attention.py's.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json

import jax
import jax.numpy as jnp

from ringattn.bench import attention_report, flops, timing
from ringattn.bench.attention import (
    AXIS,
    SINGLE_DEVICE_IMPLS,
    BenchConfig,
    Unsupported,
    base_impl,
    context_mesh,
    make_attention,
    with_mode,
)


def input_shapes(cfg: BenchConfig, seq_len: int) -> dict[str, tuple[int, ...]]:
    b, h, kh, d = cfg.batch, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    return {
        "q": (b, seq_len, h, d),
        "k": (b, seq_len, kh, d),
        "v": (b, seq_len, kh, d),
        "dout": (b, seq_len, h, d),
    }


def make_inputs(cfg: BenchConfig, seq_len: int, seed: int = 0) -> dict[str, jax.Array]:
    keys = jax.random.split(jax.random.key(seed), 4)
    return {
        name: jax.random.normal(key, shape, jnp.float32).astype(cfg.dtype)
        for key, (name, shape) in zip(keys, input_shapes(cfg, seq_len).items(), strict=True)
    }


def compile_and_time(fn, args, cfg: BenchConfig) -> dict:
    compiled, result = timing.compile_once(fn, args)
    if not cfg.dry_run:
        times = timing.interleaved({"fn": lambda: compiled(*args)}, cfg.iters, warmup=cfg.warmup)
        result["time_s"] = times["fn"]
    return result


def matmul_gflops(cfg: BenchConfig, device: jax.Device) -> dict:
    """A float32 N x N matmul on one device: the ceiling attention throughput is read against."""
    n = cfg.matmul_size
    a, b = (
        jax.device_put(jax.random.normal(jax.random.key(i), (n, n), jnp.float32), device)
        for i in range(2)
    )
    result = compile_and_time(jnp.matmul, (a, b), cfg)
    result["gflops_per_s"] = 2 * n**3 / result["time_s"] / 1e9
    return result


def run(cfg: BenchConfig) -> list[dict]:
    """Benchmarks every device count x T x impl x mode: prints a table and ratios, writes JSON
    lines, a markdown table and plots if asked; returns the rows."""
    available = jax.devices()
    counts = [c for c in cfg.device_counts if c <= len(available)]
    if len(counts) < len(cfg.device_counts):
        print(f"note: only {len(available)} {available[0].platform} device(s); using {counts}")
    counts = counts or [len(available)]
    print(attention_report.header(cfg, available[: max(counts)]))
    matmul = None
    if cfg.matmul_size and not cfg.dry_run:
        matmul = matmul_gflops(cfg, available[0])
        print(
            f"matmul f32 {cfg.matmul_size}^3 on 1 device: {matmul['time_s'] * 1e3:.1f} ms, "
            f"{matmul['gflops_per_s']:.1f} GFLOP/s"
        )
    rows = []
    for n in counts:
        print("\n" + attention_report.column_titles())
        # Single-device impls do not depend on n: they run with the first device count only.
        impls = [i for i in cfg.impls if n == counts[0] or base_impl(i) not in SINGLE_DEVICE_IMPLS]
        for seq_len in cfg.seq_lens:
            new = _run_one(cfg, impls, available[:n], seq_len)
            for row in new:
                _derive(row, cfg, matmul)
                print(attention_report.format_row(row), flush=True)
            rows += new
            print()
    print(attention_report.ratios(rows))
    if cfg.out:
        with open(cfg.out, "a") as f:
            if matmul is not None:
                f.write(json.dumps({"kind": "matmul", "size": cfg.matmul_size, **matmul}) + "\n")
            for row in rows:
                f.write(json.dumps({"kind": "attention", **row}) + "\n")
    if cfg.markdown:
        with open(cfg.markdown, "w") as f:
            f.write(attention_report.markdown(rows, cfg))
    if cfg.plot_dir:
        for path in attention_report.plots(rows, cfg.plot_dir):
            print(f"wrote {path}")
    return rows


def _run_one(cfg: BenchConfig, impls, devices, seq_len: int) -> list[dict]:
    """Every impl x mode at one length on `devices`: compiled first, then timed together."""
    n = len(devices)
    mesh = jax.make_mesh((n,), (AXIS,), devices=devices)
    if cfg.dry_run:
        inputs = {
            name: jax.ShapeDtypeStruct(shape, jnp.dtype(cfg.dtype))
            for name, shape in input_shapes(cfg, seq_len).items()
        }
    else:
        inputs = make_inputs(cfg, seq_len)
    rows, pending = [], []  # pending: (row, executable, args)
    for impl, mask in itertools.product(impls, cfg.masks or (cfg.mask,)):
        cfg = dataclasses.replace(cfg, mask=mask)
        single = base_impl(impl) in SINGLE_DEVICE_IMPLS
        if single:
            sharding = jax.sharding.SingleDeviceSharding(devices[0])
        else:
            try:
                sharding = jax.NamedSharding(*context_mesh(impl, cfg, mesh)[::2])
            except Unsupported:
                sharding = jax.NamedSharding(mesh, jax.P(None, AXIS))  # reported below
        placed = {name: _place(x, sharding) for name, x in inputs.items()}
        for mode in cfg.modes:
            row = _row(cfg, impl, mode, seq_len, 1 if single else n)
            try:
                fn = with_mode(make_attention(impl, cfg, mesh, seq_len), mode)
                names = ("q", "k", "v") if mode == "fwd" else ("q", "k", "v", "dout")
                args = [placed[x] for x in names]
                compiled, info = timing.compile_once(fn, args)
                row.update(info)
                if not cfg.dry_run:
                    pending.append((row, compiled, args))
            except Unsupported as e:
                row["skipped"] = str(e)
            except Exception as e:  # noqa: BLE001 - report and go on with the others.
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            rows.append(row)
    if pending:
        calls = {i: functools.partial(c, *a) for i, (_, c, a) in enumerate(pending)}
        times = timing.interleaved(calls, cfg.iters, warmup=cfg.warmup)
        for i, (row, _, _) in enumerate(pending):
            row["time_s"] = times[i]
    return rows


def _place(x, sharding):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)
    return jax.device_put(x, sharding)


def _row(cfg: BenchConfig, impl: str, mode: str, seq_len: int, devices: int) -> dict:
    config = dataclasses.asdict(cfg)
    # Fields that describe the sweep rather than this measurement stay out of the row.
    sweep = "seq_lens impls modes masks device_counts warmup iters original_max_seq_len"
    for key in (*sweep.split(), "out", "plot_dir", "markdown"):
        config.pop(key)
    itemsize = jnp.dtype(cfg.dtype).itemsize
    q_shard = cfg.batch * (seq_len // devices) * cfg.num_heads * cfg.head_dim * itemsize
    return {
        "impl": impl,
        "mode": mode,
        "seq_len": seq_len,
        "devices": devices,
        "q_shard_bytes": q_shard,
        "flops": flops.attention_flops(
            cfg.batch,
            cfg.num_heads,
            cfg.head_dim,
            seq_len,
            mode,
            flops.mask_reach(cfg.mask, cfg.window),
        ),
        "jax_version": jax.__version__,
        "platform": jax.devices()[0].platform,
        **config,
    }


def _derive(row: dict, cfg: BenchConfig, matmul: dict | None) -> None:
    if "time_s" in row:
        row["gflops_per_s"] = row["flops"] / row["time_s"] / 1e9
        if matmul is not None:
            row["frac_of_matmul"] = row["gflops_per_s"] / matmul["gflops_per_s"]
    if "temp_bytes" in row:
        row["temp_over_q_shard"] = row["temp_bytes"] / row["q_shard_bytes"]
