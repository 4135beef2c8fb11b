"""From request fields to prompt token ids, refusing text too long to fit the context before it is
tokenized (the engine checks the token ids: `EngineCore.validate`, through `open_streams`).

These functions run on the prompt worker's threads (see prompt_worker.py), never on the event loop:
a chat template is a program and a prompt may be megabytes, so either can take seconds.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fleet.chat_prompt import apply_template
from fleet.control.errors import APIError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_MAX_ERROR_DETAIL = 200  # characters of a template's own error message that reach the client


def _renderer_arguments() -> frozenset[str]:
    """Names `apply_chat_template` and the Jinja renderer consume themselves (a template file, tools,
    tokenize, return_dict, ...), and the variables they set: a request must not steer any of them.
    Read from the installed transformers, so arguments added later are refused too."""
    names = {
        "chat_template", "tools", "documents", "add_generation_prompt", "continue_final_message",
        "tokenize", "sanitize_control_tokens", "padding", "truncation", "max_length",
        "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
        "conversation", "conversations", "messages",
    }  # fmt: skip
    try:
        from transformers import PreTrainedTokenizerBase
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:  # pragma: no cover - transformers is a dependency
        return frozenset(names)
    for function in (PreTrainedTokenizerBase.apply_chat_template, render_jinja_template):
        for p in inspect.signature(function).parameters.values():
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self":
                names.add(p.name)
    return frozenset(names)


RENDERER_ARGUMENTS = _renderer_arguments()


@dataclass(frozen=True)
class PromptLimits:
    """What bounds a prompt before it is tokenized: no token holds more than `max_token_chars`
    characters, so a text longer than `max_token_chars * max_model_len` can never fit."""

    max_model_len: int
    max_token_chars: int

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, max_model_len: int) -> PromptLimits:
        """Byte-level and SentencePiece vocabularies spell every input character of a token, so the
        longest vocabulary entry bounds how much text one token covers."""
        longest = max((len(token) for token in tokenizer.get_vocab()), default=1)
        return cls(max_model_len, max(1, longest))

    def check_chars(self, chars: int, param: str) -> None:
        if chars > self.max_token_chars * self.max_model_len:
            raise APIError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, "
                f"your prompt has {chars} characters, more than {self.max_model_len} tokens can "
                "hold. Please reduce the length of the prompt.",
                param,
                code="context_length_exceeded",
            )


def encode(
    tokenizer: PreTrainedTokenizerBase,
    text: str,
    limits: PromptLimits,
    add_special_tokens: bool = True,
    param: str = "prompt",
) -> list[int]:
    limits.check_chars(len(text), param)
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """The conversation as the chat template writes it (the operator's `--chat-template`, else the
    tokenizer's); template failures are a 400. `template_kwargs` must hold plain variables only
    (protocol.py refuses the renderer's own arguments); `tools` are OpenAI-shaped function tools."""
    if not (chat_template or getattr(tokenizer, "chat_template", None)):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    try:  # the router renders with the same call to hash prompts as this replica caches them
        return apply_template(
            tokenizer,
            messages,
            add_generation_prompt,
            continue_final_message,
            template_kwargs,
            chat_template,
            tools,
        )
    except Exception as exc:
        detail = str(exc)
        if len(detail) > _MAX_ERROR_DETAIL:
            detail = detail[:_MAX_ERROR_DETAIL] + "..."
        raise APIError(
            400, f"the chat template rejected the messages: {detail}", "messages"
        ) from None


def template_text(tokenizer: PreTrainedTokenizerBase, chat_template: str | None) -> str | None:
    """The chat template's source (all named variants of a tokenizer's, which may pick a
    `tool_use` one when tools are given): what `--tool-call-parser auto` reads."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    return template if isinstance(template, str) else None


def encode_chat(tokenizer: PreTrainedTokenizerBase, text: str, limits: PromptLimits) -> list[int]:
    """Templates write their own BOS and special tokens, so none are added here."""
    limits.check_chars(len(text), "messages")
    return tokenizer.encode(text, add_special_tokens=False)


def chat_token_ids(
    tokenizer: PreTrainedTokenizerBase,
    limits: PromptLimits,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    chat_template: str | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render, then tokenize unless the text cannot fit (the whole job of a chat prompt)."""
    text = render_chat(
        tokenizer,
        messages,
        add_generation_prompt,
        continue_final_message,
        template_kwargs,
        chat_template,
        tools,
    )
    return encode_chat(tokenizer, text, limits)
