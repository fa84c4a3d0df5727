"""What a compiled program reads of its inputs: the bytes it takes from named parameters, from
the optimized HLO text (`jax.jit(f).lower(...).compile().as_text()`).

XLA's own cost analysis charges a fusion the whole of every operand, so a gather of a few pages
of a KV cache counts as reading all of it. Here each use of a parameter is followed (through
bitcasts and into fused computations): a gather, dynamic-slice or slice of it reads what it
returns; any other use reads the whole parameter (a full read, as a dot over the cache is).
"""

from __future__ import annotations

import re

import numpy as np

_ITEM = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
         "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}  # fmt: skip
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(\w+\[[\d,]*\])\S*\s+([\w\-]+)\((.*)$")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")
_SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
SLICES = ("gather", "dynamic-slice", "slice")


def nbytes(shape_text):
    """Bytes of one HLO array type, e.g. 'f32[3,64]' -> 768."""
    dtype, dims = _SHAPE.match(shape_text).groups()
    return _ITEM[dtype] * int(np.prod([int(d) for d in dims.split(",") if d]))


def computations(hlo):
    """{name: [instruction lines]} of every computation in the module, the entry as 'ENTRY'."""
    comps, name = {}, None
    for line in hlo.splitlines():
        header = _HEADER.match(line)
        if header:
            name = "ENTRY" if line.startswith("ENTRY") else header.group(1)
            comps[name] = []
        elif line.strip() == "}":
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def _operands(args):
    """The operand names of an instruction (the text after its opening parenthesis)."""
    return re.findall(r"%([\w.\-]+)", args.split(")", 1)[0])


def _reads(comps, comp, var, whole):
    total = 0
    for line in comps[comp]:
        if not re.search(rf"%{re.escape(var)}\b(?![\w.\-])", line) or " parameter(" in line:
            continue
        m = _INSTR.match(line)
        if m is None:  # a tuple-shaped result or an op we do not parse: the whole of it
            total += whole
            continue
        name, shape, op, args = m.groups()
        operands = _operands(args)
        if op == "bitcast":
            total += _reads(comps, comp, name, whole)
        elif op in SLICES and operands[:1] == [var]:
            total += nbytes(shape)
        elif op == "fusion":
            callee = re.search(r"calls=%([\w.\-]+)", line).group(1)
            for i, operand in enumerate(operands):
                if operand == var:
                    param = _parameter(comps[callee], i)
                    total += _reads(comps, callee, param, whole)
        else:
            total += whole
    return total


def _parameter(lines, index):
    for line in lines:
        m = re.search(rf"%([\w.\-]+)\s*=\s*\S+\s+parameter\({index}\)", line)
        if m:
            return m.group(1)
    raise ValueError(f"reads: no parameter({index}) in a fused computation")


def parameter_reads(hlo, prefix):
    """{parameter: bytes read} of the entry parameters whose names start with `prefix` (JAX
    names them by argument path: 'cache_k.1' for the `k` of an argument `cache`)."""
    comps = computations(hlo)
    out = {}
    for line in comps["ENTRY"]:
        m = re.search(r"%([\w.\-]+)\s*=\s*(\w+\[[\d,]*\])\S*\s+parameter\(", line)
        if m and m.group(1).startswith(prefix):
            out[m.group(1)] = _reads(comps, "ENTRY", m.group(1), nbytes(m.group(2)))
    return out
