"""gpu_check (experiments/gpu_check.py) as a library: its stages (calls.py: every kernel call on its
own; correctness.py: every path against an f32 reference; timed.py: throughput against JAX's own
fused attention; lower.py: every fused path lowered for CUDA and TPU on any machine) and the run
that plans, reports and judges them (run.py). Imports with JAX alone (no absl, flax or matplotlib):
gpu_check runs from a bare checkout on a machine where nothing else is installed."""
