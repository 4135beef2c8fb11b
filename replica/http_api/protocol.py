"""Request bodies of the OpenAI routes, validated strictly so bad input becomes a 400 naming the field.

Ranges follow the OpenAI spec; vLLM's sampling extensions (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, min_tokens, ...) are accepted under vLLM's names. Fields we do not know
are kept in `model_extra` (newer OpenAI clients send them) and ignored by the caller after logging.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Literal, TypeVar, cast

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fleet.control.errors import APIError
from replica.engine.structured import GrammarError, StructuredOutput
from replica.http_api.prompts import RENDERER_ARGUMENTS

Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
NonNegative = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegative], Field(min_length=1)]
logger = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool | None = None


class JsonSchemaFormat(_Body):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None  # the schema is always enforced


class ResponseFormat(_Body):
    """OpenAI's `response_format`, on both routes (as vLLM); strictness is not optional here."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise _field_error(
                "response_format.json_schema", "is required when type is 'json_schema'"
            )
        return self

    def structured_output(self) -> StructuredOutput | None:
        if self.type == "json_object":
            return StructuredOutput.json_object()
        if self.type == "json_schema" and self.json_schema is not None:
            try:
                return StructuredOutput.json_schema(self.json_schema.schema_)
            except GrammarError as exc:
                raise APIError(400, f"invalid schema: {exc}", "response_format") from None
        return None


class FleetResume(_Body):
    """A fleet router's continuation of a stream whose replica died (see resume.py)."""

    token_ids: list[NonNegative]  # generated so far, all already sent (none: only the role chunk)
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,128}$")] | None = None
    created: NonNegative | None = None


