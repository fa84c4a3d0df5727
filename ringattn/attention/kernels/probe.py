"""Probing a fused kernel before it runs a user's program: does it compile and agree with XLA?

A fused kernel can fail where the XLA kernel cannot: a Triton compile error (shared memory at a
large head dim), a Pallas lowering that a JAX version broke, a library that returns something
else than its documentation says. `failure` runs every pass of a kernel once on a small problem
of the same kind (dtype, head dims, mask kind) and compares it with the XLA kernel: the fresh
forward, the forward continuing a state (a ring step), the backward and the backward continuing
gradients. It runs now, outside whatever trace asked (in a thread of its own), once per combination
per process; dispatch.py turns a failure into a fallback or an error.

Several processes (a multi-host job) must make the same choice, or they compile different
programs and the collectives hang. `everywhere` is the answer of every process: its own (a check
before any probe, or the probe's) and the others', gathered with
`jax.experimental.multihost_utils.process_allgather`; dispatch.py uses a kernel only where no
process refused it. Why this cannot deadlock:
  - a gather is a collective: every process must reach it, in the same order. Every process
    traces the same program, so it resolves the same calls in the same order, and dispatch.py
    decides whether to gather from the program alone (kernel asked for, platform, dtype, head
    dims, mask kind, lowering target) and from earlier gathered answers, never from what the
    local machine has: a check that depends on it (cuDNN's version, JAX's splash module) is
    gathered too. So every process gathers the same combinations in the same order.
  - a gather happens once per combination per process (the first time it is resolved; cached
    like the probe), so every process's cache holds the same combinations;
  - it runs in a fresh thread (outside the caller's trace) while the calling thread waits in its
    trace: nothing of the caller is half-dispatched, and the gather's program is queued after
    everything the process dispatched before, in the same order on every process;
  - on one process there is nothing to agree: no collective, no cost.
What it asks: every process traces every computation that resolves a fused kernel (as any
multi-process program does), from one thread. A computation only some processes trace (process 0
alone on its local devices) would gather alone and wait for ever: ask for kernel="xla" there, the
one kernel never gathered (it runs on every machine).

`lower` traces the same passes and lowers them for a platform, without running them (on any
machine: target.py): what a kernel's compile-time constraints allow is checked there.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import socket
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ringattn.attention import inputs, masks
from ringattn.attention.kernels import base
from ringattn.attention.kernels.xla import Xla
from ringattn.attention.masks import MaskSpec

# max |kernel - xla| / max |xla| allowed: half precision rounds p and ds to 8 bits; f32 dots may
# run as TF32 on GPUs.
_TOL = {2: 5e-2, 4: 1e-2, 8: 1e-6}


@dataclasses.dataclass(frozen=True)
class MaskKind:
    """The static mask features that select a kernel's code paths."""

    causal: bool = False
    window: bool = False
    segments: bool = False
    soft_cap: float | None = None

    @classmethod
    def of(cls, opts: inputs.Options, segments: bool):
        return cls(opts.spec.causal, opts.spec.window is not None, segments, opts.logits_soft_cap)

    def __str__(self):
        parts = [n for n in ("causal", "window", "segments") if getattr(self, n)]
        if self.soft_cap is not None:
            parts.append(f"soft cap {self.soft_cap:g}")
        return "mask: " + (", ".join(parts) or "none")


# One of each mask kind, by name: what a kernel's code paths differ by (tests, gpu_check --lower).
MASK_KINDS = {
    "none": MaskKind(),
    "causal": MaskKind(causal=True),
    "window": MaskKind(window=True),
    "segments": MaskKind(causal=True, segments=True),
    "soft cap": MaskKind(causal=True, soft_cap=30.0),
}


