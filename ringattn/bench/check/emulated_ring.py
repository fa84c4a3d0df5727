"""A contiguous ring of n devices emulated on one through a kernel's passes, as the loop of
blockwise.exact_attention: gpu_check's check and timing of the ring's kernel calls where there is a
single accelerator."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from ringattn.attention import blockwise, inputs
from ringattn.attention.kernels import base

FN = "gpu_check"


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
