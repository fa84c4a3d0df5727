"""What experiments/gpu_check.py's stages share: the report (lines, log, JSON), data and the
f32 reference, and the attention paths compared, among them a ring emulated on one device
through a kernel's passes.

Imports only the standard library, numpy, jax and ringattn (which imports only jax and numpy),
so it runs from a bare checkout on a machine where nothing of ours is installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import ringattn
from ringattn.attention import blockwise, inputs
from ringattn.attention.kernels import base, cudnn, dispatch, splash
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.kernels.splash import PallasTpu

FN = "gpu_check"
TOL = 2e-2  # max |got - want| / max |want| of bf16 results against the f32 reference
GRADS = ("out", "lse", "dq", "dk", "dv")


@dataclasses.dataclass(frozen=True)
class Hardware:
    """What a run checks on one kind of hardware: the paths of stage 1, those timed in stage 2,
    the timed baseline (JAX's own fused attention there) and the targets, (what, timed path,
    least ratio to the baseline) on bf16, D = 128, causal fwd+bwd, T in TARGET_LENS."""

    check_paths: tuple[str, ...]
    time_paths: tuple[str, ...]
    baseline: str
    baseline_label: str
    targets: tuple[tuple[str, str, float], ...]


HARDWARE = {
    "cuda": Hardware(
        check_paths=("pallas", "cudnn", "auto", "ring2 pallas", "ring2 auto"),
        time_paths=("jax cudnn", "cudnn", "pallas", "auto", "ring2 auto", "xla1024"),
        baseline="jax cudnn",
        baseline_label="cuDNN",
        targets=(
            ("our Pallas", "pallas", 0.6),
            ("auto (blockwise)", "auto", 0.85),
            ("auto (2-step emulated ring)", "ring2 auto", 0.85),
        ),
    ),
    # The GPU targets' analogue: auto (our splash path) loses little to splash on its own.
    "tpu": Hardware(
        check_paths=("splash", "auto", "ring2 splash", "ring2 auto"),
        time_paths=("jax splash", "splash", "auto", "ring2 auto", "xla512"),
        baseline="jax splash",
        baseline_label="splash",
        targets=(
            ("auto (blockwise)", "auto", 0.85),
            ("auto (2-step emulated ring)", "ring2 auto", 0.85),
        ),
    ),
}
TARGET_LENS = (8192, 32768)


# ---------------------------------------------------------------------------------------------
# Report.


class Report:
    """Lines printed (flushed) and, with `out_dir`, written as they come: gpu_check.txt (every
    line), gpu_check.log (full tracebacks) and gpu_check.json (every figure), so a run that is
    killed keeps what it printed. `failures` decides the exit status."""

    def __init__(self, out_dir=None):
        self.start = time.perf_counter()
        self.failures = []
        self.figures = {"meta": {}, "calls": [], "checks": [], "timing": [], "targets": []}
        self.figures["lower"] = []
        self.dir = out_dir
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            for name in ("gpu_check.txt", "gpu_check.log"):
                open(os.path.join(out_dir, name), "w").close()

    def _append(self, name, text):
        if self.dir:
            with open(os.path.join(self.dir, name), "a") as f:
                f.write(text)

    def line(self, text=""):
        text = text.rstrip()
        print(text, flush=True)
        self._append("gpu_check.txt", text + "\n")

    def record(self, section, **row):
        self.figures[section].append(row)
        self.save()

    def save(self):
        if self.dir:  # rewritten whole, through a rename: never half a file
            path = os.path.join(self.dir, "gpu_check.json")
            with open(path + ".tmp", "w") as f:
                json.dump(dict(self.figures, failures=self.failures), f, indent=1, default=str)
            os.replace(path + ".tmp", path)

    def exception(self, where, e):
        """`e` in one line (its type and first line); the traceback goes to the log."""
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        self._append("gpu_check.log", f"=== {where} ===\n{tb}\n")
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:240]}"

    def fail(self, where, why):
        self.failures.append(f"{where}: {why}")

    def elapsed(self):
        return time.perf_counter() - self.start


def attempt(rep, where, fn, *args, **kwargs):
    """(True, fn(...)) or (False, the exception in one line), its traceback logged under
    `where`."""
    try:
        return True, fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure is reported and the run goes on
        return False, rep.exception(where, e)


def compile_and_run(rep, where, fn, *args):
    """(compiled, first result, compile s, first run s) of jax.jit(fn) on args, or None and
    which of the two failed ('compile: ...' or 'run: ...', its traceback logged)."""
    t0 = time.perf_counter()
    ok, compiled = attempt(rep, f"{where} (compile)", lambda: jax.jit(fn).lower(*args).compile())
    if not ok:
        return None, f"compile: {compiled}"
    t1 = time.perf_counter()
    ok, got = attempt(rep, f"{where} (run)", lambda: jax.block_until_ready(compiled(*args)))
    if not ok:
        return None, f"run: {got}"
    return (compiled, got, t1 - t0, time.perf_counter() - t1), None


def rel_errors(got, want):
    """max |got - want| / max |want| per pair (inf when a value is NaN or infinite where the
    reference is not, or shapes differ); -inf lse of queries that see nothing must match."""
    errs = []
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        fin = np.isfinite(w)
        if g.shape != w.shape or np.isnan(g).any() or (np.isfinite(g) != fin).any():
            errs.append(float("inf"))
            continue
        scale = max(np.abs(w[fin]).max(initial=0.0), 1e-30)
        errs.append(float(np.abs(g[fin] - w[fin]).max(initial=0.0) / scale))
    return errs


def shape_str(b, t, h, kh, d):
    return f"B={b} T={t} H={h} K={kh} D={d}"


# ---------------------------------------------------------------------------------------------
# Data, masks, the f32 reference.


def make_data(b, t, h, kh, d, seed=0):
    """bf16 q [B,T,H,D], k/v [B,T,K,D], do [B,T,H,D]; dlse [B,H,T] f32; sorted segment ids
    [B,T] in 0..2. Drawn on the device: host draws take seconds at T = 32K."""
    keys = jax.random.split(jax.random.key(seed), 5)
    shapes = [(b, t, h, d), (b, t, kh, d), (b, t, kh, d), (b, t, h, d), (b, h, t)]
    dtypes = [jnp.bfloat16] * 4 + [jnp.float32]
    names = ("q", "k", "v", "do", "dlse")
    data = {
        name: jax.random.normal(key, shape, dtype)
        for name, key, shape, dtype in zip(names, keys, shapes, dtypes, strict=True)
    }
    seg = np.sort(np.random.default_rng(seed).integers(0, 3, (b, t)), axis=1)
    return dict(data, seg=jnp.asarray(seg, jnp.int32))


def highest_precision():
    """f32 dots at full precision (GPUs may run them as TF32 by default): for references."""
    ctx = getattr(jax, "default_matmul_precision", None)
    return contextlib.nullcontext() if ctx is None else ctx("highest")


def mask_kwargs(mask, t, seg=None):
    """The attention arguments of a mask kind at length t."""
    return {
        "none": {},
        "causal": {"causal": True},
        "window": {"local_window_size": (t // 4, t // 8)},
        "segments": {"causal": True, "segment_ids": seg},
    }[mask]


def _vjp_all(attn, q, k, v, do, dlse):
    (out, lse), vjp = jax.vjp(attn, q, k, v)
    return (out, lse, *vjp((do, dlse)))


def reference(data, kw, dlse):
    """(out, lse, dq, dk, dv) of the f32 reference on the bf16 data, at full f32 precision."""
    f32 = [data[x].astype(jnp.float32) for x in ("q", "k", "v", "do")]
    attn = lambda q, k, v: ringattn.reference_attention(q, k, v, return_lse=True, **kw)  # noqa: E731
    with highest_precision():
        return jax.jit(lambda *a: _vjp_all(attn, *a))(*f32, dlse)


# ---------------------------------------------------------------------------------------------
# Paths: single-device calls, an emulated ring, jax.nn's dense attention.


@dataclasses.dataclass(frozen=True)
class EmulatedRing:
    """A contiguous ring of n devices emulated on one, as blockwise.exact_attention's `loop`:
    q shard i attends to its own k/v shard with a fresh `attend`, then continues that state
    over the others in ring order (`fwd_pass`); the backward continues dq over the k/v shards
    and dk/dv over the q shards (`bwd_pass`), from the final (out, lse) as a ring does."""

    n: int

    def shard(self, x, r, axis=1):
        """Shard r of x along `axis` (None stays None)."""
        if x is None:
            return None
        t = x.shape[axis] // self.n
        return jax.lax.slice_in_dim(x, r * t, (r + 1) * t, axis=axis)

    def _operands(self, cfg, q, k, v, m, i, j):
        sl = self.shard
        mij = inputs.MaskArrays(sl(m.q_pos, i), sl(m.kv_pos, j), sl(m.q_seg, i), sl(m.kv_seg, j))
        qs, q_, (k_, v_, kpos, kseg) = base.prepare(cfg, sl(q, i), sl(k, j), sl(v, j), mij)
        return q_, k_, v_, qs, base.kv_side(cfg, kpos, kseg)

    def _order(self, i):  # ring step s holds the k/v shard of device i - s
        return [(i - s) % self.n for s in range(self.n)]

    def forward(self, cfg, q, k, v, m):
        kern, outs = cfg.kernel, []
        for i in range(self.n):
            state = None
            for j in self._order(i):
                ops = self._operands(cfg, q, k, v, m, i, j)
                state = kern.attend(cfg, *ops) if state is None else kern.fwd_pass(cfg, *ops, state)
            outs.append(kern.finish_fwd(cfg, self.shard(q, i), state))
        out, lse = zip(*outs, strict=True)
        return jnp.concatenate(out, axis=1), jnp.concatenate(lse, axis=2)

    def backward(self, cfg, q, k, v, m, b):
        kern, sl, n = cfg.kernel, self.shard, self.n
        dq, dk, dv = [None] * n, [None] * n, [None] * n
        for i in range(n):
            stats = (sl(b.lse, i, 2), sl(b.delta, i, 2))
            b_i = base.BwdInputs(sl(b.out, i), sl(b.dout, i), *stats, b.dlse_nonzero)
            bwd = kern.prepare_bwd(cfg, sl(q, i), sl(k, i), b_i)
            for j in self._order(i):
                q_, k_, v_, qs, ks = self._operands(cfg, q, k, v, m, i, j)
                if dq[i] is None and dk[j] is None:
                    grads = kern.attend_bwd(cfg, q_, k_, v_, bwd, qs, ks)
                else:
                    zero = kern.init_grads(cfg, q_, k_, v_)
                    given = (dq[i], dk[j], dv[j])
                    grads = tuple(z if g is None else g for z, g in zip(zero, given, strict=True))
                    grads = kern.bwd_pass(cfg, q_, k_, v_, bwd, qs, ks, grads)
                dq[i], dk[j], dv[j] = grads
        done = [
            kern.finish_bwd(cfg, sl(q, r), sl(k, r), sl(v, r), (dq[r], dk[r], dv[r]))
            for r in range(n)
        ]
        return tuple(jnp.concatenate(x, axis=1) for x in zip(*done, strict=True))


def emulated_ring(q, k, v, *, kernel, n=2, **kw):
    """(out, lse) of EmulatedRing(n) with the kernel `kernel=` picks for one shard's lengths."""
    if q.shape[1] % n:
        raise ValueError(f"emulated_ring: T ({q.shape[1]}) must be a multiple of n ({n})")
    opts, m, _ = inputs.check(FN, q, k, v, kernel=kernel, **kw)
    ring = EmulatedRing(n)
    shard = [ring.shard(x, 0) for x in (q, k, v)]
    m0 = inputs.MaskArrays(*(ring.shard(x, 0) for x in m))
    cfg = blockwise.make_config(FN, opts, *shard, m0)
    q, k, v = (x.astype(cfg.dtype) for x in (q, k, v))
    return blockwise.exact_attention(cfg, ring, q, k, v, m, None)


