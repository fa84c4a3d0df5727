"""The XLA kernel's tiles on this machine, side by side in one run: blockwise attention on one
device and ring attention (zigzag) over 8, forward and forward + backward, for square tiles of
several sizes (SmolLM2's heads: 9 query / 3 KV heads of 64, float32, causal). What set the CPU
default of ringattn/attention/kernels/xla.py BLOCKS.

  python experiments/block_sizes.py --out=experiments/results/real_model/finetune/block_sizes.jsonl
"""

import json

from absl import app, flags

from ringattn import cli

_BLOCKS = flags.DEFINE_list("blocks", ["128", "256", "512", "1024"], "Square tiles to compare.")
_CASES = flags.DEFINE_list(
    "cases", ["blockwise:1:2048", "blockwise:1:8192", "ring/zigzag:8:8192"],
    "IMPL:DEVICES:T, each measured at every tile size.",
)  # fmt: skip
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds (the calls take turns); the median.")
_OUT = flags.DEFINE_string("out", None, "Append one JSON line per measurement here.")
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES)  # 8 simulated devices on CPU, before JAX's backend starts
    import jax
    import numpy as np

    from ringattn.bench import attention, timing

    for case in _CASES.value:
        impl, n, t = case.split(":")
        n, t = int(n), int(t)
        mesh = jax.make_mesh((n,), (attention.AXIS,), devices=jax.devices()[:n])
        rng = np.random.default_rng(0)
        q, dout = (rng.standard_normal((1, t, 9, 64), np.float32) for _ in range(2))
        k, v = (rng.standard_normal((1, t, 3, 64), np.float32) for _ in range(2))
        for mode in attention.MODES:
            args = (q, k, v) if mode == "fwd" else (q, k, v, dout)
            calls = {}
            for b in map(int, _BLOCKS.value):
                cfg = attention.BenchConfig(num_heads=9, num_kv_heads=3, block_q=b, block_k=b)
                fn = attention.with_mode(attention.make_attention(impl, cfg, mesh, t), mode)
                calls[b], _ = timing.compile_once(fn, args)
            seconds = timing.interleaved(
                {b: lambda c=c, a=args: c(*a) for b, c in calls.items()}, _ROUNDS.value, warmup=1
            )
            best = min(seconds, key=seconds.get)
            for b, s in seconds.items():
                tile = min(b, t // n)
                row = dict(impl=impl, devices=n, seq_len=t, mode=mode, block=b, tile=tile,
                           seconds=s, relative=s / seconds[best])  # fmt: skip
                print(json.dumps(row), flush=True)
                if _OUT.value:
                    with open(_OUT.value, "a") as f:
                        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    app.run(main)
