"""Fused single-device attention kernels behind the (out, lse) interface of blockwise.py."""
