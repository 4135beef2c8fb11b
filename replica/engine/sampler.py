"""Turn a step's logits into tokens, one row per sampling sequence, with batch-wide tensor ops.

Greedy batches without logit processing take a single argmax. Random rows draw with the
exponential-race trick (argmax of p / Exp(1) noise), which lets a seeded row draw its noise from its
own generator, seeded per output position: the same seed gives the same tokens whatever else shares
the batch, and a request continued from its first k tokens (elsewhere) gives the same token k+1.
Logprobs come from the model's raw distribution (before penalties and temperature). Rows of
grammar-constrained sequences are masked last (grammar_mask.py), after penalties and biases.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import torch

from replica.engine.grammar_mask import GrammarMasks
from replica.engine.outputs import TokenLogprob
from replica.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprob | None]


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: list[int], seed: int) -> None:
        self.device = device
        self.eos_token_ids = eos_token_ids
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.grammar_masks: GrammarMasks | None = None  # made by the first constrained step

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SampleResult:
        params = [seq.params for seq in seqs]
        raw_logprobs = (
            torch.log_softmax(logits, dim=-1)
            if any(p.logprobs is not None for p in params)
            else None
        )
        logits = self._apply_processors(logits, seqs)
        constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
        if constrained:
            if self.grammar_masks is None:
                self.grammar_masks = GrammarMasks(logits.shape[-1])
            grammars = [seqs[i].grammar for i in constrained]
            self.grammar_masks.apply(logits, constrained, grammars)  # type: ignore[arg-type]
        greedy = [p.greedy for p in params]
        tokens = logits.argmax(dim=-1) if all(greedy) else self._sample(logits, seqs, greedy)
        token_ids = tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(seqs)
        if raw_logprobs is not None:
            logprobs = top_logprobs(raw_logprobs, tokens, [p.logprobs for p in params])
        return SampleResult(token_ids, logprobs)

    def _apply_processors(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Penalties, logit_bias and min_tokens masking, only on the rows that ask for them."""
        penalised = [i for i, s in enumerate(seqs) if s.params.needs_penalties]
        if penalised:
            logits = self._penalise(logits, [seqs[i] for i in penalised], penalised)
        edits: list[tuple[int, int, float]] = []  # (row, token, added logit)
        for i, seq in enumerate(seqs):
            params = seq.params
            edits.extend((i, token, bias) for token, bias in (params.logit_bias or {}).items())
            # Past a grammar's end only its stop token is allowed: min_tokens cannot apply there.
            if seq.num_output_tokens < params.min_tokens and seq.grammar is None:
                banned = list(params.stop_token_ids)
                if not params.ignore_eos:
                    banned += self.eos_token_ids
                edits.extend((i, token, float("-inf")) for token in banned)
        if edits:
            rows, cols, values = zip(*edits, strict=True)
            index = (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))
            logits = logits.index_put(
                index, torch.tensor(values, device=self.device), accumulate=True
            )
        return logits

    def _penalise(
        self, logits: torch.Tensor, seqs: list[Sequence], rows: list[int]
    ) -> torch.Tensor:
        vocab = logits.shape[-1]
        outputs = [seq.output_token_ids for seq in seqs]
        width = max(1, max(len(o) for o in outputs))
        padded = torch.tensor([o + [vocab] * (width - len(o)) for o in outputs], device=self.device)
        counts = torch.zeros(len(seqs), vocab + 1, device=self.device)
        counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
        counts = counts[:, :vocab]
        prompts = [seq.token_ids[: seq.num_prompt_tokens] for seq in seqs]
        width = max(len(p) for p in prompts)
        padded = torch.tensor([p + [vocab] * (width - len(p)) for p in prompts], device=self.device)
        seen = torch.zeros(len(seqs), vocab + 1, dtype=torch.bool, device=self.device)
        seen.scatter_(1, padded, True)
        seen = seen[:, :vocab] | (counts > 0)

        def column(name: str) -> torch.Tensor:
            return torch.tensor([getattr(s.params, name) for s in seqs], device=self.device)[
                :, None
            ]

        picked = logits[rows]
        rep = column("repetition_penalty")
        picked = torch.where(seen, torch.where(picked > 0, picked / rep, picked * rep), picked)
        picked = picked - column("frequency_penalty") * counts
        picked = picked - column("presence_penalty") * (counts > 0).float()
        logits = logits.clone()
        logits[rows] = picked
        return logits

    def _sample(
        self, logits: torch.Tensor, seqs: list[Sequence], greedy: list[bool]
    ) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        params = [seqs[i].params for i in rows]
        index = torch.tensor(rows, device=self.device)
        temps = torch.tensor([p.temperature for p in params], device=self.device)[:, None]
        x = logits[index] / temps
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            x = _top_k_top_p(x, [p.top_k for p in params], [p.top_p for p in params])
        probs = torch.softmax(x, dim=-1)
        if any(p.min_p > 0 for p in params):
            min_p = torch.tensor([p.min_p for p in params], device=self.device)[:, None]
            probs = probs.masked_fill(probs < min_p * probs.max(dim=-1, keepdim=True).values, 0.0)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for j, i in enumerate(rows):
            seq = seqs[i]
            if seq.params.seed is not None:
                if seq.generator is None:
                    seq.generator = torch.Generator(device=self.device)
                seq.generator.manual_seed(position_seed(seq.params.seed, seq.index, seq))
                noise[j].exponential_(generator=seq.generator)
        tokens[index] = (probs / noise).argmax(dim=-1)
        return tokens


def position_seed(seed: int, choice: int, seq: Sequence) -> int:
    """The seed of one output token's noise: a function of (seed, choice, position) only, so a
    stream resumed on another replica after k tokens draws what token k+1 would have drawn."""
    data = struct.pack("<qqq", seed, choice, seq.num_output_tokens)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _top_k_top_p(x: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Mask logits outside each row's top-k and nucleus (the smallest set with mass >= top_p)."""
    vocab = x.shape[-1]
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=x.device)[None, :]
    k = torch.tensor([k if k > 0 else vocab for k in top_k], device=x.device)[:, None]
    sorted_x = sorted_x.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_x, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the better-ranked tokens
    p = torch.tensor(top_p, device=x.device)[:, None]
    sorted_x = sorted_x.masked_fill(before >= p, float("-inf"))
    return torch.full_like(x, float("-inf")).scatter(1, order, sorted_x)


def top_logprobs(
    logprobs: torch.Tensor, tokens: torch.Tensor, wanted: list[int | None]
) -> list[TokenLogprob | None]:
    """Each row's chosen-token logprob and rank, plus its `wanted[i]` best alternatives."""
    k = max(w or 0 for w in wanted)
    chosen = logprobs.gather(1, tokens[:, None])
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top_values, top_ids = (
        logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    )
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    values_l, ids_l, tokens_l = top_values.tolist(), top_ids.tolist(), tokens.tolist()
    out: list[TokenLogprob | None] = []
    for i, w in enumerate(wanted):
        if w is None:
            out.append(None)
            continue
        top = list(zip(ids_l[i][:w], values_l[i][:w], strict=True))
        out.append(TokenLogprob(tokens_l[i], chosen_l[i], ranks_l[i], top))
    return out
