"""Byte-level language model on the Python standard library's sources, for streaming with
attention sinks (experiments/streaming.py): small enough to train in about 10 minutes on CPU.

  python experiments/train.py --workdir=/tmp/stream_lm --config=configs/streaming.py
  python experiments/streaming.py --workdir=/tmp/stream_lm --out=/tmp/streaming

Every document begins with BOS (task_params.bos): the model learns to use it as an attention sink,
which a streaming cache then keeps. Every field not set here is configs/default.py's (documented
there). Variants: "" and "test" (tiny and fast, for the tests). Data parallel over every device
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
    c.num_train_steps = 600
    c.eval_every_steps = 200
    c.checkpoint_every_steps = 200
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    m = c.model
    m.num_layers, m.d_model, m.mlp_dim = 3, 128, 512
    m.num_heads, m.num_kv_heads, m.head_dim = 4, 4, 32
    m.attention = ml_collections.ConfigDict(
        dict(impl="dense", layout="contiguous", axis="context", block_q=128, block_k=128)
    )
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
    elif variant:
        raise ValueError(f"configs/streaming.py: unknown variant {variant!r}.")
    return c
