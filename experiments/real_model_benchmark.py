"""Prefill and decode speed of an imported model (SmolLM2-135M by default) against transformers
on the same machine and threads, side by side.

  python experiments/fetch_model.py
  python experiments/real_model_benchmark.py --out=experiments/results/real_model/throughput

For each prompt length (default 2048 and 8128 tokens, + 64 decode steps: 8192 fills the model's
context): ours on 1 device (blockwise prefill, the cache local) and on --num_devices (ring
prefill in the run's layout, the cache sharded along the sequence), then transformers (its
default attention and KV cache, float32, torch threads = CPU cores); then our sink + window cache
(4 + 1020) on 1 and n devices, whose decode cost does not grow with the stream. Both prefill as
generation does (`ringattn.evals.generate.prefill`; transformers with `logits_to_keep=1`).
Compilation is excluded; the best of --repeats runs; the table gives each of our rows' ratio to
transformers at the same prompt length. Writes OUT.json and OUT.md. The rows are timed one after
another, not in turns: run it alone on the machine.
"""

import json
import os

from absl import app, flags

from ringattn import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The run (default: the fetched SmolLM2's).")
_GGUF = flags.DEFINE_string("gguf", None, "The file transformers loads (default: the fetched one).")
_PROMPT_LENS = flags.DEFINE_list("prompt_lens", ["2048", "8128"], "Prompt lengths (tokens).")
_STEPS = flags.DEFINE_integer("steps", 64, "Timed decode steps.")
_SINK_CACHE = flags.DEFINE_integer("sink_cache_len", 1024, "Sink + window cache slots (0: skip).")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices of the sharded runs.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per row; the best is reported.")
_OUT = flags.DEFINE_string("out", None, "Write OUT.json and OUT.md.")
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES)  # before anything starts JAX's backend
    from ringattn.bench import decode, hf
    from ringattn.hf import fetch

    cfg, params = decode.model_and_params(os.path.expanduser(_WORKDIR.value or fetch.run_dir()))
    hf_model = hf.load_transformers(os.path.expanduser(_GGUF.value or fetch.gguf_path()))
    prompt_lens = [int(x) for x in _PROMPT_LENS.value]
    rows = hf.compare(
        cfg, params, hf_model, prompt_lens, _STEPS.value, _SINK_CACHE.value, _NUM_DEVICES.value,
        _REPEATS.value,
    )  # fmt: skip
    print(hf.markdown(rows))
    if _OUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
        with open(_OUT.value + ".json", "w") as f:
            json.dump(rows, f, indent=1)
        with open(_OUT.value + ".md", "w") as f:
            f.write(hf.markdown(rows) + "\n")


if __name__ == "__main__":
    app.run(main)
