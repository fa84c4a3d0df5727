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

--lower (gpu_check_lower.py) runs on any machine, no device of the target needed: every fused
path traced and lowered for CUDA and for TPU (or --platform), one line per lowered program with
its custom calls (Triton kernels by name, Mosaic kernels, cuDNN calls); a program that does not
lower, or lowers without the kernels expected there (fell back to XLA), FAILED.

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
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import warnings

# The checkout's root (ringattn) and experiments/ (the libraries below) come first on sys.path:
# this runs where nothing of ours is installed, also under `python -I` (no script dir either).
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (os.path.dirname(_HERE), _HERE) if p not in sys.path]

import gpu_check_lib as lib  # noqa: E402
import gpu_check_lower as lower  # noqa: E402
import gpu_check_stages as stages  # noqa: E402
import jax  # noqa: E402

import ringattn  # noqa: E402

MASKS = ("none", "causal", "window", "segments")
STAGES = ("calls", "checks", "timing", "lower")
RUN_STAGES = "calls,checks,timing"  # without --lower
FAST_CPU_COMPILE = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run checks and times. Shapes: (B, T, H, K, D), or (B, H, K, D) with the lengths
    apart; K < H is GQA."""

    call_shape: tuple[int, ...]  # stage 0
    call_masks: tuple[str, ...]  # of "none", "causal"
    check_shape: tuple[int, ...]  # stage 1
    check_lens: tuple[int, ...]  # 1000: not a multiple of any tile (padding)
    check_masks: tuple[str, ...]
    time_shape: tuple[int, ...]  # stage 2
    time_lens: tuple[int, ...]
    time_paths: tuple[str, ...]
    iters: int  # timed runs per path (the median is reported)
    budget_s: float  # stage 2 starts no group past this many seconds (0: no limit)
    platform: str = "cuda"  # the hardware checked: lib.HARDWARE's paths, baseline, targets


def make_plan(quick, interpret, platform="cuda"):
    plan = _make_plan(quick, interpret, lib.HARDWARE[platform].time_paths)
    return dataclasses.replace(plan, platform=platform)


def _make_plan(quick, interpret, time_paths):
    if interpret:  # the Pallas interpreter takes seconds per call on a CPU: tiny and fewer cases
        return Plan(
            call_shape=(1, 128, 2, 1, 32),
            call_masks=("causal",) if quick else ("none", "causal"),
            check_shape=(2, 2, 1, 32),
            check_lens=(96,),  # shards of 48: padded to Pallas tiles
            check_masks=("segments",) if quick else MASKS,  # segments: causal with segment ids
            time_shape=(1, 2, 2, 32),
            time_lens=(128,) if quick else (128, 256),
            time_paths=time_paths + (() if quick else ("jax xla",)),
            iters=1 if quick else 3,
            budget_s=240 if quick else 540,
        )
    return Plan(
        call_shape=(1, 512, 4, 2, 128),
        call_masks=("none", "causal"),
        check_shape=(2, 8, 2, 128),
        check_lens=(256, 1000) if quick else (256, 1000, 4096),
        check_masks=MASKS,
        time_shape=(1, 16, 16, 128),
        time_lens=(4096, 16384) if quick else (4096, 8192, 16384, 32768),
        time_paths=time_paths + (() if quick else ("jax xla",)),
        iters=5,
        budget_s=240 if quick else 540,
    )


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="T = 4K and 16K (< 5 min on an H200)")
    p.add_argument("--interpret", action="store_true", help="Pallas, splash in interpreters (CPU)")
    p.add_argument("--out", metavar="DIR", help="write gpu_check.{txt,log,json} into DIR")
    p.add_argument("--stages", default=RUN_STAGES, help=f"a subset of {','.join(STAGES)}")
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
    bad = set(args.stages.split(",")) - set(STAGES)
    if bad:
        p.error(f"--stages: expected names from {STAGES}, got {sorted(bad)}")
    if args.lower:
        args.stages = "lower"
    return args


def header(rep, args, plan):
    dev = jax.devices()
    version = getattr(getattr(dev[0], "client", None), "platform_version", "")
    mode = "lower" if args.stages == "lower" else f"{plan.platform} checks"
    rep.line(
        f"gpu_check: {mode}, {'quick' if args.quick else 'full'}"
        f"{', interpret' if args.interpret else ''}; python {platform.python_version()}, "
        f"jax {jax.__version__}; {len(dev)} x {dev[0].device_kind} ({version or dev[0].platform})"
    )
    rep.line(f"ringattn from {os.path.dirname(ringattn.__file__)}")
    meta = dict(vars(args), plan=dataclasses.asdict(plan), jax=jax.__version__)
    rep.figures["meta"] = dict(meta, device=dev[0].device_kind, platform=dev[0].platform)
    rep.save()


def table(rep, hw):
    """Every timed row, and the ratio of its throughput to the baseline's (JAX's own fused
    attention: cuDNN through jax.nn, or splash)."""
    rows = rep.figures["timing"]
    if not rows:
        return
    rep.line(f"\n| mask | T | mode | path | ms | TFLOP/s | x {hw.baseline_label} |")
    rep.line("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["status"] == "ok":
            ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
            figs = f"{r['ms']:.3f} | {r['tflops']:.1f} | {ratio}"
        else:
            figs = f"{r['status']} | - | -"
        rep.line(f"| {r['mask']} | {r['T']} | {r['mode']} | {r.get('path', 'all')} | {figs} |")


def targets(rep, hw):
    """The issue's targets: met, MISSED, or n/a where nothing measured them."""
    lo, hi = lib.TARGET_LENS
    rep.line(f"\n== targets (bf16, D=128, causal fwd+bwd, T = {lo // 1024}K-{hi // 1024}K) ==")
    for what, path, need in hw.targets:
        got = [
            (r["ratio"], r["T"])
            for r in rep.figures["timing"]
            if r.get("path") == path and r["status"] == "ok" and r["ratio"]
            and (r["mask"], r["mode"]) == ("causal", "fwdbwd") and lo <= r["T"] <= hi
            and rep.figures["meta"]["plan"]["time_shape"][-1] == 128
        ]  # fmt: skip
        text = f"{what} >= {need:.2f}x {hw.baseline_label}"
        if not got:
            verdict = f"n/a: not measured (needs {hw.baseline_label}, D = 128 and T in range)"
        else:
            ratio, t = min(got)
            verdict = f"{'met' if ratio >= need else 'MISSED'} (min {ratio:.2f}x at T={t})"
        rep.line(f"  {text:48s} {verdict}")
        rep.record("targets", target=text, verdict=verdict)
    errs = [max(r["errors"].values()) for r in rep.figures["checks"] if "errors" in r]
    failed = [r for r in rep.figures["checks"] if r["status"] in ("FAIL", "FAILED")]
    text = f"errors vs the f32 reference <= {lib.TOL:g}"
    if not errs and not failed:
        verdict = "n/a: nothing checked"
    else:
        worst = f"max {max(errs):.1e} over {len(errs)} checks" if errs else "no results"
        verdict = f"{'MISSED' if failed else 'met'} ({worst}, {len(failed)} failed)"
    rep.line(f"  {text:48s} {verdict}")
    rep.record("targets", target=text, verdict=verdict)


