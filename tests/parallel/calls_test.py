"""The ways people call us: eagerly, under jit, grad (eager and jitted), vmap, checkpoint, scan,
debug_nans / debug_infs; on Explicit-axes meshes (jax.make_mesh's default), Auto-axes meshes and
under jax.set_mesh; ring_attention inside the user's own shard_map with check_vma on and off.

Every call is compared with the float64 reference (out, and the gradients of q, k, v and the
sinks where the mode differentiates). The (mode x mesh) matrix is complete; each cell runs one
strategy and layout, chosen so that every strategy and every layout appear in every mode across
the meshes and every (strategy, layout) pair appears (the strategies x layouts x variants product
itself is strategies_test.py's, under jit).
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import ringattn

B, T, H, K, D = 2, 32, 4, 2, 8
STATIC = dict(causal=True, logits_soft_cap=3.0, block_q=8, block_k=8)
MODES = ("eager", "jit", "grad", "grad_jit", "vmap", "checkpoint", "scan", "debug")
MESHES = ("explicit", "auto", "set_mesh")
PAIRS = list(itertools.product(("ring", "allgather", "ulysses", "hybrid"), ringattn.LAYOUTS))


def _cell(mode, mesh_kind):
    """The (strategy, layout) of a matrix cell: strategies rotate along the modes, layouts along
    the meshes, so every mode sees three strategies x three layouts and all 12 pairs appear."""
    i, j = MODES.index(mode), MESHES.index(mesh_kind)
    return PAIRS[(3 * i + 5 * j) % len(PAIRS)]


@functools.cache
def _data():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((B, T, h, D)) for h in (H, K, K))
    sinks, w = rng.standard_normal(H), rng.standard_normal((B, T, H, D))
    return q, k, v, sinks, w


@functools.cache
def _reference():
    """out and d(sum(out * w))/d(q, k, v, sinks) in float64, natural order."""
    q, k, v, sinks, w = (jnp.asarray(x, jnp.float64) for x in _data())
    kw = {n: STATIC[n] for n in ("causal", "logits_soft_cap")}
    f = lambda q, k, v, s: ringattn.reference_attention(q, k, v, sinks=s, **kw)  # noqa: E731
    out = f(q, k, v, sinks)
    grads = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2, 3))(q, k, v, sinks)
    return (np.asarray(out), *(np.asarray(g) for g in grads))


def _mesh(strategy, kind):
    """Two devices (four for hybrid's 2 x 2): eager calls dispatch every op on every device."""
    shape, names = ((2, 2), ("u", "r")) if strategy == "hybrid" else ((2,), ("context",))
    types = (AxisType.Auto if kind == "auto" else AxisType.Explicit,) * len(shape)
    devices = jax.devices("cpu")[: int(np.prod(shape))]
    return jax.make_mesh(shape, names, axis_types=types, devices=devices), names


def _attention(strategy, layout, mesh, names, input_layout):
    axis = names if strategy == "hybrid" else names[0]

    def f(q, k, v, sinks):
        return ringattn.context_parallel_attention(
            q, k, v, sinks=sinks, mesh=mesh, axis_name=axis, strategy=strategy, layout=layout,
            input_layout=input_layout, **STATIC,
        )  # fmt: skip

    return f


def _run(mode, f, q, k, v, sinks, w):
    """(out, grads or None) the way `mode` calls f."""
    loss = lambda q, k, v, s: jnp.sum(f(q, k, v, s) * w)  # noqa: E731
    grad = jax.grad(loss, argnums=(0, 1, 2, 3))
    if mode == "eager":
        return f(q, k, v, sinks), None
    if mode == "jit":
        return jax.jit(f)(q, k, v, sinks), None
    if mode == "grad":
        return f(q, k, v, sinks), grad(q, k, v, sinks)
    if mode == "grad_jit":
        return jax.jit(f)(q, k, v, sinks), jax.jit(grad)(q, k, v, sinks)
    if mode == "vmap":  # over the batch, one row at a time
        row = lambda q, k, v: f(q[None], k[None], v[None], sinks)[0]  # noqa: E731
        return jax.vmap(row)(q, k, v), None
    if mode == "checkpoint":
        return f(q, k, v, sinks), jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3)))(
            q, k, v, sinks
        )
    if mode == "scan":  # the same call twice inside lax.scan, on q and on -q

        def body(_, q):
            return None, f(q, k, v, sinks)

        _, ys = jax.jit(lambda q: jax.lax.scan(body, None, jnp.stack([q, -q])))(q)
        return ys, None
    with jax.debug_nans(True), jax.debug_infs(True):  # "debug": both checks, eagerly
        return f(q, k, v, sinks), grad(q, k, v, sinks)


