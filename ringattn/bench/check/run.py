"""One gpu_check run: the plan (shapes, lengths, paths) of --quick or a full run, on a device or in
the interpreters, the stages in turn (one that breaks down is one failure; the next still runs),
the timing table, the targets met or MISSED, and the result: 0, or 1 if anything FAILED."""

from __future__ import annotations

import dataclasses
import os
import platform as platform_lib
import warnings

import jax

import ringattn
from ringattn.bench.check import calls, correctness, lower, timed
from ringattn.bench.check.problems import TOL
from ringattn.bench.check.report import Report, attempt
from ringattn.bench.hardware import HARDWARE, TARGET_LENS

MASKS = ("none", "causal", "window", "segments")
STAGES = ("calls", "checks", "timing", "lower")
RUN_STAGES = "calls,checks,timing"  # without --lower
FAST_CPU_COMPILE = (
    "--xla_backend_optimization_level=0",
    "--xla_llvm_disable_expensive_passes=true",
)


@dataclasses.dataclass(frozen=True)
class Options:
    """gpu_check's command line (experiments/gpu_check.py's flags, in their order)."""

    quick: bool = False
    interpret: bool = False
    out: str | None = None
    stages: str = RUN_STAGES
    lower: bool = False
    platform: str | None = None  # "cuda", "tpu"; None: the TPU on one, else CUDA
    iters: int | None = None
    budget_s: float | None = None

    def __post_init__(self):
        bad = set(self.stages.split(",")) - set(STAGES)
        if bad:
            raise ValueError(f"stages: expected names from {STAGES}, got {sorted(bad)}")
        if self.platform not in (None, *HARDWARE):
            raise ValueError(f"platform: expected one of {tuple(HARDWARE)}, got {self.platform!r}")


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
    platform: str = "cuda"  # the hardware checked: HARDWARE's paths, baseline, targets


def make_plan(quick, interpret, platform="cuda"):
    plan = _make_plan(quick, interpret, HARDWARE[platform].time_paths)
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


def stage_work(rep, name, plan, interpret, lower_platforms=("cuda", "tpu"), quick=True):
    """fn() that runs stage `name` of `plan` into `rep`."""
    hw = HARDWARE[plan.platform]
    return {
        "calls": lambda: calls.stage_calls(
            rep, plan.call_shape, plan.call_masks, interpret, plan.platform
        ),
        "checks": lambda: correctness.stage_checks(
            rep, plan.check_shape, plan.check_lens, plan.check_masks, hw.check_paths, interpret
        ),
        "timing": lambda: timed.stage_timing(
            rep, plan.time_shape, plan.time_lens, plan.time_paths, plan.iters, plan.budget_s,
            interpret, hw.baseline,
        ),
        "lower": lambda: lower.stage_lower(rep, lower_platforms, quick),
    }[name]  # fmt: skip


def header(rep, options, plan):
    dev = jax.devices()
    version = getattr(getattr(dev[0], "client", None), "platform_version", "")
    mode = "lower" if options.stages == "lower" else f"{plan.platform} checks"
    rep.line(
        f"gpu_check: {mode}, {'quick' if options.quick else 'full'}"
        f"{', interpret' if options.interpret else ''}; python "
        f"{platform_lib.python_version()}, jax {jax.__version__}; {len(dev)} x "
        f"{dev[0].device_kind} ({version or dev[0].platform})"
    )
    rep.line(f"ringattn from {os.path.dirname(ringattn.__file__)}")
    meta = dict(dataclasses.asdict(options), plan=dataclasses.asdict(plan), jax=jax.__version__)
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
    """The targets: met, MISSED, or n/a where nothing measured them."""
    lo, hi = TARGET_LENS
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
    text = f"errors vs the f32 reference <= {TOL:g}"
    if not errs and not failed:
        verdict = "n/a: nothing checked"
    else:
        worst = f"max {max(errs):.1e} over {len(errs)} checks" if errs else "no results"
        verdict = f"{'MISSED' if failed else 'met'} ({worst}, {len(failed)} failed)"
    rep.line(f"  {text:48s} {verdict}")
    rep.record("targets", target=text, verdict=verdict)


def run(options: Options) -> int:
    """Runs gpu_check as `options` say; 1 if anything FAILED, else 0. Sets what must be set
    before JAX's backend starts, so call it before anything runs on a device."""
    if options.interpret:  # compiling dominates a CPU run: cheaper LLVM optimisation, same results
        flags = [os.environ.get("XLA_FLAGS", "")] + list(FAST_CPU_COMPILE)
        os.environ["XLA_FLAGS"] = " ".join(f for f in flags if f)
    if "lower" in options.stages:  # a mesh of CPU devices for the strategies, before JAX starts
        try:
            jax.config.update("jax_num_cpu_devices", lower.DEVICES)
        except RuntimeError:  # started already (in a test): the devices it has
            pass
    hardware = options.platform or ("tpu" if jax.default_backend() == "tpu" else "cuda")
    plan = make_plan(options.quick, options.interpret, hardware)
    plan = dataclasses.replace(
        plan,
        iters=plan.iters if options.iters is None else options.iters,
        budget_s=plan.budget_s if options.budget_s is None else options.budget_s,
    )
    hw = HARDWARE[hardware]
    rep = Report(options.out)
    # Warnings (kernel="auto" skipping a kernel that failed its probe) as report lines.
    warnings.showwarning = lambda msg, cat, *_, **__: rep.line(f"  warning: {cat.__name__}: {msg}")
    header(rep, options, plan)
    chosen = options.stages.split(",")
    lowered = (options.platform,) if options.platform else ("cuda", "tpu")
    for name in STAGES:
        if name in chosen:  # a stage that breaks down is one failure; the next one still runs
            work = stage_work(rep, name, plan, options.interpret, lowered, options.quick)
            ok, why = attempt(rep, f"stage {name}", work)
            if not ok:
                rep.line(f"  FAILED [stage {name}, outside any single call] {why}")
                rep.fail(f"stage {name}", why)
    if chosen != ["lower"]:
        table(rep, hw)
        targets(rep, hw)
    status = "FAIL" if rep.failures else "PASS"
    rep.line(f"\nRESULT: {status}, {len(rep.failures)} failed, {rep.elapsed():.0f} s")
    for failure in rep.failures:
        rep.line(f"  FAILED {failure}")
    rep.figures["meta"].update(result=status, seconds=rep.elapsed())
    rep.save()
    return 1 if rep.failures else 0
