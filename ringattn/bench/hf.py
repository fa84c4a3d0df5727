"""An imported model's prefill and decode speed against transformers (PyTorch, CPU) on the same
machine and threads, behind experiments/real_model_benchmark.py: decode.decode_throughput's
measurements on transformers, and both side by side. Needs torch and transformers (pip install -e
'.[hf]')."""

from __future__ import annotations

import json
import os
import time

import numpy as np

from ringattn.bench import decode


def hf_throughput(model, prompt_len, steps=64, batch=1, repeats=3, seed=0):
    """Best of `repeats`: a forward pass over a random prompt of `prompt_len` tokens with
    transformers' default KV cache and the logits of the last position only (what `generate`
    asks for), then `steps` greedy decode steps, one token each."""
    import torch

    rng = np.random.default_rng(seed)
    ids = torch.as_tensor(rng.integers(32, 127, (batch, prompt_len)))
    best = None
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True, logits_to_keep=1)
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


def load_transformers(gguf):
    """transformers' float32 model of the GGUF file `gguf` (its own GGUF loader), on as many
    torch threads as CPU cores."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    return transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    ).eval()


def compare(cfg, params, hf_model, prompt_lens, steps=64, sink_cache_len=1024, n=8, repeats=2):
    """Per prompt length, a prompt + `steps` decode steps: ours on 1 device (blockwise prefill,
    the cache local) and on n (ring prefill, the cache sharded), then transformers; then our sink
    + window cache of `sink_cache_len` slots (0: none) on 1 and n devices. Rows printed as they
    come; returns them."""

    def ours(devices, cache_len, cache="full"):
        r = decode.decode_throughput(
            cfg, params, devices, cache_len, steps=steps, repeats=repeats, cache=cache
        )
        return dict(r, impl="ringattn (ring)" if devices > 1 else "ringattn (blockwise)")

    rows = []
    for prompt_len in prompt_lens:
        rows += [ours(1, prompt_len + steps), ours(n, prompt_len + steps)]
        rows.append(hf_throughput(hf_model, prompt_len, steps, repeats=repeats))
        for r in rows[-3:]:
            print(json.dumps(r), flush=True)
    if sink_cache_len:
        for devices in (1, n):
            rows.append(ours(devices, sink_cache_len, "sink_window"))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows):
    """The table, with each of our rows' ratio to transformers' at the same prompt length."""
    lines = [
        "| implementation | devices | cache | prompt | prefill tokens/s | vs transformers | "
        "decode tokens/s | vs transformers |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    theirs = {r["prompt_len"]: r for r in rows if r["impl"].startswith("transformers")}
    for r in rows:
        ref = theirs.get(r["prompt_len"])
        ratio = lambda key: f"{r[key] / ref[key]:.2f}x" if ref else "-"  # noqa: B023, E731
        lines.append(
            f"| {r['impl']} | {r['devices']} | {r['cache']} {r['cache_len']} | "
            f"{r['prompt_len']} | {r['prefill_tokens_per_s']:.0f} | "
            f"{ratio('prefill_tokens_per_s')} | {r['decode_tokens_per_s']:.1f} | "
            f"{ratio('decode_tokens_per_s')} |"
        )
    return "\n".join(lines)
