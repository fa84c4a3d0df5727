r"""Before/after timings of the speed work (issue 28) in ONE process, side by side: the code
before (a checkout given by --before) is imported under another package name next to this
checkout's `ringattn`, both are compiled, then timed in turns (ringattn.bench.timing), so load
from other processes falls on both alike and the ratio stays meaningful on a shared machine.

  git worktree add /tmp/before <base commit>
  python experiments/results/speed/before_after.py --before=/tmp/before --what=decode
  python experiments/results/speed/before_after.py --before=/tmp/before --what=forward
  python experiments/results/speed/before_after.py --before=/tmp/before --what=ring

decode: SmolLM2-135M's shape (the fetched run's config, random parameters: speed does not
depend on them), a prompt of --cache_len - 64 tokens prefilled, then --steps decode steps in one
jitted scan: ms per step on 1 device and on --num_devices (the cache sharded). forward: the
model's forward over --forward_len tokens on 1 device (blockwise attention). ring: causal
fwd+bwd ring attention at --ring_len over --num_devices against the original `ringattention`
package. With --profile, where the time goes (jax.profiler, by the HLO op names).
"""

import collections
import dataclasses
import functools
import glob
import gzip
import importlib
import json
import os
import re
import shutil
import sys
import tempfile

from absl import app, flags

_BEFORE = flags.DEFINE_string("before", None, "A checkout of the code before (its ringattn/).")
_WHAT = flags.DEFINE_list("what", ["decode"], "decode, forward and/or ring.")
_CACHE_LEN = flags.DEFINE_integer("cache_len", 2112, "decode: cache slots (prompt + 64).")
_STEPS = flags.DEFINE_integer("steps", 16, "decode: steps in the timed scan.")
_FORWARD_LEN = flags.DEFINE_integer("forward_len", 2048, "forward: tokens.")
_RING_LEN = flags.DEFINE_integer("ring_len", 4096, "ring: sequence length.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 8, "Devices of the sharded runs.")
_DECODE_DEVICES = flags.DEFINE_list("decode_devices", ["1", "8"], "decode: device counts.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (the median is reported).")
_PROFILE = flags.DEFINE_bool("profile", False, "Also trace each program: time by op name.")
_RUN = flags.DEFINE_string("run", "~/.cache/ringattn/smollm2/run", "The model's run directory.")
_OUT = flags.DEFINE_string("out", None, "Append the results as JSON lines here.")


def load_before(path):
    """`ringattn` of the checkout at `path`, imported as `ringattn_before` (a renamed copy)."""
    tmp = tempfile.mkdtemp(prefix="ringattn_before_")
    dst = os.path.join(tmp, "ringattn_before")
    shutil.copytree(os.path.join(path, "ringattn"), dst)
    word = re.compile(r"\bringattn\b")
    for name in glob.glob(os.path.join(dst, "**", "*.py"), recursive=True):
        with open(name) as f:
            text = word.sub("ringattn_before", f.read())
        with open(name, "w") as f:
            f.write(text)
    sys.path.insert(0, tmp)
    return importlib.import_module("ringattn_before")


def modules(pkg):
    """The modules of one version the measurements use."""
    names = dict(
        gen="evals.generate",
        config="nn.config",
        model="nn.model",
        mesh="mesh",
        timing="bench.timing",
        directory="run.directory",
    )
    return {k: importlib.import_module(f"{pkg}.{v}") for k, v in names.items()}


def model_cfg(m, impl):
    """SmolLM2-135M's ModelConfig from the run directory, attention `impl`."""
    config = m["directory"].load_config(os.path.expanduser(_RUN.value))
    cfg = m["config"].ModelConfig.from_config(config.model)
    return dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl=impl))


def random_params(m, cfg):
    import jax
    import numpy as np
    from flax import linen as nn

    dense = dataclasses.replace(cfg, attention=dataclasses.replace(cfg.attention, impl="dense"))
    tokens = np.zeros((1, 8), np.int32)
    init = jax.jit(m["model"].Transformer(dense).init)
    return nn.unbox(init(jax.random.key(0), tokens, tokens, tokens + 1))["params"]


