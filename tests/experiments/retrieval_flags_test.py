"""generate and needle with --cache=retrieval on a tiny untrained run (8 devices, ring prefill):
the prompt streamed through the cache, the rows naming the cache and what it reads; --plot."""

import json
import os

import pytest

from configs import default
from ringattn.train import trainer

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    config = default.get_config("test")  # 1 layer, d 32, ring / zigzag over 8 devices
    config.num_train_steps = 0  # init, save checkpoint 0 and config.json
    workdir = str(tmp_path_factory.mktemp("passkey"))
    trainer.train_and_evaluate(config, workdir)
    return workdir


RETRIEVAL = ["--cache=retrieval", "--num_sinks=4", "--window=28", "--page_size=8", "--top_pages=2"]


def test_generate_with_a_retrieval_cache(run_dir, run_script):
    out = run_script(
        "generate", f"--workdir={run_dir}", "--prompt=" + "The pass key is 12345. " * 4,
        "--max_new_tokens=3", "--prefill_chunk=32", *RETRIEVAL,
    )  # fmt: skip
    assert "| cache retrieval over 8 device(s)" in out


def test_needle_with_a_retrieval_cache(run_dir, tmp_path, run_script):
    out = tmp_path / "retrieval"
    args = [f"--workdir={run_dir}", "--lengths=128", "--depths=0,1", "--num_samples=1"]
    run_script("needle", *args, f"--out={out}", "--prefill_chunk=32", *RETRIEVAL)
    rows = json.loads((out / "needle.json").read_text())
    assert [(r["cache"], r["length"], r["tokens_attended"]) for r in rows] == [
        ("retrieval", 128, 4 + 28 + 2 * 8)
    ] * 2
    full = json.loads((out / "needle.json").read_text())
    for r in full:
        r["cache"] = "full"
    (tmp_path / "full.json").write_text(json.dumps(full))
    run_script(
        "needle", f"--plot={out / 'needle.json'},{tmp_path / 'full.json'}", f"--out={tmp_path}"
    )
    assert (tmp_path / "needle.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="`prefill_chunk`"):
        run_script("needle", *args, f"--out={out}", "--prefill_chunk=64", *RETRIEVAL)


def test_retrieval_benchmark_script(tmp_path, run_script):
    """At random parameters, 256 cached tokens: every kind decodes; the retrieval step reads
    less of the caches than the full one, and its store holds as many tokens."""
    run_script(
        "retrieval_benchmark",
        f"--config={os.path.join(EXPERIMENTS, '..', 'configs', 'default.py')}:test",
        "--lengths=256", "--steps=2", "--rounds=1", "--window=12", "--page_size=8",
        "--top_pages=2", "--host", f"--out={tmp_path}",
    )  # fmt: skip
    rows = {r["cache"]: r for r in json.loads((tmp_path / "retrieval_benchmark.json").read_text())}
    assert set(rows) == {"full", "sink_window", "retrieval", "retrieval_host"}
    assert rows["retrieval"]["tokens_attended"] == rows["sink_window"]["tokens_attended"] == 32
    assert all(r["ms_per_token"] > 0 for r in rows.values())
    assert rows["retrieval"]["bytes_vs_full"] < 0.5
    assert rows["retrieval"]["cache_bytes"] > rows["full"]["cache_bytes"]  # every token + bounds
