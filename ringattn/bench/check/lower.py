"""The lowering stage of gpu_check (--lower): every fused kernel path traced and
lowered for CUDA and for TPU, on any machine (ringattn.target_platform: no device of the target,
nothing run). One line per lowered program with its custom calls; a program that fails to lower,
or lowers without the kernels expected there (fell back to XLA), is a failure.

Programs: every pass of each fused kernel (probe.lower: forward fresh and continuing a state,
dK/dV and dQ fresh and continuing) per mask kind, head dim and dtype; kernel="auto" through
blockwise_attention, forward and gradients; context_parallel_attention with each strategy on an
8-device mesh of this machine's CPU devices; one train step of the LM with impl="ring" (when
flax, optax and absl are installed). The cuDNN path is n/a where JAX has no CUDA plugin: JAX
reads the local cuDNN version while tracing it.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

import ringattn
from ringattn.attention.kernels import cudnn, probe, splash
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.kernels.splash import PallasTpu
from ringattn.attention.target import custom_calls
from ringattn.bench.check.report import attempt

DEVICES = 8  # the whole programs' mesh, of CPU devices
MASKS = probe.MASK_KINDS
PALLAS = ("ringattn_fwd", "ringattn_dkv", "ringattn_dq")  # Triton kernels, by name
CUDNN = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")
SPLASH = ("splash_mqa_fwd", "splash_mqa_dkv", "splash_mqa_dq")  # Mosaic kernels, by prefix
BF16, F16, F32 = jnp.bfloat16, jnp.float16, jnp.float32


def _kernel_cases(platform, quick, with_cudnn):
    """(kernel name, kernel, mask, dtype, head dim, v head dim) of every kernel pass program:
    the mask kinds at bf16 and D = 128, then (not quick) head dims x dtypes, causal."""
    if platform == "cuda":
        kernels = (("pallas", PallasGpu(), (64, 128, 256), (BF16, F16, F32)),)
        if with_cudnn:  # D <= 128 without a local Hopper (JAX's rule)
            kernels += (("cudnn", Cudnn(), (64, 128), (BF16, F16)),)
    else:
        kernels = (("splash", PallasTpu(), (64, 128, 256), (BF16, F32)),)
    for name, kern, dims, dtypes in kernels:
        for mask in MASKS:
            yield name, kern, mask, BF16, 128, 128
        if name == "pallas":
            yield name, kern, "causal", BF16, 128, 64  # v's own head dim
        for d in () if quick else dims:
            for dtype in dtypes:
                if (d, dtype) != (128, BF16):
                    yield name, kern, "causal", dtype, d, d


def _expected(platform, with_cudnn):
    if platform == "tpu":
        return SPLASH
    return PALLAS + (CUDNN if with_cudnn else ())


def _na(name, kern, mask, dtype, d, dv):
    """Why a kernel does not take this case (its own rule: kernel="auto" runs another one)."""
    if name == "splash":
        return splash.problem(dtype, d) or kern.supports(MASKS[mask].soft_cap, d, dv)
    if name == "cudnn":
        return kern.supports(MASKS[mask].soft_cap, d, dv)
    return None


def _line(rep, platform, label, fn, expected):
    """Lower fn() (-> program text) and report it: ok when every expected kernel is called."""
    where = f"lower, {platform}, {label}"
    t0 = time.perf_counter()
    ok, text = attempt(rep, where, fn)
    secs = time.perf_counter() - t0
    head = f"  {platform:4s} {label:44s}"
    if not ok:
        rep.line(f"{head} FAILED [{where}] {text}")
        rep.fail(where, text)
        return rep.record("lower", where=where, status="FAILED", error=text)
    calls = custom_calls(text)
    names = {c.kernel or c.target for c in calls}
    missing = [e for e in expected if not any(n.startswith(e) for n in names)]
    listed = ", ".join(f"{c} x{n}" for c, n in sorted(calls.items(), key=str)) or "none"
    status = "FAILED" if missing else "ok"
    rep.line(f"{head} {status:6s} {secs:4.1f} s  {listed}")
    if missing:
        why = f"lowered without {missing} (fell back to XLA)"
        rep.line(f"  {'':4s} {'':44s} FAILED [{where}] {why}")
        rep.fail(where, why)
    calls = {str(c): n for c, n in calls.items()}
    rep.record("lower", where=where, status=status, seconds=secs, calls=calls)


def _lowered(platform, fn, *args):
    """The text of jit(fn) (fn itself if jitted) traced for `platform` and lowered for it."""
    fn = fn if hasattr(fn, "trace") else jax.jit(fn)
    with ringattn.target_platform(platform):
        return fn.trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _grads(attn):
    """(out, (dq, dk, dv)) of attn with the output as its own cotangent."""

    def run(q, k, v):
        out, vjp = jax.vjp(attn, q, k, v)
        return out, vjp(out)

    return run


def _programs(platform, with_cudnn):
    """(label, fn() -> lowered text, expected kernels) of the whole programs: auto, the
    strategies, the LM's train step."""
    b, t, h, kh, d = 1, 2048, 8, 4, 128
    q = jax.ShapeDtypeStruct((b, t, h, d), BF16)
    k = jax.ShapeDtypeStruct((b, t, kh, d), BF16)
    want = _expected(platform, with_cudnn)

    def blockwise(q, k, v):
        return ringattn.blockwise_attention(q, k, v, causal=True)

    yield "auto: blockwise fwd+bwd", lambda: _lowered(platform, _grads(blockwise), q, k, k), want
    cpus = jax.devices("cpu")
    if len(cpus) < DEVICES:
        return
    for strategy in ("ring", "allgather", "ulysses", "hybrid"):
        if strategy == "hybrid":
            mesh, axis = jax.make_mesh((2, 4), ("u", "r"), devices=cpus[:DEVICES]), ("u", "r")
        else:
            mesh, axis = jax.make_mesh((DEVICES,), ("c",), devices=cpus[:DEVICES]), "c"

        def attn(q, k, v, mesh=mesh, axis=axis, strategy=strategy):
            return ringattn.context_parallel_attention(
                q, k, v, mesh=mesh, axis_name=axis, strategy=strategy, causal=True
            )

        fn = _grads(attn)
        label = f"{strategy} fwd+bwd ({DEVICES} devices)"
        yield label, lambda fn=fn: _lowered(platform, fn, q, k, k), want
    yield "LM train step, impl=ring", lambda: _train_step(platform, cpus[:DEVICES]), want


