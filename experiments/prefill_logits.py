"""Prefill of an imported model on one device, side by side in one run: the LM head on every
prompt token (the prefill before the head API) or on each row's last only (generate.prefill
now), each with the XLA kernel's tiles at two sizes.

  python experiments/prefill_logits.py                      # SmolLM2, 2048 tokens of argparse.py
  python experiments/prefill_logits.py --blocks=128,512 --prompt_len=2048 \\
      --out=experiments/results/real_model/finetune/prefill.jsonl
"""

import functools
import json
import os

from absl import app, flags

from ringattn import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "The run (default: the fetched SmolLM2).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 2048, "Prompt tokens (of argparse.py's text).")
_BLOCKS = flags.DEFINE_list("blocks", ["128", "512"], "Square tiles of blockwise attention.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timed rounds (the calls take turns); the median.")
_OUT = flags.DEFINE_string("out", None, "Append one JSON line per measurement here.")
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES)
    import argparse
    import dataclasses

    import jax
    import numpy as np

    from ringattn.bench import timing
    from ringattn.evals import generate as gen
    from ringattn.hf import fetch
    from ringattn.hf.tokenizer import load_tokenizer
    from ringattn.nn.model import Transformer
    from ringattn.run.load import load_run

    workdir = os.path.expanduser(_WORKDIR.value or fetch.run_dir())
    run = load_run(workdir, num_devices=1)
    with open(argparse.__file__, encoding="utf-8") as f:
        tokens = load_tokenizer(workdir).encode(f.read())[: _PROMPT_LEN.value]
    batch = gen.prompt_batch([tokens])
    t = batch["tokens"].shape[1]

    def every_token(model, params, batch, caches):  # the LM head on all T, then the last kept
        logits, caches = model.apply(
            {"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"], caches,
            0, method=Transformer.prefill,
        )  # fmt: skip
        return logits[:, -1], caches

    calls = {}
    for b in map(int, _BLOCKS.value):
        attn = dataclasses.replace(run.model_cfg.attention, impl="blockwise", block_q=b, block_k=b)
        model = gen.decoding_model(dataclasses.replace(run.model_cfg, attention=attn))
        caches = gen.init_caches(model.cfg, gen.CacheSpec("full", max_len=t), 1)
        args = (run.params, batch, caches)
        last = functools.partial(gen.prefill, model, cache_bound=0)
        for name, fn in (("every token", functools.partial(every_token, model)), ("last", last)):
            compiled, _ = timing.compile_once(fn, args)
            calls[(name, b)] = (compiled, args)
    seconds = timing.interleaved(
        {key: lambda c=c, a=a: c(*a) for key, (c, a) in calls.items()}, _ROUNDS.value, warmup=1
    )
    logits = {key: np.asarray(c(*a)[0]) for key, (c, a) in calls.items()}
    ref = logits[next(iter(logits))]
    for (name, b), s in seconds.items():
        row = dict(run=workdir, prompt_len=t, logits_of=name, block=b, prefill_s=s,
                   tokens_per_s=t / s, threads=os.cpu_count(),
                   max_logit_diff=float(np.abs(logits[(name, b)] - ref).max()))  # fmt: skip
        print(json.dumps(row), flush=True)
        if _OUT.value:
            with open(_OUT.value, "a") as f:
                f.write(json.dumps(row) + "\n")
    jax.clear_caches()


if __name__ == "__main__":
    app.run(main)
