"""Decode throughput with the sequence-sharded KV cache on n devices against one device, and
what an int8 cache saves and costs.

  python experiments/decode_benchmark.py --cache_lens=4096,32768 --num_devices=1,8
  python experiments/decode_benchmark.py --workdir=/tmp/passkey --out=/tmp/decode.json
  python experiments/decode_benchmark.py --prefill_only --prefill_chunks=128,1024,8192 \
      --prefill_caches=8192,32768,131072 --out=/tmp/prefill.json
  python experiments/decode_benchmark.py --prefill_only --num_cpu_devices=256 \
      --prefill_dry_run_cache=1048576 --prefill_dry_run_devices=8,32,128,256

Chunked prefill (--prefill_chunks / --prefill_caches, ringattn/bench/prefill.py): one
attention layer, a chunk against a cache already holding tokens on --prefill_devices devices,
pass_kv / pass_q / decode side by side (chunk tokens/s, compiled temporaries per device), the
measured winner and the cost model's choice with constants measured on this machine. The dry
run compiles (never runs) a chunk step against a --prefill_dry_run_cache-token cache (Llama-3-8B
layer: 32 heads, 8 KV heads, head dim 128, bf16) and reports the memory per device. With
--workdir and --prefill_check_text, a real model's next-token distribution after a long prompt
prefilled in chunks against the one of the whole prompt:

  python experiments/decode_benchmark.py --prefill_only --workdir=RUN \
      --prefill_check_text=$(python -c "import typing; print(typing.__file__)")

One device: the cache whole on it, plain decode attention. n devices: ring-attention prefill,
then the cache sharded along the sequence over all n; each step attends the new token to every
shard and merges the n partial results through lse (only [B, 1, H, D] values move). Without
--workdir the model is --config's (configs/default.py) with random parameters (throughput does
not depend on the weights). Cache dtypes: the bytes of the caches, and the error of
teacher-forced decode logits against a float32 cache.
"""

import json

from absl import app, flags

from ringattn import cli

_CONFIG = cli.config("The model to measure at random parameters when there is no --workdir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (default: random parameters).")
_CACHE_LENS = flags.DEFINE_list("cache_lens", ["4096", "32768"], "Cache lengths (tokens).")
_NUM_DEVICES = flags.DEFINE_list("num_devices", ["1", "8"], "Device counts.")
_BATCH = flags.DEFINE_integer("batch", 1, "Rows decoded together.")
_STEPS = flags.DEFINE_integer("steps", 64, "Timed decode steps.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs; the best is reported.")
_DTYPE_LEN = flags.DEFINE_integer(
    "dtype_cache_len", 1024, "Cache length of the cache dtype comparison (0 skips it)."
)
_OUT = flags.DEFINE_string("out", None, "Write the results here as JSON.")
_PREFILL_ONLY = flags.DEFINE_bool("prefill_only", False, "Skip the decode measurements.")
_P_CHUNKS = flags.DEFINE_list("prefill_chunks", [], "Chunk lengths of the chunked prefill.")
_P_CACHES = flags.DEFINE_list("prefill_caches", [], "Tokens cached before the chunk.")
_P_DEVICES = flags.DEFINE_integer("prefill_devices", 8, "Devices of the chunked prefill.")
_P_CALIBRATION = flags.DEFINE_integer(
    "prefill_calibration",
    2048,
    "Chunk length of the run that measures this machine's constants for the cost model (0: its "
    "default constants).",
)
_P_DRY_CACHE = flags.DEFINE_integer("prefill_dry_run_cache", 0, "Dry-run cache tokens (0: none).")
_P_DRY_DEVICES = flags.DEFINE_list("prefill_dry_run_devices", ["8"], "Dry-run device counts.")
_P_DRY_CHUNK = flags.DEFINE_integer("prefill_dry_run_chunk", 8192, "Dry-run chunk length.")
_P_CHECK_TEXT = flags.DEFINE_string(
    "prefill_check_text", None, "With --workdir: a text file whose first tokens make the prompt."
)
_P_CHECK_TOKENS = flags.DEFINE_integer("prefill_check_tokens", 4096, "Prompt tokens.")
_P_CHECK_CHUNK = flags.DEFINE_integer("prefill_check_chunk", 1024, "Chunk of the chunked prefill.")
_P_CHECK_STRATEGIES = flags.DEFINE_list(
    "prefill_check_strategies", ["pass_kv", "pass_q"], "Strategies of the chunked prefill."
)
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES)  # before anything starts JAX's backend
    from ringattn.bench import decode, prefill

    if _P_CHECK_TEXT.value and not _WORKDIR.value:
        raise app.UsageError("--prefill_check_text needs --workdir (a run with a tokenizer).")
    results = prefill.sweep(
        _P_DEVICES.value,
        [int(x) for x in _P_CACHES.value],
        [int(x) for x in _P_CHUNKS.value],
        _P_CALIBRATION.value,
        _P_DRY_CACHE.value,
        [int(x) for x in _P_DRY_DEVICES.value],
        _P_DRY_CHUNK.value,
    )
    if _P_CHECK_TEXT.value:
        results["prefill_check"] = prefill.check_run(
            _WORKDIR.value, _P_CHECK_TEXT.value, _P_CHECK_TOKENS.value, _P_CHECK_CHUNK.value,
            _P_CHECK_STRATEGIES.value,
        )  # fmt: skip
    if not _PREFILL_ONLY.value:
        model_cfg, params = decode.model_and_params(_WORKDIR.value, _CONFIG.value)
        rows = []
        for cache_len in map(int, _CACHE_LENS.value):
            for n in map(int, _NUM_DEVICES.value):
                rows.append(
                    decode.decode_throughput(
                        model_cfg, params, n, cache_len, _BATCH.value, _STEPS.value, _REPEATS.value
                    )
                )
                print(json.dumps(rows[-1]), flush=True)
        dtypes = []
        if _DTYPE_LEN.value:
            dtypes = decode.cache_dtype_errors(model_cfg, params, cache_len=_DTYPE_LEN.value)
        for r in dtypes:
            print(json.dumps(r), flush=True)
        print(decode.markdown(rows, dtypes))
        results = {"throughput": rows, "cache_dtypes": dtypes, **results}
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
