"""Request bodies of the OpenAI routes, validated strictly so bad input becomes a 400 naming the field.

Ranges follow the OpenAI spec; vLLM's sampling extensions (top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, min_tokens, ...) are accepted under vLLM's names. Fields we do not know
are kept in `model_extra` (newer OpenAI clients send them) and ignored by the caller after logging.

Validation runs on the event loop, so its cost must follow what a request may ask for, not what
its body holds: a 4 MB body of a million one-token prompts, or of a million negative ids, once
took 3-13 s before its 400 (pydantic tried every member of the prompt union on every item, and
collected an error per item). Now the prompt shapes are told apart by their first item, list
items stop at the first error, and lists longer than the replica's limits (`BodyBounds`: prompts
per request, tokens of context) are refused by their length before their items are looked at.
"""

from __future__ import annotations

import logging
import reprlib
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar, cast

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    model_validator,
)
from pydantic_core import PydanticCustomError

from fleet.control.errors import APIError
from fleet.json_body import decode_json
from replica.engine.structured import GrammarError, StructuredOutput
from replica.http_api.prompts import RENDERER_ARGUMENTS

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BodyBounds:
    """What one request may hold: prompts (or inputs) per request, and items in a list that each
    cost at least a token of context (token ids, messages)."""

    max_prompts: int
    max_tokens: int


_TOO_MANY = {
    "max_prompts": "holds {got} prompts; this replica's limit is {limit}",
    "max_tokens": "holds {got} items, each at least a token; this model's context is {limit} tokens",
}


def _at_most(bound: Literal["max_prompts", "max_tokens"]) -> BeforeValidator:
    """Refuse a list by its length alone, before its items are validated."""

    def check(value: object, info: ValidationInfo) -> object:
        bounds = info.context
        if isinstance(value, list) and isinstance(bounds, BodyBounds):
            limit = getattr(bounds, bound)
            if len(value) > limit:
                raise PydanticCustomError(
                    "too_many_items",
                    _TOO_MANY[bound],
                    {"got": len(value), "limit": limit, "bound": bound},
                )
        return value

    return BeforeValidator(check)


Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
NonNegative = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegative], Field(min_length=1, fail_fast=True), _at_most("max_tokens")]


def _prompt_shape(value: object) -> str | None:
    """Which of the four prompt shapes `value` is, by its first item (None: none of them)."""
    if isinstance(value, str):
        return "[text]"
    if not isinstance(value, list):
        return None
    first = value[0] if value else ""
    if isinstance(first, str):
        return "[texts]"
    if isinstance(first, list):
        return "[id lists]"
    return "[ids]"


# A completions prompt or an embeddings input: text, texts, token ids or lists of token ids.
Prompts = Annotated[
    Annotated[str, Tag("[text]")]
    | Annotated[list[str], Field(fail_fast=True), _at_most("max_prompts"), Tag("[texts]")]
    | Annotated[TokenIds, Tag("[ids]")]
    | Annotated[list[TokenIds], Field(fail_fast=True), _at_most("max_prompts"), Tag("[id lists]")],
    Discriminator(_prompt_shape),
]


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

    token_ids: Annotated[
        list[NonNegative], Field(fail_fast=True), _at_most("max_tokens")
    ]  # generated so far, all already sent (none: only the role chunk)
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
    stop_token_ids: Annotated[list[NonNegative], Field(fail_fast=True)] | None = None
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
    prompt: Prompts
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


Messages = Annotated[list[ChatMessage], Field(min_length=1), _at_most("max_tokens")]

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
    """Bytes of `value` as JSON (bodies are decoded by orjson, so it encodes every value back)."""
    return len(orjson.dumps(value))


class ChatCompletionRequest(SamplingFields):
    messages: Messages
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
    input: Prompts
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1)] | None = None
    user: str | None = None

    @model_validator(mode="after")
    def _check_not_empty(self) -> EmbeddingRequest:
        if isinstance(self.input, list) and not self.input:
            raise _field_error("input", "must not be an empty list")
        return self

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
    messages: Messages | None = None
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
    tokens: Annotated[list[NonNegative], Field(fail_fast=True), _at_most("max_tokens")]


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


def parse_body(model: type[BodyT], body: bytes, bounds: BodyBounds | None = None) -> BodyT:
    """Validate a JSON body; any problem becomes one 400 whose `param` names the field."""
    try:
        data = decode_json(body)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        parsed = model.model_validate(data, context=bounds)
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
    loc = err["loc"]
    path = [str(p) for p in loc if isinstance(p, int) or not _is_union_tag(p)]
    param = ".".join(path) or None
    if err["type"] == "missing":
        return APIError(400, f"'{param}' is required", param)
    problem = _JSON_WORDS.get(err["type"], err["msg"])
    if err["type"] == "too_many_items":
        over_context = (err.get("ctx") or {}).get("bound") == "max_tokens"
        code = "context_length_exceeded" if over_context else None
        return APIError(400, f"'{param}' {problem}", param, code=code)
    tag = next((i for i, p in enumerate(loc) if isinstance(p, str) and _is_union_tag(p)), None)
    if err["type"] == "union_tag_not_found":
        tag = len(loc)
    if tag is not None:
        field = [str(p) for p in loc[:tag]]
        hint = _UNION_HINTS.get(field[-1] if field else "")
        if hint:
            where = ".".join(path[len(field) :])
            detail = f" ({where}: {problem})" if where else ""
            return APIError(400, f"'{'.'.join(field)}' {hint}{detail}", ".".join(field))
    return APIError(400, f"'{param}': {problem} (got {_short.repr(err.get('input')):.80})", param)


# Bodies are validated as the Python values JSON decodes to; name the types as JSON does.
_JSON_WORDS = {
    "list_type": "Input should be a valid array",
    "dict_type": "Input should be an object",
    "model_type": "Input should be an object",
    "float_type": "Input should be a valid number",
}


def _is_union_tag(part: str) -> bool:
    """Pydantic puts the union member tried (`str`, `list[int]`, `TextPart`, `[ids]`) into error
    paths."""
    return (
        "[" in part or part in {"str", "int", "float", "bool", "dict", "list"} or part[:1].isupper()
    )


# The offending input in a message, cut short without building the repr of a million-item list.
_short = reprlib.Repr()
_short.maxlist = _short.maxdict = 4
_short.maxstring = _short.maxother = 60