def decode_program(m, n, params):
    """(jitted decode scan, a function giving its arguments: fresh caches, as it donates them)
    after a prefill, on n devices."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    gen = m["gen"]
    cfg = model_cfg(m, "blockwise" if n == 1 else "ring")
    mesh = None
    if n > 1:
        mesh = m["mesh"].make_mesh(dict(context=n), jax.devices()[:n])
        params = jax.device_put(params, NamedSharding(mesh, P()))
    model = gen.decoding_model(cfg, mesh)
    prompt_len = _CACHE_LEN.value - 64
    rng = np.random.default_rng(0)
    batch = gen.prompt_batch([rng.integers(32, 127, prompt_len)], gen.pad_multiple(cfg, mesh))
    caches = gen.init_caches(cfg, gen.CacheSpec("full", max_len=_CACHE_LEN.value), 1, mesh)
    pre = jax.jit(functools.partial(gen.prefill, model), static_argnums=3)
    _, caches = jax.block_until_ready(pre(params, batch, caches, 0))
    loop = jax.jit(
        functools.partial(gen.decode_loop, model, num_steps=_STEPS.value, temperature=0.0, top_k=0),
        donate_argnums=1,  # the caches are updated in place, as generate does
    )
    rest = (jnp.ones((1,), jnp.int32), jnp.full((1,), prompt_len, jnp.int32), jax.random.key(0))
    fresh = lambda: (params, jax.tree.map(jnp.copy, caches), *rest)  # noqa: E731
    return loop, fresh


def forward_program(m, params):
    import jax
    import jax.numpy as jnp
    import numpy as np

    cfg = model_cfg(m, "blockwise")
    model = m["model"].Transformer(cfg)
    t = _FORWARD_LEN.value
    tokens = jnp.asarray(np.random.default_rng(0).integers(32, 127, (1, t)), jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)[None]
    fwd = jax.jit(lambda p, x, q: model.apply({"params": p}, x, q, jnp.ones_like(q)))
    return fwd, lambda: (params, tokens, pos)


def ring_program(pkg, n):
    """Causal fwd+bwd of ring attention (8 heads, head dim 64, f32, blocks 512) over n devices;
    pkg None: the original `ringattention`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    t = _RING_LEN.value
    rng = np.random.default_rng(0)
    q, k, v, do = (jnp.asarray(rng.standard_normal((1, t, 8, 64)), jnp.float32) for _ in range(4))
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n])
    if pkg is None:
        from ringattn.bench import attention

        cfg = attention.BenchConfig(impls=("original",), device_counts=(n,))
        attn = attention.make_attention("original", cfg, mesh, t)
    else:
        ringattn = importlib.import_module(pkg)

        def attn(q, k, v):
            return ringattn.context_parallel_attention(
                q, k, v, mesh=mesh, strategy="ring", layout="contiguous",
                input_layout="contiguous", block_q=512, block_k=512, causal=True,
            )  # fmt: skip

    def fwdbwd(q, k, v, do):
        return jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v) * do), argnums=(0, 1, 2))(q, k, v)

    sharding = jax.sharding.NamedSharding(mesh, jax.P(None, "context"))
    args = tuple(jax.device_put(x, sharding) for x in (q, k, v, do))
    return jax.jit(fwdbwd), lambda: args


