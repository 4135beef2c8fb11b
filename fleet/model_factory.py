"""Build small Hugging Face model folders offline: random weights from a seed plus a byte-level BPE
tokenizer trained here, so tests, benchmarks and `fleet up` need no download.

The folder is what a user's model folder looks like (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json with a ChatML template, generation_config.json) and loads through the same
code paths: transformers' Auto classes and our engine's loader. Same arguments, same bytes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")
SIZES = ("tiny", "small")

# Qwen2's split regex: transformers rebuilds this pre-tokenizer for some model types whatever the
# saved tokenizer.json says, so every architecture uses it and ids agree everywhere.
_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML that renders tools, tool results and an assistant's tool calls as Qwen2.5 does (so the
# `auto` tool-call parser finds Hermes-style calls); a chat without tools renders as plain ChatML.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call>'
    "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n{\\\"name\\\": \\\"' + call['name'] + '\\\", \\\"arguments\\\": ' }}"
    "{{- (call['arguments'] if call['arguments'] is string else call['arguments'] | tojson) }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or loop.previtem['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' }}"
    "{%- if loop.last or loop.nextitem['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif not (tools and loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Serving large language models means batching requests, caching keys and values, and streaming tokens.
def fibonacci(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a
{"model": "llama", "messages": [{"role": "user", "content": "Hello, how are you today?"}]}
Routers balance load across replicas; prefix caches reuse the attention state of shared prompts.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1024 2048 3.14159 2.71828 -1 +7 50% $20 #1 @home
Émilie a mangé une crème brûlée à Paris. Straße, Müller, naïve café, smörgåsbord, façade.
日本語のテキストも少し含めます。中文文本也包括在内。한국어 문장도 있습니다. Привет, мир!
Emoji and symbols: 🚀 ✨ → ← ∑ ∫ ≈ ≠ ≤ ≥ © ® ™ € £ ¥ • … — –
SELECT name, count(*) FROM requests WHERE status = 200 GROUP BY name ORDER BY 2 DESC;
Once upon a time there was a small model that dreamed of serving a whole fleet of users.
"""

# Shapes per size: tiny is well under 1M parameters; small is ~100M (the benchmark model).
_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=0.1,
    ),
    "small": dict(
        vocab_size=1024,
        hidden_size=768,
        intermediate_size=2816,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        initializer_range=0.02,
    ),
}
_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(tie_word_embeddings=False, rope_theta=500000.0),
    "qwen2": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3": dict(tie_word_embeddings=True, rope_theta=1000000.0),
    "mistral": dict(tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None),
}


def build_tokenizer(vocab_size: int):
    """A byte-level BPE with all 256 bytes in its alphabet, trained on the embedded corpus."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=_SHAPES["small"]["max_position_embeddings"],
    )


def model_config(arch: str, size: str, vocab_size: int, **overrides: Any):
    """The transformers config of a factory model."""
    from transformers import AutoConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    fields = {**_SHAPES[size], **_ARCH_DEFAULTS[arch], "vocab_size": vocab_size, **overrides}
    if arch == "qwen3":
        fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return AutoConfig.for_model(arch, **fields)


def make_model(
    path: str | os.PathLike,
    arch: str = "llama",
    size: str = "tiny",
    seed: int = 0,
    dtype: str | None = None,
    **overrides: Any,
) -> Path:
    """Write a model folder at `path` (replaced if present) and return it.

    `dtype` defaults to float32 for tiny (exact parity tests) and bfloat16 for small.
    `overrides` go into the model config (e.g. `rope_scaling=...`, `tie_word_embeddings=True`).
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    dtype = dtype or ("float32" if size == "tiny" else "bfloat16")
    tokenizer = build_tokenizer(overrides.pop("vocab_size", _SHAPES[size]["vocab_size"]))
    im_end, endoftext = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    config = model_config(
        arch,
        size,
        len(tokenizer),
        eos_token_id=im_end,
        pad_token_id=endoftext,
        bos_token_id=None,
        **overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        eos_token_id=[im_end, endoftext], pad_token_id=endoftext, bos_token_id=None
    )

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
        os.makedirs(tmp)  # TemporaryDirectory cleans up the (now empty) name it created
    return target


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fleetserve" / "models"


def cached_model(arch: str = "llama", size: str = "tiny", seed: int = 0) -> Path:
    """The factory model for these arguments under the user's cache folder, built on first use."""
    target = cache_dir() / f"{arch}-{size}-seed{seed}"
    if not (target / "config.json").exists():
        make_model(target, arch=arch, size=size, seed=seed)
    return target


def folder_digest(path: str | os.PathLike) -> str:
    """SHA-256 over every file of a folder, in name order (for determinism checks)."""
    digest = hashlib.sha256()
    for file in sorted(Path(path).rglob("*")):
        if file.is_file():
            digest.update(file.name.encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()
