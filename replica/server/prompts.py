"""From request fields to prompt token ids, and the context-length check with OpenAI's wording (the
engine's own checks run through `ReplicaRuntime.validate`)."""

from __future__ import annotations

from typing import Any

from fleet.control.errors import APIError


def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The conversation as the model's chat template writes it; template failures are a 400."""
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **(template_kwargs or {}),
        )
    except Exception as exc:
        raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from exc


def encode_chat(tokenizer: Any, text: str) -> list[int]:
    """Templates write their own BOS and special tokens, so none are added here."""
    return tokenizer.encode(text, add_special_tokens=False)


def check_length(
    prompt_tokens: int, max_tokens: int, max_model_len: int, param: str = "max_tokens"
) -> None:
    """prompt + completion must fit the context; the message gives the numbers, as OpenAI's does."""
    if prompt_tokens == 0:
        raise APIError(400, "the prompt is empty: it must contain at least one token", "prompt")
    if prompt_tokens + max_tokens > max_model_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, "
            f"{max_tokens} for the completion). Please reduce the length of the prompt or the "
            "completion.",
            param,
            code="context_length_exceeded",
        )
