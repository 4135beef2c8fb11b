"""Per-request sampling settings; invalid values raise ValueError naming the field (servers map
that to a 400 with `param`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from replica.engine.stop_matcher import StopMatcher
from replica.engine.structured import StructuredOutput

GREEDY_EPS = 1e-5
# Stop strings are matched inside the shared engine step, so their size is bounded. OpenAI allows 4;
# vLLM sets no limit; these leave room for every real use (templates' end markers, code fences).
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024


class SamplingParamsError(ValueError):
    """A bad sampling field or a request the engine cannot serve; `param` names the field and
    `code` (OpenAI's error code, e.g. `context_length_exceeded`) says why, where it has one."""

    def __init__(self, param: str, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class SamplingParams:
    """What to sample and when to stop. `temperature=0` is greedy; `top_k` 0 or -1 means off."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    max_tokens: int | None = 16
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured: StructuredOutput | None = None  # JSON the output must match (structured.py)
    _stop_matcher: StopMatcher | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._check()

    def _check(self) -> None:
        def need(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise SamplingParamsError(param, message)

        need(self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        need(
            self.temperature >= 0,
            "temperature",
            f"temperature must be >= 0, got {self.temperature}",
        )
        need(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        need(self.top_k >= 0, "top_k", f"top_k must be -1, 0 (off) or positive, got {self.top_k}")
        need(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            need(-2 <= value <= 2, name, f"{name} must be in [-2, 2], got {value}")
        need(self.repetition_penalty > 0, "repetition_penalty", "repetition_penalty must be > 0")
        need(
            self.seed is None or -(2**63) <= self.seed < 2**63,
            "seed",
            f"seed must be a signed 64-bit integer, got {self.seed}",
        )
        need(self.min_tokens >= 0, "min_tokens", f"min_tokens must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            need(
                self.max_tokens >= 1,
                "max_tokens",
                f"max_tokens must be at least 1, got {self.max_tokens}",
            )
            need(
                self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            )
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            need(value is None or value >= 0, name, f"{name} must be >= 0, got {value}")
        stops = self.stop or []
        need(
            len(stops) <= MAX_STOP_STRINGS,
            "stop",
            f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}",
        )
        need(
            all(len(s) <= MAX_STOP_CHARS for s in stops),
            "stop",
            f"stop strings must be at most {MAX_STOP_CHARS} characters long",
        )

    @property
    def stop_matcher(self) -> StopMatcher:
        """The stop strings' automaton, built on first use and shared by the request's sequences
        (the server builds it before submitting, so the engine's step thread never does)."""
        if self._stop_matcher is None:
            self._stop_matcher = StopMatcher(self.stop or [])
        return self._stop_matcher

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1.0
        )
