"""Deprecated: a run directory's config and parameters moved to ringattn/run/ (directory.py,
fields.py, params.py), below the training loop, so that evals/ and hf/ read runs without it."""

from ringattn import deprecation

__getattr__ = deprecation.moved(
    __name__,
    {
        "load_config": "ringattn.run.directory",
        "with_overrides": "ringattn.run.directory",
        "restore_params": "ringattn.run.params",
        "merge_model": "ringattn.run.fields",
    },
)
