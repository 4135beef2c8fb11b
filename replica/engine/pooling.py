"""Embeddings from a decoder: each prompt's final hidden states (after the model's last norm)
pooled into one vector and L2-normalised, as vLLM pools decoder embedders (`last` by default).

A prompt may run over several steps (chunked prefill) and may be recomputed from its first token
after a preemption, so the pooler keeps a running sum per request and starts it again whenever a
chunk starts at position 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from replica.engine.config import POOLING_METHODS


def normalize(vector: torch.Tensor) -> torch.Tensor:
    return F.normalize(vector.float(), dim=-1)


def truncate(embedding: list[float], dimensions: int) -> list[float]:
    """The first `dimensions` values renormalised (Matryoshka embeddings, as vLLM and OpenAI's
    `dimensions`): the same as truncating before normalising, since scale does not matter."""
    return normalize(torch.tensor(embedding[:dimensions], dtype=torch.float32)).tolist()


class Pooler:
    def __init__(self, method: str) -> None:
        if method not in POOLING_METHODS:
            raise ValueError(f"pooling must be one of {', '.join(POOLING_METHODS)}; got {method!r}")
        self.method = method
        self._sums: dict[str, torch.Tensor] = {}  # request id -> sum of its rows so far (mean)

    def add(
        self, request_id: str, rows: torch.Tensor, start: int, num_tokens: int
    ) -> torch.Tensor | None:
        """Take one chunk's hidden rows (prompt positions `start`..); the normalised embedding
        once the chunk reaches the prompt's last token, else None."""
        done = start + rows.shape[0] == num_tokens
        if self.method == "last":
            return normalize(rows[-1]) if done else None
        chunk = rows.float().sum(dim=0)
        total = chunk if start == 0 else self._sums[request_id] + chunk
        if not done:
            self._sums[request_id] = total
            return None
        self._sums.pop(request_id, None)
        return normalize(total / num_tokens)

    def forget(self, request_id: str) -> None:
        self._sums.pop(request_id, None)
