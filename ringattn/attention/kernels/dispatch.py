"""`kernel=`: which single-device kernel the attention functions run, by name or as an object.

  "xla"         the pure-JAX blockwise kernel (blockwise.py): every backend, dtype and mask
  "pallas_gpu"  our Pallas/Triton kernel (pallas_gpu.py); on a non-GPU platform it runs in the
                Pallas interpreter (slow: for tests)
  "cudnn"       cuDNN flash attention for unmasked and causal-diagonal steps, Pallas for the
                others (cudnn.py); CUDA GPUs, bf16/f16, head dim a multiple of 8
  "pallas_tpu"  JAX's splash attention for the steps it expresses, XLA for the others
                (splash.py); on a non-TPU platform in the TPU interpreter (slow: for tests)
  "auto"        cuDNN for bf16/f16 on CUDA GPUs where it applies, else Pallas GPU on GPUs,
                splash on TPUs, XLA on CPUs (and whenever a tile_callback is given)

Objects (`PallasGpu(block_q=..., interpret=True)`, `Cudnn(fallback=...)`, `PallasTpu(...)`) set
a kernel's tiles and launch options. The platform is that of the mesh being traced under
(inside shard_map or a `jax.set_mesh`), else the default backend.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp

from ringattn.attention.kernels import cudnn, fused, splash
from ringattn.attention.kernels.pallas_gpu import PallasGpu

KERNELS = ("auto", "xla", "pallas_gpu", "cudnn", "pallas_tpu")
_GPU_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
_HALF = (jnp.bfloat16, jnp.float16)


def platform():
    """'gpu', 'tpu' or 'cpu' (or another backend's name) for the computation being traced."""
    mesh = jax.sharding.get_abstract_mesh()
    device = getattr(mesh, "abstract_device", None)
    name = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if name in ("gpu", "cuda", "rocm") else name


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


def blocks(kern, block_q, block_k, q_len, kv_len):
    """The Config's (block_q, block_k): the XLA tiles, or the fused kernel's padding multiples."""
    if kern is None:
        return min(block_q, q_len), min(block_k, kv_len)
    return kern.pad_q, kern.pad_k


def _dtype_in(dtype, allowed):
    return any(jnp.dtype(dtype) == jnp.dtype(a) for a in allowed)


def _cudnn_problem(dtype, head_dim, where):
    """Why cuDNN cannot run these inputs here (None if it can)."""
    if where != "gpu":
        return f"it needs a CUDA GPU and the platform is {where!r}"
    if not _dtype_in(dtype, _HALF):
        return f"it takes bfloat16/float16 inputs, got {jnp.dtype(dtype).name}"
    reason = cudnn.unavailable_reason()
    if reason is None and (head_dim % 8 or head_dim > cudnn.max_head_dim()):
        return f"it needs a head dim that is a multiple of 8 and <= {cudnn.max_head_dim()}"
    return None


def _working(dtype, head_dim, where):
    """The kernel names that would run these inputs on this platform."""
    names = ["xla"]
    if _dtype_in(dtype, _GPU_DTYPES) or where != "gpu":
        names.append("pallas_gpu")
    if _cudnn_problem(dtype, head_dim, where) is None and cudnn.unavailable_reason() is None:
        names.append("cudnn")
    if splash.problem(dtype, head_dim) is None:
        names.append("pallas_tpu")
    return names


def _unsupported(fn, kernel, why, dtype, head_dim, where):
    return ValueError(
        f"{fn}: kernel={kernel!r} cannot run here: {why}. Kernels that would work: "
        f"{_working(dtype, head_dim, where)}."
    )


def _named(fn, kernel, dtype, head_dim, where):
    """The kernel object a name stands for (None: XLA)."""
    if kernel == "xla":
        return None
    if kernel == "pallas_gpu":
        if where != "gpu":
            warn_once(f"kernel='pallas_gpu' on platform {where!r} runs in the Pallas interpreter.")
            return PallasGpu(interpret=True)
        if not _dtype_in(dtype, _GPU_DTYPES):
            why = f"it takes float32/bfloat16/float16 inputs, got {jnp.dtype(dtype).name}"
            raise _unsupported(fn, kernel, why, dtype, head_dim, where)
        return PallasGpu()
    if kernel == "cudnn":
        why = _cudnn_problem(dtype, head_dim, where)
        if why is not None:
            raise _unsupported(fn, kernel, why, dtype, head_dim, where)
        reason = cudnn.unavailable_reason()
        if reason is not None:
            warn_once(f"kernel='cudnn' is unavailable ({reason}); using 'pallas_gpu' instead.")
            return PallasGpu()
        return cudnn.Cudnn()
    if kernel == "pallas_tpu":
        why = splash.problem(dtype, head_dim)
        if why is not None:
            raise _unsupported(fn, kernel, why, dtype, head_dim, where)
        if where != "tpu":
            warn_once(f"kernel='pallas_tpu' on platform {where!r} runs in the TPU interpreter.")
        return splash.PallasTpu(interpret=where != "tpu")
    raise AssertionError(kernel)


def _auto(dtype, head_dim, where):
    if where == "gpu":
        if _cudnn_problem(dtype, head_dim, where) is None and cudnn.unavailable_reason() is None:
            return cudnn.Cudnn()
        return PallasGpu() if _dtype_in(dtype, _GPU_DTYPES) else None
    if where == "tpu" and splash.problem(dtype, head_dim) is None:
        return splash.PallasTpu()
    return None


def resolve(fn, kernel, dtype, head_dim, q_len, kv_len, tile_callback=None):
    """The fused kernel object (fitted to the local lengths) to run, or None for XLA.

    Every kernel takes every mask (fused ones fall back per step), so the choice depends on the
    platform, the dtype and the head dim. Raises a ValueError naming the kernels that would work
    when `kernel` cannot run the inputs.
    """
    if isinstance(kernel, fused.FusedKernel):
        kern = kernel
    elif isinstance(kernel, str) and kernel in KERNELS:
        where = platform()
        if kernel == "auto":
            kern = None if tile_callback is not None else _auto(dtype, head_dim, where)
        else:
            kern = _named(fn, kernel, dtype, head_dim, where)
    else:
        raise ValueError(
            f"{fn}: `kernel` must be one of {KERNELS} or a kernel object "
            f"(PallasGpu, Cudnn, PallasTpu), got {kernel!r}."
        )
    if kern is not None and tile_callback is not None:
        raise ValueError(
            f"{fn}: `tile_callback` reports the XLA kernel's tiles only; got kernel={kernel!r}. "
            f"Use kernel='xla' with a tile_callback."
        )
    return None if kern is None else kern.fit(q_len, kv_len)
