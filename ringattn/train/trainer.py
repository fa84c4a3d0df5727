"""The training loop: config -> mesh -> data (in the layout) -> model -> step -> checkpoints.

Before anything in the workdir is written, the config is checked against the run already there
(ringattn/run/directory.py `prepare`; where each field comes from: ringattn/run/fields.py):
a rerun resumes from the newest readable checkpoint in `<workdir>/checkpoints` (and may change
only steps, logging, evaluation, checkpoint cadence and speed-only fields; anything else stops
it with an error naming the fields), else the parameters of `config.init_from`'s run with a fresh
optimizer at step 0, else a fresh state. Checkpoints that exist but none of which reads stop the
run; it never silently restarts at step 0.
The config is written to `<workdir>/config.json` (ringattn/run/load.py reads it back), metrics to
`<workdir>/metrics.jsonl` and TensorBoard event files in `<workdir>/tensorboard/`.
A resumed run continues exactly (same batches, same losses) because the data iterator's state is
saved with the train state. SIGTERM saves a checkpoint and stops cleanly.
"""

from __future__ import annotations

import inspect
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from ringattn import deprecation
from ringattn.mesh import local_rows, make_mesh, mesh_axes_for
from ringattn.nn.config import ModelConfig
from ringattn.nn.model import Transformer
from ringattn.parallel.layouts import check_layout, layout_positions
from ringattn.run import directory, fields
from ringattn.run.checkpoint import Checkpointer
from ringattn.train import data as data_lib
from ringattn.train import memory
from ringattn.train.loss import LossConfig
from ringattn.train.metrics import MetricsWriter, progress_line
from ringattn.train.state import init_state, make_optimizer, state_from_run, state_shardings
from ringattn.train.step import batch_sharding, jit_eval_step, jit_train_step

EVAL_SEED_OFFSET = 1_000_003  # evaluation batches come from a stream training never sees

model_config = deprecation.alias(ModelConfig.from_config, "ringattn.train.trainer.model_config")


def curriculum(config):
    """((start_step, seq_len), ...): `config.curriculum` if set, else the fixed `seq_len`."""
    if config.get("curriculum"):
        return tuple((int(s), int(t)) for s, t in config.curriculum)
    return ((0, int(config.seq_len)),)


def loss_config(config):
    """The loss's LossConfig of a config's `loss_chunk_size` and `z_loss` (absent: 0)."""
    return LossConfig(
        chunk_size=int(config.get("loss_chunk_size") or 0), z_loss=float(config.get("z_loss") or 0)
    )


def task_params(config, evaluation=False):
    """The task's parameters: `task_params`, updated by `eval_task_params` for evaluation; a
    text task (one taking a `tokenizer`) gets the tokenizer of `init_from`'s run when that run
    has one (ringattn/run/directory.py `hf_template_dir`) and the config names none."""
    params = dict(config.task_params)
    if evaluation:
        params.update(dict(config.get("eval_task_params") or {}))
    takes = inspect.signature(data_lib.TASKS[config.task]).parameters
    if "tokenizer" in takes and params.get("tokenizer") is None and config.get("init_from"):
        found = directory.hf_template_dir(config.init_from)
        if found and os.path.exists(os.path.join(found, "tokenizer.json")):
            params["tokenizer"] = found
    return params


def optimizer(config):
    """(optax transformation, learning-rate schedule) of a config's optimizer fields."""
    return make_optimizer(
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_steps,
        total_steps=config.num_train_steps,
        min_lr_ratio=config.min_lr_ratio,
        weight_decay=config.weight_decay,
        b1=config.b1,
        b2=config.b2,
        grad_clip=config.grad_clip,
    )


