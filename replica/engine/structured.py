"""Structured outputs: what a request's text must match, and its grammar, compiled once per schema.

The API (tool calling reuses it):

    spec = StructuredOutput.json_schema(schema)       # a dict or its JSON text; or .json_object()
    grammar = engine.grammars.compile(spec)           # cached; GrammarError names a bad schema
    SamplingParams(..., structured=spec)              # constrains every choice of a request

`compile` is slow on a miss (milliseconds to tens of ms, more for large schemas) and thread-safe:
servers call it on a worker thread before submitting, so the engine's step only finds it cached.
The engine then gives each constrained sequence its own matcher (grammar_mask.py) and masks its row
of the logits before sampling; the sequence finishes with "stop" when the grammar ends.

Grammar engine: xgrammar (what vLLM uses). On this project's CPU it filled a 32k / 128k-token mask
in ~4-6 µs against llguidance's ~75-540 µs; llguidance compiles lazily (~1 ms against 6-50 ms) but
pays on every token, and compiling happens once per schema (loadtests/grammar_engines.py).

Termination: JSON is generated without free whitespace (separators ", " and ": "), so every token
moves the document on. A schema whose strings, arrays and numbers are bounded (maxLength, maxItems,
enum, minimum/maximum) has a finite grammar: the answer ends within a max_tokens sized for it even
with a random model. An unbounded schema (or json_object) relies on the model to close it; when
max_tokens comes first, finish_reason "length" says the JSON was cut, as with OpenAI.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

# The standard library's regex parser (private, stable in practice) measures user patterns.
if sys.version_info >= (3, 11):
    from re import _constants as _sre_constants  # type: ignore[attr-defined]
    from re import _parser as _sre_parser  # type: ignore[attr-defined]
else:
    import sre_constants as _sre_constants
    import sre_parse as _sre_parser

if TYPE_CHECKING:
    import xgrammar

# Compiled grammars kept (each holds a token-mask cache: tens of kB to a few MB).
MAX_CACHED_GRAMMARS = 256
MAX_CACHED_BYTES = 512 * 1024 * 1024
# So that one request cannot hold a compile thread for long or fill memory. Measured here, compile
# time grows ~n^3.5 with an object's optional properties (400: 0.14 s; 2,000: 39 s and 550 MB).
MAX_SCHEMA_CHARS = 64 * 1024
MAX_SCHEMA_DEPTH = 64  # JSON containers nested in the schema
MAX_SCHEMA_PROPERTIES = 512  # of all its objects together
# xgrammar unrolls counted repeats of groups: "(a|b){0,2000}" took 1.4 s, "{0,10000}" 42 s.
MAX_PATTERN_SIZE = 1000  # pattern items once counted repeats of groups are unrolled
SEPARATORS = (", ", ": ")
# A character of a length-bounded string (see _bounded_strings).
_BOUNDED_CHAR = r"[ !#-\[\]-~\u00a0-\u07ff\u1000-\ud7ff\ue000-\uffef]"
_SINGLE_CHARACTER = (
    _sre_constants.LITERAL, _sre_constants.NOT_LITERAL, _sre_constants.IN, _sre_constants.ANY,
)  # fmt: skip
# Values, not schemas: never rewritten.
_LITERAL_KEYS = frozenset({"enum", "const", "default", "examples"})
# xgrammar prefixes its errors with a timestamp and its C++ source location.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """A schema that cannot be turned into a grammar; the message names the problem."""


@dataclass(frozen=True)
class StructuredOutput:
    """What the output must match. `schema` is the JSON schema's compact text (property order kept:
    it is the order the fields are generated in); empty for json_object."""

    kind: Literal["json_object", "json_schema"]
    schema: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> StructuredOutput:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except (ValueError, RecursionError) as exc:
                raise GrammarError(f"the schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise GrammarError("the schema must be a JSON object")
        _check_size(schema)
        text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
        if len(text) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the schema is longer than {MAX_SCHEMA_CHARS} characters")
        return cls("json_schema", text)

    @classmethod
    def json_object(cls) -> StructuredOutput:
        return cls("json_object")


class GrammarCompiler:
    """Compiles specs for one tokenizer, each once: concurrent callers of the same spec wait for
    the one compile. xgrammar and its tokenizer tables are loaded on first use, so engines that
    never see a constrained request pay nothing."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = list(stop_token_ids)
        self.num_compiled = 0
        self._compiler: xgrammar.GrammarCompiler | None = None
        self._cache: OrderedDict[StructuredOutput, Future] = OrderedDict()
        self._sizes: dict[StructuredOutput, int] = {}  # bytes of the compiled ones in the cache
        self._lock = threading.Lock()
        self._setup_lock = threading.Lock()  # apart: setup takes ~0.3 s, `cached` must not wait

    def cached(self, spec: StructuredOutput) -> bool:
        with self._lock:
            future = self._cache.get(spec)
        return future is not None and future.done()

    def compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        """The spec's grammar; GrammarError (cached too) for a schema that has none."""
        with self._lock:
            future = self._cache.get(spec)
            owner = future is None
            if future is None:
                future = self._cache[spec] = Future()
                self._evict()
            else:
                self._cache.move_to_end(spec)
        if owner:
            try:
                grammar = self._compile(spec)
            except GrammarError as exc:
                future.set_exception(exc)
            except BaseException as exc:  # not the schema's fault: let a later call retry
                with self._lock:
                    self._cache.pop(spec, None)
                future.set_exception(exc)
            else:
                future.set_result(grammar)
                with self._lock:
                    if spec in self._cache:
                        self._sizes[spec] = grammar.memory_size_bytes
                        self._evict()
        return future.result()

    def _evict(self) -> None:
        """Drop the least recently used grammars beyond the bounds (lock held)."""
        while len(self._cache) > 1 and (
            len(self._cache) > MAX_CACHED_GRAMMARS or sum(self._sizes.values()) > MAX_CACHED_BYTES
        ):
            spec, _ = self._cache.popitem(last=False)
            self._sizes.pop(spec, None)

    def _compile(self, spec: StructuredOutput) -> xgrammar.CompiledGrammar:
        compiler = self._xgrammar_compiler()
        strict = spec.kind == "json_schema"
        schema = '{"type": "object"}'
        if strict:
            schema = json.dumps(_bounded_strings(json.loads(spec.schema)))
        try:
            grammar = compiler.compile_json_schema(
                schema, any_whitespace=False, separators=SEPARATORS, strict_mode=strict
            )
        except RuntimeError as exc:
            raise GrammarError(_CPP_PREFIX.sub("", str(exc)).strip()) from None
        with self._lock:
            self.num_compiled += 1
        return grammar

    def _xgrammar_compiler(self) -> xgrammar.GrammarCompiler:
        with self._setup_lock:
            if self._compiler is None:
                import xgrammar

                info = xgrammar.TokenizerInfo.from_huggingface(
                    self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                # Our cache above keeps the grammars; xgrammar's would keep a second copy.
                self._compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)
            return self._compiler


