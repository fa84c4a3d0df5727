"""Continued training of a pretrained model at long context through the ring.

  python experiments/fetch_model.py          # SmolLM2-135M -> ~/.cache/ringattn/smollm2/run
  python experiments/train.py --config=configs/finetune.py:smollm2 \\
      --config.init_from=$HOME/.cache/ringattn/smollm2/run --workdir=/tmp/smollm2_ft
  python experiments/export_hf.py --workdir=/tmp/smollm2_ft --out=/tmp/smollm2_ft_hf
  python experiments/train.py --config=configs/finetune.py:smollm2 --dry_run   # no run needed

Variant "smollm2": SmolLM2-135M's shape (set here, so that --dry_run needs no run; with
--config.init_from the run's shape must agree, and --config.model.num_layers=2 fits a 2-layer
cut of it), its function (RoPE theta, norm eps, unscaled tied logits) left unset: the run's
(ringattn/run/fields.py). Data: the Python standard library's sources in the run's tokenizer's
tokens (ringattn/train/corpus.py), packed into 4096-token rows, held-out files for evaluation,
evaluated before the first step and at the end. Ring attention (zigzag) over every device, the
parameters and the optimizer state also sharded over the context axis (as default.py:7b_1m),
the loss tiled (no [tokens, vocab] logits). A small learning rate: the default 2e-3 raised the
loss from 2.67 to 4.08 in 3 steps. Override as usual: --config.seq_len, --config.batch_size,
--config.num_train_steps.
"""

import os
import runpy

import ml_collections

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")


def get_config(variant="smollm2"):
    c = runpy.run_path(DEFAULT)["get_config"]()  # every field not set here is default.py's
    c.task = "text"
    c.task_params = ml_collections.ConfigDict({"glob": "*.py"})  # the standard library's
    c.eval_task_params = ml_collections.ConfigDict({"split": "eval"})  # held-out files
    c.batch_size = 1
    c.seq_len = 4096
    c.curriculum = ()
    c.learning_rate = 1e-4  # held-out loss 2.409 -> 2.348 in 8 steps of 1024 tokens (3e-5: 2.372)
    c.warmup_steps = 5
    c.min_lr_ratio = 0.1
    c.weight_decay = 0.0
    c.num_train_steps = 35
    c.log_every_steps = 1
    c.eval_every_steps = 35
    c.eval_batches = 8  # the same 8 held-out rows before and after
    c.eval_at_start = True
    c.checkpoint_every_steps = 5  # a kill loses at most 5 steps (~6 minutes here)
    c.keep_checkpoints = 1
    c.loss_chunk_size = 1024  # 4 tiles: 128 tokens x 49152 logits per device at a time
    m = c.model
    m.attention.impl = "ring"
    m.attention.layout = "zigzag"
    m.remat = "full"
    m.scan_layers = True
    m.rule_overrides = ml_collections.ConfigDict({"embed": ("fsdp", "context")})
    if variant == "smollm2":
        m.vocab_size = 49_152
        m.num_layers, m.d_model, m.mlp_dim = 30, 576, 1536
        m.num_heads, m.num_kv_heads, m.head_dim = 9, 3, 64
        m.tie_embeddings = True
    else:
        raise ValueError(f"configs/finetune.py: unknown variant {variant!r}.")
    return c
