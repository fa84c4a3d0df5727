"""Deprecated: moved to `ringattn.bench.hf` (this path is removed in ringattn 0.3)."""

from ringattn import deprecation

__getattr__ = deprecation.moved(
    __name__,
    {name: "ringattn.bench.hf" for name in ("hf_throughput",)},
)
