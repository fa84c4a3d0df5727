"""The run's tokenizer: bytes for our own byte-level runs, a Hugging Face fast tokenizer (the
`tokenizers` package) for an imported model, with its chat template (Jinja, rendered as
transformers does). A run has one when `<run>/hf/tokenizer.json` exists (or in the run it was
started from): copied from a Hugging Face checkpoint, or built from a GGUF file's vocabulary.

    tok = load_tokenizer(workdir)
    ids = tok.encode("The capital of France is")          # int32 [T]
    text = tok.decode(ids)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
"""

from __future__ import annotations

import json
import os

import numpy as np

from ringattn.train import tokens as byte_tokens

TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE = "chat_template.jinja"
# GGUF token types (llama.cpp's llama_token_type): which become added tokens.
CONTROL, USER_DEFINED = 3, 4
# tokenizer.ggml.pre -> digits split one by one before byte-level BPE (llama.cpp's pre-tokenizer
# types whose regex is GPT-2's, with or without that split).
PRE_TYPES = {"default": False, "gpt2": False, "gpt-2": False, "smollm": True}


class ByteTokenizer:
    """Our byte-level runs' tokens: UTF-8 bytes; BOS = 1 (ringattn/train/tokens.py)."""

    vocab_size = byte_tokens.VOCAB_SIZE
    bos_id = byte_tokens.BOS
    eos_id = None
    chat_template = None

    def encode(self, text, add_special_tokens=True):
        del add_special_tokens
        return byte_tokens.encode(text)

    def decode(self, ids):
        return byte_tokens.decode(ids)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        raise ValueError("apply_chat_template: this run (byte-level) has no chat template.")


class HFTokenizer:
    """A Hugging Face fast tokenizer directory: tokenizer.json, tokenizer_config.json (special
    tokens) and the chat template (chat_template.jinja or tokenizer_config's field)."""

    def __init__(self, directory):
        from tokenizers import Tokenizer

        self.directory = directory
        self.tokenizer = Tokenizer.from_file(os.path.join(directory, TOKENIZER))
        self.config = _read_json(os.path.join(directory, TOKENIZER_CONFIG))
        template = os.path.join(directory, CHAT_TEMPLATE)
        self.chat_template = self.config.get("chat_template")
        if os.path.exists(template):
            with open(template, encoding="utf-8") as f:
                self.chat_template = f.read()
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.bos_id, self.eos_id = (self._id(k) for k in ("bos_token", "eos_token"))

    def _id(self, key):
        token = self.config.get(key)
        if isinstance(token, dict):  # AddedToken's serialised form
            token = token.get("content")
        return None if token is None else self.tokenizer.token_to_id(token)

    def encode(self, text, add_special_tokens=True):
        """int32 ids [T]; `add_special_tokens`: what tokenizer.json's post-processor adds (a
        BOS for models that want one)."""
        ids = self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids
        return np.asarray(ids, np.int32)

    def decode(self, ids):
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages, add_generation_prompt=True):
        """The conversation `messages` ([{role, content}]) as text, through the model's chat
        template (encode it with add_special_tokens=False: the template has its own)."""
        if not self.chat_template:
            raise ValueError(f"apply_chat_template: {self.directory} has no chat template.")
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ValueError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        special = {k: self._token(k) for k in ("bos_token", "eos_token")}
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **special
        )

    def _token(self, key):
        token = self.config.get(key)
        return token.get("content") if isinstance(token, dict) else token


def _read_json(path):
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_tokenizer(workdir):
    """The tokenizer of the run in `workdir`: HFTokenizer when the run (or the run it was
    started from) keeps a tokenizer.json under hf/, else ByteTokenizer."""
    from ringattn.hf.convert import hf_template_dir

    directory = hf_template_dir(workdir)
    if directory and os.path.exists(os.path.join(directory, TOKENIZER)):
        return HFTokenizer(directory)
    return ByteTokenizer()


def files_from_gguf(fields) -> dict:
    """{file name: text}: tokenizer.json, tokenizer_config.json and chat_template.jinja built from
    a GGUF file's tokenizer.ggml.* metadata (`fields`: key -> value). Byte-level BPE only
    (tokenizer.ggml.model "gpt2": GPT-2, Llama 3, SmolLM ...); others are refused by name."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = fields.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(
            f"GGUF tokenizer: `tokenizer.ggml.model` must be 'gpt2' (byte-level BPE), got {kind!r}."
        )
    pre = fields.get("tokenizer.ggml.pre") or "default"
    if pre not in PRE_TYPES:
        raise ValueError(
            f"GGUF tokenizer: `tokenizer.ggml.pre` must be one of {sorted(PRE_TYPES)}, got {pre!r}."
        )
    vocab = list(fields["tokenizer.ggml.tokens"])
    types = list(fields.get("tokenizer.ggml.token_type") or [1] * len(vocab))
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, fuse_unk=False)
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if PRE_TYPES[pre]:
        digits = pre_tokenizers.Digits(individual_digits=True)
        tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_tokens(
        [
            AddedToken(t, special=ty == CONTROL, normalized=False)
            for t, ty in zip(vocab, types, strict=True)
            if ty in (CONTROL, USER_DEFINED)
        ]
    )

    def token(key):
        i = fields.get(f"tokenizer.ggml.{key}_token_id")
        return None if i is None else vocab[int(i)]

    config = dict(
        tokenizer_class="PreTrainedTokenizerFast",
        bos_token=token("bos"),
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding"),
        add_bos_token=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
    )
    if config["add_bos_token"] and config["bos_token"] is not None:
        bos = (config["bos_token"], vocab.index(config["bos_token"]))
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos]
        )
    files = {
        TOKENIZER: tok.to_str(),
        TOKENIZER_CONFIG: json.dumps({k: v for k, v in config.items() if v is not None}, indent=2),
    }
    if fields.get("tokenizer.chat_template"):
        files[CHAT_TEMPLATE] = fields["tokenizer.chat_template"]
    return files
