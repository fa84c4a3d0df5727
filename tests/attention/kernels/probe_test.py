"""Processes agree on kernels (probe.everywhere, dispatch): on one process nothing is gathered;
on several (a gather faked here as a second process's answers; tests/train/multihost_test.py runs
two real ones) a kernel runs only where every process passed its checks and probe, each
combination is gathered once, in the order the calls resolve, and a pinned kernel that one
process cannot run, or would run differently, raises on every process."""

import warnings

import jax.numpy as jnp
import pytest

from ringattn.attention import inputs
from ringattn.attention.kernels import cudnn, dispatch, probe
from ringattn.attention.kernels.cudnn import Cudnn
from ringattn.attention.kernels.pallas_gpu import PallasGpu
from ringattn.attention.kernels.xla import Xla
from ringattn.attention.masks import MaskSpec

F32, BF16 = jnp.float32, jnp.bfloat16


def _resolve(kernel, dtype=F32, head_dim=64, causal=False):
    opts = inputs.Options(MaskSpec(causal), 1.0, None, kernel=kernel)
    return dispatch.resolve("fn", opts, dtype, head_dim, head_dim, 256, 256)


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA platform with cuDNN whose kernels all pass their probes here."""
    monkeypatch.setattr(dispatch, "platform", lambda: "gpu")
    monkeypatch.setattr(cudnn, "unavailable_reason", lambda: None)
    monkeypatch.setattr(cudnn, "max_head_dim", lambda: 128)
    monkeypatch.setattr(probe, "failure", lambda *a: None)
    for cache in (probe._gathered, dispatch._outcomes, dispatch.warn_once):
        cache.cache_clear()
    yield
    for cache in (probe._gathered, dispatch._outcomes, dispatch.warn_once):
        cache.cache_clear()


@pytest.fixture
def two_processes(monkeypatch, gpu):
    """probe.gather as on process 0 of 2: process 1 ("there") answers `other[i]` to the i-th
    gather where the dict has it, else what this process answers. Returns (other, the texts
    this process gathered, in order)."""
    other, gathered = {}, []

    def gather(text):
        theirs = other.get(len(gathered), text)
        gathered.append(text)
        return (probe.Answer(0, "here", text), probe.Answer(1, "there", theirs))

    monkeypatch.setattr(probe, "gather", gather)
    return other, gathered


def test_one_process_gathers_without_a_collective(monkeypatch):
    def no_collective(*a):
        raise AssertionError("a collective on one process")

    monkeypatch.setattr(probe.multihost_utils, "process_allgather", no_collective)
    assert probe.gather("why") == (probe.Answer(0, probe.socket.gethostname(), "why"),)
    kind = probe.MASK_KINDS["causal"]
    answers = probe.everywhere(PallasGpu(), F32, 64, 64, kind, "it needs a GPU")
    assert [(a.process, a.text) for a in answers] == [(0, "it needs a GPU")]


def test_auto_uses_a_kernel_every_process_passed(two_processes):
    """Our Pallas kernel passes here and on process 1: float32 runs it, and each combination
    is gathered once, however often it is resolved (the cuDNN candidate's dtype check too)."""
    _, gathered = two_processes
    assert _resolve("auto") == PallasGpu()
    assert gathered == ["", "it takes bfloat16/float16 inputs, got float32"]
    assert _resolve("auto") == PallasGpu()
    assert len(gathered) == 2
    assert _resolve("auto", causal=True) == PallasGpu()  # a new mask kind: new combinations
    assert len(gathered) == 4


def _warnings(fn):
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        result = fn()
    return result, [str(r.message) for r in records]


def test_auto_skips_a_kernel_one_process_refused(two_processes):
    """Process 1's probe of our Pallas kernel failed: this process, whose probe passed, runs the
    XLA kernel too, and its warning names the process, its host and the cause."""
    other, _ = two_processes
    other[0] = "XlaRuntimeError: out of shared memory"
    kern, [message] = _warnings(lambda: _resolve("auto"))
    assert kern == Xla(block=1024)
    assert "kernel 'pallas_gpu' failed its check on float32, head dim 64, mask: none" in message
    assert "on 1 of 2 processes (process 1 (there): XlaRuntimeError: out of shared" in message
    assert "Every process uses the next kernel" in message


def test_a_check_that_differs_across_hosts_is_gathered(two_processes):
    """cuDNN is present here, missing on process 1: in half precision both run our Pallas
    kernel, not cuDNN here and Pallas there, and the warning says why."""
    other, gathered = two_processes
    other[1] = "cuDNN is missing"  # the second gather: the cuDNN candidate
    kern, [message] = _warnings(lambda: _resolve("auto", BF16))
    assert kern == PallasGpu()
    assert gathered == ["", ""]  # both kernels run here
    assert "kernel 'cudnn' failed" in message and "(process 1 (there): cuDNN is missing)" in message
    assert _resolve("auto", BF16, head_dim=32) == Cudnn(fallback=PallasGpu())  # it has cuDNN


def test_a_pinned_kernel_is_the_same_everywhere_or_raises_everywhere(two_processes, monkeypatch):
    other, gathered = two_processes
    assert _resolve("cudnn", BF16) == Cudnn()  # every process runs cuDNN
    assert _resolve("xla") == Xla(block=1024) and len(gathered) == 1  # XLA: nothing to agree
    monkeypatch.setattr(cudnn, "unavailable_reason", lambda: "JAX changed")
    other[1] = repr(Cudnn())  # process 1 has cuDNN, this one falls back to our Pallas kernel
    with pytest.warns(RuntimeWarning, match="JAX changed"):
        with pytest.raises(ValueError, match=r"resolves differently across processes \(proc"):
            _resolve("cudnn", BF16, head_dim=32)
    monkeypatch.setattr(probe, "failure", lambda *a: "lse differs")  # fails here and there
    with pytest.raises(ValueError, match=r"failed its check \(lse differs\)"):
        _resolve("pallas_gpu", head_dim=16)
