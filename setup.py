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
        "chex",
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
        "test": ["pytest", "hypothesis", "nbformat", "nbclient", "ipykernel", "ruff"],
        # The original Ring Attention (Liu et al.), compared against in experiments/benchmark.py.
        "bench": ["ringattention==0.1.2", "einops"],
        "notebooks": ["jupyter", "ipykernel"],
        # Parity tests against Hugging Face transformers (tests/hf/). Keep this torch pin: here
        # and in CI it is a CPU build already on disk; another pin downloads a multi-GB CUDA one.
        # gguf + accelerate: transformers' own GGUF loader, the reference of tests/hf/gguf_test.py.
        "hf": ["torch==2.13.0", "transformers", "gguf", "accelerate"],
        # llama.cpp GGUF files (experiments/import_gguf.py, fetch_model.py): llama.cpp's reader.
        "gguf": ["gguf"],
    },
)
