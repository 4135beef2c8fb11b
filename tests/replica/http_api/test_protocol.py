"""Request validation: every bad field is a 400 naming it; unknown fields are ignored."""

from __future__ import annotations

import pytest

from fleet.control.errors import APIError
from replica.http_api.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    parse_body,
    plain_messages,
)

CHAT = '"messages": [{"role": "user", "content": "hi"}]'


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        ('{"prompt": "x", "temperature": 2.5}', "temperature", "less than or equal to 2"),
        ('{"prompt": "x", "top_p": -0.1}', "top_p", "greater than or equal to 0"),
        ('{"prompt": "x", "n": 0}', "n", "greater than or equal to 1"),
        ('{"prompt": "x", "n": 129}', "n", "less than or equal to 128"),
        ('{"prompt": "x", "presence_penalty": 3}', "presence_penalty", "2"),
        ('{"prompt": "x", "max_tokens": "ten"}', "max_tokens", "valid integer"),
        ('{"prompt": "x", "echo": 1}', "echo", "valid boolean"),
        ('{"prompt": [1, "a"]}', "prompt", "list of token ids"),
        ('{"prompt": []}', "prompt", "empty"),
        ('{"prompt": [[]]}', "prompt", "list of token-id lists"),
        ('{"prompt": "x", "suffix": "y"}', "suffix", "not supported"),
        ('{"prompt": "x", "best_of": 3}', "best_of", "not supported"),
        ('{"prompt": "x", "stream_options": {"include_usage": true}}', "stream_options", "stream"),
        ('{"prompt": "x", "max_tokens": 0}', "max_tokens", "echo"),
        ('{"prompt": "x", "logprobs": 21}', "logprobs", "20"),
        ('{"prompt": "x", "stop": [1]}', "stop", "string"),
        ('{"prompt": "x", "top_k": -2}', "top_k", "-1"),
        ('{"prompt": "x", "repetition_penalty": 0}', "repetition_penalty", "greater than 0"),
        ('{"prompt": "x", "stop_token_ids": [-1]}', "stop_token_ids.0", "0"),
        ('{"temperature": 1}', "prompt", "required"),
        ('{"prompt": "x", "seed": 18446744073709551615}', "seed", "less than or equal"),
    ],
)
def test_completion_field_errors(body: str, param: str, fragment: str) -> None:
    with pytest.raises(APIError) as info:
        parse_body(CompletionRequest, body.encode())
    assert info.value.status == 400
    assert info.value.param == param
    assert fragment in info.value.message


@pytest.mark.parametrize(
    "number", ["Infinity", "NaN", "1e999", "-1e999"], ids=["inf", "nan", "overflow", "-overflow"]
)
def test_numbers_json_cannot_hold_are_invalid_json(number: str) -> None:
    with pytest.raises(APIError) as info:
        parse_body(CompletionRequest, f'{{"prompt": "x", "repetition_penalty": {number}}}'.encode())
    assert info.value.status == 400
    assert "not valid JSON" in info.value.message


@pytest.mark.parametrize(
    ("extra", "param", "fragment"),
    [
        ('"response_format": {"type": "json_schema"}', "response_format.json_schema", "required"),
        ('"response_format": {"type": "json"}', "response_format.type", "json_object"),
        ('"top_logprobs": 3', "top_logprobs", "logprobs"),
        ('"top_logprobs": 21, "logprobs": true', "top_logprobs", "20"),
        ('"parallel_tool_calls": "yes"', "parallel_tool_calls", "valid boolean"),
        ('"tool_choice": 3', "tool_choice", "valid"),
        ('"max_completion_tokens": 0', "max_completion_tokens", "greater than or equal to 1"),
    ],
)
def test_chat_field_errors(extra: str, param: str, fragment: str) -> None:
    with pytest.raises(APIError) as info:
        parse_body(ChatCompletionRequest, f"{{{CHAT}, {extra}}}".encode())
    assert (info.value.status, info.value.param) == (400, param)
    assert fragment in info.value.message


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ("[]", "messages"),
        ('[{"role": "bot", "content": "x"}]', "messages.0.role"),
        ('[{"role": "user", "content": 5}]', "messages.0.content"),
        ('[{"content": "x"}]', "messages.0.role"),
    ],
)
def test_chat_message_errors(messages: str, param: str) -> None:
    with pytest.raises(APIError) as info:
        parse_body(ChatCompletionRequest, f'{{"messages": {messages}}}'.encode())
    assert (info.value.status, info.value.param) == (400, param)


def test_body_not_json_or_not_object() -> None:
    for raw, fragment in ((b"{bad", "not valid JSON"), (b"[1]", "JSON object"), (b"", "JSON")):
        with pytest.raises(APIError) as info:
            parse_body(CompletionRequest, raw)
        assert info.value.status == 400
        assert fragment in info.value.message


def test_unknown_fields_are_ignored() -> None:
    body = parse_body(
        CompletionRequest, b'{"prompt": "x", "store": true, "metadata": {"a": 1}, "stop": "\\n"}'
    )
    assert set(body.model_extra or {}) == {"store", "metadata"}
    assert body.stop_strings == ["\n"]


def test_prompt_shapes() -> None:
    def prompts(raw: str) -> list:
        return parse_body(CompletionRequest, f'{{"prompt": {raw}}}'.encode()).prompts

    assert prompts('"a"') == ["a"]
    assert prompts('["a", "b"]') == ["a", "b"]
    assert prompts("[1, 2]") == [[1, 2]]
    assert prompts("[[1], [2, 3]]") == [[1], [2, 3]]


def test_include_usage_needs_stream_and_true() -> None:
    def usage(extra: str) -> bool:
        return parse_body(CompletionRequest, f'{{"prompt": "x", {extra}}}'.encode()).include_usage

    assert usage('"stream": true, "stream_options": {"include_usage": true}')
    assert not usage('"stream": true, "stream_options": {}')
    assert not usage('"stream": true')


def test_chat_text_parts_join_and_other_parts_refused() -> None:
    body = parse_body(
        ChatCompletionRequest,
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},'
        b' {"type": "text", "text": "b"}]}]}',
    )
    assert plain_messages(body.messages) == [{"role": "user", "content": "a\nb"}]
    body = parse_body(
        ChatCompletionRequest,
        b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
    )
    with pytest.raises(APIError) as info:
        plain_messages(body.messages)
    assert info.value.param == "messages.0.content.0"


def test_tool_history_reaches_the_template() -> None:
    """An assistant's calls (content null) with their arguments as objects, as templates write
    them with `tojson`; a tool message keeps the id of the call it answers."""
    body = parse_body(
        ChatCompletionRequest,
        b'{"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", "content":'
        b' null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "w",'
        b' "arguments": "{\\"city\\": \\"Paris\\"}"}}]}, {"role": "tool", "tool_call_id":'
        b' "call_1", "content": "21 C"}]}',
    )
    assert plain_messages(body.messages)[1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "w", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "content": "21 C", "tool_call_id": "call_1"},
    ]


def test_logit_bias_keys_must_be_token_ids() -> None:
    body = parse_body(CompletionRequest, b'{"prompt": "x", "logit_bias": {"5": 10, "7": -100}}')
    assert body.logit_bias_ids() == {5: 10.0, 7: -100.0}
    for key in ("abc", "-1", "1.5"):
        raw = f'{{"prompt": "x", "logit_bias": {{"{key}": 1}}}}'.encode()
        with pytest.raises(APIError) as info:
            parse_body(CompletionRequest, raw).logit_bias_ids()
        assert info.value.param == "logit_bias"
