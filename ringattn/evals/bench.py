"""Deprecated: moved to `ringattn.bench.decode` (this path is removed in ringattn 0.3)."""

from ringattn import deprecation

__getattr__ = deprecation.moved(
    __name__,
    {
        name: "ringattn.bench.decode"
        for name in (
            "model_and_params",
            "random_params",
            "on_devices",
            "decode_throughput",
            "cache_dtype_errors",
            "markdown",
        )
    },
)
