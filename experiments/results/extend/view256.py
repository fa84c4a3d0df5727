"""A view of an `extend` run for experiments/needle.py: the same checkpoints (a symlink) under a
config.json that says the run was trained at 256 tokens, its RoPE's original_len.

needle.py stretches RoPE from the run's training length to each length it measures, replacing the
run's RoPE scaling: on an extend run (trained at 1024 with factor 4 over 256) it would evaluate
1024 tokens with scaling "none" and 2048 with factor 2 over 1024. On the view, the stretch is
factor length / 256 over 256: at 1024 exactly the scaling the run was fine-tuned with, at 2048
factor 8 (the rule the untuned runs are measured with).

  python experiments/results/extend/view256.py /work/runs/extend_llama3   # -> ..._view256
"""

import json
import os
import sys


def main(src):
    dst = src.rstrip("/") + "_view256"
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    rope = config["model"]["rope"]
    if (rope.get("original_len"), rope.get("factor")) != (256, 4.0):
        raise ValueError(f"view256: {src} has rope {rope}, expected original_len 256, factor 4.")
    config["seq_len"], config["curriculum"] = 256, []
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    link = os.path.join(dst, "checkpoints")
    if not os.path.exists(link):
        os.symlink(os.path.abspath(os.path.join(src, "checkpoints")), link)
    print(dst, rope)


if __name__ == "__main__":
    main(sys.argv[1])
