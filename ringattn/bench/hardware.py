"""The one hardware table: per kind of accelerator, the cost model's constants (`Hardware` extends
`ringattn.Hardware`: an entry can be passed to `ringattn.estimate_costs(hardware=...)`) and what
gpu_check checks and times there, against which baseline, with which targets."""

from __future__ import annotations

import dataclasses

from ringattn.parallel import costs

# The targets' range of T (bf16, D = 128, causal fwd+bwd).
TARGET_LENS = (8192, 32768)


@dataclasses.dataclass(frozen=True)
class Hardware(costs.Hardware):
    """`ringattn.Hardware`'s constants of one kind of device, and gpu_check's plan there: the
    paths of stage 1, those timed in stage 2, the timed baseline (JAX's own fused attention) and
    the targets, (what, timed path, least ratio of throughput to the baseline) on bf16, D = 128,
    causal fwd+bwd, T in TARGET_LENS."""

    check_paths: tuple[str, ...] = ()
    time_paths: tuple[str, ...] = ()
    baseline: str = ""
    baseline_label: str = ""
    targets: tuple[tuple[str, str, float], ...] = ()


HARDWARE = {
    # The cost model's default constants are an H100's (see ringattn.Hardware).
    "cuda": Hardware(
        check_paths=("pallas", "cudnn", "auto", "ring2 pallas", "ring2 auto"),
        time_paths=("jax cudnn", "cudnn", "pallas", "auto", "ring2 auto", "xla1024"),
        baseline="jax cudnn",
        baseline_label="cuDNN",
        targets=(
            ("our Pallas", "pallas", 0.6),
            ("auto (blockwise)", "auto", 0.85),
            ("auto (2-step emulated ring)", "ring2 auto", 0.85),
        ),
    ),
    # The GPU targets' analogue: auto (our splash path) loses little to splash on its own. The
    # link is a TPU's ICI (~50 GB/s a device, ringattn.Hardware's note); the rest the defaults.
    "tpu": Hardware(
        link_bytes_per_s=50e9,
        check_paths=("splash", "auto", "ring2 splash", "ring2 auto"),
        time_paths=("jax splash", "splash", "auto", "ring2 auto", "xla512"),
        baseline="jax splash",
        baseline_label="splash",
        targets=(
            ("auto (blockwise)", "auto", 0.85),
            ("auto (2-step emulated ring)", "ring2 auto", 0.85),
        ),
    ),
}
