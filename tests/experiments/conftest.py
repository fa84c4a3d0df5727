"""What the experiments/ tests share: running a script's main in this process."""

import contextlib
import importlib.util
import io
import os

import pytest
from absl import flags

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


def _run_script(name, *args):
    """experiments/<name>.py's main with these flags, in this process; returns its stdout.
    Its flags are removed afterwards, so scripts defining the same flag names can follow."""
    before = set(flags.FLAGS)
    spec = importlib.util.spec_from_file_location(
        f"exp_{name}", os.path.join(EXPERIMENTS, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
        flags.FLAGS([name, *args])
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            module.main([])
        return out.getvalue()
    finally:
        for flag in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, flag)


@pytest.fixture(scope="session")
def run_script():
    """_run_script: experiments/<name>.py's main(flags) in this process -> its stdout."""
    return _run_script
