r"""Checks and times every GPU (or TPU) attention path in one command (issues 10, 18), from a
bare checkout with JAX alone (nothing of ours installed, no absl):

  python experiments/gpu_check.py --quick --out=/tmp/gpu_check   # < 5 min on one H200
  python experiments/gpu_check.py --out=/tmp/gpu_check           # < 10 min, T up to 32K
  python experiments/gpu_check.py --platform=tpu --quick --out=/tmp/tpu_check   # on a TPU
  python experiments/gpu_check.py --lower        # any machine: lowered for CUDA and TPU (~30 s)

Stage 0 compiles and runs each kernel call on its own at one small shape, against an f32
reference: our Pallas kernel's forward, dK/dV and dQ (fresh and continuing a state), cuDNN's
forward and backward, splash attention's on TPUs; so a failure names the call. Stage 1 checks
out, lse, dq, dk, dv of our Pallas kernel, our cuDNN path, kernel="auto" and a 2-shard ring
emulated through the kernels' passes, against the f32 reference (bf16, GQA; no mask, causal, a
window, segments); forward and backward compile apart. Stage 2 times fwd and fwd+bwd (bf16,
D = 128, causal and no mask) against jax.nn.dot_product_attention(implementation="cudnn"),
then prints a table and the targets (bf16, D = 128, causal fwd+bwd, T = 8K-32K: our Pallas
>= 0.6x cuDNN's throughput, auto and the emulated ring >= 0.85x; errors within 2e-2).

--platform=tpu (the default on a TPU) runs the same stages for a TPU: stage 0 splash
attention's calls through our splash path, stage 1 that path, auto and the emulated rings
against the f32 reference, stage 2 timing against JAX's splash attention on its own (and the
XLA kernel), with the GPU targets' analogue: auto >= 0.85x splash's throughput.

--lower (ringattn/bench/check/lower.py) runs on any machine, no device of the target needed:
every fused path traced and lowered for CUDA and for TPU (or --platform), one line per lowered
program with its custom calls (Triton kernels by name, Mosaic kernels, cuDNN calls); a program
that does not lower, or lowers without the kernels expected there (fell back to XLA), FAILED.

Every line is flushed as printed. With --out=DIR: DIR/gpu_check.txt holds every line,
DIR/gpu_check.log the full tracebacks, DIR/gpu_check.json every figure, all written as they
come, so a killed run keeps what it did. On screen a failure is one line naming where (stage,
kernel or path, call, shape). Exit status 1 if anything FAILED; "n/a: why" (cannot run here,
e.g. cuDNN on a CPU) is not a failure, nor is a missed performance target (reported as MISSED).
Timing runs the largest T first and starts no group past --budget_s (240 s quick, 540 s full;
those print n/a); --stages=timing reruns it alone, --stages=calls only stage 0.

On a CPU the same logic runs at tiny sizes, our Pallas kernel (or splash) in its interpreter
(~1-2 min on 2 cores):

  python experiments/gpu_check.py --interpret --quick [--platform=tpu]

The stages are ringattn/bench/check/ (importable with JAX alone); the same stages at --quick's
plan are pytest tests marked gpu / tpu (tests/bench/device_test.py), skipped without the device:

  python -m pytest -m gpu tests     # on a GPU machine, with the package installed
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

# The checkout's root first on sys.path: this runs where nothing of ours is installed, also under
# `python -I` (no script dir either); the check code it imports needs JAX alone.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringattn.bench.check import run  # noqa: E402


def parse_args(argv=None):
    """gpu_check's options from the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 4K and 16K (< 5 min on an H200)")
    p.add_argument("--interpret", action="store_true", help="Pallas, splash in interpreters (CPU)")
    p.add_argument("--out", metavar="DIR", help="write gpu_check.{txt,log,json} into DIR")
    p.add_argument("--stages", default=run.RUN_STAGES, help=f"a subset of {','.join(run.STAGES)}")
    p.add_argument(
        "--lower",
        action="store_true",
        help="lower every fused path for --platform (default: cuda and tpu) on any machine, "
        "print each program's custom calls (--stages=lower)",
    )
    p.add_argument("--platform", choices=("cuda", "tpu"), help="the hardware checked")
    p.add_argument("--iters", type=int, help="timed runs per path (default: the plan's)")
    p.add_argument("--budget_s", type=float, help="no timing group starts past it (0: none)")
    args = p.parse_args(argv)
    try:
        options = run.Options(**vars(args))
    except ValueError as e:
        p.error(f"--{e}")
    return dataclasses.replace(options, stages="lower") if args.lower else options


def main(argv=None):
    return run.run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
