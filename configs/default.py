"""The default experiment: passkey retrieval with ring attention over every device.

  python experiments/train.py --workdir=/tmp/passkey                       # 256 tokens
  python experiments/train.py --workdir=/tmp/passkey_long --config=configs/default.py:long
  python experiments/train.py --workdir=/tmp/x --config=configs/default.py:7b_1m --dry_run
  python experiments/train.py --workdir=/tmp/passkey_yarn --config=configs/default.py:extend \
      --config.init_from=/tmp/passkey --config.model.rope.scaling=yarn
  python experiments/train.py --workdir=/tmp/smollm2_text --config=configs/default.py:text \
      --config.init_from=$HOME/.cache/ringattn/smollm2/run
  python experiments/train.py --workdir=/tmp/x --config=configs/default.py:llama3_8b_128k --dry_run

Variants (`--config=configs/default.py:<variant>`): "" (default), "long" (128 -> 256 -> 512 -> 1024
token curriculum), "test" (tiny and fast, for the tests), "text" (LM on local Python sources,
held-out files for evaluation; the data only: the default model on bytes, or --config.init_from's
model on its tokenizer's tokens when the run has one), "7b_1m" (a Llama-2-7B shape
at 1M tokens on a 256-device mesh: for --dry_run), "extend" (the default passkey model, given by
--config.init_from, fine-tuned at 1024 tokens with the RoPE scaling that
--config.model.rope.scaling names), "llama3_8b_128k" (Llama 3.1 8B at 128K tokens on 32 devices:
fine-tuning a checkpoint imported by experiments/import_hf.py, or --dry_run).
Any field can be overridden: --config.num_train_steps=100 --config.model.attention.impl=dense.
Model fields left unset come from the run being continued (init_from, or a rerun): see `model`.
"""

import ml_collections
from ml_collections.config_dict import placeholder as unset

# RopeConfig's fields (ringattn/nn/rope.py) and their types.
ROPE_FIELDS = dict(theta=float, scaling=str, factor=float, original_len=int, beta_fast=float)
ROPE_FIELDS |= dict(beta_slow=float, attention_factor=float, low_freq_factor=float)
ROPE_FIELDS |= dict(high_freq_factor=float)


