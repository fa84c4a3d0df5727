"""Import a Hugging Face Llama / Mistral checkpoint as a run directory.

  python experiments/import_hf.py --hf_dir=~/Llama-3.1-8B --workdir=/tmp/llama31_8b \
      --config=configs/default.py:llama3_8b_128k
  python experiments/generate.py --workdir=/tmp/llama31_8b ...          # loads like a trained run
  python experiments/train.py --workdir=/tmp/ft --config=configs/default.py:llama3_8b_128k \
      --config.init_from=/tmp/llama31_8b

--hf_dir holds config.json and model.safetensors (or model.safetensors.index.json and its
shards). The run's config is --config with the HF model's fields; weights keep their dtype and go
tensor by tensor into shards over all devices (no device and no host holds the whole model).
"""

import os

from absl import app, flags

from ringattn import cli

_HF_DIR = flags.DEFINE_string("hf_dir", None, "The Hugging Face checkpoint directory.")
_GGUF = flags.DEFINE_string("gguf", None, "Or a llama.cpp GGUF file (experiments/import_gguf.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to write.")
_CONFIG = cli.config(
    "The training config the run gets (mesh, task, attention); its model is replaced."
)
_PARAM_DTYPE = flags.DEFINE_string(
    "param_dtype", None, "Cast the weights (default: keep; float32 from a GGUF file)."
)
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES)  # before anything starts JAX's backend
    from ringattn.hf.convert import describe, import_checkpoint
    from ringattn.hf.gguf_import import import_gguf

    if (_HF_DIR.value is None) == (_GGUF.value is None) or not _WORKDIR.value:
        raise app.UsageError("--workdir and one of --hf_dir and --gguf are required.")
    workdir = os.path.expanduser(_WORKDIR.value)
    if _GGUF.value:
        dtype = _PARAM_DTYPE.value or "float32"
        config = import_gguf(
            os.path.expanduser(_GGUF.value), workdir, _CONFIG.value, param_dtype=dtype
        )
    else:
        source = os.path.expanduser(_HF_DIR.value)
        config = import_checkpoint(source, workdir, _CONFIG.value, param_dtype=_PARAM_DTYPE.value)
    print(f"{describe(config)} -> {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
