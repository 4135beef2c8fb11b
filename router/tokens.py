"""Estimate prompt tokens from characters, per model, learning the ratio from upstream usage.

The router has no tokenizer (it fronts any engine), yet its cost model and the key store's token
reservations need token counts; each finished request's `usage.prompt_tokens` refines the ratio.
"""

from __future__ import annotations

from router.prompt_key import Units

INITIAL_CHARS_PER_TOKEN = 4.0
SMOOTHING = 0.05
SAMPLE_EVERY = 16


class TokenEstimator:
    def __init__(self) -> None:
        self.chars_per_token: dict[str, float] = {}
        self._seen = 0

    def wants_sample(self, model: str) -> bool:
        """Learning needs the answer's usage parsed; once a model is known, 1 in SAMPLE_EVERY."""
        self._seen += 1
        return model not in self.chars_per_token or self._seen % SAMPLE_EVERY == 0

    def ratio(self, model: str) -> float:
        return self.chars_per_token.get(model, INITIAL_CHARS_PER_TOKEN)

    def estimate(self, model: str, units: Units) -> int:
        if isinstance(units, str):
            return int(len(units) / self.ratio(model)) + 1
        return len(units)

    def observe(self, model: str, units: Units, prompt_tokens: int) -> None:
        if not isinstance(units, str) or prompt_tokens <= 0 or len(units) < 16:
            return
        sample = len(units) / prompt_tokens
        current = self.chars_per_token.get(model)
        self.chars_per_token[model] = (
            sample if current is None else current + SMOOTHING * (sample - current)
        )
