"""ringattn: Ring Attention and context parallelism in JAX."""

import pathlib

from setuptools import find_packages, setup

setup(
    name="ringattn",
    version="0.1.0",
    description="Ring Attention and context parallelism in JAX",
    long_description=(pathlib.Path(__file__).parent / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["ringattn", "ringattn.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.7",  # jax.shard_map(..., check_vma=...) and jax.P.
        "flax",
        "optax",
        "orbax-checkpoint",
        "absl-py",
        "ml-collections",
        "tensorboardX",  # training metrics as TensorBoard event files, without TensorFlow.
        "matplotlib",
        "numpy",
        # Hugging Face checkpoints (ringattn/hf/): read and written through its numpy API.
        "safetensors",
        # An imported model's tokenizer and chat template (ringattn/hf/tokenizer.py).
        "tokenizers",
        "jinja2",
    ],
    extras_require={
        # chex: the tests' shape and tree assertions, and a function run with and without jit.
        "test": ["pytest", "hypothesis", "chex", "nbformat", "nbclient", "ipykernel", "ruff"],
        # The original Ring Attention (Liu et al.), compared against in experiments/benchmark.py.
        "bench": ["ringattention==0.1.2", "einops"],
        "notebooks": ["jupyter", "ipykernel"],
        # Parity tests against Hugging Face transformers (tests/hf/) and real_model_benchmark.py:
        # any torch (a CPU build is enough; CI keeps the one on disk through .ci/constraints.txt).
        # gguf + accelerate: transformers' own GGUF loader, the reference of tests/hf/gguf_test.py.
        "hf": ["torch", "transformers", "gguf", "accelerate"],
        # llama.cpp GGUF files (experiments/import_gguf.py, fetch_model.py): llama.cpp's reader.
        "gguf": ["gguf"],
    },
)
