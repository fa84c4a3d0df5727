"""Deprecated: loading a run moved to ringattn/run/load.py (`load_run`, `Run`), beside the run
directory it reads (ringattn/run/directory.py: `load_config`, `with_overrides`)."""

from ringattn import deprecation

__getattr__ = deprecation.moved(
    __name__,
    {
        "Run": "ringattn.run.load",
        "load_run": "ringattn.run.load",
        "load_config": "ringattn.run.directory",
        "with_overrides": "ringattn.run.directory",
    },
)