def _train_step(platform, devices):
    """The text of one train step of a small bf16 LM (head dim 128, ring attention) on a
    data=2 x context=4 mesh, lowered for `platform`."""
    import optax

    from ringattn.mesh import make_mesh, mesh_axes_for
    from ringattn.nn.config import AttentionConfig, ModelConfig
    from ringattn.nn.model import Transformer
    from ringattn.train import state, step

    cfg = ModelConfig(
        vocab_size=256, num_layers=1, d_model=256, num_heads=2, num_kv_heads=1, head_dim=128,
        mlp_dim=512, dtype="bfloat16", attention=AttentionConfig(impl="ring"),
    )  # fmt: skip
    mesh = make_mesh(dict(data=2, context=4), devices)
    model, tx = Transformer(cfg, mesh), optax.adamw(1e-3)
    abstract_state, shardings = state.state_shardings(model, tx, mesh, cfg.rules)
    data = step.batch_sharding(mesh, mesh_axes_for(cfg.rules, "act_batch"))
    dtypes = dict(weights=jnp.float32, answer_mask=jnp.bool_)
    batch = {
        name: jax.ShapeDtypeStruct((2, 1024), dtypes.get(name, jnp.int32), sharding=data)
        for name in step.BATCH_KEYS
    }
    train_step = step.jit_train_step(model, tx, shardings, data, mesh)
    return _lowered(platform, train_step, abstract_state, batch)


def _na_line(rep, platform, label, why):
    rep.line(f"  {platform:4s} {label:44s} n/a: {why}")
    rep.record("lower", where=f"lower, {platform}, {label}", status="n/a", why=why)


def stage_lower(rep, platforms, quick):
    """Every kernel pass program, then the whole programs, lowered for each platform."""
    rep.line(
        f"== lower [{rep.elapsed():.0f} s]: every fused path lowered for {', '.join(platforms)} "
        f"(no device of it needed; custom calls per program, 'x n' = in the text n times) =="
    )
    no_cudnn = cudnn.lowering_problem()
    for platform in platforms:
        if platform == "cuda" and no_cudnn is not None:
            _na_line(rep, platform, "cudnn passes (every case)", no_cudnn)
        for name, kern, mask, dtype, d, dv in _kernel_cases(platform, quick, no_cudnn is None):
            label = f"{name} passes, {mask}, {jnp.dtype(dtype).name}, D={d}"
            label += f" Dv={dv}" if dv != d else ""
            why = _na(name, kern, mask, dtype, d, dv)
            if why is not None:
                _na_line(rep, platform, label, why)
                continue
            lower = functools.partial(probe.lower, kern, dtype, d, dv, MASKS[mask], platform)
            _line(rep, platform, label, lower, _expected(platform, name == "cudnn"))
        if len(jax.devices("cpu")) < DEVICES:
            why = f"the strategies need {DEVICES} CPU devices, this process has fewer"
            _na_line(rep, platform, "context_parallel_attention, LM train step", why)
        for label, fn, want in _programs(platform, no_cudnn is None):
            if label.startswith("LM") and not _has_model_deps():
                _na_line(rep, platform, label, "needs flax, optax and absl (pip install -e .)")
                continue
            _line(rep, platform, label, fn, want)


def _has_model_deps():
    try:
        import absl  # noqa: F401
        import flax  # noqa: F401
        import optax  # noqa: F401
    except ImportError:
        return False
    return True
