"""`kernel=`: which single-device kernel the attention functions run, by name or as an object.

  "xla"         the pure-JAX blockwise kernel (xla.py): every backend, dtype, mask and variant
  "pallas_gpu"  our Pallas/Triton kernel (pallas_gpu.py); on a non-GPU platform it runs in the
                Pallas interpreter (slow: for tests)
  "cudnn"       cuDNN flash attention for unmasked and causal-diagonal steps, Pallas for the
                others (cudnn.py); CUDA GPUs, bf16/f16, head dim a multiple of 8
  "pallas_tpu"  JAX's splash attention for the steps it expresses, XLA for the others
                (splash.py); on a non-TPU platform in the TPU interpreter (slow: for tests)
  "auto"        the first kernel of the platform's chain that runs: cuDNN -> our Pallas -> XLA
                on CUDA GPUs, splash -> XLA on TPUs, XLA on CPUs (and whenever a tile_callback
                is given)

Objects (`PallasGpu(block_q=..., interpret=True)`, `Cudnn(fallback=...)`, `PallasTpu(...)`) set
a kernel's tiles and launch options. The platform is the lowering target when one is set
(`ringattn.target_platform`, target.py), else that of the mesh being traced under (inside
shard_map or a `jax.set_mesh`), else the default backend.

A fused kernel is probed (probe.py) the first time a combination (kernel, dtype, head dims, mask
kind) is used: compiled and run once on a small problem, outside the caller's trace, against
the XLA kernel. Under "auto" one that fails is skipped with a warning, once; a kernel asked for
by name or object that fails raises an error naming the cause and the kernels that would work.

In a multi-process job every process must run the same kernels (probe.py explains how): under
"auto" a kernel is used only where every process's checks and probe passed, and the warning
names the processes (and hosts) that refused it; a kernel asked for by name or object raises on
every process when any process cannot run it. Asking by name (AttentionConfig.kernel) pins the
choice: no chain of probes decides it.

Lowering for a target platform (`with ringattn.target_platform("tpu"):` around
`jax.jit(f).trace(...).lower(lowering_platforms=("tpu",))`) chooses for that platform, on the
static checks alone: the probe cannot run another platform's program, so it is skipped, and
cuDNN needs only JAX's cuDNN module and version here, not a local GPU. "auto" then gives the
kernels the target would run (cuDNN only where JAX can trace it: with its CUDA plugin).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp

from ringattn.attention import target
from ringattn.attention.kernels import cudnn, fused, probe, splash
from ringattn.attention.kernels import xla as xla_lib
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.kernels.xla import Xla

KERNELS = ("auto", "xla", "pallas_gpu", "cudnn", "pallas_tpu")
_OBJECTS = (Xla, fused.FusedKernel)  # the kernel objects a call may pass
_GPU_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_HALF = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class Call:
    """What decides a kernel: the call's static options and its local shapes and dtype."""

    fn: str
    dtype: jnp.dtype
    head_dim: int
    v_head_dim: int
    q_len: int
    kv_len: int
    kind: probe.MaskKind
    where: str
    target: str | None = None  # lowering for this platform (target.py): no probe, no device

    @property
    def lowering(self):
        return self.target is not None


def platform_of(name):
    """A JAX platform or device name as `platform` gives it: 'gpu' for the GPU platforms."""
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


def mesh_platform(mesh):
    """The platform kernels are chosen for on `mesh`: the lowering target (target.py) when one
    is set, else that of the mesh's devices."""
    return platform_of(target.current() or mesh.devices.flat[0].platform)


def platform():
    """'gpu', 'tpu' or 'cpu' (or another backend's name) for the computation being traced: that
    of the lowering target (target.py) when one is set, else of the mesh traced under, else the
    default backend."""
    if target.current() is not None:
        return platform_of(target.current())
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    return platform_of(getattr(device, "platform", None) or jax.default_backend())


@functools.cache
def warn_once(message):
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def interpreted(kernel, where):
    """Whether `kernel` runs in a Pallas interpreter on platform `where`."""
    if isinstance(kernel, fused.FusedKernel):
        kernels = (kernel, getattr(kernel, "fallback", None))
        return any(getattr(k, "interpret", False) for k in kernels)
    home = {"pallas_gpu": "gpu", "pallas_tpu": "tpu"}
    return kernel in home and where != home[kernel]


def needs_vma_off(kernel, where):
    """Whether jax.shard_map must run `kernel` with check_vma=False: the Pallas interpreter
    does not carry varying-axis types, nor do splash attention's output shapes."""
    splash_kernel = isinstance(kernel, splash.PallasTpu) or kernel == "pallas_tpu"
    return interpreted(kernel, where) or splash_kernel or (kernel == "auto" and where == "tpu")


