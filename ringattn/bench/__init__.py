"""Benchmarks and device checks behind experiments/: the attention benchmark (attention*.py), decode
and chunked prefill (decode.py, prefill.py), an imported model against transformers (hf.py), and
gpu_check's stages (check/). They share one timer (timing.py), one FLOP count (flops.py) and one
hardware table (hardware.py, over the cost model's `ringattn.Hardware`).

Nothing is imported here: check/ and what it uses import with JAX alone (gpu_check runs from a bare
checkout), while decode.py and prefill.py need flax and the model.
"""
