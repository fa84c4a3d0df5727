"""The tensor layouts (HF [out, in] matrices, fused heads) and block-wise placement: every
device's block is read from the file on its own, and no device reads a whole matrix."""

import itertools

import jax
import numpy as np
import optax
import pytest

from ringattn.hf import weights
from ringattn.mesh import make_mesh
from ringattn.nn.config import ModelConfig
from ringattn.nn.model import Transformer
from ringattn.train.state import state_shardings

LAYOUTS = {
    "qkv": (weights.QKV, (12, 3, 4)),  # ours [E, H, D] from HF [H*D, E]
    "out": (weights.OUT, (3, 4, 12)),  # ours [H, D, E] from HF [E, H*D]
    "transpose": (weights.TRANSPOSE, (6, 10)),
    "same": (weights.SAME, (6, 10)),
    "vector": (weights.VECTOR, (7,)),
}


def full_to_ours(layout, hf, ours_shape):
    return np.transpose(hf.reshape(layout.split_shape(ours_shape)), layout.perm)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_blocks_read_from_the_hf_tensor(name):
    layout, ours = LAYOUTS[name]
    hf = np.random.default_rng(0).standard_normal(layout.hf_shape(ours))
    full = full_to_ours(layout, hf, ours)
    assert full.shape == ours
    np.testing.assert_array_equal(layout.to_hf(full), hf)
    if name == "qkv":  # head h, dim d, embedding e is HF's row h * D + d, column e
        np.testing.assert_array_equal(full[5, 2, 1], hf[2 * 4 + 1, 5])
    cuts = [sorted({0, n // 2, n // 3, n}) for n in ours]
    for bounds in itertools.product(*[list(zip(c, c[1:], strict=False)) for c in cuts]):
        index = tuple(slice(a, b) for a, b in bounds)
        np.testing.assert_array_equal(layout.read(hf, ours, index), full[index])


class RecordingCheckpoint(weights.Checkpoint):
    """Records the size of every block read."""

    reads = []

    def tensor(self, name):
        inner = super().tensor(name)
        reads = self.reads

        class Recorded:
            def __getattr__(self, attr):  # shape, dtype
                return getattr(inner, attr)

            def __getitem__(self, index):
                block = inner[index]
                reads.append((name, block.size, np.prod(inner.get_shape())))
                return block

        return Recorded()


@pytest.mark.parametrize("scan", [False, True])
def test_each_device_reads_its_block(tmp_path, scan):
    cfg = ModelConfig(
        vocab_size=40, num_layers=2, d_model=16, num_heads=4, num_kv_heads=2, head_dim=8,
        mlp_dim=24, tie_embeddings=False, scan_layers=scan,
    )  # fmt: skip
    mesh = make_mesh({"fsdp": 8})
    abstract, _ = state_shardings(Transformer(cfg, mesh), optax.identity(), mesh, cfg.rules)
    rng = np.random.default_rng(0)
    # Our parameters -> HF tensors (our writer) -> our parameters on the mesh.
    host = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32), abstract.params)
    tensors = weights.hf_tensors(host_arrays(host), cfg.num_layers, untie_scaled=False)
    weights.save_tensors(tensors, str(tmp_path), max_file_bytes=4096)
    RecordingCheckpoint.reads = []
    params = weights.load_params(
        RecordingCheckpoint(str(tmp_path)), abstract.params, cfg.num_layers, tied=False
    )
    jax.tree.map(lambda x, want: np.testing.assert_array_equal(np.asarray(x), want), params, host)
    query = params["layers" if scan else "layer_0"]["attn"]["query"]
    assert query.addressable_shards[0].data.shape[-3] == 16 // 8  # embedding split 8 ways
    matrices = [r for r in RecordingCheckpoint.reads if "norm" not in r[0]]
    assert matrices and all(size * 8 == whole for _, size, whole in matrices)


def host_arrays(tree):
    """Numpy leaves that behave like our jax arrays for hf_tensors."""

    class Host(np.ndarray):
        is_fully_addressable = True

    return jax.tree.map(lambda x: x.view(Host), tree)