def _xla(c: Call):
    """The XLA kernel with the platform's default tiles."""
    return Xla(block=xla_lib.BLOCKS.get(c.where, 512))


def _dtype_in(dtype, allowed):
    return any(jnp.dtype(dtype) == jnp.dtype(a) for a in allowed)


def _problem(name, c: Call):
    """Why the kernel `name` cannot run call `c` on its platform (None if it can), before any
    probe: platform, dtype, head dim and the variants it expresses."""
    if name == "xla":
        return None
    if name == "pallas_gpu":
        if c.where == "gpu" and not _dtype_in(c.dtype, _GPU_DTYPES):
            return f"it takes float32/bfloat16/float16 inputs, got {jnp.dtype(c.dtype).name}"
        return None
    if name == "cudnn":
        if c.where != "gpu":
            return f"it needs a CUDA GPU and the platform is {c.where!r}"
        if not _dtype_in(c.dtype, _HALF):
            return f"it takes bfloat16/float16 inputs, got {jnp.dtype(c.dtype).name}"
        reason = _cudnn_missing(c)
        if reason is not None:
            return reason
        if c.head_dim % 8 or c.head_dim > cudnn.max_head_dim():
            return f"it needs a head dim that is a multiple of 8 and <= {cudnn.max_head_dim()}"
        return cudnn.Cudnn().supports(c.kind.soft_cap, c.head_dim, c.v_head_dim)
    if name == "pallas_tpu":
        why = splash.problem(c.dtype, c.head_dim)
        return why or splash.PallasTpu().supports(c.kind.soft_cap, c.head_dim, c.v_head_dim)
    raise AssertionError(name)


def _working(c: Call):
    return [n for n in KERNELS[1:] if _problem(n, c) is None]


def _unsupported(c: Call, kernel, why):
    return ValueError(
        f"{c.fn}: kernel={kernel!r} cannot run here: {why}. Kernels that would work: {_working(c)}."
    )


def _named(c: Call, name):
    """The kernel object a name stands for; raises if it cannot run the call."""
    why = _problem(name, c)
    if why is not None and not (name == "cudnn" and _cudnn_missing(c) == why):
        raise _unsupported(c, name, why)
    if name == "xla":
        return _xla(c)
    if name == "pallas_gpu":
        if c.where != "gpu":
            warn_once(
                f"kernel='pallas_gpu' on platform {c.where!r} runs in the Pallas interpreter."
            )
            return PallasGpu(interpret=True)
        return PallasGpu()
    if name == "cudnn":
        if why is not None:  # the API itself is missing: the next kernel of the chain
            warn_once(f"kernel='cudnn' is unavailable ({why}); using 'pallas_gpu' instead.")
            return PallasGpu()
        return cudnn.Cudnn()
    if c.where != "tpu":
        warn_once(f"kernel='pallas_tpu' on platform {c.where!r} runs in the TPU interpreter.")
    return splash.PallasTpu(interpret=c.where != "tpu")


def _cudnn_missing(c: Call):
    """Why the cuDNN path is missing altogether here (None if it is not)."""
    if c.target == "rocm":
        return "the target platform is ROCm, not CUDA"
    return cudnn.lowering_problem() if c.lowering else cudnn.unavailable_reason()


def _auto(c: Call):
    """The first kernel of the platform's chain that passes its checks and probe on every
    process (module docstring)."""
    if c.where == "gpu" and _problem("pallas_gpu", c) is None:
        pallas = _first_working(c, [(PallasGpu(), None)])
        partial = pallas or fused.FusedXla()  # cuDNN's steps it cannot express
        why = _problem("cudnn", c)  # gathered, not branched on: it depends on the machine
        chosen = _first_working(c, [(cudnn.Cudnn(fallback=partial), why)])
        if chosen is not None:
            return chosen
        if c.target == "cuda" and why is not None and why == _cudnn_missing(c):
            warn_once(  # not what a GPU would run
                f"{c.fn}: lowering for CUDA without the cuDNN path ({why}): the program runs "
                f"{(pallas or _xla(c)).name!r} where a GPU would run cuDNN."
            )
        return pallas or _xla(c)
    if c.where == "tpu":
        return _first_working(c, [(splash.PallasTpu(), _problem("pallas_tpu", c))]) or _xla(c)
    return _xla(c)


