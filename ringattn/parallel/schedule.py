"""Which tiles each device computes at each step of a context-parallel strategy, and its balance.

Everything is derived from the predicates the kernels run, on the positions the layout gives each
shard (segment ids are data, unknown here: a schedule is the worst case over them):

* per-block `masks.Ranges` built by `base.make_side` (blocks of block_q / block_k inside each
  shard, edge-padded) and `masks.tile_state` decide which tiles a pass computes (not SKIP) and
  which it masks (PARTIAL);
* ring: `ring.plan_ring` decides which steps run; at step s device r holds the k/v shard of
  device (r - s) mod n and computes only if the shard-level tile state is not SKIP.

"work" is the number of visible (query, key) pairs, counted exactly from positions; "area" is
what the kernel computes: block_q x block_k per tile, masked or not. With work w[s][r] of device r
at step s, balance_efficiency = sum(w) / (n * sum_s max_r w[s][r]): 1 when every step keeps every
device busy; for a causal ring in the contiguous layout device r has r + 1 shards to attend to
while the ring runs in lockstep, n / (2n - 1) = 0.53 at n = 8 (the (n + 1) / 2n = 0.56 of a count
in whole shards: the diagonal shard is half a shard of pairs). It does not depend on the blocks.
compute_efficiency puts area in the denominator, so it also charges the masked part of PARTIAL
tiles: it grows as blocks shrink.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import numpy as np

from ringattn.attention import inputs, masks
from ringattn.attention.masks import FULL, PARTIAL, SKIP, MaskSpec
from ringattn.parallel import layouts, ring

STRATEGIES = ("ring", "allgather", "ulysses")
_BIG = 1 << 62  # beyond any position (int64), for open window bounds and padded keys


class Tile(NamedTuple):
    """One tile a device computes: block indices in its query and k/v arrays, FULL or PARTIAL,
    and its visible (query, key) pairs."""

    q_block: int
    kv_block: int
    state: int
    work: int


@dataclasses.dataclass(frozen=True)
class Schedule:
    """tiles[i][r]: the tiles device r computes at the i-th step that runs, `steps[i]`.

    ring: q blocks of the device's shard x kv blocks of the shard it holds at that step, the one
    of device (r - steps[i]) mod n; steps that do not run (`ring.plan_ring`) are not listed.
    allgather: one step; the device's q blocks x kv blocks of the gathered sequence (layout order).
    ulysses: one step; every device computes all tiles of the whole sequence (layout order) on
    its H / n heads, so its work is the tiles' work times `head_fraction` = 1 / n.
    """

    strategy: str
    layout: str
    num_shards: int
    seq_len: int
    kv_len: int
    block_q: int
    block_k: int
    spec: MaskSpec
    steps: tuple[int, ...]
    tiles: tuple[tuple[tuple[Tile, ...], ...], ...]
    head_fraction: float = 1.0

    @property
    def work(self) -> np.ndarray:
        """[steps, devices] visible pairs (per head, averaged over heads for ulysses)."""
        w = [[sum(t.work for t in dev) for dev in row] for row in self.tiles]
        return np.asarray(w, np.float64).reshape(len(self.steps), -1) * self.head_fraction

    @property
    def area(self) -> np.ndarray:
        """[steps, devices] pairs the kernel computes: block_q * block_k per tile."""
        a = [[len(dev) * self.block_q * self.block_k for dev in row] for row in self.tiles]
        return np.asarray(a, np.float64).reshape(len(self.steps), -1) * self.head_fraction

    @property
    def total_work(self) -> float:
        return float(self.work.sum())

    @property
    def balance_efficiency(self) -> float:
        crit = self.work.max(axis=1).sum()
        return float(self.work.sum() / (self.num_shards * crit)) if crit else 1.0

    @property
    def compute_efficiency(self) -> float:
        crit = self.area.max(axis=1).sum()
        return float(self.work.sum() / (self.num_shards * crit)) if crit else 1.0


def mask_spec(fn, causal, local_window_size) -> MaskSpec:
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{fn}: `causal` must be a bool, got {causal!r}.")
    return MaskSpec(bool(causal), inputs.normalize_window(fn, local_window_size))


def block_ranges(pos_ML, block):
    """(lo, hi) [M, nb] position ranges of the blocks of each shard, built as the kernels build
    them (`base.make_side`: edge padding to whole blocks, then min / max per block)."""
    pad = -pos_ML.shape[1] % block
    pos = np.pad(pos_ML, ((0, 0), (0, pad)), mode="edge").reshape(pos_ML.shape[0], -1, block)
    return pos.min(-1), pos.max(-1)


_tile_state = jax.jit(masks.tile_state, static_argnums=0)


def _tile_states(spec, qlo, qhi, klo, khi):
    """masks.tile_state, broadcast; evaluated flat on int32 at power-of-two sizes, so that a few
    compiled programs serve every shape (also while a caller is being traced)."""
    shape = np.broadcast_shapes(qlo.shape, klo.shape)
    size = max(1024, 1 << (math.prod(shape) - 1).bit_length())
    flat = [
        np.pad(np.broadcast_to(x, shape).ravel().astype(np.int32), (0, size - math.prod(shape)))
        for x in (qlo, qhi, klo, khi)
    ]
    with jax.ensure_compile_time_eval():
        q, kv = masks.Ranges(*flat[:2], None, None), masks.Ranges(*flat[2:], None, None)
        st = np.broadcast_to(np.asarray(_tile_state(spec, q, kv)), (size,))
    return st[: math.prod(shape)].reshape(shape).copy()


def states(spec, qpos_ML, kpos_ML, block_q, block_k):
    """Tile states [Mq, nq, Mk, nk] of every q shard's blocks against every kv shard's, and the
    shard-level states [Mq, Mk] (the ring's per-step rule, from the reduced ranges)."""
    (qlo, qhi), (klo, khi) = block_ranges(qpos_ML, block_q), block_ranges(kpos_ML, block_k)
    tiles = _tile_states(
        spec, qlo[:, :, None, None], qhi[:, :, None, None], klo[None, None], khi[None, None]
    )
    if kpos_ML.shape[1] % block_k:  # the kernel masks the padded keys of the last block
        last = tiles[..., -1]
        tiles[..., -1] = np.where(last == FULL, PARTIAL, last)
    shard = _tile_states(
        spec, qlo.min(1)[:, None], qhi.max(1)[:, None], klo.min(1)[None], khi.max(1)[None]
    )
    return tiles, shard


def visible_pairs(spec, qpos_ML, kpos_ML, block_q, block_k):
    """Visible (query, key) pairs [Mq, nq, Mk, nk] of every tile, counted exactly: for each
    query, the keys of a (sorted) kv block in [pos - left, min(pos + right, pos if causal)]."""
    (mq, lq), (mk, lk) = qpos_ML.shape, kpos_ML.shape
    nq, nk = -(-lq // block_q), -(-lk // block_k)
    q = qpos_ML.reshape(-1).astype(np.int64)
    lo, hi = np.full_like(q, -_BIG), np.full_like(q, _BIG - 1)
    if spec.window is not None:
        lo, hi = q - spec.window[0], q + spec.window[1]
    if spec.causal:
        hi = np.minimum(hi, q)
    kb = np.full((mk, nk * block_k), _BIG, np.int64)  # padded keys match no query
    kb[:, :lk] = kpos_ML
    kb = np.sort(kb.reshape(mk, nk, block_k), axis=-1)
    counts = np.empty((q.size, mk, nk), np.int64)
    for j in range(mk):
        for b in range(nk):
            counts[:, j, b] = np.searchsorted(kb[j, b], hi, "right")
            counts[:, j, b] -= np.searchsorted(kb[j, b], lo, "left")
    counts = np.maximum(counts, 0).reshape(mq, lq, mk, nk)
    counts = np.pad(counts, ((0, 0), (0, nq * block_q - lq), (0, 0), (0, 0)))
    return counts.reshape(mq, nq, block_q, mk, nk).sum(axis=2)


def shard_positions(layout, length, n, groups=1):
    """Positions [n // groups, groups * length // n] of each device's tokens; with groups > 1,
    device g holds shards g * groups ... (g + 1) * groups - 1 in order (a hybrid ring chunk)."""
    pos = np.stack([layouts.shard_positions(layout, length // n, r, n) for r in range(n)])
    return pos.reshape(n // groups, -1)


def check_int(fn, name, value, minimum=1):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{fn}: `{name}` must be an int >= {minimum}, got {value!r}.")


def tile_schedule(
    strategy="ring",
    *,
    seq_len,
    num_shards,
    layout,
    causal=False,
    local_window_size=None,
    block_q=512,
    block_k=512,
    kv_len=None,
):
    """The `Schedule` of `strategy` ("ring", "allgather" or "ulysses") over `num_shards` devices
    for a sequence in `layout` order: which tiles each device computes at each step."""
    fn = "tile_schedule"
    if strategy not in STRATEGIES:
        raise ValueError(f"{fn}: `strategy` must be one of {STRATEGIES}, got {strategy!r}.")
    kv_len = seq_len if kv_len is None else kv_len
    for name, x in (("seq_len", seq_len), ("kv_len", kv_len), ("num_shards", num_shards)):
        check_int(fn, name, x)
    inputs.check_blocks(fn, block_q, block_k)
    spec = mask_spec(fn, causal, local_window_size)
    layouts.check_layout(fn, layout, seq_len, num_shards, "`seq_len`")
    layouts.check_layout(fn, layout, kv_len, num_shards, "`kv_len`")
    return _schedule(strategy, layout, num_shards, seq_len, kv_len, block_q, block_k, spec)


@functools.lru_cache(maxsize=64)
def _schedule(strategy, layout, n, seq_len, kv_len, block_q, block_k, spec):
    qpos = shard_positions(layout, seq_len, n, n if strategy == "ulysses" else 1)
    kpos = shard_positions(layout, kv_len, n, 1 if strategy == "ring" else n)
    bq, bk = min(block_q, qpos.shape[1]), min(block_k, kpos.shape[1])
    st, shard = states(spec, qpos, kpos, bq, bk)
    work = visible_pairs(spec, qpos, kpos, bq, bk)

    def tiles(r, j):
        if shard[r, j] == SKIP:
            return ()
        idx = np.argwhere(st[r, :, j] != SKIP)
        return tuple(
            Tile(i, b, int(st[r, i, j, b]), int(work[r, i, j, b])) for i, b in idx.tolist()
        )

    if strategy == "ring":
        plan = ring.plan_ring(spec, layout, n, seq_len // n, kv_len // n)
        steps = tuple((plan.first + i) % n for i in range(plan.steps))
        rows = tuple(tuple(tiles(r, (r - s) % n) for r in range(n)) for s in steps)
    else:  # one step; ulysses: every device the same (whole-sequence) tiles
        row = (tiles(0, 0),) * n if strategy == "ulysses" else tuple(tiles(r, 0) for r in range(n))
        rows, steps = (row,), (0,)
    frac = 1.0 / n if strategy == "ulysses" else 1.0
    return Schedule(strategy, layout, n, seq_len, kv_len, bq, bk, spec, steps, rows, frac)


def format_schedule(sched: Schedule, cell="both") -> str:
    """A step x device grid as text: per cell the tiles computed ("tiles"), the work as a
    percentage of the busiest cell ("work"), or both; "." where a device computes nothing."""
    if cell not in ("tiles", "work", "both"):
        raise ValueError(f"format_schedule: `cell` must be tiles, work or both, got {cell!r}.")
    work, n = sched.work, sched.num_shards
    top = work.max() or 1.0
    window = sched.spec.window
    mask = (["causal"] if sched.spec.causal else []) + ([f"window {window}"] if window else [])
    title = (
        f"{sched.strategy}, {sched.layout} layout, {n} devices, T={sched.seq_len} "
        f"S={sched.kv_len}, blocks {sched.block_q}x{sched.block_k}, {', '.join(mask) or 'no mask'}"
    )

    def fmt(i, r):
        t = len(sched.tiles[i][r])
        if not t:
            return "."
        pct = f"{100 * work[i, r] / top:.0f}%"
        return {"tiles": f"{t}t", "work": pct, "both": f"{t}t {pct}"}[cell]

    grid = [[fmt(i, r) for r in range(n)] for i in range(len(sched.steps))]
    width = max(5, *(len(c) for row in grid for c in row))
    head = "step | " + " ".join(f"d{r}".rjust(width) for r in range(n))
    lines = [title, head, "-" * len(head)]
    lines += [
        f"{s:>4} | " + " ".join(c.rjust(width) for c in row)
        for s, row in zip(sched.steps, grid, strict=True)
    ]
    lines.append(
        f"balance efficiency {sched.balance_efficiency:.3f} (visible pairs), "
        f"compute efficiency {sched.compute_efficiency:.3f} (tile area)"
    )
    return "\n".join(lines)