class Experiment:
    """Everything a run (or a dry run) builds from its config, before any step."""

    def __init__(self, config):
        self.config = config
        self.mesh = make_mesh(dict(config.mesh))
        self.model_cfg = ModelConfig.from_config(config.model)
        self.model = Transformer(self.model_cfg, self.mesh)
        self.tx, self.schedule = optimizer(config)
        rules = self.model_cfg.rules
        self.abstract_state, self.state_shardings = state_shardings(
            self.model, self.tx, self.mesh, rules
        )
        axis = self.model_cfg.attention.axis
        self.num_shards = self.mesh.shape[axis]
        self.layout = self.model_cfg.attention.layout
        self.loss_config = loss_config(config)
        for _, seq_len in curriculum(config):
            check_layout("train", self.layout, seq_len, self.num_shards, "seq_len")
            chunk = self.loss_config.chunk_size
            if chunk and seq_len > chunk and seq_len % chunk:
                raise ValueError(
                    f"train: `loss_chunk_size` ({chunk}) must divide every training length "
                    f"(seq_len {seq_len}), or be at least it."
                )
        self.task_params = {False: task_params(config), True: task_params(config, True)}
        vocab = data_lib.vocab_size(self.task_params[False].get("tokenizer"))
        if vocab is not None and vocab > self.model_cfg.vocab_size:
            raise ValueError(
                f"train: the tokenizer {self.task_params[False]['tokenizer']} has {vocab} tokens, "
                f"more than the model's vocab_size ({self.model_cfg.vocab_size})."
            )
        self.data_sharding = batch_sharding(self.mesh, mesh_axes_for(rules, "act_batch"), axis)
        # The batch rows this process feeds (its devices' shards only), and where each sits in
        # this process's numpy batch: fixed for the run, so computed once, not per step.
        self.rows = local_rows(self.data_sharding, (config.batch_size, self.num_shards))
        self._row_index = {int(r): i for i, r in enumerate(self.rows)}
        self._perms = {}  # seq_len -> the layout's token order
        self.train_step = jit_train_step(
            self.model, self.tx, self.state_shardings, self.data_sharding, self.mesh,
            self.loss_config,
        )  # fmt: skip
        self.eval_step = jit_eval_step(
            self.model, self.state_shardings.params, self.data_sharding, self.mesh,
            self.loss_config,
        )  # fmt: skip

    def iterator(self, seed, schedule, evaluation=False):
        return data_lib.DataIterator(
            self.config.task,
            self.config.batch_size,
            seed,
            schedule,
            self.task_params[evaluation],
            rows=self.rows,
        )

    def to_device(self, batch):
        """Numpy rows of this process -> global arrays in the layout's token order."""
        b, t = self.config.batch_size, batch["inputs"].shape[1]
        if t not in self._perms:
            self._perms[t] = np.asarray(layout_positions(self.layout, t, self.num_shards))
        perm, where = self._perms[t], self._row_index

        def put(x):
            x = x[:, perm]
            return jax.make_array_from_callback(
                (b, t),
                self.data_sharding,
                lambda idx: x[[where[r] for r in range(*idx[0].indices(b))]][:, idx[1]],
            )

        return {k: put(v) for k, v in batch.items()}

    def abstract_batch(self, seq_len):
        shape = (self.config.batch_size, seq_len)
        dtypes = dict(weights=jnp.float32, answer_mask=jnp.bool_)
        return {
            k: jax.ShapeDtypeStruct(shape, dtypes.get(k, jnp.int32), sharding=self.data_sharding)
            for k in data_lib.BATCH_KEYS
        }


class _Stop:
    """Set by SIGTERM (a preemption): the loop saves a checkpoint and returns."""

    def __init__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)


def _scalar(x):
    return float(np.asarray(x.addressable_data(0)))


def evaluate(exp: Experiment, params, seq_len):
    """Exact-match and next-token accuracy and loss over `eval_batches` held-out batches at
    `seq_len` (a stream of its own seed, with `eval_task_params`: a text task's held-out files)."""
    config = exp.config
    it = exp.iterator(config.seed + EVAL_SEED_OFFSET, seq_len, evaluation=True)
    sums = dict.fromkeys(("correct", "rows", "right", "tokens", "loss"), 0.0)
    for _ in range(config.eval_batches):
        out = exp.eval_step(params, exp.to_device(next(it)))
        for key in sums:
            sums[key] += _scalar(out[key])
    return {
        "eval/loss": sums["loss"] / config.eval_batches,
        "eval/accuracy": sums["correct"] / max(sums["rows"], 1),
        "eval/token_accuracy": sums["right"] / max(sums["tokens"], 1),
        "eval/seq_len": seq_len,
    }