def get_config(variant=""):
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Data (ringattn/train/data.py): a task, its parameters, and the training length(s).
    c.task = "passkey"
    c.task_params = ml_collections.ConfigDict({"answer_weight": 10.0})  # answer targets x10
    c.batch_size = 16  # global batch (rows)
    c.seq_len = 256  # training length when there is no curriculum
    # ((start_step, seq_len), ...): lengths by step; () = seq_len throughout. Starting at 128
    # tokens (mostly needle and question) the copying circuit forms ~2x sooner than at 256.
    c.curriculum = ((0, 128), (300, 256))
    # Optimizer: AdamW, linear warmup then cosine decay to min_lr_ratio x learning_rate.
    c.learning_rate = 2e-3
    c.warmup_steps = 50
    c.min_lr_ratio = 0.1
    c.weight_decay = 0.1
    c.b1, c.b2 = 0.9, 0.98
    c.grad_clip = 1.0
    # A run directory (ours, or one written by experiments/import_hf.py) to start from: its newest
    # parameters, its model but where this config requests otherwise (see `model`), a fresh
    # optimizer at step 0; everything else is this config's (ringattn/run/fields.py). "": none.
    c.init_from = ""
    c.num_train_steps = 700
    # The loss (ringattn/train/loss.py): tokens of each row per tile of the LM head and
    # cross-entropy (0: every token's logits at once; > 0: tiled, no [tokens, vocab] array), and
    # the z-loss coefficient (0: none).
    c.loss_chunk_size = 0
    c.z_loss = 0.0
    # Logging, evaluation (exact-match accuracy and loss on held-out batches: a stream of its own
    # seed, with eval_task_params updating task_params), checkpoints.
    c.log_every_steps = 10
    c.eval_every_steps = 100
    c.eval_batches = 4
    c.eval_task_params = ml_collections.ConfigDict()
    c.eval_at_start = False  # also evaluate before the first step (step 0)
    c.checkpoint_every_steps = 100
    c.keep_checkpoints = 3
    # Mesh axis sizes (ringattn/mesh.py); -1 takes the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1, context=-1))
    # Model (ringattn/nn/config.py documents every field). Fields left unset (None) come from the
    # run being continued (--config.init_from, or a rerun in the same workdir), else they are
    # ModelConfig's defaults (the values in the comments: the passkey model); a value set here or
    # by a flag is requested (ringattn/run/fields.py). Shape fields: set only for a fresh model
    # (with init_from the run's shape is kept, and another value is an error).
    m = c.model = ml_collections.ConfigDict()
    m.vocab_size = unset(int)  # 256: bytes
    m.num_layers = unset(int)  # 2
    m.d_model = unset(int)  # 128
    m.num_heads = unset(int)  # 4
    m.num_kv_heads = unset(int)  # 4
    m.head_dim = unset(int)  # 32
    m.v_head_dim = unset(int)  # 0: head_dim (values' own head dim, MLA-style)
    m.mlp_dim = unset(int)  # 512
    m.tie_embeddings = unset(bool)  # True
    # What the parameters compute: unset = the run's (or the default for a fresh model).
    m.scale_tied_logits = unset(bool)  # True: tied logits / sqrt(d_model); Hugging Face's: False
    m.norm_eps = unset(float)  # 1e-6
    # RoPE (ringattn/nn/rope.py): theta 10000, scaling none | linear | ntk | yarn | llama3, factor
    # (target / original length), original_len (8192), yarn's beta_fast / beta_slow /
    # attention_factor, llama3's low_freq_factor / high_freq_factor.
    m.rope = ml_collections.ConfigDict()
    for name, kind in ROPE_FIELDS.items():
        m.rope[name] = unset(kind)
    # Variants: logit soft cap c (c tanh(s / c); 0: none), a learned sink logit per head and
    # layer (False), and local layers: a query at i sees keys i - local_window_size .. i (unset
    # for a fresh model: global; Hugging Face's `sliding_window` is local_window_size + 1), every
    # layer (global_every = 0, Mistral) or all but every global_every-th (Gemma 2: 2; 1: none).
    m.attention = ml_collections.ConfigDict()
    m.attention.logits_soft_cap = unset(float)
    m.attention.sinks = unset(bool)
    m.attention.local_window_size = unset(int)
    m.attention.global_every = unset(int)
    # Speed and memory only: always this config's (unset blocks: the platform's default).
    m.attention.impl = "ring"
    m.attention.layout = "zigzag"
    m.attention.axis = "context"
    m.attention.block_q = unset(int)
    m.attention.block_k = unset(int)
    # The single-device kernel: auto (the platform's best that passes its probe on every
    # process) | xla | pallas_gpu | cudnn | pallas_tpu (pinned, the same on every process).
    m.attention.kernel = "auto"
    m.mlp_chunk_size = 0
    m.remat = "none"
    m.scan_layers = False
    m.dtype = "float32"
    m.param_dtype = "float32"

    if variant == "long":
        c.curriculum = ((0, 128), (300, 256), (700, 512), (1000, 1024))
        c.num_train_steps = 1200
        c.batch_size = 8
    elif variant == "test":
        c.seq_len = 128
        c.curriculum = ()
        c.batch_size = 4
        c.num_train_steps = 6
        c.log_every_steps = 1
        c.eval_every_steps = 3
        c.eval_batches = 1
        c.checkpoint_every_steps = 2
        m.num_layers, m.d_model, m.mlp_dim, m.num_heads, m.num_kv_heads, m.head_dim = (
            1,
            32,
            64,
            4,
            2,
            8,
        )
        m.attention.block_q = m.attention.block_k = 16
    elif variant == "text":
        c.task = "text"
        c.curriculum = ()
        c.task_params = ml_collections.ConfigDict()  # the Python standard library's sources
        c.eval_task_params = ml_collections.ConfigDict({"split": "eval"})  # held-out files
        c.seq_len = 512
        c.num_train_steps = 1000
        # No model field: a fresh model is the default one; with --config.init_from, the run's.
    elif variant == "7b_1m":
        # Llama-2-7B shape (32 layers, d 4096, 32 heads, SwiGLU 11008) with GQA (8 KV heads),
        # 1M tokens per sequence on 256 devices: 8-way tensor, 32-way context; weights and
        # optimizer state sharded over (fsdp, context) as well, activations over context.
        c.batch_size = 1
        c.seq_len = 1 << 20
        c.curriculum = ()
        c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=8, context=32))
        m.vocab_size = 32_000
        m.num_layers, m.d_model, m.mlp_dim = 32, 4096, 11008
        m.num_heads, m.num_kv_heads, m.head_dim = 32, 8, 128
        m.tie_embeddings = False
        m.dtype = "bfloat16"
        m.remat = "full"
        m.scan_layers = True
        m.mlp_chunk_size = 4096
        m.rope.theta = 500_000.0
        m.attention.block_q = m.attention.block_k = 1024
        m.rule_overrides = ml_collections.ConfigDict({"embed": ("fsdp", "context")})
        c.loss_chunk_size = 1 << 17  # 8 tiles: 4096 tokens per device at a time
    elif variant == "extend":
        # Context extension: 256 -> 1024 tokens (4x), from the default model's parameters.
        c.seq_len = 1024
        c.curriculum = ()
        c.batch_size = 8
        c.num_train_steps = 150  # 3-6 s/step on the shared 2-core machine: 8-15 min
        c.learning_rate = 5e-4
        c.warmup_steps = 20
        c.eval_every_steps = 50
        c.checkpoint_every_steps = 50
        m.rope.factor = 4.0
        m.rope.original_len = 256  # the default model's training length
    elif variant == "llama3_8b_128k":
        # Llama 3.1 8B (as imported: 128256 vocabulary, 32 layers, d 4096, 32 heads / 8 KV heads,
        # SwiGLU 14336, llama3 RoPE scaling) at 128K tokens on 32 devices: 8-way tensor (a node),
        # 4-way context; weights and optimizer state also sharded over context, like 7b_1m.
        c.batch_size = 1
        c.seq_len = 1 << 17
        c.curriculum = ()
        c.learning_rate = 1e-5
        c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=8, context=4))
        m.vocab_size = 128_256
        m.num_layers, m.d_model, m.mlp_dim = 32, 4096, 14336
        m.num_heads, m.num_kv_heads, m.head_dim = 32, 8, 128
        m.tie_embeddings = False
        m.norm_eps = 1e-5
        m.dtype = "bfloat16"  # float32 master weights (param_dtype): the imported bf16 are cast
        m.remat = "full"
        m.scan_layers = True
        m.mlp_chunk_size = 4096
        m.rope.update(dict(theta=500_000.0, scaling="llama3", factor=8.0, original_len=8192))
        m.rope.low_freq_factor, m.rope.high_freq_factor = 1.0, 4.0
        m.attention.block_q = m.attention.block_k = 1024
        m.rule_overrides = ml_collections.ConfigDict({"embed": ("fsdp", "context")})
        c.loss_chunk_size = 1 << 14  # 8 tiles: 4096 tokens per device at a time
    elif variant:
        raise ValueError(f"configs/default.py: unknown variant {variant!r}.")
    return c