def _first_working(c: Call, candidates):
    """The first kernel of `candidates` ((kernel, why it cannot run here before any probe, or
    None), ...) that runs on every process: no check found a problem and its probe passed
    (probe.everywhere). Warns about one that failed a probe or is refused by some processes
    only, naming them."""
    for kern, problem in candidates:
        if c.lowering:  # for another platform: the probe cannot run its programs
            if problem is None:
                return kern
            continue
        fitted = kern.fit(c.q_len, c.kv_len)
        answers = probe.everywhere(fitted, c.dtype, c.head_dim, c.v_head_dim, c.kind, problem)
        refused = [a for a in answers if a.text is not None]
        if not refused:
            return kern
        if problem is None or len({a.text for a in answers}) > 1:
            warn_once(_refusal(c, kern, refused, len(answers)))
    return None


def _refusal(c: Call, kern, refused, num_processes):
    """The warning that names the processes that `refused` (probe.Answer each) `kern`, and why."""
    what = (
        f"{c.fn}: kernel {kern.name!r} failed its check on {jnp.dtype(c.dtype).name}, head "
        f"dim {c.head_dim}, {c.kind}"
    )
    if num_processes == 1:
        return f"{what}: {refused[0].text}. Using the next kernel."
    hosts = "; ".join(f"process {a.process} ({a.host}): {a.text}" for a in refused)
    return (
        f"{what} on {len(refused)} of {num_processes} processes ({hosts}). Every process uses "
        f"the next kernel."
    )


def resolve(fn, opts, dtype, head_dim, v_head_dim, q_len, kv_len, segments=False):
    """The kernel object (fitted to the local lengths) that runs a call with options `opts`.

    Raises a ValueError naming the kernels that would work when the kernel asked for cannot run
    the inputs (or fails its probe).
    """
    kernel = opts.kernel
    c = Call(
        fn,
        dtype,
        head_dim,
        v_head_dim,
        q_len,
        kv_len,
        probe.MaskKind.of(opts, segments),
        platform(),
        target.current(),
    )
    if isinstance(kernel, str) and kernel == "auto":
        kern = _xla(c) if opts.tile_callback is not None else _auto(c)
        return kern.fit(q_len, kv_len)
    if not (isinstance(kernel, str) and kernel in KERNELS or isinstance(kernel, _OBJECTS)):
        raise ValueError(
            f"{fn}: `kernel` must be one of {KERNELS} or a kernel object "
            f"(Xla, PallasGpu, Cudnn, PallasTpu), got {kernel!r}."
        )
    if kernel == "xla" or isinstance(kernel, Xla) or c.lowering:
        return _pinned(c, opts)  # the same on every machine: nothing to agree
    return _agreed(c, kernel, lambda: _pinned(c, opts))


def _pinned(c: Call, opts):
    """The kernel a call asks for by name or object, fitted to its lengths; raises a ValueError
    naming the kernels that would work when it cannot run the inputs or fails its probe."""
    kernel = opts.kernel
    if isinstance(kernel, str):
        kern = _named(c, kernel)
    else:
        kern = kernel  # an object gets the checks its name gets (interpreted ones: test tools)
        why = None if interpreted(kern, c.where) else _problem(kern.name, c)
        why = why or kern.supports(opts.logits_soft_cap, c.head_dim, c.v_head_dim)
        if why is not None:
            raise _unsupported(c, kernel, why)
    if not isinstance(kern, Xla) and opts.tile_callback is not None:
        raise ValueError(
            f"{c.fn}: `tile_callback` reports the XLA kernel's tiles only; got kernel={kernel!r}. "
            f"Use kernel='xla' with a tile_callback."
        )
    kern = kern.fit(c.q_len, c.kv_len)
    if not isinstance(kern, Xla) and not c.lowering:
        why = probe.failure(kern, c.dtype, c.head_dim, c.v_head_dim, c.kind)
        if why is not None:
            raise _unsupported(c, kernel, f"it failed its check ({why})")
    return kern


def _agreed(c: Call, kernel, pinned):
    """pinned() (a kernel asked for by name or object), the same on every process: on several,
    each process's outcome (the kernel object, or the error) is gathered once per call kind,
    and every process raises when any cannot run it or would run another (a cuDNN missing on
    one host): none compiles a program the others do not."""
    try:
        kern, error = pinned(), None
    except ValueError as e:
        kern, error = None, e
    answers = _outcomes(c, kernel, repr(kern) if error is None else f"error: {error}")
    if len({a.text for a in answers}) > 1:
        each = "; ".join(f"process {a.process} ({a.host}): {a.text}" for a in answers)
        raise ValueError(
            f"{c.fn}: kernel={kernel!r} resolves differently across processes ({each}). Every "
            f"process must compile the same program: ask for a kernel that runs on every host "
            f"(kernel='xla' always does)."
        )
    if error is not None:
        raise error
    return kern


@functools.cache
def _outcomes(c: Call, kernel, mine):
    return probe.gather(mine)
