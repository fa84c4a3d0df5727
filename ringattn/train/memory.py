"""Per-device memory of a compiled train step (what `--dry_run` prints), with a breakdown.

Measured (XLA's memory analysis of the compiled program): arguments (the train state and the
batch), temporaries, their total. Derived from shapes and shardings, exactly: the parameters'
and the optimizer state's bytes per device; their gradients are as many bytes as the
parameters (float32, the same shardings) and live among the temporaries. Analytic: one
[tokens per device, vocabulary per device] float32 array of logits (the plain loss holds several
at once: the logits, their softmax, their gradient), and the block inputs that remat keeps for
the backward (layers x tokens per device x d_model, in the activations' dtype), which remat
"offload" moves to host memory on TPU and GPU (a CPU compilation keeps them where they are).
"""

from __future__ import annotations

import math

import jax
import numpy as np

from ringattn.mesh import mesh_axes_for

GIB = 2.0**30


def per_device_bytes(tree):
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (its shard)."""
    return sum(
        math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )


def report(exp, seq_len, compiled, compile_s):
    """The dry-run report of `exp` (a trainer Experiment) compiled at `seq_len` (see the module
    docstring); GiB per device."""
    config, cfg, mesh = exp.config, exp.model_cfg, exp.mesh
    mem = compiled.memory_analysis()
    tokens = (
        config.batch_size * seq_len / math.prod(mesh.shape[a] for a in ("data", "fsdp", "context"))
    )
    vocab_shards = math.prod(mesh.shape[a] for a in mesh_axes_for(cfg.rules, "act_vocab"))
    params = per_device_bytes(exp.abstract_state.params) / GIB
    out = {
        "parameters": sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params)),
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "batch_size": config.batch_size,
        "seq_len": seq_len,
        "tokens_per_device": tokens,  # whose activations each device holds
        "loss_chunk_size": exp.loss_config.chunk_size,
        "remat": cfg.remat,
        "compile_s": compile_s,
        "argument_gib": mem.argument_size_in_bytes / GIB,
        "output_gib": mem.output_size_in_bytes / GIB,
        "alias_gib": mem.alias_size_in_bytes / GIB,
        "temp_gib": mem.temp_size_in_bytes / GIB,
        "host_temp_gib": getattr(mem, "host_temp_size_in_bytes", 0) / GIB,
        "generated_code_gib": mem.generated_code_size_in_bytes / GIB,
        "params_gib": params,
        "optimizer_gib": per_device_bytes(exp.abstract_state.opt_state) / GIB,
        "gradients_gib": params,
        "logits_array_gib": tokens * cfg.vocab_size / vocab_shards * 4 / GIB,
        "saved_block_inputs_gib": (
            0.0
            if cfg.remat == "none"
            else cfg.num_layers * tokens * cfg.d_model * np.dtype(cfg.dtype).itemsize / GIB
        ),
    }
    out["total_per_device_gib"] = (
        out["argument_gib"] + out["output_gib"] - out["alias_gib"] + out["temp_gib"]
    )
    # The temporaries besides the gradients: activations, logits, workspace.
    out["activations_and_workspace_gib"] = out["temp_gib"] - out["gradients_gib"]
    return out


COLUMNS = (
    ("total", "total_per_device_gib"),
    ("temporaries", "temp_gib"),
    ("params", "params_gib"),
    ("optimizer", "optimizer_gib"),
    ("gradients", "gradients_gib"),
    ("one logits array", "logits_array_gib"),
    ("saved block inputs", "saved_block_inputs_gib"),
    ("activations + workspace", "activations_and_workspace_gib"),
)


def table_row(r):
    """One markdown row of a dry-run report carrying `what`, `loss` and `xla` labels."""
    cells = [r["what"], r["loss"], r["xla"]] + [f"{r[key]:.2f}" for _, key in COLUMNS]
    return "| " + " | ".join(cells) + " |"


def table(reports):
    """A markdown table of dry-run reports (GiB per device), then each one's command."""
    head = ["case", "loss", "XLA"] + [name for name, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += [table_row(r) for r in reports]
    lines += ["", "Commands:", ""] + [f"- `{r['command']}`" for r in reports]
    return "\n".join(lines) + "\n"
