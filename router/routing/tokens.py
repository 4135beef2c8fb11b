"""Estimate prompt tokens from characters, per model, learning the ratio from upstream usage.

The router has no tokenizer (it fronts any engine), yet its cost model and the key store's token
reservations need token counts; each finished request's `usage.prompt_tokens` refines the ratio.
A fleet key's requests teach only that key's own ratio: one key's unusual text (emoji take
several tokens a character) must not inflate every other key's reservations into 429s. The
model's shared ratio learns from requests without a fleet key.
"""

from __future__ import annotations

from router.routing.prompt_key import MAX_KEY_CHARS, Units

INITIAL_CHARS_PER_TOKEN = 4.0
SMOOTHING = 0.05
SAMPLE_EVERY = 16
MAX_KEYS = 4096  # per-key ratios kept; the oldest learned is forgotten first


class TokenEstimator:
    def __init__(self) -> None:
        self.chars_per_token: dict[str, float] = {}
        self.per_key: dict[tuple[str, str], float] = {}
        self._seen = 0

    def wants_sample(self, model: str) -> bool:
        """Learning needs the answer's usage parsed; once a model is known, 1 in SAMPLE_EVERY."""
        self._seen += 1
        return model not in self.chars_per_token or self._seen % SAMPLE_EVERY == 0

    def ratio(self, model: str, key: str | None = None) -> float:
        if key is not None:
            learned = self.per_key.get((model, key))
            if learned is not None:
                return learned
        return self.chars_per_token.get(model, INITIAL_CHARS_PER_TOKEN)

    def estimate(self, model: str, units: Units, key: str | None = None) -> int:
        if isinstance(units, str):
            return int(len(units) / self.ratio(model, key)) + 1
        return len(units)

    def observe(self, model: str, units: Units, prompt_tokens: int, key: str | None = None) -> None:
        if not isinstance(units, str) or prompt_tokens <= 0 or not 16 <= len(units) < MAX_KEY_CHARS:
            return  # ids need no ratio; a key cut short would teach a wrong one
        sample = len(units) / prompt_tokens
        if key is None:
            current = self.chars_per_token.get(model)
            self.chars_per_token[model] = _smoothed(current, sample)
            return
        slot = (model, key)
        current = self.per_key.pop(slot, None)
        if current is None and len(self.per_key) >= MAX_KEYS:
            del self.per_key[next(iter(self.per_key))]
        self.per_key[slot] = _smoothed(current or self.ratio(model), sample)


def _smoothed(current: float | None, sample: float) -> float:
    return sample if current is None else current + SMOOTHING * (sample - current)