def main(argv=None):
    args = parse_args(argv)
    if args.interpret:  # compiling dominates a CPU run: cheaper LLVM optimisation, same results
        flags = [os.environ.get("XLA_FLAGS", "")] + list(FAST_CPU_COMPILE)
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f)
    if "lower" in args.stages:  # a mesh of CPU devices for the strategies, set before JAX starts
        try:
            jax.config.update("jax_num_cpu_devices", lower.DEVICES)
        except RuntimeError:  # started already (in a test): the devices it has
            pass
    hardware = args.platform or ("tpu" if jax.default_backend() == "tpu" else "cuda")
    plan = make_plan(args.quick, args.interpret, hardware)
    plan = dataclasses.replace(
        plan,
        iters=plan.iters if args.iters is None else args.iters,
        budget_s=plan.budget_s if args.budget_s is None else args.budget_s,
    )
    hw = lib.HARDWARE[hardware]
    rep = lib.Report(args.out)
    # Warnings (kernel="auto" skipping a kernel that failed its probe) as report lines.
    warnings.showwarning = lambda msg, cat, *_, **__: rep.line(f"  warning: {cat.__name__}: {msg}")
    header(rep, args, plan)
    run = args.stages.split(",")
    work = {
        "calls": lambda: stages.stage_calls(
            rep, plan.call_shape, plan.call_masks, args.interpret, hardware
        ),
        "checks": lambda: stages.stage_checks(
            rep, plan.check_shape, plan.check_lens, plan.check_masks, hw.check_paths,
            args.interpret,
        ),
        "timing": lambda: stages.stage_timing(
            rep, plan.time_shape, plan.time_lens, plan.time_paths, plan.iters, plan.budget_s,
            args.interpret, hw.baseline,
        ),
        "lower": lambda: lower.stage_lower(
            rep, (args.platform,) if args.platform else ("cuda", "tpu"), args.quick
        ),
    }  # fmt: skip
    for name in STAGES:
        if name in run:  # a stage that breaks down is one failure; the next one still runs
            ok, why = lib.attempt(rep, f"stage {name}", work[name])
            if not ok:
                rep.line(f"  FAILED [stage {name}, outside any single call] {why}")
                rep.fail(f"stage {name}", why)
    if run != ["lower"]:
        table(rep, hw)
        targets(rep, hw)
    status = "FAIL" if rep.failures else "PASS"
    rep.line(f"\nRESULT: {status}, {len(rep.failures)} failed, {rep.elapsed():.0f} s")
    for failure in rep.failures:
        rep.line(f"  FAILED {failure}")
    rep.figures["meta"].update(result=status, seconds=rep.elapsed())
    rep.save()
    return 1 if rep.failures else 0


if __name__ == "__main__":
    sys.exit(main())
