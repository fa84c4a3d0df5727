"""Import a llama.cpp GGUF file (Llama architecture) as a run directory.

  python experiments/import_gguf.py --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --workdir=/tmp/smollm2
  python experiments/generate.py --workdir=/tmp/smollm2 --prompt="The capital of France is"

Tensors are dequantised to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
K-quants Q2_K..Q6_K; others are refused by name), q/k rows are put back in Hugging Face's order,
and the run directory is the one experiments/import_hf.py writes (config.json, the parameters
sharded over every device, hf/ with config.json, tokenizer.json and the chat template). The same
as `python experiments/import_hf.py --gguf=...`, with the same flags.
"""

import os

from absl import app, flags

from ringattn import cli

_GGUF = flags.DEFINE_string("gguf", None, "The llama.cpp GGUF file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The run directory to write.")
_CONFIG = cli.config(
    "The training config the run gets (mesh, task, attention); its model is replaced."
)
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "Cast the weights.")
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES, _GGUF, _WORKDIR)  # before anything starts JAX's backend
    from ringattn.hf.convert import describe
    from ringattn.hf.gguf_import import import_gguf

    gguf, workdir = os.path.expanduser(_GGUF.value), os.path.expanduser(_WORKDIR.value)
    config = import_gguf(gguf, workdir, _CONFIG.value, param_dtype=_PARAM_DTYPE.value)
    print(f"{describe(config)} -> {_WORKDIR.value}")


if __name__ == "__main__":
    app.run(main)
