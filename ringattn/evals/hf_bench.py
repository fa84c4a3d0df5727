"""The same measurements as bench.decode_throughput, on transformers (PyTorch, CPU): the
reference an imported model's prefill and decode speed are compared with, on the same machine
and threads. Needs torch and transformers (pip install -e '.[hf]')."""

from __future__ import annotations

import time

import numpy as np


def hf_throughput(model, prompt_len, steps=64, batch=1, repeats=3, seed=0):
    """Best of `repeats`: a forward pass over a random prompt of `prompt_len` tokens with
    transformers' default KV cache, then `steps` greedy decode steps, one token each."""
    import torch

    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(32, 127, (batch, prompt_len)))
    best = None
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill_s = time.perf_counter() - t0
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t0 = time.perf_counter()
            for _ in range(steps):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            decode_s = time.perf_counter() - t0
            row = dict(
                impl=f"transformers ({model.config._attn_implementation})",
                devices=1,
                cache="full",
                cache_len=prompt_len + steps,
                batch=batch,
                prompt_len=prompt_len,
                prefill_s=prefill_s,
                prefill_tokens_per_s=batch * prompt_len / prefill_s,
                decode_tokens_per_s=batch * steps / decode_s,
                threads=torch.get_num_threads(),
            )
            if best is None or row["decode_tokens_per_s"] > best["decode_tokens_per_s"]:
                best = row
    return best
