"""xgrammar against llguidance on this CPU: compile time per schema and mask fill time per token,
one sequence and a batch of 64, with the tiny test tokenizer and synthetic 32k / 128k vocabularies.

    .venv/bin/python loadtests/grammar_engines.py [--vocab tiny 32000 128000] [--threads 1]

Each schema's valid example (structured_schemas.py) is tokenized greedily (longest match) and
replayed: fill the mask, accept the token, on every step. "compile" is the matcher's first mask
included (llguidance builds its lexer lazily); caches are off or bypassed so each figure is a cold
compile. The synthetic vocabularies are byte strings shaped like a real BPE vocabulary: all 256 bytes,
words with and without a leading space, numbers, punctuation runs, whitespace runs and UTF-8 pieces.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from structured_schemas import EXAMPLES, SCHEMAS

BATCH = 64
EOS = 0


def synthetic_vocab(size: int, seed: int = 0) -> list[bytes]:
    """`size` distinct byte strings: token 0 is EOS, then the 256 bytes, then BPE-like pieces."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12, 9, 8, 7.5, 7, 6.7, 6.3, 6, 6, 4.3, 4, 2.8, 2.8, 2.4, 2.4, 2.2, 2, 2, 1.9,
               1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]  # fmt: skip
    vocab: list[bytes] = [b"<eos>"] + [bytes([b]) for b in range(256)]
    seen = set(vocab)
    extras = ['":', '",', '{"', '"}', '},', '],', '[{', '}]', '": "', '", "', "\n", "\n\n",
              "  ", "    ", "\t", "true", "false", "null", "é", "ü", "日本", "→", "—"]  # fmt: skip
    extras += [str(n) for n in range(1000)]
    for piece in extras:
        b = piece.encode()
        if b not in seen:
            seen.add(b)
            vocab.append(b)
    while len(vocab) < size:
        n = min(12, max(1, int(rng.expovariate(1 / 4.5)) + 1))
        word = "".join(rng.choices(letters, weights, k=n))
        shape = rng.random()
        if shape < 0.5:
            word = " " + word
        elif shape < 0.6:
            word = word.capitalize()
        elif shape < 0.65:
            word = " " + word.capitalize()
        b = word.encode()
        if b not in seen:
            seen.add(b)
            vocab.append(b)
    return vocab


def piece_index(vocab: list[bytes]) -> dict[bytes, int]:
    return {piece: i for i, piece in enumerate(vocab) if i != EOS}


def greedy_tokenize(index: dict[bytes, int], text: bytes, longest: int = 16) -> list[int]:
    """Longest match first: not BPE, but any sequence of vocabulary pieces will do for a replay
    (llguidance calls this while decoding too, so it must be cheap)."""
    out, i = [], 0
    while i < len(text):
        for n in range(min(longest, len(text) - i), 0, -1):
            token = index.get(text[i : i + n])
            if token is not None:
                out.append(token)
                i += n
                break
    return out


class Xgr:
    name = "xgrammar"

    def __init__(self, vocab: list[bytes] | None, hf_tokenizer, vocab_size: int, threads: int):
        import xgrammar as xgr

        self.xgr = xgr
        if vocab is None:
            info = xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        else:
            info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, stop_token_ids=[EOS])
        self.compiler = xgr.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgr.BatchGrammarMatcher(max_threads=threads)
        self.vocab_size = vocab_size

    def matcher(self, schema: dict):
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher, token: int) -> bool:
        return matcher.accept_token(token)


