"""Deprecated: moved to `ringattn.bench.prefill` (this path is removed in ringattn 0.3)."""

from ringattn import deprecation

__getattr__ = deprecation.moved(
    __name__,
    {
        name: "ringattn.bench.prefill"
        for name in (
            "Shape",
            "filled_cache",
            "chunk",
            "measure",
            "estimates",
            "calibrate",
            "dry_run",
            "markdown",
            "chunked_vs_whole",
        )
    },
)
