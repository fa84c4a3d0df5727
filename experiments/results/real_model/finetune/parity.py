"""The exported fine-tune read back by transformers: its tokenizer's ids and its logits against
ours (1024 tokens of argparse.py, every position), and the held-out loss of the first evaluation
row by transformers and by us, before and after the fine-tune.

  python experiments/results/real_model/finetune/parity.py --workdir=/tmp/smollm2_ft \\
      --hf=/tmp/smollm2_ft_hf
"""

import argparse
import json
import os

from absl import app, flags

flags.DEFINE_string("workdir", None, "The fine-tuned run.")
flags.DEFINE_string("hf", None, "Its export (experiments/export_hf.py --out).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import jax

    jax.config.update("jax_num_cpu_devices", 1)
    import numpy as np
    import optax
    import torch
    import transformers

    from ringattn.evals.logits import Forward
    from ringattn.hf.tokenizer import load_tokenizer
    from ringattn.run.directory import load_config
    from ringattn.run.load import load_run
    from ringattn.train import data, trainer

    run = load_run(FLAGS.workdir, num_devices=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(FLAGS.hf, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(FLAGS.hf)
    with open(argparse.__file__, encoding="utf-8") as f:
        text = f.read()
    ids = load_tokenizer(FLAGS.workdir).encode(text)
    same_ids = bool(np.array_equal(tok(text)["input_ids"], ids))
    tokens = ids[None, :1024]
    ours = Forward(run.model_cfg, jax.device_get(run.params))(tokens)
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens, dtype=torch.int64)).logits.numpy()
    config = load_config(FLAGS.workdir)
    params = trainer.task_params(config, evaluation=True)
    row = data.make_batch(config.task, seed=config.seed + trainer.EVAL_SEED_OFFSET, index=0,
                          batch_size=1, seq_len=config.seq_len, **params)  # fmt: skip
    losses = {}
    for name, path in (("before", config.init_from), ("after", FLAGS.workdir)):
        r = load_run(path, num_devices=1)
        fwd = Forward(r.model_cfg, jax.device_get(r.params))
        logits = fwd.apply(fwd.params, row["inputs"], row["positions"], row["segment_ids"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, row["targets"])
        losses[f"ours_{name}"] = float(np.sum(ce * row["weights"]) / np.sum(row["weights"]))
    # transformers on the same row: one document at a time (no packing in its API).
    total, count = 0.0, 0.0
    for s in np.unique(row["segment_ids"][0]):
        if s == 0:
            continue
        idx = np.flatnonzero(row["segment_ids"][0] == s)
        with torch.no_grad():
            out = model(torch.as_tensor(row["inputs"][:, idx], dtype=torch.int64)).logits[0]
        w = row["weights"][0, idx]
        ce = torch.nn.functional.cross_entropy(
            out, torch.as_tensor(row["targets"][0, idx], dtype=torch.int64), reduction="none"
        ).numpy()
        total, count = total + float(np.sum(ce * w)), count + float(np.sum(w))
    losses["transformers_after"] = total / count
    result = dict(
        tokenizer_ids_equal=same_ids,
        logits_max_abs_diff=float(np.abs(ours - theirs).max()),
        logits_max_abs=float(np.abs(theirs).max()),
        logits_relative=float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
        first_eval_row_loss=losses,
        transformers=transformers.__version__,
        torch=torch.__version__,
    )
    print(json.dumps(result, indent=1))
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "parity.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
