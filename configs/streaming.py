"""Byte-level language model on the Python standard library's sources, for streaming with
attention sinks (experiments/streaming.py): small enough to train in 10-15 minutes on CPU.

  python experiments/train.py --workdir=/tmp/stream_lm --config=configs/streaming.py
  python experiments/train.py --workdir=/tmp/stream_ls --config=configs/streaming.py:learned_sinks
  python experiments/streaming.py --workdir=/tmp/stream_lm --sinks_run=/tmp/stream_ls \
      --out=/tmp/streaming

Every document begins with BOS (task_params.bos), as StreamingLLM's models see their data: a model
that learns to use it as an attention sink needs a streaming cache that keeps it. Every field not
set here is configs/default.py's (documented there). Variants: "", "learned_sinks"
(attention.sinks: a learned sink logit per head and layer; compare it with
`experiments/streaming.py --sinks_run=...`), "deep" (6 narrower layers, 600 steps),
"deep+learned_sinks", and "test" (tiny and fast, for the tests). Data parallel over every device
with dense attention: at 256 tokens context parallelism buys nothing, and the inference side does
not depend on how the model was trained.
"""

import importlib.util
import os

import ml_collections


def _default_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
    spec = importlib.util.spec_from_file_location("ringattn_configs_default", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(variant=""):
    c = _default_config()
    c.task = "text"
    # The standard library's *.py, "train" split. bos: every document starts with BOS, the sink
    # token StreamingLLM prepends to every training sample (give text_stream bos=True too).
    c.task_params = ml_collections.ConfigDict({"bos": True})
    c.seq_len = 256  # the streaming cache holds this many tokens: positions stay in range
    c.curriculum = ()  # seq_len throughout
    c.batch_size = 16
    c.learning_rate = 2e-3
    c.warmup_steps = 50
    # ~2-3 s/step on the shared 2-core machine (8 simulated devices): 300 steps in 10-15 min.
    c.num_train_steps = 300
    c.eval_every_steps = 100
    c.checkpoint_every_steps = 100
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    m = c.model
    m.num_layers, m.d_model, m.mlp_dim = 3, 128, 512
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 4, 32
    m.attention.update(dict(impl="dense", layout="contiguous", block_q=128, block_k=128))
    words = set(variant.split("+")) - {""}
    if words - {"learned_sinks", "deep"} and variant != "test":
        raise ValueError(f"configs/streaming.py: unknown variant {variant!r}.")
    if "learned_sinks" in words:
        # The same data and model with a learned sink logit per head and layer (gpt-oss): the
        # softmax has somewhere to put surplus attention that no cache can evict.
        m.attention.sinks = True
    if "deep" in words:
        # Twice the layers at half the width (0.41M parameters) for twice the steps: a second
        # try at growing attention sinks (22.5 min on the shared machine, not half as fast).
        m.num_layers, m.d_model, m.mlp_dim, m.head_dim = 6, 64, 256, 16
        c.num_train_steps = 600
        c.eval_every_steps = c.checkpoint_every_steps = 200
    if variant == "test":
        c.seq_len = 64
        c.batch_size = 8
        c.num_train_steps = 2
        c.log_every_steps = 1
        c.eval_every_steps = 2
        c.eval_batches = 1
        c.checkpoint_every_steps = 2
        m.num_layers, m.d_model, m.mlp_dim, m.num_heads, m.num_kv_heads, m.head_dim = (
            1, 32, 64, 2, 2, 16,
        )  # fmt: skip
    return c
