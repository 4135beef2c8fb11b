"""The text and raw bytes of single tokens, as OpenAI's logprobs report them.

A byte-level BPE token can hold part of a UTF-8 character; decoding it alone would give U+FFFD. We
recover each token's exact bytes from its vocabulary string (GPT-2 byte-to-unicode alphabet, or
SentencePiece `<0xNN>` byte fallback with `▁` for spaces) and cache them per id. A token whose bytes
are not valid UTF-8 on their own is shown as `bytes:\\xNN...`, the way OpenAI's API shows them.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table (printable bytes map to themselves)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shift = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shift)] = b
            shift += 1
    return table


class TokenTexts:
    """Per-token `(text, bytes)` for one tokenizer, cached because logprobs ask for them per token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._byte_level = self._detect_byte_level()
        self._special_ids = set(getattr(tokenizer, "all_special_ids", None) or [])
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def _detect_byte_level(self) -> bool:
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        pre = getattr(backend, "pre_tokenizer", None)
        decoder = getattr(backend, "decoder", None)
        return "ByteLevel" in repr(pre) or "ByteLevel" in repr(decoder)

    def get(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            raw = self._raw_bytes(token_id)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
            cached = self._cache[token_id] = (text, list(raw))
        return cached

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def _raw_bytes(self, token_id: int) -> bytes:
        piece = cast("str | None", self._tokenizer.convert_ids_to_tokens(token_id))
        if piece is None:
            return b""
        if token_id in self._special_ids:
            return piece.encode()
        if self._byte_level:
            table = _unicode_to_byte()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
            return piece.encode()
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:5], 16)])
        return piece.replace("▁", " ").encode()
