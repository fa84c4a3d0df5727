"""SmolLM2 continued through the ring and exported, on a 2-layer cut of the imported run: the path
of `configs/finetune.py:smollm2` (tokenized, packed standard-library sources; ring attention,
zigzag, over 8 devices; parameters and optimizer sharded over context; the tiled loss), then
`export_checkpoint`, then transformers loads the model and the tokenizer.

Checked: the held-out loss the trainer reports before the first step is the loss of that batch
computed apart (dense attention, one device, every logit); training moves the parameters; the
exported model's logits are ours within 1e-4 of the largest logit and its tokenizer's ids are
ours. Needs the fetched model (python experiments/fetch_model.py) and transformers."""

import json
import os
import runpy
import shutil

import jax
import numpy as np
import optax
import pytest

from ringattn.evals.logits import Forward
from ringattn.hf import fetch
from ringattn.hf.convert import export_checkpoint
from ringattn.hf.tokenizer import load_tokenizer
from ringattn.run.checkpoint import Checkpointer
from ringattn.run.directory import write_config
from ringattn.run.load import load_run
from ringattn.train import data, trainer

if not fetch.is_imported():
    pytest.skip(
        f"SmolLM2 not fetched into {fetch.default_dir()} (python experiments/fetch_model.py)",
        allow_module_level=True,
    )
torch = pytest.importorskip("torch", reason="needs torch and transformers ('.[hf]')")
transformers = pytest.importorskip("transformers", reason="needs transformers ('.[hf]')")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T = 256


@pytest.fixture(scope="module")
def two_layer_run(tmp_path_factory):
    """The imported run cut to its first 2 layers: a run directory of its own (config, checkpoint
    0 of parameters, the hf/ files: tokenizer and HF config)."""
    run = load_run(fetch.run_dir(), overrides={"model.num_layers": 2}, num_devices=1)
    directory = str(tmp_path_factory.mktemp("smollm2_2layers"))
    ckpt = Checkpointer(directory, async_save=False)
    ckpt.save(0, {"params": run.params}, {})
    ckpt.close()
    write_config(directory, run.config)
    shutil.copytree(os.path.join(fetch.run_dir(), "hf"), os.path.join(directory, "hf"))
    return directory


def finetune_config(init_from):
    c = runpy.run_path(os.path.join(REPO, "configs", "finetune.py"))["get_config"]("smollm2")
    c.init_from = init_from
    c.model.num_layers = 2  # the cut's shape; any other value is refused (init_from's shape)
    c.seq_len, c.num_train_steps, c.eval_batches, c.loss_chunk_size = T, 2, 1, 64
    c.eval_every_steps = c.checkpoint_every_steps = 2
    c.learning_rate = 1e-3  # visible in 2 steps
    return c


def test_finetune_through_the_ring_and_export(two_layer_run, tmp_path):
    work, out = str(tmp_path / "ft"), str(tmp_path / "hf")
    c = finetune_config(two_layer_run)
    trainer.train_and_evaluate(c, work)
    with open(os.path.join(work, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert "eval/loss" in records[0] and "eval/loss" in records[2]

    # The step-0 held-out loss: the first evaluation batch (the tokenizer's tokens of held-out
    # files) through the imported parameters, dense attention, all logits, optax's CE.
    tok_dir = os.path.join(two_layer_run, "hf")
    batch = data.make_batch("text", seed=c.seed + trainer.EVAL_SEED_OFFSET, index=0,
                            batch_size=1, seq_len=T, split="eval", glob="*.py",
                            tokenizer=tok_dir)  # fmt: skip
    assert 0 in batch["inputs"] or batch["inputs"].max() > 255  # token ids, not bytes
    start = load_run(two_layer_run, num_devices=1)
    fwd = Forward(start.model_cfg, jax.device_get(start.params))
    logits = fwd.apply(fwd.params, batch["inputs"], batch["positions"], batch["segment_ids"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    want = float(np.sum(ce * batch["weights"]) / np.sum(batch["weights"]))
    assert records[0]["eval/loss"] == pytest.approx(want, rel=1e-4)

    # Export: transformers reads the model and the tokenizer; logits and ids are ours.
    export_checkpoint(work, out)
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= set(os.listdir(out))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = open(json.__file__, encoding="utf-8").read()[:2000]
    ids = load_tokenizer(work).encode(text)
    np.testing.assert_array_equal(hf_tok(text)["input_ids"], ids)
    tokens = ids[None, :T]
    with torch.no_grad():
        theirs = hf(torch.as_tensor(tokens, dtype=torch.int64)).logits.numpy()
    trained = load_run(work, num_devices=1)
    ours = Forward(trained.model_cfg, jax.device_get(trained.params))(tokens)
    assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    moved = np.asarray(trained.params["embedding"]) - np.asarray(start.params["embedding"])
    assert np.abs(moved).max() > 0  # trained (the tied head and embedding)
