"""The attention benchmark (experiments/benchmark.py): its configuration and the implementations
measured, each as f(q, k, v) on global arrays (attention_run.py measures them: time and compiled
memory per device; flops.py counts their work: visible pairs only).

Memory is what XLA reports for one device's compiled program (`memory_analysis()`): temp is the
scratch the program needs beyond its arguments and outputs; this is what grows as T^2 for dense
attention and must stay ~linear in the local shard for ring attention.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

import ringattn
from ringattn.bench.flops import MASKS

IMPLS = ("dense", "dense_cudnn", "blockwise", "original")  # + context-parallel: STRATEGY[/LAYOUT]
# Attention variants an impl of ours takes as "+VARIANT" suffixes (ring/zigzag+cap+sinks): a
# logit soft cap (Gemma 2's 50) and learned sinks (one logit per head, here all 0.5).
VARIANTS = ("cap", "sinks")
SOFT_CAP = 50.0
STRATEGIES = ("ring", "allgather", "ulysses", "hybrid", "auto")
MODES = ("fwd", "fwdbwd")
SINGLE_DEVICE_IMPLS = ("dense", "dense_cudnn", "blockwise")
AXIS = "context"
MiB = 2**20


class Unsupported(Exception):
    """The implementation cannot run this configuration (reported as skipped, not failed)."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    seq_lens: tuple[int, ...] = (4096,)
    batch: int = 1
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int = 64
    dtype: str = "float32"
    mask: str = "causal"  # the mask being measured; run() sweeps `masks`
    masks: tuple[str, ...] = ()
    window: int = 1024  # --mask=window: causal sliding window, pos(i) - window <= pos(j) <= pos(i)
    impls: tuple[str, ...] = ("dense", "blockwise", "ring", "original")
    modes: tuple[str, ...] = MODES
    block_q: int = 512
    block_k: int = 512
    device_counts: tuple[int, ...] = (8,)
    ulysses_size: int = 2  # hybrid: the Ulysses axis of the 2-D context mesh
    warmup: int = 1
    iters: int = 3
    dry_run: bool = False
    matmul_size: int = 2048
    original_max_seq_len: int = 0  # 0: no cap
    out: str | None = None
    plot_dir: str | None = None
    markdown: str | None = None

    def __post_init__(self):
        bad = [x for x in self.impls if base_impl(x) not in IMPLS and not _is_cp(x)]
        if bad:
            raise ValueError(
                f"impls: expected names from {IMPLS} or STRATEGY[/LAYOUT] with a strategy from "
                f"{STRATEGIES} and a layout from {ringattn.LAYOUTS}, got {bad}"
            )
        bad = [x for x in self.modes if x not in MODES]
        if bad:
            raise ValueError(f"modes: expected a subset of {MODES}, got {bad}")
        for mask in (self.mask, *self.masks):
            if mask not in MASKS:
                raise ValueError(f"mask: expected one of {MASKS}, got {mask!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )


def _is_cp(impl: str) -> bool:
    strategy, _, layout = base_impl(impl).partition("/")
    return strategy in STRATEGIES and (not layout or layout in ringattn.LAYOUTS)


def base_impl(impl: str) -> str:
    """The impl without its variants (ring/zigzag+cap -> ring/zigzag)."""
    return impl.split("+")[0]


def _variant_kwargs(impl: str, cfg: BenchConfig) -> dict:
    """The variant keywords of an impl's "+VARIANT" suffixes (blockwise and ours only)."""
    variants = impl.split("+")[1:]
    bad = [x for x in variants if x not in VARIANTS]
    if bad or (variants and base_impl(impl) not in ("blockwise",) and not _is_cp(impl)):
        raise ValueError(f"impl {impl!r}: variants {VARIANTS} apply to blockwise and ours")
    kw = {}
    if "cap" in variants:
        kw["logits_soft_cap"] = SOFT_CAP
    if "sinks" in variants:
        kw["sinks"] = jnp.full((cfg.num_heads,), 0.5, jnp.float32)
    return kw


def set_num_cpu_devices(n: int) -> None:
    """Simulates n CPU devices. Must run before JAX initialises a backend (once it has, in a
    notebook or a test, the devices it has are used); only the CPU backend is affected, so it is
    harmless where an accelerator is the default backend."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return  # The user chose the count through XLA_FLAGS.
    try:
        jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backend has started: run() uses the devices there are
        pass


# ---------------------------------------------------------------------------- implementations


def _mask_kwargs(cfg: BenchConfig) -> dict:
    if cfg.mask == "causal":
        return {"causal": True}
    if cfg.mask == "window":
        return {"causal": True, "local_window_size": (cfg.window, 0)}
    return {}


def load_original():
    """The original JAX Ring Attention (`ringattention` on PyPI). Its package __init__ still calls
    the removed `jax.lib.xla_bridge` (and initialises the backend: call after device setup)."""
    import jax._src.xla_bridge as xb

    if not hasattr(jax.lib, "xla_bridge"):
        jax.lib.xla_bridge = xb
    return importlib.import_module("ringattention.ringattention_jax")


def context_mesh(impl: str, cfg: BenchConfig, mesh: jax.sharding.Mesh):
    """(mesh, axis_name, sequence PartitionSpec) an impl runs on: the 1-D context mesh, or for
    hybrid a (--ulysses_size, rest) mesh whose sequence is sharded ring-major."""
    if not impl.startswith("hybrid"):
        return mesh, AXIS, jax.P(None, AXIS)
    n, u = mesh.shape[AXIS], cfg.ulysses_size
    if n % u:
        raise Unsupported(f"--ulysses_size={u} does not divide {n} devices")
    mesh = jax.make_mesh((u, n // u), ("ulysses", "ring"), devices=mesh.devices.ravel())
    return mesh, ("ulysses", "ring"), jax.P(None, ("ring", "ulysses"))


def make_attention(impl: str, cfg: BenchConfig, mesh: jax.sharding.Mesh, seq_len: int) -> Callable:
    """Returns f(q, k, v) -> out on global [B, T, H, D] / [B, S, K, D] arrays."""
    mask = _mask_kwargs(cfg)
    variants = _variant_kwargs(impl, cfg)
    impl = base_impl(impl)
    n = mesh.shape[AXIS]
    local_len = seq_len // n
    if impl in ("dense", "dense_cudnn"):
        if impl == "dense_cudnn" and jax.devices()[0].platform != "gpu":
            raise Unsupported("cuDNN needs a GPU")

        def dense(q, k, v):
            return jax.nn.dot_product_attention(
                q,
                k,
                v,
                is_causal=mask.get("causal", False),
                local_window_size=mask.get("local_window_size"),
                implementation="cudnn" if impl == "dense_cudnn" else "xla",
            )

        return dense
    if impl == "blockwise":
        bq, bk = min(cfg.block_q, seq_len), min(cfg.block_k, seq_len)
        return lambda q, k, v: ringattn.blockwise_attention(
            q, k, v, block_q=bq, block_k=bk, **mask, **variants
        )
    if _is_cp(impl):
        strategy, _, layout = impl.partition("/")
        bq, bk = min(cfg.block_q, local_len), min(cfg.block_k, local_len)
        mesh, axis_name, _ = context_mesh(impl, cfg, mesh)
        return lambda q, k, v: ringattn.context_parallel_attention(
            q,
            k,
            v,
            mesh=mesh,
            axis_name=axis_name,
            strategy=strategy,
            layout=layout or "contiguous",
            input_layout=layout or "contiguous",  # the benchmark's data: laid out already
            block_q=bq,
            block_k=bk,
            **mask,
            **variants,
        )
    if impl == "original":
        return _make_original(cfg, mesh, local_len)
    raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")


def _make_original(cfg: BenchConfig, mesh: jax.sharding.Mesh, local_len: int) -> Callable:
    if cfg.mask == "window":
        raise Unsupported("no sliding-window mask")
    if cfg.original_max_seq_len and local_len * mesh.shape[AXIS] > cfg.original_max_seq_len:
        raise Unsupported(f"T > --original_max_seq_len={cfg.original_max_seq_len}")
    try:
        original = load_original()
    except Exception as e:  # noqa: BLE001 - any import failure means "not available here".
        raise Unsupported(f"not importable: {type(e).__name__}: {e}") from e
    blockwise_kwargs = dict(
        causal_block_size=1 if cfg.mask == "causal" else None,
        query_chunk_size=min(cfg.block_q, local_len),
        key_chunk_size=min(cfg.block_k, local_len),
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        dtype=jnp.dtype(cfg.dtype),
        policy=jax.checkpoint_policies.nothing_saveable,
        precision=None,
        prevent_cse=True,
    )
    reps = cfg.num_heads // cfg.num_kv_heads

    def local(q, k, v):
        if reps > 1:  # The original has no GQA: it needs K/V repeated to H heads.
            k, v = jnp.repeat(k, reps, axis=2), jnp.repeat(v, reps, axis=2)
        # float32_logits=True: the original's recommended setting, keeps softmax stats in f32.
        return original.ring_attention(q, k, v, None, None, None, AXIS, True, blockwise_kwargs)

    spec = jax.P(None, AXIS)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)


def with_mode(attn: Callable, mode: str) -> Callable:
    """fwd: f(q, k, v). fwdbwd: f(q, k, v, dout) = grads of sum(out * dout) w.r.t. q, k, v."""
    if mode == "fwd":
        return attn

    def fwdbwd(q, k, v, dout):
        def loss(q, k, v):
            out = attn(q, k, v).astype(jnp.float32)
            return jnp.sum(out * dout.astype(jnp.float32))

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    return fwdbwd
