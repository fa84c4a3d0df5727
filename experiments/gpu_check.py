r"""Checks and times every GPU attention path in one run (issue 6), on one H100/H200:

  python experiments/gpu_check.py

1. correctness of our paths (Pallas, our cuDNN path, kernel="auto"; single calls and ring steps
   emulated on one device) against an f32 reference: out, lse, dq, dk, dv at --check_seq_lens;
2. time of fwd and fwd+bwd, bf16, D = 128, no mask and causal, T = 4K..32K: our Pallas kernel,
   our cuDNN path, auto, the XLA blockwise kernel, jax.nn.dot_product_attention (xla, cudnn);
3. a final table with TFLOP/s and the ratio to cuDNN (jax.nn's cuDNN), and the targets.

Paths that cannot run here are skipped with a line saying why. On CPU the logic runs at tiny
sizes, the Pallas kernel in the interpreter (~2 min on 2 cores):

  python experiments/gpu_check.py --interpret --seq_lens=64 --check_seq_lens=64 \
      --num_heads=2 --num_kv_heads=2 --head_dim=32 --iters=1
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import bench_lib
import ringattn
from ringattn.attention import blockwise, inputs
from ringattn.attention.kernels import cudnn
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["4096", "8192", "16384", "32768"], "Timed T (= S).")
_CHECK_SEQ_LENS = flags.DEFINE_list("check_seq_lens", ["256", "1024"], "Checked T (= S).")
_BATCH = flags.DEFINE_integer("batch", 1, "Batch size B.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 16, "Query heads H.")
_NUM_KV_HEADS = flags.DEFINE_integer("num_kv_heads", 16, "KV heads K of the timed runs.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dimension D.")
_MASKS = flags.DEFINE_list("masks", ["none", "causal"], "Timed masks: none | causal.")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwdbwd"], "fwd and/or fwdbwd.")
_PATHS = flags.DEFINE_list(
    "paths", ["pallas", "cudnn", "auto", "xla", "jax_xla", "jax_cudnn"], "Timed paths."
)
_RING_SHARDS = flags.DEFINE_integer("ring_shards", 4, "Shards of the emulated ring check.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed calls after compiling.")
_ITERS = flags.DEFINE_integer("iters", 5, "Timed calls (interleaved); the median is reported.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run Pallas in the interpreter (CPU).")

TOL = 2e-2  # relative max error of bf16 results (as in the tests)
NAMES = ("out", "lse", "dq", "dk", "dv")


def _pallas():
    return PallasGpu(interpret=_INTERPRET.value)


def _paths():
    """name -> kernel= of our single-device paths, or None where the path cannot run here."""
    reason = cudnn.unavailable_reason()
    if reason is not None:
        print(f"skip path 'cudnn' (ours): {reason}")
    return {
        "pallas": _pallas(),
        "cudnn": None if reason else Cudnn(fallback=_pallas()),
        "auto": "auto",
        "xla": "xla",
    }


# ---------------------------------------------------------------------------------------------
# Correctness.


def _grads(attn):
    """jit((q, k, v, do, dlse) -> (out, lse, dq, dk, dv)) of attn(q, k, v) -> (out, lse)."""

    @jax.jit
    def run(q, k, v, do, dlse):
        (out, lse), vjp = jax.vjp(attn, q, k, v)
        return (out, lse, *vjp((do, dlse)))

    return run


def _ring_emulated(kernel, n, mask):
    """attn(q, k, v) -> (out, lse): a contiguous ring of n devices emulated on one, with a fused
    kernel's passes: q shard i continues its softmax state over every k/v shard j (the ring's
    steps), and the backward gives each pair the final (out, lse), as the ring does."""

    def setup(q):
        t = q.shape[1] // n
        x = q[:, :t]
        spec, _, scale = inputs.check_and_normalize(
            "ring", x, x, x, **_mask_kwargs(mask, defaults=True), segment_ids=None,
            kv_segment_ids=None, q_positions=None, kv_positions=None, scale=None,
        )  # fmt: skip
        kern = kernel.fit(t, t)
        cfg = blockwise.Config(spec, scale, kern.pad_q, kern.pad_k, t, q.dtype, None, kern)
        return kern, cfg, lambda r: slice(r * t, (r + 1) * t)

    def operands(kern, cfg, sl, q, k, v, i, j):
        pos = lambda r: jnp.arange(sl(r).start, sl(r).stop, dtype=jnp.int32)[None]  # noqa: E731
        m = inputs.MaskArrays(pos(i), pos(j), None, None)
        qs, q_, (k_, v_, kpos, kseg) = kern.prepare(cfg, q[:, sl(i)], k[:, sl(j)], v[:, sl(j)], m)
        return q_, k_, v_, qs, kern.kv_side(cfg, kpos, kseg)

    def fwd(q, k, v):
        kern, cfg, sl = setup(q)
        outs = []
        for i in range(n):
            state = None
            for j in range(n):
                q_, k_, v_, qs, ks = operands(kern, cfg, sl, q, k, v, i, j)
                state = state or kern.init_fwd_state(cfg, q_)
                state = kern.fwd_pass(cfg, q_, k_, v_, qs, ks, *state)
            outs.append(kern.finish_fwd(cfg, q[:, sl(i)], *state))
        out = jnp.concatenate([o for o, _ in outs], axis=1)
        lse = jnp.concatenate([x for _, x in outs], axis=2)
        return (out, lse), (q, k, v, out, lse)

    def bwd(res, cts):
        (q, k, v, out, lse), (do, dlse) = res, cts
        kern, cfg, sl = setup(q)
        dq_all, dkv = [], [None] * n
        for i in range(n):
            do_, lse_, aux = kern.prepare_bwd(
                cfg, k, out[:, sl(i)], lse[..., sl(i)], do[:, sl(i)], dlse[..., sl(i)]
            )
            dq = None
            for j in range(n):
                q_, k_, v_, qs, ks = operands(kern, cfg, sl, q, k, v, i, j)
                zeros = [jnp.zeros_like(x, dtype=jnp.float32) for x in (q_, k_, v_)]
                grads = (zeros[0] if dq is None else dq, *(dkv[j] or zeros[1:]))
                dq, *dkv[j] = kern.bwd_pass(cfg, q_, k_, v_, do_, lse_, aux, qs, ks, grads)
            dq_all.append(dq)
        finish = [
            kern.finish_bwd(cfg, q[:, sl(r)], k[:, sl(r)], v[:, sl(r)], dq_all[r], *dkv[r])
            for r in range(n)
        ]
        return tuple(jnp.concatenate([f[x] for f in finish], axis=1) for x in range(3))

    attn = jax.custom_vjp(lambda q, k, v: fwd(q, k, v)[0])
    attn.defvjp(fwd, bwd)
    return attn


def _mask_kwargs(mask, defaults=False):
    kw = {
        "none": {},
        "causal": {"causal": True},
        "window": {"causal": True, "local_window_size": (200, 0)},
    }[mask]
    return {"causal": False, "local_window_size": None, **kw} if defaults else kw


def _check_one(label, attn, data, want):
    try:
        got = _grads(attn)(*data)
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  {label:42s} FAILED to run: {str(e).splitlines()[0][:100]}")
        return False
    errs = []
    for g, w in zip(got, want, strict=True):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        fin = np.isfinite(w)
        bad = np.isnan(g).any() or (np.isfinite(g) != fin).any()
        errs.append(np.inf if bad else np.abs(g[fin] - w[fin]).max() / np.abs(w[fin]).max())
    ok = max(errs) <= TOL
    detail = " ".join(f"{n}={e:.1e}" for n, e in zip(NAMES, errs, strict=True))
    print(f"  {label:42s} {'PASS' if ok else 'FAIL'}  {detail}")
    return ok


def check(paths):
    """Every path and mask kind against an f32 reference (GQA: 4 query heads per KV head)."""
    print("== correctness vs an f32 reference (bf16 inputs, tolerance 2e-2 relative) ==")
    h, d = _NUM_HEADS.value, _HEAD_DIM.value
    kh = max(1, h // 4)
    all_ok = True
    for t in map(int, _CHECK_SEQ_LENS.value):
        rng = np.random.default_rng(t)
        data = [jnp.asarray(rng.standard_normal(s), jnp.bfloat16) for s in
                [(_BATCH.value, t, h, d), (_BATCH.value, t, kh, d), (_BATCH.value, t, kh, d),
                 (_BATCH.value, t, h, d)]]  # fmt: skip
        data.append(jnp.asarray(rng.standard_normal((_BATCH.value, h, t)), jnp.float32))
        seg = np.sort(rng.integers(0, 3, (_BATCH.value, t))).astype(np.int32)
        masks = {m: (_mask_kwargs(m), {}) for m in ("none", "causal", "window")}
        masks["segments"] = ({"causal": True}, {"segment_ids": seg})
        for mask, (static, arrays) in masks.items():
            ref = functools.partial(ringattn.reference_attention, **static, **arrays)
            # A zero lse cotangent is what lets cuDNN run the backward (dlse != 0 falls back).
            for dlse_label, dlse in (("", data[4]), (" dlse=0", jnp.zeros_like(data[4]))):
                run = (*data[:4], dlse)
                with jax.default_matmul_precision("highest"):
                    f32 = [x.astype(jnp.float32) for x in run]
                    want = _grads(lambda q, k, v, f=ref: f(q, k, v, return_lse=True))(*f32)
                for name, kernel in paths.items():
                    if kernel is None or name == "xla" or (dlse_label and name == "pallas"):
                        continue
                    attn = functools.partial(
                        ringattn.blockwise_attention, kernel=kernel, return_lse=True,
                        **static, **arrays,
                    )  # fmt: skip
                    label = f"T={t} {mask:8s} {name}{dlse_label}"
                    all_ok &= _check_one(label, attn, run, want)
                    if not arrays and mask != "window" and not isinstance(kernel, str):
                        ring = _ring_emulated(kernel, _RING_SHARDS.value, mask)
                        label = f"T={t} {mask:8s} {name} ring x{_RING_SHARDS.value}{dlse_label}"
                        all_ok &= _check_one(label, ring, run, want)
    print(f"correctness: {'all PASS' if all_ok else 'FAILURES above'}")
    return all_ok


# ---------------------------------------------------------------------------------------------
# Timing.


def _timed(name, kernel, mask):
    static = _mask_kwargs(mask)
    if name.startswith("jax_"):
        impl = name[4:]

        def dense(q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=static.get("causal", False), implementation=impl
            )

        return dense
    return functools.partial(ringattn.blockwise_attention, kernel=kernel, **static)


def time_all(paths):
    base = bench_lib.BenchConfig(
        batch=_BATCH.value,
        num_heads=_NUM_HEADS.value,
        num_kv_heads=_NUM_KV_HEADS.value,
        head_dim=_HEAD_DIM.value,
        dtype="bfloat16",
        warmup=_WARMUP.value,
        iters=_ITERS.value,
        impls=("blockwise",),
    )
    rows = []
    for mask in _MASKS.value:
        cfg = dataclasses.replace(base, mask=mask)
        for t in map(int, _SEQ_LENS.value):
            data = bench_lib.make_inputs(cfg, t)
            for mode in _MODES.value:
                args = (data["q"], data["k"], data["v"]) + ((data["dout"],) * (mode != "fwd"))
                calls, names = [], []
                for name in _PATHS.value:
                    kernel = paths.get(name, name)
                    if kernel is None:
                        continue
                    fn = bench_lib.with_mode(_timed(name, kernel, mask), mode)
                    try:
                        compiled, _ = bench_lib.compile_once(fn, args)
                        jax.block_until_ready(compiled(*args))
                    except Exception as e:  # noqa: BLE001 - unavailable here: say so, go on
                        print(f"skip {name} {mask} T={t} {mode}: {str(e).splitlines()[0][:120]}")
                        continue
                    calls.append(functools.partial(compiled, *args))
                    names.append(name)
                times = bench_lib.time_interleaved(calls, cfg) if calls else []
                flops = bench_lib.attention_flops(cfg, t, mode)
                for name, sec in zip(names, times, strict=True):
                    rows.append(dict(mask=mask, T=t, mode=mode, path=name, ms=sec * 1e3,
                                     tflops=flops / sec / 1e12))  # fmt: skip
                    print(f"  {mask:6s} T={t:6d} {mode:6s} {name:10s} {sec * 1e3:9.3f} ms "
                          f"{flops / sec / 1e12:7.1f} TFLOP/s")  # fmt: skip
    return rows


def report(rows):
    """The final table, ratios to cuDNN (jax.nn's, else ours) and the issue's targets."""
    ref = {}
    for r in rows:
        if r["path"] in ("jax_cudnn", "cudnn"):
            key = (r["mask"], r["T"], r["mode"])
            if r["path"] == "jax_cudnn" or key not in ref:
                ref[key] = r["tflops"]
    print("\n| mask | T | mode | path | ms | TFLOP/s | x cuDNN |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        base = ref.get((r["mask"], r["T"], r["mode"]))
        r["ratio"] = r["tflops"] / base if base else None
        ratio = f"{r['ratio']:.2f}" if base else "n/a"
        print(f"| {r['mask']} | {r['T']} | {r['mode']} | {r['path']} | {r['ms']:.3f} | "
              f"{r['tflops']:.1f} | {ratio} |")  # fmt: skip
    targets = [
        ("pallas causal fwd+bwd >= 0.6x cuDNN, T >= 8K", "pallas", ("causal",), 0.6),
        ("auto >= 0.85x cuDNN, no mask and causal", "auto", ("none", "causal"), 0.85),
    ]
    for text, path, masks, need in targets:
        got = [r["ratio"] for r in rows if r["path"] == path and r["mask"] in masks
               and r["ratio"] is not None
               and (path != "pallas" or (r["mode"] == "fwdbwd" and r["T"] >= 8192))]  # fmt: skip
        verdict = "n/a (no cuDNN baseline)" if not got else (
            f"{'met' if min(got) >= need else 'MISSED'} (min {min(got):.2f})")  # fmt: skip
        print(f"target: {text}: {verdict}")


def main(argv):
    del argv
    print(f"jax {jax.__version__}, devices: {jax.devices()}")
    paths = _paths()
    check(paths)
    report(time_all(paths))


if __name__ == "__main__":
    app.run(main)