def tile_matmuls(n):
    """The matrix products alone of the causal ring's fwd+bwd at T = --ring_len over n devices
    (8 heads, head dim 64, 512-token shards and tiles, the contiguous layout): device r computes
    r + 1 tiles, each 2 forward products (q k^T, p v) and 5 backward (q k^T again, do v^T,
    p^T do, ds^T q, ds k), in the layouts XLA multiplies fastest; on the same simulated devices
    as the ring: what its step cannot go below with these tiles on this machine's matmuls."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax import lax

    rng = np.random.default_rng(0)
    mesh = jax.make_mesh((n,), ("context",), devices=jax.devices()[:n])
    x = jnp.asarray(rng.standard_normal((n * 4, 8, 512, 64)), jnp.float32)
    x = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.P("context")))

    def local(x):
        def body(i, acc):
            q, k, v, do = (x[j] + i.astype(x.dtype) for j in range(4))
            s = jnp.einsum("hqd,hsd->hqs", q, k)
            o = jnp.einsum("hqs,hsd->hqd", s, v)
            s2 = jnp.einsum("hqd,hsd->hqs", q + o, k)
            dp = jnp.einsum("hqd,hsd->hqs", do, v)
            dv = jnp.einsum("hqs,hqd->hsd", s2, do)
            dk = jnp.einsum("hqs,hqd->hsd", dp, q)
            dq = jnp.einsum("hqs,hsd->hqd", dp, k)
            return acc + dv + dk + dq

        tiles = lax.axis_index("context") + 1
        return lax.fori_loop(0, tiles, body, jnp.zeros_like(x[:1]))

    fn = jax.shard_map(local, mesh=mesh, in_specs=jax.P("context"), out_specs=jax.P("context"))
    return jax.jit(fn), lambda: (x,)


def profile(fn, fresh, hlo, runs=2):
    """ms per run of fn's thunks grouped by op name (layer numbers dropped), over all devices;
    thunks may overlap (XLA:CPU runs independent ones at once), so the sum exceeds wall time."""
    import jax

    ops = {}
    for line in hlo.splitlines():
        mm = re.match(r"\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\(", line)
        if not mm or mm.group(3) in ("while", "conditional", "call", "parameter", "tuple"):
            continue
        name = re.search(r'op_name="([^"]*)"', line)
        # Without a name (XLA's own rewrites: decode's matrix-vector dots), the op and its shape.
        op = name.group(1) if name else f"{mm.group(3)} {mm.group(2).split('{')[0]}"
        op = re.sub(r"layer_\d+/|while/body/|closed_call/", "", op)
        ops[mm.group(1)] = re.sub(r"^jit\([^)]*\)/|Transformer[./]\w*/?", "", op)
    path = tempfile.mkdtemp(prefix="trace_")
    jax.block_until_ready(fn(*fresh()))
    args = [fresh() for _ in range(runs)]
    jax.profiler.start_trace(path, create_perfetto_trace=True)
    for a in args:
        jax.block_until_ready(fn(*a))
    jax.profiler.stop_trace()
    trace = glob.glob(f"{path}/**/perfetto_trace.json.gz", recursive=True)[0]
    events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    total = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and e["name"] in ops:
            total[ops[e["name"]]] += e["dur"] / runs / 1e3
    shutil.rmtree(path, ignore_errors=True)
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def compare(name, programs, per=1.0, unit="ms"):
    """Time the programs (version -> (fn, args)) in turns; print and return a row."""
    from ringattn.bench import timing

    compiled = {v: fn.lower(*fresh()).compile() for v, (fn, fresh) in programs.items()}
    fresh = {v: programs[v][1] for v in compiled}
    secs = timing.interleaved(compiled, _ROUNDS.value, warmup=1, fresh_args=fresh)
    row = dict(what=name, **{f"{v}_{unit}": s * 1e3 / per for v, s in secs.items()})
    versions = list(secs)
    if "before" in secs and "after" in secs:
        row["after_vs_before"] = secs["after"] / secs["before"]
    if "original" in secs:
        row.update({f"{v}_vs_original": secs[v] / secs["original"] for v in versions})
    print(json.dumps(row), flush=True)
    if _PROFILE.value:
        for v in compiled:
            prof = profile(compiled[v], fresh[v], compiled[v].as_text())
            top = {k: round(x, 2) for k, x in list(prof.items())[:25]}
            print(json.dumps(dict(what=name, version=v, profile_ms=top)), flush=True)
            row[f"{v}_profile_ms"] = prof
    if _OUT.value:
        with open(_OUT.value, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def main(argv):
    del argv
    import jax

    jax.config.update("jax_num_cpu_devices", max(8, _NUM_DEVICES.value))
    versions = {"after": "ringattn"}
    if _BEFORE.value:
        load_before(os.path.expanduser(_BEFORE.value))
        versions = {"before": "ringattn_before", **versions}
    mods = {v: modules(pkg) for v, pkg in versions.items()}
    if "decode" in _WHAT.value or "forward" in _WHAT.value:
        first = next(iter(mods.values()))
        params = random_params(first, model_cfg(first, "dense"))
    if "decode" in _WHAT.value:
        for n in map(int, _DECODE_DEVICES.value):
            progs = {v: decode_program(m, n, params) for v, m in mods.items()}
            compare(f"decode ms/step, {n} device(s), cache {_CACHE_LEN.value}", progs,
                    per=_STEPS.value)  # fmt: skip
    if "forward" in _WHAT.value:
        progs = {v: forward_program(m, params) for v, m in mods.items()}
        compare(f"forward ms, {_FORWARD_LEN.value} tokens, 1 device", progs)
    if "ring" in _WHAT.value:
        progs = {v: ring_program(pkg, _NUM_DEVICES.value) for v, pkg in versions.items()}
        progs["original"] = ring_program(None, _NUM_DEVICES.value)
        progs["matmuls_only"] = tile_matmuls(_NUM_DEVICES.value)
        compare(f"ring fwd+bwd ms, T={_RING_LEN.value}, {_NUM_DEVICES.value} devices", progs)


if __name__ == "__main__":
    app.run(main)
