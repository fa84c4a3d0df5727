r"""Benchmarks attention implementations: time, GFLOP/s and compiled memory per device.

Default (8 simulated CPU devices, T=4096, causal, fwd and fwd+bwd; ~1-2 min on 2 cores):

  python experiments/benchmark.py

Memory at long context, compile only (no inputs are allocated):

  python experiments/benchmark.py --dry_run --seq_lens=131072,1048576 --dtype=bfloat16 \
      --head_dim=128 --mask=causal --impls=ring,original --mode=fwdbwd

Implementations: dense (jax.nn.dot_product_attention, 1 device), blockwise
(ringattn.blockwise_attention, 1 device), ring (ringattn.context_parallel_attention over a 1-D
"context" mesh of all devices), original (the `ringattention` package, Liu et al., when installed).
The FLOP convention is in ringattn/bench/flops.py's docstring.

The attention variants' cost (soft cap and sinks over the plain ring, one run, side by side):

  python experiments/benchmark.py --mode=fwdbwd --matmul_size=0 --iters=7 \
      --impls=ring/zigzag,ring/zigzag+cap,ring/zigzag+sinks,ring/zigzag+cap+sinks
"""

from absl import app, flags, logging

from ringattn.bench import attention, attention_run

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096"], "Sequence lengths T (= S).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size B.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 8, "Query heads H.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 8, "Key/value heads K (K < H: GQA).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 64, "Head dimension D.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "q/k/v dtype.")
_MASK = flags.DEFINE_list(
    "mask",
    ["causal"],
    "Masks, measured side by side: causal | none | window (causal sliding window of --window "
    "keys).",
)
_WINDOW = flags.DEFINE_integer("window", 1024, "Left reach of --mask=window.")
_IMPLS = flags.DEFINE_list(
    "impls",
    ["dense", "blockwise", "ring", "original"],
    f"Implementations: {attention.IMPLS} or context-parallel STRATEGY[/LAYOUT], with STRATEGY "
    f"in {attention.STRATEGIES} (e.g. ring/zigzag, ulysses, hybrid/striped); ours (blockwise and "
    f"the strategies) with attention variants as +VARIANT suffixes, VARIANT in "
    f"{attention.VARIANTS} (ring/zigzag+cap+sinks: soft cap {attention.SOFT_CAP:g} and sinks).",
)
_MODE = flags.DEFINE_list("mode", list(attention.MODES), "fwd and/or fwdbwd.")
_BLOCK_Q = flags.DEFINE_integer("block_q", 512, "Query block (capped at the local length).")
_BLOCK_K = flags.DEFINE_integer("block_k", 512, "Key block (capped at the local length).")
_NUM_DEVICES = flags.DEFINE_list(
    "num_devices", ["8"], "Device counts of the context mesh (simulated when on CPU)."
)
_ULYSSES_SIZE = flags.DEFINE_integer(
    "ulysses_size", 2, "hybrid: size of the Ulysses axis of the 2-D context mesh."
)
_PLOT_DIR = flags.DEFINE_string("plot_dir", None, "Write PNG plots (time, memory vs T) here.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Write a markdown table of the results here.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.")
_ITERS = flags.DEFINE_integer("iters", 3, "Timed calls; the median is reported.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Compile only from shapes and report memory; allocates nothing."
)
_MATMUL_SIZE = flags.DEFINE_integer(
    "matmul_size", 2048, "Time an f32 NxN matmul as a GFLOP/s reference; 0 skips."
)
_ORIGINAL_MAX_SEQ_LEN = flags.DEFINE_integer(
    "original_max_seq_len", 0, "Skip `original` above this T; 0: no cap."
)
_OUT = flags.DEFINE_string("out", None, "Append one JSON line per measurement to this file.")


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # Silence JAX's backend-probing INFO lines.
    # Before anything touches a JAX backend.
    counts = tuple(int(n) for n in _NUM_DEVICES.value)
    attention.set_num_cpu_devices(max(counts))
    config = attention.BenchConfig(
        seq_lens=tuple(int(t) for t in _SEQ_LENS.value),
        batch=_BATCH.value,
        num_heads=_NUM_HEADS.value,
        num_kv_heads=_NUM_KV_HEADS.value,
        head_dim=_HEAD_DIM.value,
        dtype=_DTYPE.value,
        mask=_MASK.value[0],
        masks=tuple(_MASK.value),
        window=_WINDOW.value,
        impls=tuple(_IMPLS.value),
        modes=tuple(_MODE.value),
        block_q=_BLOCK_Q.value,
        block_k=_BLOCK_K.value,
        device_counts=counts,
        ulysses_size=_ULYSSES_SIZE.value,
        plot_dir=_PLOT_DIR.value,
        markdown=_MARKDOWN.value,
        warmup=_WARMUP.value,
        iters=_ITERS.value,
        dry_run=_DRY_RUN.value,
        matmul_size=_MATMUL_SIZE.value,
        original_max_seq_len=_ORIGINAL_MAX_SEQ_LEN.value,
        out=_OUT.value,
    )
    rows = attention_run.run(config)
    if any("error" in row for row in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
