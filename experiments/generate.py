"""Generate text from a trained run: prefill with its context-parallel attention, then decode
with the KV cache sharded along the sequence over the devices (it never moves).

  python experiments/generate.py --workdir=/tmp/passkey --prompt="What is the pass key?"
  python experiments/generate.py --workdir=/tmp/text --prompt_file=prompt.txt \
      --temperature=0.8 --top_k=20 --max_new_tokens=256
  python experiments/generate.py --workdir=/tmp/passkey --prompt=... --num_devices=1
  python experiments/generate.py --workdir=/tmp/passkey --prompt_file=long.txt --prefill_chunk=512
  python experiments/generate.py --workdir=~/.cache/ringattn/smollm2/run --chat \
      --prompt="What is the capital of France?"
  python experiments/generate.py --workdir=~/.cache/ringattn/smollm2/run --prompt_file=long.txt \
      --cache=retrieval --window=252 --page_size=64 --top_pages=12 --prefill_chunk=256

--cache picks the KV cache: full, sink_window / window (StreamingLLM: --num_sinks, --window), or
retrieval (ringattn/decode/retrieval.py: every token kept in pages of --page_size, each step
attending to the sinks, the --window and the --top_pages pages whose keys promise the highest
scores).

Prompts are encoded with the run's tokenizer (ringattn/hf/tokenizer.py: an imported model's own,
bytes for our runs); --chat applies the model's chat template. Generation stops at its end-of-
sequence token. Prints the continuation and the prefill time and decode tokens per second
(compilation excluded).
"""

import os

from absl import app, flags

from ringattn import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A training run: config.json and checkpoints/.")
_CONFIG = cli.run_config()
_PROMPT = flags.DEFINE_string("prompt", None, "The prompt text.")
_PROMPT_FILE = flags.DEFINE_string("prompt_file", None, "Read the prompt from this file.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap the prompt as a user message in the chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0: greedy; else sample at this temperature.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_CACHE = cli.cache_flags()
_INT8 = flags.DEFINE_bool("int8", False, "Store K/V in int8 with per-token, per-head scales.")
_PREFILL_CHUNK = flags.DEFINE_integer(
    "prefill_chunk", None, "Prefill the prompt this many tokens at a time (default: at once)."
)
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", None, "Devices to use (default all; simulated when on CPU)."
)
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES, _WORKDIR)  # before anything starts JAX's backend
    from ringattn.evals import generate as gen

    if (_PROMPT.value is None) == (_PROMPT_FILE.value is None):
        raise app.UsageError("Give exactly one of --prompt and --prompt_file.")
    text = _PROMPT.value
    if _PROMPT_FILE.value:
        with open(os.path.expanduser(_PROMPT_FILE.value), encoding="utf-8") as f:
            text = f.read()
    run, tok = cli.open_run(_WORKDIR.value, _CONFIG.value, _NUM_DEVICES.value)
    if _CHAT.value:
        text = tok.apply_chat_template([{"role": "user", "content": text}])
    prompt = tok.encode(text, add_special_tokens=not _CHAT.value)
    spec = cli.cache_spec(_CACHE, len(prompt) + _MAX_NEW.value, _INT8.value)
    model = gen.decoding_model(run.model_cfg, run.mesh)
    params = gen.decoding_params(run.model_cfg, run.params)
    caches = gen.init_caches(run.model_cfg, spec, 1, run.mesh)
    batch = gen.prompt_batch([prompt], gen.pad_multiple(run.model_cfg, run.mesh))
    out = gen.generate(
        model,
        params,
        batch,
        caches,
        _MAX_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        seed=_SEED.value,
        prefill_chunk=_PREFILL_CHUNK.value,
    )
    answer = tok.decode(gen.until_eos(out["tokens"][0], tok.eos_id))
    print(answer if _CHAT.value else text + answer)
    n = gen.num_shards(run.model_cfg, run.mesh)
    print(
        f"\n[checkpoint {run.step} | {len(prompt)} prompt tokens | cache {spec.kind}"
        f"{' int8' if spec.quantize else ''} over {n} device(s) | prefill "
        f"{out['prefill_s'] * 1e3:.0f} ms | decode {out['tokens_per_s']:.1f} tokens/s]"
    )


if __name__ == "__main__":
    app.run(main)
