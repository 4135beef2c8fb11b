"""Grammar-constrained sampling inside the batched step: each constrained sequence has a matcher
that follows its tokens; before sampling, one bitmask row per constrained sequence is filled (all
rows at once, on xgrammar's threads) and the disallowed logits of those rows only are set to -inf.
Free rows are never touched, and a batch without constrained rows costs nothing here."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    import xgrammar


class SequenceGrammar:
    """One sequence's place in its grammar (each choice of a request has its own)."""

    def __init__(self, grammar: xgrammar.CompiledGrammar) -> None:
        import xgrammar

        self.matcher = xgrammar.GrammarMatcher(grammar)

    def accept(self, token: int) -> bool:
        """Advance by a sampled token; False if the grammar refuses it (it then stays put)."""
        return self.matcher.accept_token(token)

    @property
    def ended(self) -> bool:
        """The grammar is complete and took its stop token: nothing more may be generated."""
        return self.matcher.is_terminated()


class GrammarMasks:
    """Fills and applies the bitmask of a step's constrained rows (a buffer reused across steps)."""

    def __init__(self, vocab_size: int) -> None:
        import xgrammar

        self.xgrammar = xgrammar
        self.vocab_size = vocab_size
        self.batch = xgrammar.BatchGrammarMatcher()
        self.bitmask = xgrammar.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits: torch.Tensor, rows: list[int], grammars: list[SequenceGrammar]) -> None:
        """Mask `logits[rows[k]]` (in place) to what `grammars[k]` allows next."""
        if self.bitmask.shape[0] < logits.shape[0]:
            self.bitmask = self.xgrammar.allocate_token_bitmask(logits.shape[0], self.vocab_size)
        bitmask = self.bitmask[: logits.shape[0]]
        self.batch.batch_fill_next_token_bitmask([g.matcher for g in grammars], bitmask, rows)
        self.xgrammar.apply_token_bitmask_inplace(
            logits, bitmask.to(logits.device, non_blocking=True), vocab_size=self.vocab_size,
            indices=rows,
        )  # fmt: skip
