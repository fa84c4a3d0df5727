"""experiments/benchmark.py end to end at a tiny size, in this process: the printed table's
columns, one row per impl x mask x mode, every row timed and its FLOPs the visible pairs'."""

import json

from ringattn.bench import flops

COLUMNS = (
    "     impl   mask   mode         T dev    time ms  GFLOP/s %matmul temp MiB/dev args MiB/dev "
    "temp/q_shard compile s"
)


def test_benchmark_script(tmp_path, run_script):
    out = run_script(
        "benchmark",
        "--seq_lens=64",
        "--num_devices=2",
        "--impls=dense,blockwise,ring/zigzag",
        "--mask=causal,window",
        "--window=16",
        "--block_q=16",
        "--block_k=16",
        "--warmup=0",
        "--iters=1",
        "--matmul_size=0",
        f"--out={tmp_path / 'rows.jsonl'}",
        f"--markdown={tmp_path / 'rows.md'}",
    )
    lines = out.splitlines()
    assert lines[1] == "B=1 H=8 K=8 D=64 float32 mask=causal,window window=16 block_q=16 " + (
        "block_k=16 warmup=0 iters=1"
    )
    assert COLUMNS in lines
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    keys = [(r["impl"], r["mask"], r["mode"], r["devices"]) for r in rows]
    assert keys == [
        (impl, mask, mode, 2 if impl == "ring/zigzag" else 1)
        for impl in ("dense", "blockwise", "ring/zigzag")
        for mask in ("causal", "window")
        for mode in ("fwd", "fwdbwd")
    ]
    for r in rows:
        reach = flops.mask_reach(r["mask"], 16)
        pairs = flops.visible_pairs(64, *reach)
        assert r["flops"] == pairs * 8 * 64 * (4 if r["mode"] == "fwd" else 14)
        assert r["time_s"] > 0 and r["temp_bytes"] > 0 and "error" not in r
    table = (tmp_path / "rows.md").read_text().splitlines()
    assert len(table) == 4 + len(rows)
    assert "ratios of time to dense (< 1: better than dense):" in lines
    assert "ratios of time to mask causal (is masked work really skipped?):" in lines