def train_and_evaluate(config, workdir):
    """Train (or resume) the experiment `config` in `workdir`; returns the last metrics."""
    config, _, report = directory.prepare(config, workdir)  # raises before writing anything
    if report:
        print(report, flush=True)
    exp = Experiment(config)
    os.makedirs(workdir, exist_ok=True)
    ckpt = Checkpointer(workdir, keep=config.keep_checkpoints)
    train_it = exp.iterator(config.seed, curriculum(config))
    try:
        restored = ckpt.restore_latest(exp.abstract_state)  # raises if none of them reads
    except BaseException:
        ckpt.close()
        raise
    directory.write_config(workdir, config)  # what generate/needle rebuild the model from
    if restored is None and config.get("init_from"):
        state, step = state_from_run(config.init_from, exp.model, exp.tx, exp.abstract_state), 0
    elif restored is None:
        state = init_state(
            exp.model, exp.tx, exp.mesh, exp.model_cfg.rules, jax.random.key(config.seed)
        )
        step = 0
    else:
        step, state, data_state = restored
        train_it.set_state(data_state)
        print(f"resumed from checkpoint {step} in {ckpt.directory}", flush=True)
    writer = MetricsWriter(workdir, step)
    stop = _Stop()
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(exp.abstract_state.params))
    tokenizer = exp.task_params[False].get("tokenizer")
    print(
        f"model: {num_params / 1e6:.2f}M parameters | mesh {dict(exp.mesh.shape)} | attention "
        f"{exp.model_cfg.attention.impl}/{exp.layout} | {jax.device_count()} devices, "
        f"{jax.process_count()} process(es)" + (f" | tokens of {tokenizer}" if tokenizer else ""),
        flush=True,
    )
    last = {}
    if step == 0 and config.get("eval_at_start"):  # the starting point, e.g. an imported model
        last = {"step": 0} | evaluate(exp, state.params, train_it.seq_len_at(0))
        writer.write(last)
        print(progress_line(last), flush=True)
    tick, ticked_step = time.perf_counter(), step
    try:
        while step < config.num_train_steps:
            seq_len = train_it.seq_len_at(step)
            state, metrics = exp.train_step(state, exp.to_device(next(train_it)))
            step += 1
            record = None
            if step % config.log_every_steps == 0 or step == config.num_train_steps:
                metrics = {k: _scalar(v) for k, v in metrics.items()}
                elapsed = time.perf_counter() - tick
                steps = step - ticked_step
                tick, ticked_step = time.perf_counter(), step
                record = {
                    "step": step,
                    **metrics,
                    "seq_len": seq_len,
                    "step_time_s": elapsed / steps,
                    "tokens_per_s": steps * config.batch_size * seq_len / elapsed,
                    "learning_rate": float(exp.schedule(step - 1)),
                }
            if step % config.eval_every_steps == 0 or step == config.num_train_steps:
                record = (record or {"step": step}) | evaluate(exp, state.params, seq_len)
                tick = time.perf_counter()  # evaluation time is not training time
            if record is not None:
                writer.write(record)
                print(progress_line(record), flush=True)
                last = record
            if step % config.checkpoint_every_steps == 0 or stop.requested:
                ckpt.save(step, state, train_it.get_state())
            if stop.requested:
                print(f"SIGTERM: saved checkpoint {step}; stopping.", flush=True)
                break
        else:
            ckpt.save(step, state, train_it.get_state())
    finally:
        ckpt.close()
        writer.close()
        stop.restore()
    return last


def dry_run(config):
    """Compile one train step for `config`'s shapes (the model of `config.init_from`'s run,
    where given) and return per-device memory from the compiled program, with a breakdown
    (ringattn/train/memory.py); allocates nothing."""
    source = config.get("init_from")
    if source:
        config, _ = fields.start_from(config, directory.load_config(source), source)
    exp = Experiment(config)
    seq_len = curriculum(config)[-1][1]
    t0 = time.perf_counter()
    compiled = exp.train_step.lower(exp.abstract_state, exp.abstract_batch(seq_len)).compile()
    return memory.report(exp, seq_len, compiled, time.perf_counter() - t0)
