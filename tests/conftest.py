"""Test setup: 8 simulated CPU devices, float64 enabled, and the helpers every test shares.

RINGATTN_X64=0 runs the suite as users run JAX, with float64 off: then only the tests marked
`x64_off` run (they compute their references in NumPy float64), the others are skipped.

The device count and x64 must be set before JAX initialises its backend, so this runs at import,
before any test module touches JAX. Compilation dominates the test time on CPU, so the jitted
helpers below are cached per static configuration and take every mask array as an argument: a new
mask, layout or data set reuses the compiled program.
"""

import functools
import os
import re
import types
import warnings

import jax

NUM_DEVICES = 8

# The tests compile many tiny programs and run each once: cheaper LLVM optimisation halves the
# compile time (floating-point semantics are the same: no fast-math either way). XLA reads the
# flags when the backend starts, so they are set only for that moment: the environment that child
# processes inherit is left as it was.
_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_user_flags = os.environ.get("XLA_FLAGS")
_flags = [] if _user_flags is None else [_user_flags]
_flags += [f for f in _FAST_COMPILE if f.split("=")[0] not in (_user_flags or "")]
try:
    jax.config.update("jax_num_cpu_devices", NUM_DEVICES)
except AttributeError:  # an older JAX without the option: the XLA flag does the same.
    _flags.append(f"--xla_force_host_platform_device_count={NUM_DEVICES}")
X64 = os.environ.get("RINGATTN_X64", "1") != "0"
jax.config.update("jax_enable_x64", X64)
os.environ["XLA_FLAGS"] = " ".join(_flags)
try:
    jax.devices()  # starts the backend with the flags above
finally:
    if _user_flags is None:
        del os.environ["XLA_FLAGS"]
    else:
        os.environ["XLA_FLAGS"] = _user_flags

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import ringattn  # noqa: E402
from ringattn.attention import target  # noqa: E402

# Relative tolerances against the float64 reference (max |err| / max |ref|).
TOL = {np.dtype(np.float32): 2e-5, np.dtype(jnp.bfloat16): 2e-2, np.dtype(np.float64): 1e-12}
MASK_ARGS = ("segment_ids", "kv_segment_ids", "q_positions", "kv_positions")


# ---------------------------------------------------------------------------------------------
# Data.


def random_inputs(rng, b, t, s, h, kh, d, dtype=np.float32, logit_scale=1.0):
    """q [B,T,H,D], k/v [B,S,K,D], cotangents do [B,T,H,D] and dlse [B,H,T] (f32), in `dtype`."""
    q = rng.standard_normal((b, t, h, d)) * logit_scale
    k, v = rng.standard_normal((2, b, s, kh, d))
    do = rng.standard_normal((b, t, h, d))
    dlse = rng.standard_normal((b, h, t)).astype(np.float32)
    cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(do), dlse


def packed_segments(rng, b, length, num_docs):
    """Sorted segment ids [B, length] int32: `num_docs` documents of random lengths per row, so
    document boundaries fall at arbitrary places (inside blocks and shards, across them)."""
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, length), num_docs - 1, replace=False))
        rows.append(np.searchsorted(cuts, np.arange(length), side="right"))
    return np.asarray(rows, np.int32)


# ---------------------------------------------------------------------------------------------
# Comparisons.


def assert_close(actual, expected, tol, name="value"):
    """max |actual - expected| / max |expected| <= tol, with no NaN, and -inf exactly where the
    reference has -inf (lse of queries that see nothing)."""
    a = np.asarray(actual, np.float64)
    e = np.asarray(expected, np.float64)
    assert a.shape == e.shape, f"{name}: shape {a.shape} != {e.shape}"
    assert not np.isnan(a).any(), f"{name}: NaN in result"
    fin = np.isfinite(e)
    np.testing.assert_array_equal(a[~fin], e[~fin], err_msg=f"{name}: non-finite entries differ")
    assert np.isfinite(a[fin]).all(), f"{name}: non-finite result where the reference is finite"
    if not fin.any():
        return
    err = np.max(np.abs(a[fin] - e[fin]))
    ref = max(np.max(np.abs(e[fin])), 1e-30)
    assert err <= tol * ref, f"{name}: max|err| = {err:.3e} > {tol:g} * max|ref| = {tol * ref:.3e}"


def assert_all_close(results, expected, dtype, names=("out", "lse", "dq", "dk", "dv")):
    tol = TOL[np.dtype(dtype)]
    for name, a, e in zip(names, results, expected, strict=True):
        assert_close(a, e, tol, name)


# ---------------------------------------------------------------------------------------------
# Jitted (out, lse, dq, dk, dv) of an attention function, one compiled program per static config.


@functools.cache
def grads_fn(fn, **static):
    """jit((q, k, v, do, dlse, masks) -> (out, lse, dq, dk, dv)) of fn(..., return_lse=True).

    `masks` is a dict of the array mask arguments (None allowed). The vjp runs inside the jit.
    """

    @jax.jit
    def run(q, k, v, do, dlse, masks):
        def f(q, k, v):
            return fn(q, k, v, **static, **masks, return_lse=True)

        (out, lse), vjp = jax.vjp(f, q, k, v)
        return (out, lse, *vjp((do, dlse.astype(lse.dtype))))

    return run


def run_attention(fn, q, k, v, do, dlse, masks=None, **static):
    """(out, lse, dq, dk, dv) as numpy arrays."""
    masks = {name: (masks or {}).get(name) for name in MASK_ARGS}
    return tuple(np.asarray(x) for x in grads_fn(fn, **static)(q, k, v, do, dlse, masks))


