"""gpu_check's report: lines printed (flushed) and written as they come, full tracebacks in a log,
every figure in JSON; and running a step so that its failure is one line and the run goes on."""

from __future__ import annotations

import json
import os
import time
import traceback

import jax
import numpy as np


class Report:
    """Lines printed (flushed) and, with `out_dir`, written as they come: gpu_check.txt (every
    line), gpu_check.log (full tracebacks) and gpu_check.json (every figure), so a run that is
    killed keeps what it printed. `failures` decides the exit status."""

    def __init__(self, out_dir=None):
        self.start = time.perf_counter()
        self.failures = []
        self.figures = {"meta": {}, "calls": [], "checks": [], "timing": [], "targets": []}
        self.figures["lower"] = []
        self.dir = out_dir
        if out_dir:
            os.makedirs(out_dir, exist_ok=True)
            for name in ("gpu_check.txt", "gpu_check.log"):
                open(os.path.join(out_dir, name), "w").close()

    def _append(self, name, text):
        if self.dir:
            with open(os.path.join(self.dir, name), "a") as f:
                f.write(text)

    def line(self, text=""):
        text = text.rstrip()
        print(text, flush=True)
        self._append("gpu_check.txt", text + "\n")

    def record(self, section, **row):
        self.figures[section].append(row)
        self.save()

    def save(self):
        if self.dir:  # rewritten whole, through a rename: never half a file
            path = os.path.join(self.dir, "gpu_check.json")
            with open(path + ".tmp", "w") as f:
                json.dump(dict(self.figures, failures=self.failures), f, indent=1, default=str)
            os.replace(path + ".tmp", path)

    def exception(self, where, e):
        """`e` in one line (its type and first line); the traceback goes to the log."""
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        self._append("gpu_check.log", f"=== {where} ===\n{tb}\n")
        first = (str(e).strip().splitlines() or [""])[0]
        return f"{type(e).__name__}: {first[:240]}"

    def fail(self, where, why):
        self.failures.append(f"{where}: {why}")

    def elapsed(self):
        return time.perf_counter() - self.start


def attempt(rep, where, fn, *args, **kwargs):
    """(True, fn(...)) or (False, the exception in one line), its traceback logged under
    `where`."""
    try:
        return True, fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure is reported and the run goes on
        return False, rep.exception(where, e)


def compile_and_run(rep, where, fn, *args):
    """(compiled, first result, compile s, first run s) of jax.jit(fn) on args, or None and
    which of the two failed ('compile: ...' or 'run: ...', its traceback logged)."""
    t0 = time.perf_counter()
    ok, compiled = attempt(rep, f"{where} (compile)", lambda: jax.jit(fn).lower(*args).compile())
    if not ok:
        return None, f"compile: {compiled}"
    t1 = time.perf_counter()
    ok, got = attempt(rep, f"{where} (run)", lambda: jax.block_until_ready(compiled(*args)))
    if not ok:
        return None, f"run: {got}"
    return (compiled, got, t1 - t0, time.perf_counter() - t1), None


def rel_errors(got, want):
    """max |got - want| / max |want| per pair (inf when a value is NaN or infinite where the
    reference is not, or shapes differ); -inf lse of queries that see nothing must match."""
    errs = []
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
        fin = np.isfinite(w)
        if g.shape != w.shape or np.isnan(g).any() or (np.isfinite(g) != fin).any():
            errs.append(float("inf"))
            continue
        scale = max(np.abs(w[fin]).max(initial=0.0), 1e-30)
        errs.append(float(np.abs(g[fin] - w[fin]).max(initial=0.0) / scale))
    return errs


def shape_str(b, t, h, kh, d):
    return f"B={b} T={t} H={h} K={kh} D={d}"
