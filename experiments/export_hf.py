"""Export a run's newest parameters as a Hugging Face checkpoint (LlamaForCausalLM, or
MistralForCausalLM with a sliding window).

  python experiments/export_hf.py --workdir=/tmp/ft --out=/tmp/ft_hf
  python experiments/export_hf.py --workdir=/tmp/passkey --out=/tmp/passkey_hf --dtype=bfloat16

An imported run's HF config fields and tokenizer files are kept (also for a run trained from one
with --config.init_from). Our own tied models are written untied (HF's tied logits are unscaled).
"""

import os

from absl import app, flags

from ringattn import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A run directory (trained or imported).")
_OUT = flags.DEFINE_string("out", None, "The Hugging Face checkpoint directory to write.")
_DTYPE = flags.DEFINE_string("dtype", None, "Weights' dtype (default: the parameters').")
_MAX_FILE_GB = flags.DEFINE_float("max_file_gb", 5.0, "Split the safetensors above this size.")
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES, _WORKDIR, _OUT)  # before anything starts JAX's backend
    from ringattn.hf.convert import export_checkpoint

    out = os.path.expanduser(_OUT.value)
    hf = export_checkpoint(
        os.path.expanduser(_WORKDIR.value),
        out,
        dtype=_DTYPE.value,
        max_file_bytes=int(_MAX_FILE_GB.value * 2**30),
    )
    print(f"exported {hf['architectures'][0]} ({hf['torch_dtype']}) -> {out}")


if __name__ == "__main__":
    app.run(main)
