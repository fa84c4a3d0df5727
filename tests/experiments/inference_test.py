"""The inference experiments end to end on tiny untrained runs (the trainer with 0 steps writes
the config and a checkpoint): generate, needle, streaming, decode_benchmark, each script's main
run in this process; and what their results must satisfy whatever the weights."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from configs import default
from configs import streaming as streaming_config
from ringattn.evals import needle
from ringattn.nn.config import ModelConfig
from ringattn.train import trainer

EXPERIMENTS = os.path.join(os.path.dirname(__file__), "..", "..", "experiments")


def untrained_run(config, workdir):
    config.num_train_steps = 0  # init, save checkpoint 0 and config.json
    trainer.train_and_evaluate(config, str(workdir))
    return str(workdir)


@pytest.fixture(scope="module")
def passkey_run(tmp_path_factory):
    c = default.get_config("test")  # 1 layer, d 32, ring / zigzag over 8 devices, 128 tokens
    return untrained_run(c, tmp_path_factory.mktemp("passkey"))


def test_generate_script(passkey_run, run_script):
    out = run_script(
        "generate", f"--workdir={passkey_run}", "--prompt=The pass key is", "--max_new_tokens=3"
    )
    assert out.startswith("The pass key is")
    assert "checkpoint 0 | 15 prompt tokens | cache full over 8 device(s)" in out
    assert "tokens/s" in out


@pytest.mark.slow
def test_needle_script(passkey_run, tmp_path, run_script):
    run_script(
        "needle",
        f"--workdir={passkey_run}",
        f"--out={tmp_path}",
        "--lengths=128,256",
        "--depths=0,0.5,1",
        "--rope_scaling=yarn",
        "--num_samples=2",
    )
    rows = json.loads((tmp_path / "needle.json").read_text())
    assert [(r["rope_scaling"], r["length"], r["depth"]) for r in rows] == [
        ("yarn", n, d) for n in (128, 256) for d in (0.0, 0.5, 1.0)
    ]
    assert all(r["accuracy"] in (0.0, 0.5, 1.0) and r["num_samples"] == 2 for r in rows)
    assert (tmp_path / "needle.png").stat().st_size > 1000


def test_streaming_config_parses():
    for variant in ("", "learned_sinks", "test"):
        c = streaming_config.get_config(variant)
        cfg = ModelConfig.from_config(c.model)
        assert c.task == "text" and cfg.attention.impl == "dense"
        assert trainer.curriculum(c) == ((0, c.seq_len),)
        assert c.task_params.bos and cfg.attention.sinks == (variant == "learned_sinks")
    with pytest.raises(ValueError, match="unknown variant"):
        streaming_config.get_config("huge")


def test_rope_scaling_factor():
    model_cfg = ModelConfig.from_config(default.get_config("test").model)
    scaled = needle.with_rope_scaling(model_cfg, "yarn", 512, 128)
    assert (scaled.rope.scaling, scaled.rope.factor, scaled.rope.original_len) == ("yarn", 4.0, 128)
    assert needle.with_rope_scaling(model_cfg, "none", 512, 128).rope.factor == 1.0
    # A context-extended run (llama3, factor 4 over 256, trained at 1024): its own RoPE at 1024,
    # factor 8 over 256 at 2048 (it used to be stretched from 1024, its scaling replaced).
    rope = dataclasses.replace(model_cfg.rope, scaling="llama3", factor=4.0, original_len=256)
    extended = dataclasses.replace(model_cfg, rope=rope)
    assert needle.with_rope_scaling(extended, "llama3", 1024, 1024).rope == rope
    far = needle.with_rope_scaling(extended, "llama3", 2048, 1024).rope
    assert (far.scaling, far.factor, far.original_len) == ("llama3", 8.0, 256)
    assert needle.with_rope_scaling(extended, "none", 2048, 1024).rope == rope


@pytest.fixture(scope="module")
def learned_sinks_run(tmp_path_factory):
    c = streaming_config.get_config("test")  # 1 layer, BOS documents
    c.model.attention.sinks = True
    return untrained_run(c, tmp_path_factory.mktemp("learned_sinks"))


@pytest.mark.slow
def test_streaming_script(passkey_run, learned_sinks_run, tmp_path, run_script):
    """One layer: the window-only cache is exactly the sliding window recomputed (cached K/V of
    one layer do not depend on the context), learned sinks included; sinks change the result."""
    run_script(
        "streaming",
        f"--workdir={passkey_run}",
        f"--sinks_run={learned_sinks_run}",
        f"--out={tmp_path}",
        "--cache_len=16",
        "--num_sinks=2",
        "--stream_multiple=4",
        "--num_streams=2",
        "--bin_size=16",
    )
    result = json.loads((tmp_path / "streaming.json").read_text())
    methods = result["methods"]
    keys = ["dense", "window", "sink_window", "recompute"]
    keys += ["learned_sinks_window", "learned_sinks_recompute"]
    assert list(methods) == list(result["summary"]) == keys
    assert len(methods["recompute"]["perplexity"]) == 63 // 16
    for window, recompute in [("window", "recompute"), keys[4:]]:
        np.testing.assert_allclose(
            methods[window]["perplexity"], methods[recompute]["perplexity"], rtol=1e-4
        )
    sink, window = methods["sink_window"], methods["window"]
    assert sink["perplexity"][0] == pytest.approx(window["perplexity"][0], rel=1e-4)
    assert sink["perplexity_after_cache_full"] != pytest.approx(
        window["perplexity_after_cache_full"], rel=1e-6
    )
    assert set(result["ratios"]) == {
        "window_over_sink_window", "sink_window_over_recompute", "dense_over_recompute",
        "learned_sinks_window_over_recompute",
    }  # fmt: skip
    model, learned = result["attention"]["model"], result["attention"]["learned_sinks"]
    assert np.shape(model["first_tokens"]) == (1, 4) and model["sink_logit"] is None
    assert np.shape(learned["sink_logit"]) == (1, 2)
    assert 0 < np.sum(learned["first_tokens"]) and 0 < np.min(learned["sink_logit"]) < 1
    for name in ("streaming.png", "attention_sinks.png"):
        assert (tmp_path / name).stat().st_size > 1000


@pytest.mark.slow
def test_decode_benchmark_script(tmp_path, run_script):
    out_path = tmp_path / "decode.json"
    run_script(
        "decode_benchmark",
        f"--config={os.path.join(EXPERIMENTS, '..', 'configs', 'default.py')}:test",
        "--cache_lens=64",
        "--num_devices=1,4",
        "--steps=4",
        "--repeats=1",
        "--dtype_cache_len=64",
        f"--out={out_path}",
    )
    result = json.loads(out_path.read_text())
    assert [r["devices"] for r in result["throughput"]] == [1, 4]
    assert all(r["decode_tokens_per_s"] > 0 for r in result["throughput"])
    one, four = result["throughput"]
    assert four["cache_mib_per_device"] == pytest.approx(one["cache_mib_per_device"] / 4)
    by = {r["cache"]: r for r in result["cache_dtypes"]}
    assert by["float32"]["max_abs_logit_err"] == 0
    # Per token and layer: int8 K/V (2 K D bytes) + float32 scales (2 K 4) + its int32 position,
    # against bf16's 2 K D 2 + 4: 0.76 at the test model's D = 8, 0.52 at D = 128.
    k, d = 2, 8
    assert by["int8"]["bytes_vs_bf16"] == pytest.approx((2 * k * d + 8 * k + 4) / (4 * k * d + 4))
    assert by["int8"]["rel_logit_err"] < 2e-2
    assert jax.device_count() == 8


def test_decode_benchmark_chunked_prefill(tmp_path, run_script):
    """--prefill_only: a row per (cache, chunk) with all three strategies timed, the winner and
    the model's choice; the dry run's cache per device is the cache's bytes over the devices."""
    out_path = tmp_path / "prefill.json"
    run_script(
        "decode_benchmark",
        "--prefill_only",
        "--prefill_chunks=32",
        "--prefill_caches=96",
        "--prefill_calibration=0",
        "--prefill_dry_run_cache=1024",
        "--prefill_dry_run_devices=4",
        "--prefill_dry_run_chunk=64",
        f"--out={out_path}",
    )
    result = json.loads(out_path.read_text())
    (row,) = result["prefill"]
    assert (row["chunk"], row["cached"], row["devices"]) == (32, 96, 8)
    times = {s: row[f"{s}_s"] for s in ("pass_kv", "pass_q", "decode")}
    assert min(times.values()) > 0 and row["winner"] == min(times, key=times.get)
    assert row["model_agrees"] == (row["model_choice"] == row["winner"])
    assert row["choice_vs_best"] == times[row["model_choice"]] / times[row["winner"]] >= 1
    (four,) = result["prefill_dry_run"]
    # 1024 tokens x (K + V: 2 x 8 heads x 128 x 2 bytes + int32 position) over the devices
    assert four["cache_mib_per_device"] == pytest.approx(1024 * (2 * 8 * 128 * 2 + 4) / 4 / 2**20)
    assert all(four[f"{s}_temp_mib"] > 0 for s in times)


def test_natural_language_passkey_prompt():
    """The pretrained models' prompt: at most `length` tokens, the needle after `depth` of the
    filler sentences, the key's digits right after "The pass key is"."""
    from ringattn.hf.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    for depth in (0.0, 0.5, 1.0):
        ids, key = needle.text_prompt(tok, np.random.default_rng(3), 1000, depth)
        text = tok.decode(ids)
        assert 1000 - len(needle.FILLER) < len(ids) <= 1000 and len(key) == 5
        assert text.startswith(needle.INTRO) and text.endswith(needle.QUESTION)
        before, after = text.split(needle.NEEDLE.format(key=key))
        n_before, n_after = before.count(needle.FILLER), after.count(needle.FILLER)
        assert n_before == round(depth * (n_before + n_after))
    cases = needle.prompts(1000, 0.25, 2, tokenizer=tok)
    assert cases[0][1] != cases[1][1]
    with pytest.raises(ValueError, match="no room"):
        needle.text_prompt(tok, np.random.default_rng(0), 200, 0.5)
