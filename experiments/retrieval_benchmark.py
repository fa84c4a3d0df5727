"""Decode with a retrieval cache against a full cache and a sink + window cache on one device:
the bytes of the caches a step reads (from the compiled program), the time per decoded token
and the memory held, after 8K and 32K cached tokens.

  python experiments/retrieval_benchmark.py --workdir=~/.cache/ringattn/smollm2/run \\
      --lengths=8192,32768 --out=DIR

sink + window and retrieval attend to the same number of tokens per step (--num_sinks + --window
+ --top_pages x --page_size = 1024 by default); the full cache to all of them. The caches are
filled with random K/V (a step's cost does not depend on the values: ringattn/bench/retrieval.py).
--host adds the retrieval cache with its pages in host memory. Without --workdir the model is
--config's with random parameters. Writes DIR/retrieval_benchmark.json and .md.
"""

import json
import os

from absl import app, flags

from ringattn import cli

_CONFIG = cli.config("The model to measure at random parameters when there is no --workdir.")
_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run (default: random parameters).")
_LENGTHS = flags.DEFINE_list("lengths", ["8192", "32768"], "Cached tokens before decoding.")
_STEPS = flags.DEFINE_integer("steps", 8, "Decode steps per timed call.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed calls per cache (taking turns).")
_NUM_SINKS = flags.DEFINE_integer("num_sinks", 4, "Sinks of the bounded caches.")
_WINDOW = flags.DEFINE_integer("window", 252, "The retrieval cache's window.")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 64, "Tokens per page.")
_TOP_PAGES = flags.DEFINE_integer("top_pages", 12, "Pages attended per step.")
_DENSE = flags.DEFINE_integer("dense_layers", 0, "Retrieval: the lowest layers read every page.")
_HOST = flags.DEFINE_bool("host", False, "Also time the retrieval cache with host-memory pages.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES, _OUT)  # before anything starts JAX's backend
    import jax

    from ringattn.bench import decode
    from ringattn.bench import retrieval as bench
    from ringattn.evals import needle

    cfg, params = decode.model_and_params(_WORKDIR.value, _CONFIG.value)
    params = jax.device_put(params, jax.devices()[0])
    rows = []
    for length in map(int, _LENGTHS.value):
        held = length + (_ROUNDS.value + 1) * _STEPS.value
        specs = bench.specs(
            held,
            _NUM_SINKS.value,
            _WINDOW.value,
            _PAGE_SIZE.value,
            _TOP_PAGES.value,
            _HOST.value,
            _DENSE.value,
        )
        caches = {name: bench.filled(cfg, spec, length) for name, spec in specs.items()}
        memory = {name: bench.cache_bytes(c) for name, c in caches.items()}
        seconds = bench.decode_times(cfg, params, length, caches, _STEPS.value, _ROUNDS.value)
        for name, spec in specs.items():
            rows.append(
                dict(
                    cached_tokens=length,
                    cache=name,
                    tokens_attended=needle.tokens_attended(spec, length, cfg.num_layers),
                    cache_bytes=memory[name],
                    bytes_read_per_token=bench.bytes_per_token(cfg, spec, length),
                    ms_per_token=1e3 * seconds[name],
                    platform=jax.devices()[0].platform,
                )
            )
        full = next(r for r in rows if r["cached_tokens"] == length and r["cache"] == "full")
        for r in rows[-len(specs) :]:
            r["time_vs_full"] = r["ms_per_token"] / full["ms_per_token"]
            r["bytes_vs_full"] = r["bytes_read_per_token"] / full["bytes_read_per_token"]
            print(json.dumps(r), flush=True)
    lines = [
        "| cached tokens | cache | tokens/step | cache MiB | MiB read/token | vs full | "
        "ms/token | vs full |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['cached_tokens']} | {r['cache']} | {r['tokens_attended']} | "
            f"{r['cache_bytes'] / 2**20:.1f} | "
            f"{r['bytes_read_per_token'] / 2**20:.2f} | {r['bytes_vs_full']:.3f} | "
            f"{r['ms_per_token']:.1f} | {r['time_vs_full']:.3f} |"
        )
    print("\n".join(lines))
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "retrieval_benchmark.json"), "w") as f:
        json.dump(rows, f, indent=1)
    with open(os.path.join(_OUT.value, "retrieval_benchmark.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    app.run(main)
