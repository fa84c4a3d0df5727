"""Hugging Face Llama / Mistral tensors <-> our parameters, read and written with safetensors'
numpy API (no torch).

Each of our parameters is an HF tensor (one per layer, stacked when the layers are scanned)
reshaped and transposed: q_proj.weight [H*D, E] is our query [E, H, D], o_proj.weight [E, H*D]
our out [H, D, E], the MLP's and lm_head's [out, in] our [in, out]. q/k need no permutation: HF's
rotate-half RoPE pairs (i, i + D/2), as ours does. Reading places every tensor straight into its
sharding, each device reading only its own block from the file: the host holds one block at a
time, never the model. Weights keep the checkpoint's dtype unless the target says otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import jax
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """Ours = the HF tensor with its dim i split into `groups[i]` dims, then transposed by
    `perm` (our dim k is split dim perm[k])."""

    groups: tuple
    perm: tuple

    def split_shape(self, ours):
        split = [0] * len(ours)
        for k, n in enumerate(ours):
            split[self.perm[k]] = n
        return split

    def hf_shape(self, ours):
        split, out, i = self.split_shape(ours), [], 0
        for g in self.groups:
            out.append(math.prod(split[i : i + g]))
            i += g
        return tuple(out)

    def to_hf(self, x):
        return np.transpose(x, np.argsort(self.perm)).reshape(self.hf_shape(x.shape))

    def read(self, tensor, ours, index):
        """Our block `index` (slices of our shape `ours`) read from `tensor` (a safetensors
        slice): each HF dim is read over the rows its leading split dim selects."""
        split = self.split_shape(ours)
        want = [None] * len(ours)
        for k, s in enumerate(index):
            want[self.perm[k]] = range(*s.indices(ours[k]))
        hf_index, block_shape, inner, i = [], [], [], 0
        for g in self.groups:
            lead, rest = want[i], split[i + 1 : i + g]
            size = math.prod(rest)
            hf_index.append(slice(lead.start * size, lead.stop * size))
            block_shape += [len(lead), *rest]
            inner += [slice(None)] + [slice(r.start, r.stop) for r in want[i + 1 : i + g]]
            i += g
        block = np.asarray(tensor[tuple(hf_index)]).reshape(block_shape)[tuple(inner)]
        return np.transpose(block, self.perm)


VECTOR = Layout((1,), (0,))
SAME = Layout((1, 1), (0, 1))
TRANSPOSE = Layout((1, 1), (1, 0))
QKV = Layout((2, 1), (2, 0, 1))  # [H*D, E] -> [H, D, E] -> [E, H, D]
OUT = Layout((1, 2), (1, 2, 0))  # [E, H*D] -> [E, H, D] -> [H, D, E]

TOP = {
    ("embedding",): ("model.embed_tokens.weight", SAME),
    ("unembedding",): ("lm_head.weight", TRANSPOSE),
    ("final_norm", "scale"): ("model.norm.weight", VECTOR),
}
LAYER = {
    ("attn_norm", "scale"): ("input_layernorm.weight", VECTOR),
    ("attn", "query"): ("self_attn.q_proj.weight", QKV),
    ("attn", "key"): ("self_attn.k_proj.weight", QKV),
    ("attn", "value"): ("self_attn.v_proj.weight", QKV),
    ("attn", "out"): ("self_attn.o_proj.weight", OUT),
    ("mlp_norm", "scale"): ("post_attention_layernorm.weight", VECTOR),
    ("mlp", "gate"): ("mlp.gate_proj.weight", TRANSPOSE),
    ("mlp", "up"): ("mlp.up_proj.weight", TRANSPOSE),
    ("mlp", "down"): ("mlp.down_proj.weight", TRANSPOSE),
}
IGNORED = ("rotary_emb.inv_freq",)  # buffers some older checkpoints saved


@dataclasses.dataclass(frozen=True)
class Entry:
    """One of our parameters: its path, the HF tensor of each layer it holds (one name when it is
    not per layer), whether the layers are stacked on a leading axis, the layout, our shape."""

    path: tuple
    names: tuple
    stacked: bool
    layout: Layout
    shape: tuple

    @property
    def hf_shape(self):
        return self.layout.hf_shape(self.shape[1:] if self.stacked else self.shape)


def entries(abstract_params, num_layers):
    """An Entry per leaf of our parameter tree (flax's nesting: layer_<i>/..., or layers/...
    stacked when scanned)."""
    out = []
    for keys, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
        path, shape = tuple(k.key for k in keys), tuple(leaf.shape)
        if path in TOP:
            name, layout = TOP[path]
            out.append(Entry(path, (name,), False, layout, shape))
        elif path[0] == "layers" and path[1:] in LAYER:
            name, layout = LAYER[path[1:]]
            names = tuple(f"model.layers.{i}.{name}" for i in range(num_layers))
            out.append(Entry(path, names, True, layout, shape))
        elif path[0].startswith("layer_") and path[1:] in LAYER:
            name, layout = LAYER[path[1:]]
            names = (f"model.layers.{path[0][len('layer_') :]}.{name}",)
            out.append(Entry(path, names, False, layout, shape))
        else:
            raise ValueError(f"weights: no Hugging Face tensor for our parameter {'/'.join(path)}.")
    return out


class Checkpoint:
    """The tensors of a Hugging Face checkpoint directory: model.safetensors, or the shards that
    model.safetensors.index.json names. Files are memory-mapped, read block by block."""

    def __init__(self, directory):
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, SINGLE)):
            with safe_open(os.path.join(directory, SINGLE), framework="numpy") as f:
                weight_map = {name: SINGLE for name in f.keys()}
        else:
            raise FileNotFoundError(
                f"Checkpoint: neither {SINGLE} nor {INDEX} in {directory} (we read safetensors "
                "only: convert a pytorch_model.bin checkpoint with transformers first)."
            )
        self.directory, self.weight_map, self._files = directory, weight_map, {}

    def names(self):
        return set(self.weight_map)

    def tensor(self, name):
        """A lazy slice of tensor `name`: shape, dtype, and numpy blocks by indexing."""
        file = self.weight_map[name]
        if file not in self._files:
            path = os.path.join(self.directory, file)
            if not os.path.exists(path):
                raise FileNotFoundError(f"Checkpoint: {INDEX} names {file}, which is missing.")
            self._files[file] = safe_open(path, framework="numpy")
        return self._files[file].get_slice(name)

    def shape(self, name):
        return tuple(self.tensor(name).get_shape())

    def dtype(self, name):
        kind = self.tensor(name).get_dtype()
        if kind not in DTYPES:
            raise ValueError(f"Checkpoint: tensor {name!r} has dtype {kind}; expected {DTYPES}.")
        return DTYPES[kind]


def check(checkpoint: Checkpoint, table, tied: bool):
    """Every tensor `table` (Entry list) needs exists with its shape; no tensor is left over
    (biases, say, that the model would silently drop)."""
    needed = {name: e.hf_shape for e in table for name in e.names}
    have = checkpoint.names()
    missing = sorted(set(needed) - have)
    if missing:
        raise ValueError(
            f"Checkpoint {checkpoint.directory}: {len(missing)} tensor(s) missing, e.g. "
            f"{missing[:3]}."
        )
    for name, shape in needed.items():
        got = checkpoint.shape(name)
        if got != shape:
            raise ValueError(
                f"Checkpoint {checkpoint.directory}: tensor {name!r} must have shape {shape} "
                f"(from config.json), got {got}."
            )
    extra = sorted(n for n in have - set(needed) if not n.endswith(IGNORED))
    if tied:
        extra = [n for n in extra if n != "lm_head.weight"]  # a tied copy some checkpoints keep
    if extra:
        raise ValueError(
            f"Checkpoint {checkpoint.directory}: {len(extra)} tensor(s) the model has no place "
            f"for, e.g. {extra[:3]} (biases? another architecture?)."
        )


def load_params(checkpoint: Checkpoint, abstract_params, num_layers, tied):
    """Our parameters from `checkpoint`, each created in the sharding and dtype of
    `abstract_params` (ShapeDtypeStructs): every device's block is read from the file alone."""
    leaves, treedef = jax.tree.flatten(abstract_params)
    table = entries(abstract_params, num_layers)
    check(checkpoint, table, tied)
    out = []
    for e, leaf in zip(table, leaves, strict=True):

        def block(index, e=e, leaf=leaf):
            if not e.stacked:
                x = e.layout.read(checkpoint.tensor(e.names[0]), leaf.shape, index)
            else:
                ours = leaf.shape[1:]
                layers = range(*index[0].indices(leaf.shape[0]))
                x = np.stack(
                    [e.layout.read(checkpoint.tensor(e.names[i]), ours, index[1:]) for i in layers]
                )
            return x.astype(leaf.dtype, copy=False)

        out.append(jax.make_array_from_callback(leaf.shape, leaf.sharding, block))
    return jax.tree.unflatten(treedef, out)


