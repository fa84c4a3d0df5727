"""Partial attention results over disjoint key sets, merged across devices with one collective.

Device r holds (out_r, lse_r) of the same queries over its own keys. The exact result is

    lse = log sum_r exp(lse_r),    out = sum_r out_r * exp(lse_r - lse)

(DESIGN 3). Each device sends its partials once and merges what it receives locally
(`merge_stacked`): out and lse travel as one array (lse as one more column of out), so a merge
is one collective, however many terms the formula has.

  merge_partials   every device keeps every row (a decode step): one all-gather.
  merge_own_rows   device r keeps only its own queries' rows (the decode strategy of chunked
                   prefill, where every device attended every device's queries): one
                   all-to-all, the bytes of a reduce-scatter.

Rows no device sees (every lse_r at LSE_NONE) stay 0 with lse = LSE_NONE: the max term is
exp(0) = 1 on every device, so nothing is divided by 0 and no inf is formed.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax


def _pack(out_BtHD, lse_BHt):
    """[B, t, H, D + 1]: lse as the last column of out (both the accumulator's dtype)."""
    lse_BtH1 = jnp.moveaxis(lse_BHt, 2, 1)[..., None].astype(out_BtHD.dtype)
    return jnp.concatenate([out_BtHD, lse_BtH1], axis=-1)


def _unpack(packed_NBtHD):
    """(out [N, B, t, H, D], lse [N, B, H, t]) of `_pack`ed partials stacked along N."""
    return packed_NBtHD[..., :-1], jnp.moveaxis(packed_NBtHD[..., -1], 3, 2)


def merge_stacked(out_NBtHD, lse_NBHt):
    """The exact merge of N partial results stacked along axis 0: (out [B, t, H, D], lse
    [B, H, t]). Local: no collective."""
    m_BHt = jnp.max(lse_NBHt, axis=0)
    w_NBHt = jnp.exp(lse_NBHt - m_BHt)  # <= 1, and 1 for the max term
    total_BHt = jnp.sum(w_NBHt, axis=0)  # >= 1
    lse_BHt = m_BHt + jnp.log(total_BHt)
    w_NBtH1 = jnp.moveaxis(w_NBHt / total_BHt, 3, 2)[..., None]
    return jnp.sum(out_NBtHD * w_NBtH1, axis=0), lse_BHt


def merge_partials(out_BtHD, lse_BHt, axis_name):
    """The exact merge over `axis_name` of every device's partials of the same queries, the
    result on every device (invariant over the axis): one all-gather of [B, t, H, D + 1]."""
    packed = lax.all_gather(_pack(out_BtHD, lse_BHt), axis_name, to="invarying")
    return merge_stacked(*_unpack(packed))


def merge_own_rows(out_BTHD, lse_BHT, axis_name):
    """Device r's rows [r t, (r + 1) t) of the exact merge over `axis_name` of every device's
    partials of all n t queries: (out [B, t, H, D], lse [B, H, t]). One all-to-all: row block j
    goes to device j, which merges the n blocks it receives."""
    n = lax.axis_size(axis_name)
    b, nt, h, d = out_BTHD.shape
    packed = _pack(out_BTHD, lse_BHT).reshape(b, n, nt // n, h, d + 1)
    # After the exchange axis 1 counts the sending device: every partial of this device's rows.
    packed = lax.all_to_all(packed, axis_name, split_axis=1, concat_axis=1, tiled=True)
    return merge_stacked(*_unpack(jnp.moveaxis(packed, 1, 0)))


def gather_packed(arrays, axis_name, axis=1):
    """`lax.all_gather(x, axis_name, axis=axis, tiled=True)` of every array of `arrays` (any
    dtypes, equal shapes up to `axis` inclusive), as one collective: their bytes travel
    together, each array is then rebuilt bit for bit."""
    lead = arrays[0].shape[: axis + 1]
    if any(x.shape[: axis + 1] != lead for x in arrays):
        raise ValueError(
            f"gather_packed: the arrays must share their leading dims {lead}, got "
            f"{[x.shape for x in arrays]}."
        )
    parts, layouts = [], []
    for x in arrays:
        tail = x.shape[axis + 1 :]
        flat = x.reshape(*lead, -1)
        bytes_ = flat if x.dtype == jnp.uint8 else lax.bitcast_convert_type(flat, jnp.uint8)
        bytes_ = bytes_.reshape(*lead, -1)
        parts.append(bytes_)
        layouts.append((x.dtype, tail, bytes_.shape[-1]))
    gathered = lax.all_gather(jnp.concatenate(parts, -1), axis_name, axis=axis, tiled=True)
    out, start = [], 0
    for dtype, tail, size in layouts:
        chunk = gathered[..., start : start + size]
        start += size
        width = np.dtype(dtype).itemsize
        if dtype != jnp.uint8:
            chunk = lax.bitcast_convert_type(chunk.reshape(*chunk.shape[:-1], -1, width), dtype)
        out.append(chunk.reshape(*gathered.shape[: axis + 1], *tail))
    return out