def reference_f64(q, k, v, do, dlse, masks=None, **static):
    """The ground truth: reference_attention and its vjp in float64 on the same input values."""
    f64 = lambda x: jnp.asarray(x, np.float64)  # noqa: E731
    return run_attention(
        ringattn.reference_attention, f64(q), f64(k), f64(v), f64(do), f64(dlse), masks, **static
    )


@functools.cache
def ring_grads_fn(mesh, axis_name, **static):
    """Like grads_fn, for ring_attention inside jax.shard_map on global arrays sharded on axis 1.

    Mask arrays must be [B, L] (positions broadcast to the batch) so one spec fits them all.
    """
    seq = P(None, axis_name)

    @jax.jit
    def run(q, k, v, do, dlse, masks):
        def local(q, k, v, masks):
            return ringattn.ring_attention(
                q, k, v, axis_name=axis_name, **static, **masks, return_lse=True
            )

        sharded = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(seq, seq, seq, seq),
            out_specs=(seq, P(None, None, axis_name)),
        )
        (out, lse), vjp = jax.vjp(lambda q, k, v: sharded(q, k, v, masks), q, k, v)
        return (out, lse, *vjp((do, dlse.astype(lse.dtype))))

    return run


@functools.cache
def ring_mesh(n, axis_name="ring"):
    """A 1-D mesh over the first n CPU devices (8 of them whatever the accelerator), with an Auto
    axis (shard_map is called directly)."""
    return jax.sharding.Mesh(
        np.asarray(jax.devices("cpu")[:n]), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,)
    )


# ---------------------------------------------------------------------------------------------
# Compiled-program inspection.

_HLO_SHAPE = re.compile(r"\b(?:pred|[a-z]+\d+)\[([\d,]*)\]")


def hlo_shapes(text):
    """Every array shape in HLO text, as tuples of ints."""
    return {tuple(int(d) for d in m.split(",") if d) for m in _HLO_SHAPE.findall(text)}


def square_buffers(text, size):
    """The shapes with two dims of `size`: what a size x size score matrix looks like."""
    return {s for s in hlo_shapes(text) if sum(d == size for d in s) >= 2}


def largest_buffer(text):
    """The element count of the largest array in HLO text."""
    return max(int(np.prod(s)) for s in hlo_shapes(text))


_COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all", "reduce-scatter")


def collectives(text):
    """The collectives of compiled HLO text, in program order: (op, shapes of its result)."""
    found = []
    for line in text.splitlines():
        for op in _COLLECTIVES:
            for form in (f" {op}(", f" {op}-start("):
                if form in line and "=" in line:
                    found.append((op, hlo_shapes(line.split("=", 1)[1].split(form)[0])))
    return found


# ---------------------------------------------------------------------------------------------
# Lowering for another platform.


def lowered_calls(platform, fn, *args):
    """The custom calls (target.custom_calls) of jax.jit(fn) traced under
    ringattn.target_platform(platform) and lowered for it; a RuntimeWarning while tracing (the
    kernel choice's: a kernel skipped, a path missing, an interpreter) is an error."""
    with ringattn.target_platform(platform), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        lowered = jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,))
    return target.custom_calls(lowered.as_text())


@pytest.fixture
def cudnn_stand_in(monkeypatch):
    """A cuDNN version (9.1) where JAX reads the local one while tracing its cuDNN attention:
    from its CUDA plugin, which a CPU machine lacks (then nothing of cuDNN can be traced). With
    it the cuDNN path traces and lowers for CUDA here; what cuDNN itself accepts is unchecked.
    Programs traced with it are cached like any: a test without it lowers other shapes."""
    fa = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 90100)


# ---------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def helpers():
    """The helpers above, for test modules: they take them from here, not by importing conftest."""
    names = (
        "random_inputs",
        "packed_segments",
        "assert_close",
        "assert_all_close",
        "grads_fn",
        "run_attention",
        "reference_f64",
        "ring_grads_fn",
        "ring_mesh",
        "hlo_shapes",
        "square_buffers",
        "largest_buffer",
        "collectives",
        "lowered_calls",
        "TOL",
    )
    return types.SimpleNamespace(**{name: globals()[name] for name in names})


# ---------------------------------------------------------------------------------------------
# Device markers: tests marked `gpu` or `tpu` (pytest.ini) run only where JAX has such a device
# (`pytest -m gpu` on a GPU machine); everywhere else they are skipped, saying why.

DEVICE_MARKERS = ("gpu", "tpu")


@functools.cache
def _has_device(platform):
    try:
        return bool(jax.devices(platform))
    except RuntimeError:  # no such backend in this JAX, or it failed to start
        return False


def pytest_runtest_setup(item):
    if not X64 and not item.get_closest_marker("x64_off"):
        pytest.skip("RINGATTN_X64=0: only the tests marked x64_off run with float64 off")
    for marker in DEVICE_MARKERS:
        if item.get_closest_marker(marker) and not _has_device(marker):
            pytest.skip(f"marked {marker}: JAX has no {marker.upper()} device here")


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each module: every executable keeps memory mappings
    of its code, and the whole suite in one process (~900 tests) crashed XLA:CPU's compiler
    (a segfault, at the same test each time) past a count of them; no module shares one."""
    yield
    jax.clear_caches()
