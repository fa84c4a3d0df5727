"""Needle in a haystack on a trained passkey run: exact-match accuracy over context lengths x
needle depths, answers decoded with the KV cache; a heatmap ("lost in the middle").

  python experiments/needle.py --workdir=/tmp/passkey --out=/tmp/needle
  python experiments/needle.py --workdir=/tmp/passkey --out=/tmp/needle_rope \
      --rope_scaling=none,linear,ntk,yarn,llama3            # 1x, 2x, 4x the training length

A pretrained model (a run with a tokenizer, e.g. experiments/fetch_model.py's) gets the
natural-language passkey prompt (ringattn/evals/needle.py) at its trained length and below:

  python experiments/needle.py --workdir=~/.cache/ringattn/smollm2/run --out=/tmp/needle_smollm2 \
      --lengths=1024,2048,4096,8192 --num_samples=1

A bounded KV cache streams each prompt through itself --prefill_chunk tokens at a time (never
attended densely) and answers from it: --cache=sink_window (--num_sinks, --window) or
--cache=retrieval (--window, --page_size, --top_pages, --selection_block, --dense_layers:
ringattn/decode/retrieval.py, docs/retrieval.md); --plot draws several runs' needle.json side by
side:

  python experiments/needle.py --workdir=~/.cache/ringattn/smollm2/run --out=/tmp/needle_ret \
      --lengths=2048,4096,8192 --num_samples=1 --cache=retrieval --window=252 --top_pages=12 \
      --selection_block=4 --dense_layers=2
  python experiments/needle.py --plot=/tmp/needle_smollm2/needle.json,/tmp/needle_ret/needle.json \
      --out=/tmp/needle_both

Writes DIR/needle.json (a list of {cache, tokens_attended, cache_mib, rope_scaling, length,
depth, accuracy, num_samples}) and DIR/needle.png. Lengths default to 1x, 2x and 4x the run's
training length; beyond it each --rope_scaling stretches RoPE by length / training length (at the
training length all are the identity).
"""

import json
import os
import time

from absl import app, flags

from ringattn import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained passkey run.")
_CONFIG = cli.run_config()
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_LENGTHS = flags.DEFINE_list("lengths", None, "Context lengths (default: 1x, 2x, 4x training).")
_DEPTHS = flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Needle depths.")
_SCALINGS = flags.DEFINE_list(
    "rope_scaling",
    ["none"],
    "RoPE scalings beyond the training length: none,linear,ntk,yarn,llama3",
)
_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Prompts per (length, depth) cell.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts decoded together.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", None, "Devices (default: all).")
_INT8 = flags.DEFINE_bool("int8", False, "Decode with int8 KV caches.")
_SEED = flags.DEFINE_integer("seed", 0, "Prompt seed (evaluation prompts, not training ones).")
_CACHE = cli.cache_flags()
_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", 256, "Bounded caches: prompt tokens streamed through the cache per step."
)
_PLOT = flags.DEFINE_list(
    "plot", None, "Only plot these needle.json files together (a panel per cache) into --out."
)
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    if _PLOT.value:
        return plot(_PLOT.value)
    cli.start(_CPU_DEVICES, _WORKDIR, _OUT)  # before anything starts JAX's backend
    from ringattn.evals import needle
    from ringattn.hf.tokenizer import HFTokenizer
    from ringattn.train.trainer import curriculum

    t0 = time.perf_counter()
    run, tokenizer = cli.open_run(_WORKDIR.value, _CONFIG.value, _NUM_DEVICES.value)
    tokenizer = tokenizer if isinstance(tokenizer, HFTokenizer) else None
    train_len = curriculum(run.config)[-1][1]
    lengths = [int(x) for x in _LENGTHS.value or [train_len, 2 * train_len, 4 * train_len]]
    print(f"checkpoint {run.step}, trained at {train_len} tokens; mesh {dict(run.mesh.shape)}")
    rows = needle.evaluate(
        run.model_cfg,
        run.params,
        run.mesh,
        train_len=train_len,
        lengths=lengths,
        depths=[float(d) for d in _DEPTHS.value],
        scalings=_SCALINGS.value,
        num_samples=_SAMPLES.value,
        batch_size=_BATCH.value,
        seed=_SEED.value,
        quantize=_INT8.value,
        tokenizer=tokenizer,
        caches=[cli.cache_spec(_CACHE, quantize=_INT8.value)],
        prefill_chunk=_CHUNK.value,
    )
    os.makedirs(_OUT.value, exist_ok=True)
    with open(os.path.join(_OUT.value, "needle.json"), "w") as f:
        json.dump(rows, f, indent=1)
    needle.plot_heatmap(rows, os.path.join(_OUT.value, "needle.png"))
    print(f"wrote {_OUT.value}/needle.json and needle.png in {time.perf_counter() - t0:.0f} s")


def plot(files):
    cli.start(_CPU_DEVICES, _OUT)
    from ringattn.evals import needle

    rows = []
    for path in files:
        with open(os.path.expanduser(path)) as f:
            rows += json.load(f)
    os.makedirs(_OUT.value, exist_ok=True)
    needle.plot_heatmap(rows, os.path.join(_OUT.value, "needle.png"))
    print(f"wrote {_OUT.value}/needle.png from {len(rows)} rows")


if __name__ == "__main__":
    app.run(main)
