"""The README's and the guides' Python examples run as written (with float64 off too, as users
run them), and the documentation points nowhere outside the repository."""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _examples(path):
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.slow  # 8192-token examples: ~20 s each on 2 cores
@pytest.mark.x64_off
@pytest.mark.parametrize(
    "path", [REPO / "README.md", REPO / "docs" / "api.md"], ids=lambda p: p.name
)
def test_examples_run(path):
    examples = _examples(path)
    assert examples, f"{path.name} has no Python example"
    for code in examples:
        # jax_num_cpu_devices is set by the tests' conftest already; the rest runs as written.
        code = code.replace('jax.config.update("jax_num_cpu_devices", 8)', "")
        exec(compile(code, str(path), "exec"), {"__name__": "example"})


def test_no_placeholders_or_outside_paths():
    for path in [*DOCS, *sorted((REPO / "notebooks").glob("*.ipynb"))]:
        text = path.read_text()
        for bad in ("YOUR_ORG", "../shared", "/work/", "/root/"):
            assert bad not in text, f"{path.relative_to(REPO)} contains {bad!r}"