class SamplingFields(_Body):
    """Fields both generation routes share; the engine's SamplingParams is built from these."""

    model: str | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions
    top_k: Annotated[int, Field(ge=-1)] | None = None
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    stop_token_ids: list[NonNegative] | None = None
    ignore_eos: bool | None = None
    min_tokens: NonNegative | None = None
    skip_special_tokens: bool | None = None
    include_stop_str_in_output: bool | None = None
    # the fleet's own: a router resuming a stream on this replica (resume.py)
    fleet_resume: FleetResume | None = None

    @model_validator(mode="after")
    def _check_stream_options(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise _field_error("stream_options", "is only allowed when 'stream' is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def logit_bias_ids(self) -> dict[int, float] | None:
        """Keys arrive as strings of token ids (JSON objects have string keys)."""
        if not self.logit_bias:
            return None
        bad = next((k for k in self.logit_bias if not k.isdigit()), None)
        if bad is not None:
            raise APIError(400, f"logit_bias key {bad!r} is not a token id", "logit_bias")
        return {int(k): v for k, v in self.logit_bias.items()}


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    max_tokens: NonNegative | None = None
    echo: bool | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise _field_error("suffix", "is not supported: this server does not do insertion")
        if self.best_of is not None and self.best_of > (self.n or 1):
            raise _field_error("best_of", "greater than n is not supported")
        if isinstance(self.prompt, list) and not self.prompt:
            raise _field_error("prompt", "must not be an empty list")
        if self.max_tokens == 0 and not self.echo:
            raise _field_error("max_tokens", "must be at least 1 unless echo is true")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of single prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if isinstance(p[0], int):
            return [cast("list[int]", p)]
        return list(cast("list[str] | list[list[int]]", p))


class TextPart(_Body):
    type: Literal["text"]
    text: str


class CalledFunction(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI returns it


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # the call a tool message answers

    def text(self, index: int) -> str | None:
        """Content as one string: text parts joined by newlines; other part types are refused."""
        if self.content is None or isinstance(self.content, str):
            return self.content
        texts = []
        for k, part in enumerate(self.content):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(
                    400,
                    f"only text content parts are supported (got type {part.get('type')!r})",
                    f"messages.{index}.content.{k}",
                )
            texts.append(part["text"])
        return "\n".join(texts)


MAX_TEMPLATE_KWARGS = 32
MAX_TEMPLATE_VALUE_BYTES = 4096


def check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    """`chat_template_kwargs` may set plain template variables (vLLM's use: `enable_thinking`),
    never the renderer's own arguments: a caller's `chat_template` is a program run on this
    server, and `tokenize`, `return_dict`, `tools`, ... change what rendering returns."""
    if not kwargs:
        return
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise _field_error("chat_template_kwargs", f"may hold at most {MAX_TEMPLATE_KWARGS} keys")
    for key, value in kwargs.items():
        param = f"chat_template_kwargs.{key:.64}"
        if key in RENDERER_ARGUMENTS:
            raise APIError(400, f"chat_template_kwargs key '{key}' is not allowed", param)
        if not key.isidentifier():
            raise APIError(
                400, f"chat_template_kwargs key '{key:.64}' is not a template variable name", param
            )
        if _json_size(value) > MAX_TEMPLATE_VALUE_BYTES:
            raise APIError(
                400,
                f"chat_template_kwargs value of '{key}' is larger than "
                f"{MAX_TEMPLATE_VALUE_BYTES} bytes of JSON",
                param,
            )


def _json_size(value: object) -> int:
    """Bytes of `value` as JSON; integers beyond 64 bits (which orjson refuses) count as too big."""
    try:
        return len(orjson.dumps(value))
    except orjson.JSONEncodeError:
        return MAX_TEMPLATE_VALUE_BYTES + 1


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict[str, Any]] | None = None  # checked by tool_calls/request.py
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's extensions
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_unsupported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise _field_error("top_logprobs", "requires 'logprobs' to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise _field_error(
                "continue_final_message", "cannot be combined with add_generation_prompt=true"
            )
        check_template_kwargs(self.chat_template_kwargs)
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class EmbeddingRequest(_Body):
    """OpenAI's embeddings body: `input` takes the same four shapes as a completions prompt."""

    model: str | None = None
    input: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @property
    def inputs(self) -> list[str | list[int]]:
        """The input field as a list of single inputs (text or token ids)."""
        i = self.input
        if isinstance(i, str):
            return [i]
        if isinstance(i[0], int):
            return [cast("list[int]", i)]
        return list(cast("list[str] | list[list[int]]", i))


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise _field_error("prompt", "give exactly one of 'prompt' or 'messages'")
        check_template_kwargs(self.chat_template_kwargs)
        return self


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[NonNegative]


BodyT = TypeVar("BodyT", bound=_Body)


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages in the form chat templates expect: string content, optional name, an assistant's
    tool calls with their arguments as objects (templates write them with `tojson`, as vLLM passes
    them), a tool message's `tool_call_id`."""
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.text(i) or ""}
        if m.name is not None:
            msg["name"] = m.name
        if m.tool_calls:
            if m.role != "assistant":
                raise _field_error(
                    f"messages.{i}.tool_calls", "is only allowed on assistant messages"
                )
            msg["tool_calls"] = [_template_call(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _template_call(call: MessageToolCall) -> dict[str, Any]:
    try:
        arguments: Any = orjson.loads(call.function.arguments)
    except orjson.JSONDecodeError:
        arguments = call.function.arguments
    function = {"name": call.function.name, "arguments": arguments}
    return {"id": call.id, "type": "function", "function": function}


def _field_error(param: str, problem: str) -> APIError:
    return APIError(400, f"'{param}' {problem}", param)


_UNION_HINTS = {
    "prompt": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "input": "must be a string, a list of strings, a list of token ids or a list of token-id lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of content parts",
}
# Unknown field names are logged once each; both the memory and the log are bounded, since the
# names come from clients (two requests once wrote 26.8 MB of log).
_logged_unknown: set[str] = set()
MAX_REMEMBERED_UNKNOWN = 256
MAX_LOGGED_NAME = 64


def parse_body(model: type[BodyT], body: bytes) -> BodyT:
    """Validate a JSON body; any problem becomes one 400 whose `param` names the field."""
    try:
        parsed = model.model_validate_json(body)
    except ValidationError as exc:
        raise _to_api_error(exc) from None
    for name in parsed.model_extra or ():
        _log_unknown(name[:MAX_LOGGED_NAME])
    return parsed


def _log_unknown(name: str) -> None:
    if name in _logged_unknown or len(_logged_unknown) >= MAX_REMEMBERED_UNKNOWN:
        return
    _logged_unknown.add(name)
    if len(_logged_unknown) == MAX_REMEMBERED_UNKNOWN:
        logger.info("ignoring unknown request fields; no more of their names will be logged")
    else:
        logger.info("ignoring unknown request field %r (logged once)", name)


def _to_api_error(exc: ValidationError) -> APIError:
    err = exc.errors(include_url=False)[0]
    if err["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {err['msg']}")
    if err["type"] == "model_type" and not err["loc"]:
        return APIError(400, "request body must be a JSON object")
    path = [str(p) for p in err["loc"] if isinstance(p, int) or not _is_union_tag(p)]
    param = ".".join(path) or None
    if err["type"] == "missing":
        return APIError(400, f"'{param}' is required", param)
    tagged = any(isinstance(p, str) and _is_union_tag(p) for p in err["loc"])
    hint = _UNION_HINTS.get(path[-1] if path and not path[-1].isdigit() else "", "")
    if tagged and hint:
        return APIError(400, f"'{param}' {hint}", param)
    return APIError(400, f"'{param}': {err['msg']} (got {err.get('input')!r:.80})", param)


def _is_union_tag(part: str) -> bool:
    """Pydantic puts the union member tried (`str`, `list[int]`, `TextPart`) into error paths."""
    return (
        "[" in part or part in {"str", "int", "float", "bool", "dict", "list"} or part[:1].isupper()
    )