@dataclasses.dataclass(frozen=True)
class Path:
    """An attention path: attn(q, k, v, **mask kwargs) -> (out, lse or None), or why it cannot
    run here (`na`)."""

    name: str
    attn: object = None
    na: str | None = None
    dlse: bool = True  # checked with a random lse cotangent (else 0: cuDNN's backward needs 0)


def _blockwise(kernel, **extra):
    def attn(q, k, v, **kw):
        return ringattn.blockwise_attention(q, k, v, kernel=kernel, return_lse=True, **extra, **kw)

    return attn


def _ring(kernel):
    return lambda q, k, v, **kw: emulated_ring(q, k, v, kernel=kernel, n=2, **kw)


def _dense(impl):
    def attn(q, k, v, causal=False):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl), None

    return attn


def _jax_splash(interpret):
    """JAX's splash attention on its own (no lse; K/V heads repeated to H): the TPU baseline."""

    def attn(q, k, v, causal=False):
        sk, sm = splash._modules()
        h, d = q.shape[2:]
        one = (sm.CausalMask if causal else sm.FullMask)((q.shape[1], k.shape[1]))
        with jax.ensure_compile_time_eval():  # concrete mask tables
            kern = sk.make_splash_mha(
                sm.MultiHeadMask([one] * h), head_shards=1, q_seq_shards=1, interpret=interpret
            )
        q = q * jnp.asarray(d**-0.5, q.dtype)  # splash takes no scale
        q, k, v = (jnp.swapaxes(jnp.repeat(x, h // x.shape[2], axis=2), 1, 2) for x in (q, k, v))
        return jnp.swapaxes(jax.vmap(kern)(q, k, v), 1, 2), None  # [B, H, T, D] and back

    return attn


def paths(interpret):
    """Every path by name, those that cannot run here with the reason."""
    on = dispatch.platform()
    pallas, tpu = PallasGpu(interpret=interpret), PallasTpu(interpret=interpret)
    no_pallas = (
        None if (on == "gpu" or interpret) else "our Pallas kernel needs a GPU (or --interpret)"
    )
    no_splash = (
        None if (on == "tpu" or interpret) else "splash attention needs a TPU (or --interpret)"
    )
    no_cudnn = cudnn.unavailable_reason()
    return {
        p.name: p
        for p in (
            Path("pallas", _blockwise(pallas), no_pallas),
            Path("cudnn", _blockwise(Cudnn(fallback=pallas)), no_cudnn, dlse=False),
            Path("auto", _blockwise("auto"), dlse=False),
            Path("ring2 pallas", _ring(pallas), no_pallas),
            Path("ring2 auto", _ring("auto"), dlse=False),
            Path("splash", _blockwise(tpu), no_splash, dlse=False),  # 0: splash's backward
            Path("ring2 splash", _ring(tpu), no_splash, dlse=False),
            Path("xla1024", _blockwise("xla", block_q=1024, block_k=1024)),
            Path("xla512", _blockwise("xla", block_q=512, block_k=512)),
            Path("jax cudnn", _dense("cudnn"), no_cudnn),
            Path("jax splash", _jax_splash(interpret), no_splash),
            Path("jax xla", _dense("xla")),
        )
    }


def describe(kern):
    fallback = getattr(kern, "fallback", None)
    return kern.name + (f" (fallback {fallback.name})" if fallback is not None else "")


def auto_kernel(q, k, v, **kw):
    """The kernel kernel='auto' runs for these inputs on this platform."""
    opts, m, _ = inputs.check(FN, q, k, v, **kw)
    d, t, s = q.shape[-1], q.shape[1], k.shape[1]
    return dispatch.resolve(FN, opts, q.dtype, d, v.shape[-1], t, s, m.q_seg is not None)
