"""GGUF (llama.cpp) tensor data -> float32 numpy, block by block.

A quantised GGUF tensor is a run of fixed-size blocks along its innermost (row) dimension, each
block a few float16 scales followed by packed integers. We decode the plain types and llama.cpp's
"legacy" block formats ourselves (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1; 32 values per
block, layouts from ggml's block_q* structs); the K-quants (256-value super-blocks with 6-bit
sub-block scales: Q2_K ... Q6_K) are decoded by the `gguf` package, llama.cpp's own Python
reader. Anything else is refused by name.
"""

from __future__ import annotations

import numpy as np

BLOCK = 32  # values per block of the legacy formats
# type name -> bytes per block of 32 values (the legacy formats).
LEGACY = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24}
PLAIN = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}
K_QUANTS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED = (*PLAIN, *LEGACY, *K_QUANTS)


def _f16(blocks, start):
    """The float16 at byte `start` of every block, as float32 [N, 1]."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs):
    """[N, 16] bytes -> [N, 32] 4-bit values: low nibbles are values 0..15, high ones 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _high_bits(qh):
    """[N, 4] bytes (a little-endian uint32) -> [N, 32] fifth bits: bit j belongs to value j."""
    bits = qh.copy().view("<u4")
    return ((bits >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def _legacy(blocks, kind):
    """Decode [N, bytes] blocks of a legacy type to [N, 32] float32."""
    d = _f16(blocks, 0)
    if kind == "Q8_0":
        return d * blocks[:, 2:].copy().view(np.int8).astype(np.float32)
    if kind == "Q4_0":
        return d * (_nibbles(blocks[:, 2:]).astype(np.float32) - 8)
    if kind == "Q4_1":
        return d * _nibbles(blocks[:, 4:]).astype(np.float32) + _f16(blocks, 2)
    if kind == "Q5_0":
        q = _nibbles(blocks[:, 6:]) | (_high_bits(blocks[:, 2:6]) << 4)
        return d * (q.astype(np.float32) - 16)
    q = _nibbles(blocks[:, 8:]) | (_high_bits(blocks[:, 4:8]) << 4)  # Q5_1
    return d * q.astype(np.float32) + _f16(blocks, 2)


def dequantize(data, kind, shape):
    """float32 array of `shape` (numpy order: the GGUF dims reversed, rows last) from the raw
    tensor `data` (the reader's array: typed values for plain types, uint8 bytes otherwise) of
    GGML type name `kind`."""
    data = np.asarray(data)
    if kind in PLAIN:
        x = data.reshape(-1).view(PLAIN[kind])
        if kind == "BF16":  # the upper half of a float32
            x = (x.astype(np.uint32) << 16).view(np.float32)
        return x.astype(np.float32).reshape(shape)
    if kind in LEGACY:
        if shape[-1] % BLOCK:
            raise ValueError(f"dequantize: a {kind} tensor's rows must be whole blocks: {shape}.")
        blocks = data.reshape(-1, LEGACY[kind])
        return _legacy(blocks, kind).reshape(shape)
    if kind in K_QUANTS:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        return gguf_dequantize(data, GGMLQuantizationType[kind]).astype(np.float32).reshape(shape)
    raise ValueError(
        f"dequantize: GGML tensor type {kind} is not supported; supported: {', '.join(SUPPORTED)}."
    )
