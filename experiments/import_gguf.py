"""Import a llama.cpp GGUF file (Llama architecture) as a run directory.

  python experiments/import_gguf.py --gguf=SmolLM2-135M-Instruct.Q4_1.gguf --workdir=/tmp/smollm2
  python experiments/generate.py --workdir=/tmp/smollm2 --prompt="The capital of France is"

Tensors are dequantised to float32 (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
K-quants Q2_K..Q6_K; others are refused by name), q/k rows are put back in Hugging Face's order,
and the run directory is the one experiments/import_hf.py writes (config.json, the parameters
sharded over every device, hf/ with config.json, tokenizer.json and the chat template). The same
flags as import_hf.py (--config, --param_dtype, --num_cpu_devices), which runs it.
"""

import import_hf  # experiments/import_hf.py: its flags and main take --gguf
from absl import app

if __name__ == "__main__":
    app.run(import_hf.main)
