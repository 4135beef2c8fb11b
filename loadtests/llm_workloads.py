"""Where the load tests' prompts come from. The shape of traffic (unique prompts, tenants sharing
long system prompts, conversations growing turn by turn) decides what prefix caching and
cache-aware routing can save, so each shape is its own workload.

Every workload hands out chat messages; the completions API gets them rendered as one text.
Text is random words, sized in tokens through a characters-per-token ratio measured once against
the served model's tokenizer (the server's token counts in `usage` are what the summary reports).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

WORKLOADS = ("random", "shared-prefix", "multi-turn")
DEFAULT_CHARS_PER_TOKEN = 4.0

_WORD_LIST = (
    "the of and to in is that for it as with was on be at by this had not are but from or have "
    "an they which one you were all we her she there would their will when who him been has "
    "more if no out so said what up its about than into them can only other new some could "
    "time these two may then do first any my now such like our over man me even most made "
    "after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see "
    "men work long get here between both life being under never day same another know while "
    "last might us great old year off come since against go came right used take three model "
    "cache token batch query router server replica fleet prompt stream latency memory kernel "
    "tensor request queue prefix system"
)
_WORDS = _WORD_LIST.split()

Messages = list[dict[str, str]]


def render_completion_prompt(messages: Messages) -> str:
    """A plain-text rendering for the completions API that keeps the prefix property: a longer
    conversation's text starts with the shorter one's."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def measure_chars_per_token(count_tokens: Callable[[str], int], seed: int = 0) -> float:
    """Characters per token of our random text under the served model's tokenizer."""
    sample = RandomText(random.Random(seed)).words(400)
    return len(sample) / max(1, count_tokens(sample))


class RandomText:
    """Random words from a fixed list; `tokens(n)` is about n tokens at the measured ratio."""

    def __init__(
        self, rng: random.Random, chars_per_token: float = DEFAULT_CHARS_PER_TOKEN
    ) -> None:
        self.rng = rng
        self.chars_per_token = chars_per_token

    def words(self, count: int) -> str:
        return " ".join(self.rng.choice(_WORDS) for _ in range(count))

    def tokens(self, count: int) -> str:
        target_chars = max(1, round(count * self.chars_per_token))
        parts: list[str] = []
        size = 0
        while size < target_chars:
            word = self.rng.choice(_WORDS)
            size += len(word) + (1 if parts else 0)
            parts.append(word)
        return " ".join(parts)


@dataclass
class Conversation:
    id: int
    messages: Messages = field(default_factory=list)
    turns_done: int = 0


@dataclass
class Prompt:
    """One request's input; `conversation` links a multi-turn request back to its history."""

    messages: Messages
    tag: str = ""
    conversation: Conversation | None = None


class Workload(Protocol):
    name: str

    def next(self) -> Prompt: ...

    def done(self, prompt: Prompt, reply: str | None) -> None:
        """Told each request's outcome: the generated text, or None when it failed."""
        ...


class RandomWorkload:
    """Unique prompts of a fixed length: no two requests share more than a word or two."""

    name = "random"

    def __init__(self, text: RandomText, prompt_len: int) -> None:
        self.text = text
        self.prompt_len = prompt_len

    def next(self) -> Prompt:
        return Prompt([{"role": "user", "content": self.text.tokens(self.prompt_len)}])

    def done(self, prompt: Prompt, reply: str | None) -> None:
        return None


class SharedPrefixWorkload:
    """G tenants, each with its own long system prompt, asking many short questions."""

    name = "shared-prefix"

    def __init__(
        self,
        text: RandomText,
        num_tenants: int,
        system_prompt_len: int,
        question_len: int,
        prompt_text: RandomText | None = None,
    ) -> None:
        self.text = text
        self.question_len = question_len
        prompt_text = prompt_text or text
        self.system_prompts = [
            f"You are the assistant of tenant {g}. {prompt_text.tokens(system_prompt_len)}"
            for g in range(num_tenants)
        ]

    def next(self) -> Prompt:
        tenant = self.text.rng.randrange(len(self.system_prompts))
        messages = [
            {"role": "system", "content": self.system_prompts[tenant]},
            {"role": "user", "content": self.text.tokens(self.question_len)},
        ]
        return Prompt(messages, tag=f"tenant-{tenant}")

    def done(self, prompt: Prompt, reply: str | None) -> None:
        return None


class MultiTurnWorkload:
    """Conversations of `turns` user turns; each turn resends the whole history plus the new
    question. Turns of one conversation never overlap: a conversation waits idle for its next
    turn and a failed turn ends it."""

    name = "multi-turn"

    def __init__(self, text: RandomText, turns: int, turn_len: int) -> None:
        self.text = text
        self.turns = turns
        self.turn_len = turn_len
        self.idle: deque[Conversation] = deque()
        self.started = 0

    def next(self) -> Prompt:
        if self.idle:
            conversation = self.idle.popleft()
        else:
            conversation = Conversation(self.started)
            self.started += 1
        conversation.messages.append({"role": "user", "content": self.text.tokens(self.turn_len)})
        tag = f"conversation-{conversation.id}-turn-{conversation.turns_done}"
        return Prompt(list(conversation.messages), tag=tag, conversation=conversation)

    def done(self, prompt: Prompt, reply: str | None) -> None:
        conversation = prompt.conversation
        if conversation is None or reply is None:
            return
        conversation.messages.append({"role": "assistant", "content": reply})
        conversation.turns_done += 1
        if conversation.turns_done < self.turns:
            self.idle.append(conversation)


def make_workload(
    name: str,
    text: RandomText,
    *,
    prompt_len: int = 256,
    num_tenants: int = 8,
    system_prompt_len: int = 1024,
    question_len: int = 32,
    turns: int = 5,
    turn_len: int = 64,
    shared_text: RandomText | None = None,
) -> Workload:
    """`shared_text` draws what every load-generating process must agree on (the tenants' system
    prompts); `text` draws the rest."""
    if name == "random":
        return RandomWorkload(text, prompt_len)
    if name == "shared-prefix":
        return SharedPrefixWorkload(text, num_tenants, system_prompt_len, question_len, shared_text)
    if name == "multi-turn":
        return MultiTurnWorkload(text, turns, turn_len)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