def _check_size(schema: dict[str, Any]) -> None:
    """GrammarError for a schema beyond MAX_SCHEMA_DEPTH or MAX_SCHEMA_PROPERTIES (iterative: a
    deep schema must not reach Python's recursion limit first)."""
    properties = 0
    stack: list[tuple[Any, int]] = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_SCHEMA_DEPTH:
            raise GrammarError(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
        if isinstance(node, dict):
            if isinstance(node.get("properties"), dict):
                properties += len(node["properties"])
            if isinstance(node.get("pattern"), str):
                _check_pattern(node["pattern"])
            stack.extend((value, depth + 1) for value in node.values())
        elif isinstance(node, list):
            stack.extend((value, depth + 1) for value in node)
    if properties > MAX_SCHEMA_PROPERTIES:
        raise GrammarError(
            f"the schema has {properties} properties; at most {MAX_SCHEMA_PROPERTIES} are allowed"
        )


def _check_pattern(pattern: str) -> None:
    try:
        parsed = _sre_parser.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError):
        return  # a syntax Python does not know: xgrammar judges it
    size = _pattern_size(parsed)
    if size > MAX_PATTERN_SIZE:
        raise GrammarError(
            f"pattern {pattern[:64]!r} unrolls to {size} items; at most {MAX_PATTERN_SIZE} are "
            "allowed (lower its repeat counts)"
        )


def _pattern_size(items: Any) -> int:
    """Items of a parsed regex once counted repeats are unrolled; a repeat of a single character
    (class) counts once, as xgrammar compiles it into a loop cheaply."""
    total = 0
    for op, arg in items:
        if op in (_sre_constants.MAX_REPEAT, _sre_constants.MIN_REPEAT):
            low, high, sub = arg
            single = len(sub) == 1 and sub[0][0] in _SINGLE_CHARACTER
            count = 1 if single else (low if high == _sre_constants.MAXREPEAT else high)
            total += max(1, count) * _pattern_size(sub)
        elif op is _sre_constants.SUBPATTERN:
            total += _pattern_size(arg[-1])
        elif op is _sre_constants.BRANCH:
            total += sum(_pattern_size(branch) for branch in arg[1])
        else:
            total += 1
    return total


def _bounded_strings(node: Any) -> Any:
    """The schema with each length-bounded string turned into a pattern of as many characters.

    Works around xgrammar 0.2: its minLength/maxLength rule lets control characters through
    (invalid JSON), and its UTF-8 ranges let overlong and surrogate byte sequences through, which
    decode to several U+FFFD and break the length. So bounded strings take printable ASCII and
    U+00A0-U+07FF, U+1000-U+D7FF, U+E000-U+FFEF (where xgrammar's byte ranges are exact), without
    escapes (which xgrammar's own rule does not allow either)."""
    if isinstance(node, list):
        return [_bounded_strings(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {k: v if k in _LITERAL_KEYS else _bounded_strings(v) for k, v in node.items()}
    lengths = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and lengths and "pattern" not in out and "format" not in out:
        low, high = out.pop("minLength", 0), out.pop("maxLength", "")
        if not all(_count(n) for n in (low, high) if n != ""):
            raise GrammarError("minLength and maxLength must be non-negative integers")
        out["pattern"] = f"^{_BOUNDED_CHAR}{{{low},{high}}}$"
    return out


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
