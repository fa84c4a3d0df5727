"""Streaming with attention sinks (StreamingLLM): perplexity against position on a stream 8x
longer than the KV cache, for dense attention (no eviction, positions past the training length),
window only, sink + window, and the sliding window recomputed for every token (the exact
reference), on a byte-level LM trained on local text; with --sinks_run, also a model trained
with learned sink logits, window only and recomputed.

  python experiments/train.py --workdir=/tmp/stream_lm --config=configs/streaming.py
  python experiments/train.py --workdir=/tmp/stream_ls --config=configs/streaming.py:learned_sinks
  python experiments/streaming.py --workdir=/tmp/stream_lm --sinks_run=/tmp/stream_ls \
      --out=/tmp/streaming

A pretrained model (an imported run with its tokenizer) streams real text instead:

  python experiments/streaming.py --workdir=~/.cache/ringattn/smollm2/run --cache_len=256 \
      --text_files=$(python -c "import argparse, typing, inspect, dataclasses as d; print(','.join(
      m.__file__ for m in (argparse, typing, inspect, d)))") --recompute_stride=16 --out=DIR

each file one stream (its first --stream_multiple x --cache_len tokens, encoded with the run's
tokenizer); --recompute_stride=k reruns the sliding window at every k-th position only (the
summary is then over those positions for every method). --methods=...,retrieval adds a retrieval
cache (ringattn/decode/retrieval.py) attending to --cache_len tokens per step: --num_sinks sinks,
--top_pages pages of --page_size chosen by their key bounds, the rest a window.

Writes DIR/streaming_nll.npz (the streams and every method's per-token NLL), DIR/streaming.json
(per-bin perplexities; "summary": perplexity once the cache is full per
method; "ratios"; per layer and head the attention on the first tokens), DIR/streaming.png and
DIR/attention_sinks.png. The streams are the "eval" split of the text the model was trained on
(files it never saw), concatenated, starting with BOS when the run trained with BOS documents.
"""

import json
import os
import time

import numpy as np
from absl import app, flags

from ringattn import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained text LM run.")
_SINKS_RUN = flags.DEFINE_string("sinks_run", None, "A run trained with attention.sinks.")
_CONFIG = cli.run_config()
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", None, "KV cache tokens (default: training length).")
_NUM_SINKS = flags.DEFINE_integer("num_sinks", 4, "Sink tokens kept from the stream's start.")
_MULTIPLE = flags.DEFINE_integer("stream_multiple", 8, "Stream length / cache length.")
_STREAMS = flags.DEFINE_integer("num_streams", 4, "Streams (different file orders) averaged.")
_BIN = flags.DEFINE_integer("bin_size", 128, "Positions per perplexity bin.")
_TEXT_FILES = flags.DEFINE_list(
    "text_files", None, "Stream these files (one stream each) through the run's tokenizer."
)
_STRIDE = flags.DEFINE_integer("recompute_stride", 1, "Recompute the window every k positions.")
_METHODS = flags.DEFINE_list(
    "methods",
    ["dense", "window", "sink_window", "recompute"],
    "Methods to run: dense, window, sink_window, recompute, retrieval.",
)
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "retrieval: tokens per page.")
_TOP_PAGES = flags.DEFINE_integer(
    "top_pages", 8, "retrieval: pages attended per step (the window is the rest of cache_len)."
)
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES, _WORKDIR, _OUT)  # before anything starts JAX's backend
    from ringattn.evals import streaming
    from ringattn.run.load import load_run
    from ringattn.train.trainer import curriculum

    t0 = time.perf_counter()
    run, tokenizer = cli.open_run(_WORKDIR.value, _CONFIG.value, num_devices=1)
    cache_len = _CACHE_LEN.value or curriculum(run.config)[-1][1]
    length = _MULTIPLE.value * cache_len
    if _TEXT_FILES.value:
        files = [os.path.expanduser(f) for f in _TEXT_FILES.value]
        streams = streaming.text_streams(tokenizer, files, length)
    else:
        streams = streaming.eval_streams(run.config.task_params, length, _STREAMS.value)
    print(f"checkpoint {run.step}; {len(streams)} streams of {length} tokens, cache {cache_len}")
    result = streaming.evaluate(
        run.model_cfg,
        run.params,
        streams,
        cache_len=cache_len,
        num_sinks=_NUM_SINKS.value,
        bin_size=_BIN.value,
        methods=tuple(_METHODS.value),
        recompute_stride=_STRIDE.value,
        pages=dict(page_size=_PAGE_SIZE.value, top_pages=_TOP_PAGES.value),
    )
    if _SINKS_RUN.value:
        sinks = load_run(_SINKS_RUN.value, num_devices=1)
        print(f"learned sinks: checkpoint {sinks.step}")
        sink_streams = streaming.eval_streams(sinks.config.task_params, length, _STREAMS.value)
        result = streaming.add_model(
            result, "learned_sinks", sinks.model_cfg, sinks.params, sink_streams
        )
    result["ratios"] = streaming.ratios(result["summary"])
    result["wall_time_s"] = time.perf_counter() - t0
    print("summary:", json.dumps(result["summary"]), "\nratios:", json.dumps(result["ratios"]))
    os.makedirs(_OUT.value, exist_ok=True)
    nll = result.pop("nll")
    np.savez_compressed(os.path.join(_OUT.value, "streaming_nll.npz"), streams=streams, **nll)
    with open(os.path.join(_OUT.value, "streaming.json"), "w") as f:
        json.dump(result, f, indent=1)
    streaming.plot(result, os.path.join(_OUT.value, "streaming.png"))
    streaming.plot_attention(result, os.path.join(_OUT.value, "attention_sinks.png"))
    print(f"wrote {_OUT.value}/streaming.json, streaming_nll.npz (per-token NLL), streaming.png")


if __name__ == "__main__":
    app.run(main)
