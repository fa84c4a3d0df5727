"""Decode throughput with the sequence-sharded KV cache on n devices against one device, and
what an int8 cache saves and costs.

  python experiments/decode_benchmark.py --cache_lens=4096,32768 --num_devices=1,8
  python experiments/decode_benchmark.py --workdir=/tmp/passkey --out=/tmp/decode.json

One device: the cache whole on it, plain decode attention. n devices: ring-attention prefill,
then the cache sharded along the sequence over all n; each step attends the new token to every
shard and merges the n partial results through lse (only [B, 1, H, D] values move). Without
--workdir the model is --config's (configs/default.py) with random parameters (throughput does
not depend on the weights). Cache dtypes: the bytes of the caches, and the error of
teacher-forced decode logits against a float32 cache.
"""

import json
import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"),
    "The model to measure at random parameters when there is no --workdir.",
    lock_config=True,
)
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
_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 8, "Simulated devices on CPU.")


def main(argv):
    del argv
    from ringattn.mesh import start_entrypoint

    start_entrypoint(_CPU_DEVICES.value)  # before anything starts JAX's backend
    from ringattn.evals import bench

    model_cfg, params = bench.model_and_params(_WORKDIR.value, _CONFIG.value)
    rows = []
    for cache_len in map(int, _CACHE_LENS.value):
        for n in map(int, _NUM_DEVICES.value):
            rows.append(
                bench.decode_throughput(
                    model_cfg, params, n, cache_len, _BATCH.value, _STEPS.value, _REPEATS.value
                )
            )
            print(json.dumps(rows[-1]), flush=True)
    dtypes = []
    if _DTYPE_LEN.value:
        dtypes = bench.cache_dtype_errors(model_cfg, params, cache_len=_DTYPE_LEN.value)
    for r in dtypes:
        print(json.dumps(r), flush=True)
    print(bench.markdown(rows, dtypes))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump({"throughput": rows, "cache_dtypes": dtypes}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