def hf_tensors(params, num_layers, untie_scaled, dtype=None):
    """[(HF name, shape, dtype, a function returning the tensor as numpy)] of our parameters,
    one layer of a stacked parameter at a time, cast to `dtype` if given. `untie_scaled`: write
    lm_head = embedding / sqrt(d_model) (a tied model with scale_tied_logits exported untied, as
    HF's tied logits are not scaled)."""
    out = []
    for e in entries(params, num_layers):
        leaf = params
        for k in e.path:
            leaf = leaf[k]
        if not leaf.is_fully_addressable:
            raise ValueError("hf_tensors: export runs in one process (parameters not addressable).")
        dt = np.dtype(dtype or leaf.dtype)
        for i, name in enumerate(e.names):
            get = (lambda leaf=leaf, i=i: leaf[i]) if e.stacked else (lambda leaf=leaf: leaf)
            fn = lambda get=get, e=e, dt=dt: e.layout.to_hf(np.asarray(get())).astype(dt)  # noqa: E731
            out.append((name, e.hf_shape, dt, fn))
    if untie_scaled:
        table = params["embedding"]
        dt = np.dtype(dtype or table.dtype)
        scale = math.sqrt(table.shape[1])
        fn = lambda: (np.asarray(table, np.float32) / scale).astype(dt)  # noqa: E731
        out.append(("lm_head.weight", tuple(table.shape), dt, fn))
    return out


def save_tensors(tensors, directory, max_file_bytes=5 << 30):
    """Write hf_tensors' list as model.safetensors, or as model-0000i-of-0000n.safetensors files
    of at most `max_file_bytes` each (a larger tensor gets a file of its own) and their index.
    Only one file's tensors are in memory at a time."""
    files, size = [[]], 0
    for name, shape, dtype, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        if files[-1] and size + nbytes > max_file_bytes:
            files.append([])
            size = 0
        files[-1].append(name)
        size += nbytes
    fns = {name: fn for name, _, _, fn in tensors}
    n = len(files)
    file_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    file_names = [SINGLE] if n == 1 else file_names
    os.makedirs(directory, exist_ok=True)
    weight_map, total = {}, 0
    for file_name, names in zip(file_names, files, strict=True):
        arrays = {name: np.ascontiguousarray(fns[name]()) for name in names}
        total += sum(a.nbytes for a in arrays.values())
        save_file(arrays, os.path.join(directory, file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in names})
        del arrays
    if n > 1:
        with open(os.path.join(directory, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