class Llg:
    name = "llguidance"

    def __init__(self, vocab: list[bytes] | None, hf_tokenizer, vocab_size: int, threads: int):
        import llguidance as llg
        import llguidance.hf
        import llguidance.torch

        self.llg = llg
        if vocab is None:
            self.tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
        else:
            self.tokenizer = llg.LLTokenizer(llg.TokenizerWrapper(_Wrapped(vocab)))
        self.executor = llg.LLExecutor(num_threads=threads)
        self.torch = llguidance.torch

    def matcher(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fill(self, matcher, bitmask: torch.Tensor, row: int) -> None:
        self.torch.fill_next_token_bitmask(matcher, bitmask, row)

    def fill_batch(self, matchers: list, bitmask: torch.Tensor) -> None:
        self.torch.fill_next_token_bitmask_par(
            self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask
        )

    def accept(self, matcher, token: int) -> bool:
        return matcher.consume_token(token)


class _Wrapped:
    """The minimal tokenizer llguidance's TokenizerWrapper asks for."""

    def __init__(self, vocab: list[bytes]) -> None:
        self.vocab = vocab
        self.tokens = vocab
        self.eos_token_id = EOS
        self.bos_token_id = None
        self.special_token_ids = [EOS]
        self.index = piece_index(vocab)

    def __call__(self, text: bytes) -> list[int]:
        return greedy_tokenize(self.index, text)


def measure(engine, traces: dict[str, list[int]], vocab_size: int) -> dict[str, float]:
    """Mean compile ms per schema, mean fill µs per token (one sequence), ms per batch step."""
    words = (vocab_size + 31) // 32
    compile_ms = []
    for _ in range(3):
        for name in SCHEMAS:
            # A fresh schema text each time: nothing cached may help.
            schema = {**SCHEMAS[name], "description": f"run {time.perf_counter_ns()}"}
            bitmask = torch.full((1, words), -1, dtype=torch.int32)
            start = time.perf_counter()
            engine.fill(engine.matcher(schema), bitmask, 0)
            compile_ms.append((time.perf_counter() - start) * 1e3)
    fill_us = []
    bitmask = torch.full((1, words), -1, dtype=torch.int32)
    for name, trace in traces.items():
        matcher = engine.matcher(SCHEMAS[name])
        for token in trace:
            start = time.perf_counter()
            engine.fill(matcher, bitmask, 0)
            fill_us.append((time.perf_counter() - start) * 1e6)
            assert engine.accept(matcher, token), (engine.name, name, token)
    names = [list(traces)[i % len(traces)] for i in range(BATCH)]
    matchers = [engine.matcher(SCHEMAS[n]) for n in names]
    bitmask = torch.full((BATCH, words), -1, dtype=torch.int32)
    steps = min(len(t) for t in traces.values())
    batch_ms = []
    for step in range(steps):
        start = time.perf_counter()
        engine.fill_batch(matchers, bitmask)
        batch_ms.append((time.perf_counter() - start) * 1e3)
        for m, n in zip(matchers, names, strict=True):
            engine.accept(m, traces[n][step])
    return {
        "compile_ms": statistics.median(compile_ms),
        "compile_max_ms": max(compile_ms),
        "fill_us": statistics.mean(fill_us),
        "fill_p99_us": sorted(fill_us)[int(0.99 * (len(fill_us) - 1))],
        "batch64_ms": statistics.mean(batch_ms),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", nargs="+", default=["tiny", "32000", "128000"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None, help="a model folder for the 'tiny' tokenizer")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'vocab':>7} {'engine':>10} {'setup s':>8} {'compile ms':>11} {'max ms':>7} "
          f"{'fill µs/tok':>12} {'p99 µs':>7} {'batch64 ms':>11}")  # fmt: skip
    for v in args.vocab:
        if v == "tiny":
            from transformers import AutoTokenizer

            from fleet.model_factory import cached_model

            path = args.model or cached_model("llama", "tiny")
            hf = AutoTokenizer.from_pretrained(str(path))
            vocab, size = None, len(hf)
            traces = {n: hf.encode(json.dumps(EXAMPLES[n], separators=(",", ":")),
                                   add_special_tokens=False) for n in SCHEMAS}  # fmt: skip
        else:
            hf, size = None, int(v)
            vocab = synthetic_vocab(size)
            index = piece_index(vocab)
            traces = {n: greedy_tokenize(index, json.dumps(EXAMPLES[n], separators=(",", ":")).encode())
                      for n in SCHEMAS}  # fmt: skip
        for cls in (Xgr, Llg):
            start = time.perf_counter()
            engine = cls(vocab, hf, size, args.threads)
            setup = time.perf_counter() - start
            r = measure(engine, traces, size)
            print(f"{v:>7} {engine.name:>10} {setup:8.2f} {r['compile_ms']:11.1f} "
                  f"{r['compile_max_ms']:7.1f} {r['fill_us']:12.1f} {r['fill_p99_us']:7.0f} "
                  f"{r['batch64_ms']:11.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