def _problem(kind: MaskKind, t):
    """A small self-attention problem of this kind (t tokens): spec and mask arrays. Queries and
    keys share positions, so library kernels see the steps they run (unmasked, causal diagonal)."""
    window = (t // 4, t // 8) if kind.window else None
    spec = MaskSpec(kind.causal, window)
    seg = None
    if kind.segments:
        seg = jnp.asarray((np.arange(t) >= t // 3)[None], jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    return spec, inputs.MaskArrays(pos, pos, seg, seg)


def _passes(cfg, q, k, v, m, dout):
    """Every pass of cfg.kernel: fresh and continued forward, fresh and continued backward."""
    kern = cfg.kernel
    qs, q_, (k_, v_, kpos, kseg) = base.prepare(cfg, q, k, v, m)
    ks = base.kv_side(cfg, kpos, kseg)
    o, lse = kern.finish_fwd(cfg, q, kern.attend(cfg, q_, k_, v_, qs, ks))
    # A ring step: the first half of the keys, then the second half continuing that state.
    half = k_.shape[1] // 2
    cut = lambda x, a, b: None if x is None else x[:, a:b]  # noqa: E731
    ks1 = base.kv_side(cfg, cut(kpos, 0, half), cut(kseg, 0, half))
    ks2 = base.kv_side(cfg, cut(kpos, half, None), cut(kseg, half, None))
    half_cfg = dataclasses.replace(cfg, kv_len=half)
    state = kern.attend(half_cfg, q_, k_[:, :half], v_[:, :half], qs, ks1)
    rest = dataclasses.replace(cfg, kv_len=cfg.kv_len - half)
    state = kern.fwd_pass(rest, q_, k_[:, half:], v_[:, half:], qs, ks2, state)
    o2, lse2 = kern.finish_fwd(cfg, q, state)

    out = o.astype(q.dtype)
    delta = jnp.moveaxis(jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), -1), 1, 2)
    b = base.BwdInputs(out, dout, masks.backward_lse(lse), delta, jnp.asarray(False))
    bwd = kern.prepare_bwd(cfg, q, k, b)
    grads = kern.attend_bwd(cfg, q_, k_, v_, bwd, qs, ks)
    twice = kern.bwd_pass(cfg, q_, k_, v_, bwd, qs, ks, grads)
    results = (o, lse, o2, lse2, *kern.finish_bwd(cfg, q, k, v, grads))
    return results + tuple(x / 2 for x in kern.finish_bwd(cfg, q, k, v, twice))


def _inputs(kind, t, dtype, head_dim, v_head_dim):
    """(spec, q, k, v, mask arrays, dout) of the probe's problem: t tokens, 2 query heads sharing
    one KV head (GQA), random data."""
    spec, m = _problem(kind, t)
    rng = np.random.default_rng(0)
    shapes = (
        (1, t, 2, head_dim),
        (1, t, 1, head_dim),
        (1, t, 1, v_head_dim),
        (1, t, 2, v_head_dim),
    )
    q, k, v, dout = (jnp.asarray(rng.standard_normal(shape), dtype) for shape in shapes)
    return spec, q, k, v, m, dout


def _run_passes(kern, blocks, spec, kind, t, dtype, head_dim):
    """jit(_passes) of `kern` with tiles `blocks` on the probe's problem."""
    scale = 1.0 / float(np.sqrt(head_dim))
    cfg = base.Config(spec, scale, kind.soft_cap, *blocks, t, dtype, kern, None, t)
    return jax.jit(functools.partial(_passes, cfg))


def lower(kern, dtype, head_dim, v_head_dim, kind: MaskKind, platform, t=None):
    """The text of every pass of `kern` (those `failure` runs, on its problem of this kind with
    t tokens: two blocks when None) traced and lowered for `platform` ('cuda', 'tpu' ...), not
    run. Lengths that are not whole blocks are padded as a call's are."""
    dtype = jnp.dtype(dtype)
    t = t or 2 * max(kern.blocks(1, 1, 1, 1))
    kern = kern.fit(t, t)
    spec, *args = _inputs(kind, t, dtype, head_dim, v_head_dim)
    passes = _run_passes(kern, kern.blocks(1, 1, t, t), spec, kind, t, dtype, head_dim)
    return passes.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _outside_any_trace(fn):
    """fn() in a fresh thread: JAX's trace state and mesh context are per thread, so a jit
    called there compiles and runs now, whatever the calling thread is tracing."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(fn).result()


@functools.cache
def failure(kern, dtype, head_dim, v_head_dim, kind: MaskKind):
    """None if `kern` runs a small problem of this kind and agrees with the XLA kernel, else what
    went wrong (the exception, or which result differs and by how much)."""
    if any(getattr(x, "interpret", False) for x in (kern, getattr(kern, "fallback", None))):
        return None  # interpreted kernels are test tools: they run in the caller's trace as is
    dtype = jnp.dtype(dtype)
    names = ("out", "lse", "out (continued)", "lse (continued)", "dq", "dk", "dv")
    names += ("dq (continued)", "dk (continued)", "dv (continued)")

    def run():  # everything made here, in the probe's thread: nothing of the caller's trace
        t = 2 * max(kern.blocks(1, 1, 1, 1))
        spec, *args = _inputs(kind, t, dtype, head_dim, v_head_dim)
        got = _run_passes(kern, kern.blocks(1, 1, t, t), spec, kind, t, dtype, head_dim)(*args)
        want = _run_passes(Xla(), (t // 2, t // 2), spec, kind, t, dtype, head_dim)(*args)
        return jax.device_get((got, want))

    try:
        got, want = _outside_any_trace(run)
    except Exception as e:  # noqa: BLE001 - any failure to compile or run is the answer
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first}"
    tol = _TOL[dtype.itemsize]
    for name, a, w in zip(names, got, want, strict=True):
        a, w = np.asarray(a, np.float64), np.asarray(w, np.float64)
        if not np.isfinite(a).all():
            return f"{name} is not finite"
        if name.startswith("lse"):  # queries that see nothing: LSE_NONE in both
            unseen = w <= 0.5 * masks.LSE_NONE
            if not (a[unseen] <= 0.5 * masks.LSE_NONE).all():
                return f"{name}: a query that sees no key has a finite lse"
            a, w = a[~unseen], w[~unseen]
        err = np.max(np.abs(a - w), initial=0) / max(np.max(np.abs(w), initial=0), 1e-30)
        if err > tol:
            return f"{name} differs from the XLA kernel's by {err:.2e} (relative, > {tol:g})"
    return None


# The longest text a process contributes to a gather, in bytes (longer texts are cut).
_GATHER_BYTES = 1024


class Answer(NamedTuple):
    """One process's contribution to a gather."""

    process: int
    host: str
    text: str


def gather(text: str) -> tuple[Answer, ...]:
    """Every process's `text` with its index and host name, in process order: this process's
    alone on one process (no collective), else one process_allgather that every process must
    reach (module docstring), run outside any trace."""
    host = socket.gethostname()
    if jax.process_count() == 1:
        return (Answer(0, host, text),)
    data = f"{host}|{text}".replace("\0", " ").encode()[:_GATHER_BYTES]
    row = np.zeros(_GATHER_BYTES, np.uint8)
    row[: len(data)] = np.frombuffer(data, np.uint8)
    rows = _outside_any_trace(lambda: multihost_utils.process_allgather(row))
    texts = (bytes(r).rstrip(b"\0").decode(errors="replace") for r in np.asarray(rows))
    return tuple(Answer(i, *t.split("|", 1)) for i, t in enumerate(texts))


def everywhere(kern, dtype, head_dim, v_head_dim, kind: MaskKind, problem=None):
    """Every process's answer for `kern` on this combination (Answer.text: None where it runs,
    else why not): `problem` where one is given (why it cannot run there, found before any
    probe), else the probe's `failure`. Gathered from every process in a multi-process job,
    once per combination per process (module docstring)."""
    why = problem if problem is not None else failure(kern, dtype, head_dim, v_head_dim, kind)
    return _gathered(kern, jnp.dtype(dtype), head_dim, v_head_dim, kind, why or "")


@functools.cache
def _gathered(kern, dtype, head_dim, v_head_dim, kind, why):
    """gather(why) for a combination, once: `why` is this process's (cached) answer for it."""
    return tuple(a._replace(text=a.text or None) for a in gather(why))