@pytest.mark.parametrize("mesh_kind", MESHES)
@pytest.mark.parametrize("mode", MODES)
def test_calls(helpers, mode, mesh_kind):
    strategy, layout = _cell(mode, mesh_kind)
    mesh, names = _mesh(strategy, mesh_kind)
    n = mesh.size
    q, k, v, sinks, w = _data()
    # Half the modes hand over arrays in natural order (laid out inside), half laid out already.
    natural = MODES.index(mode) % 2 == 0
    order = "contiguous" if natural else layout
    to = lambda x: ringattn.to_layout(jnp.asarray(x, jnp.float32), order, n)  # noqa: E731
    back = lambda x: np.asarray(ringattn.from_layout(np.asarray(x), order, n))  # noqa: E731
    f = _attention(strategy, layout, mesh, names, "natural" if natural else layout)
    args = (to(q), to(k), to(v), jnp.asarray(sinks, jnp.float32), to(w))
    if mesh_kind == "set_mesh":
        with jax.set_mesh(mesh):
            out, grads = _run(mode, f, *args)
    else:
        out, grads = _run(mode, f, *args)
    ref = _reference()
    tol = helpers.TOL[np.dtype(np.float32)]
    if mode == "scan":
        neg = _negated_reference()
        helpers.assert_close(back(out[0]), ref[0], tol, "out")
        helpers.assert_close(back(out[1]), neg, tol, "out(-q)")
        return
    helpers.assert_close(back(out), ref[0], tol, "out")
    if grads is not None:
        for name, g, want in zip(("dq", "dk", "dv"), grads[:3], ref[1:4], strict=True):
            helpers.assert_close(back(g), want, tol, name)
        helpers.assert_close(grads[3], ref[4], tol, "dsinks")


@functools.cache
def _negated_reference():
    q, k, v, sinks, _ = (jnp.asarray(x, jnp.float64) for x in _data())
    return np.asarray(
        ringattn.reference_attention(
            -q, k, v, sinks=sinks, causal=True, logits_soft_cap=STATIC["logits_soft_cap"]
        )
    )


def test_matrix_covers_every_strategy_and_layout():
    cells = {_cell(mode, kind) for mode in MODES for kind in MESHES}
    assert cells == set(PAIRS)
    for mode in MODES:
        strategies = {_cell(mode, kind)[0] for kind in MESHES}
        layouts = {_cell(mode, kind)[1] for kind in MESHES}
        assert len(strategies) == 3 and len(layouts) == 3


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("jit", [False, True])
def test_ring_inside_users_shard_map(helpers, check_vma, jit):
    """ring_attention in the user's own shard_map (sinks replicated, q/k/v sharded), value and
    gradients, jitted or not, with check_vma on and off."""
    mesh = jax.make_mesh((4,), ("context",), devices=jax.devices("cpu")[:4])
    q, k, v, sinks, w = (jnp.asarray(x, jnp.float32) for x in _data())
    seq = P(None, "context")

    def local(q, k, v, sinks):
        return ringattn.ring_attention(q, k, v, sinks=sinks, axis_name="context", **STATIC)

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(seq, seq, seq, P()), out_specs=seq, check_vma=check_vma
    )
    grad = jax.grad(lambda *a: jnp.sum(f(*a) * w), argnums=(0, 1, 2, 3))
    if jit:
        f, grad = jax.jit(f), jax.jit(grad)
    with jax.set_mesh(mesh):
        q, k, v = (jax.reshard(x, seq) for x in (q, k, v))  # Explicit axes: the user shards
        out, grads = f(q, k, v, sinks), grad(q, k, v, sinks)
    ref = _reference()
    tol = helpers.TOL[np.dtype(np.float32)]
    helpers.assert_close(out, ref[0], tol, "out")
    for name, g, want in zip(("dq", "dk", "dv", "dsinks"), grads, ref[1:], strict=True):
        helpers.assert_close(g, want, tol, name)


@pytest.mark.parametrize("mode", ["eager", "grad", "vmap", "debug"])
def test_blockwise_and_reference_calls(helpers, mode):
    """The single-device functions the same ways (no mesh)."""
    q, k, v, sinks, w = (jnp.asarray(x, jnp.float32) for x in _data())
    ref = _reference()
    tol = helpers.TOL[np.dtype(np.float32)]
    for fn, kw in (
        (ringattn.blockwise_attention, STATIC),
        (ringattn.reference_attention, {n: STATIC[n] for n in ("causal", "logits_soft_cap")}),
    ):
        f = functools.partial(fn, **kw)
        out, grads = _run(mode, lambda q, k, v, s: f(q, k, v, sinks=s), q, k, v, sinks, w)  # noqa: B023
        helpers.assert_close(out, ref[0], tol, f"{fn.__name__} out")
        if grads is not None:
            for name, g, want in zip(("dq", "dk", "dv", "ds"), grads, ref[1:], strict=True):
                helpers.assert_close(g, want, tol, f"{fn.__name__} {name}")
