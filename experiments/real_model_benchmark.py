"""Prefill and decode speed of an imported model (SmolLM2-135M by default) against transformers
on the same machine and threads, side by side.

  python experiments/fetch_model.py
  python experiments/real_model_benchmark.py --out=experiments/results/real_model/throughput

For each prompt length (default 2048 and 8128 tokens, + 64 decode steps: 8192 fills the model's
context): ours on 1 device (blockwise prefill, the cache local) and on --num_devices (ring
prefill in the run's layout, the cache sharded along the sequence), then transformers (its
default attention and KV cache, float32, torch threads = CPU cores); then our sink + window cache
(4 + 1020) on 1 and n devices, whose decode cost does not grow with the stream. Compilation is
excluded; the best of --repeats runs. Writes OUT.json and OUT.md.
"""

import json
import os

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "The run (default: the fetched SmolLM2's).")
_GGUF = flags.DEFINE_string("gguf", None, "The file transformers loads (default: the fetched one).")
_PROMPT_LENS = flags.DEFINE_list("prompt_lens", ["2048", "8128"], "Prompt lengths (tokens).")
_STEPS = flags.DEFINE_integer("steps", 64, "Timed decode steps.")
_SINK_CACHE = flags.DEFINE_integer("sink_cache_len", 1024, "Sink + window cache slots (0: skip).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices of the sharded runs.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per row; the best is reported.")
_OUT = flags.DEFINE_string("out", None, "Write OUT.json and OUT.md.")
_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 8, "Simulated devices on CPU.")


def markdown(rows):
    lines = [
        "| implementation | devices | cache | prompt | prefill tokens/s | decode tokens/s |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['impl']} | {r['devices']} | {r['cache']} {r['cache_len']} | "
            f"{r['prompt_len']} | {r['prefill_tokens_per_s']:.0f} | "
            f"{r['decode_tokens_per_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv):
    del argv
    from ringattn.mesh import start_entrypoint

    start_entrypoint(_CPU_DEVICES.value)  # before anything starts JAX's backend
    import torch
    import transformers

    from ringattn.evals import bench
    from ringattn.evals.hf_bench import hf_throughput
    from ringattn.hf import fetch

    torch.set_num_threads(os.cpu_count())
    workdir = os.path.expanduser(_WORKDIR.value or fetch.run_dir())
    cfg, params = bench.model_and_params(workdir)
    gguf = os.path.expanduser(_GGUF.value or fetch.gguf_path())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()
    n, steps, repeats = _NUM_DEVICES.value, _STEPS.value, _REPEATS.value
    rows = []

    def ours(devices, cache_len, cache="full"):
        r = bench.decode_throughput(
            cfg, params, devices, cache_len, steps=steps, repeats=repeats, cache=cache
        )
        return dict(r, impl="ringattn (ring)" if devices > 1 else "ringattn (blockwise)")

    for prompt_len in map(int, _PROMPT_LENS.value):
        rows += [ours(1, prompt_len + steps), ours(n, prompt_len + steps)]
        rows.append(hf_throughput(hf, prompt_len, steps, repeats=repeats))
        for r in rows[-3:]:
            print(json.dumps(r), flush=True)
    if _SINK_CACHE.value:
        for devices in (1, n):
            rows.append(ours(devices, _SINK_CACHE.value, "sink_window"))
            print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        with open(_OUT.value + ".md", "w") as f:
            f.write(markdown(rows) + "\n")


if __name__ == "__main__":
    app.run(main)
