"""Workloads: prompt sizes, tenants sharing system prompts, conversations growing turn by turn."""

from __future__ import annotations

import random

import pytest
from llm_workloads import (
    MultiTurnWorkload,
    RandomText,
    SharedPrefixWorkload,
    make_workload,
    measure_chars_per_token,
    render_completion_prompt,
)


def text(seed: int = 0, chars_per_token: float = 4.0) -> RandomText:
    return RandomText(random.Random(seed), chars_per_token)


def test_text_length_follows_the_measured_ratio() -> None:
    ratio = measure_chars_per_token(lambda s: len(s) // 3)
    assert ratio == pytest.approx(3.0, rel=0.01)
    for n in (1, 50, 1000):
        assert n * ratio <= len(text(1, ratio).tokens(n)) <= n * ratio + 20


def test_random_prompts_are_unique_and_seeded() -> None:
    first = [make_workload("random", text(7), prompt_len=64).next().messages for _ in range(1)]
    again = [make_workload("random", text(7), prompt_len=64).next().messages for _ in range(1)]
    assert first == again
    workload = make_workload("random", text(7), prompt_len=64)
    prompts = {workload.next().messages[0]["content"] for _ in range(50)}
    assert len(prompts) == 50


def test_shared_prefix_tenants_reuse_their_system_prompt() -> None:
    workload = SharedPrefixWorkload(text(), num_tenants=4, system_prompt_len=200, question_len=10)
    assert len(set(workload.system_prompts)) == 4
    assert all(len(p) >= 800 for p in workload.system_prompts)
    seen: dict[str, set[str]] = {}
    for _ in range(200):
        prompt = workload.next()
        system, question = prompt.messages
        assert system["role"] == "system" and question["role"] == "user"
        assert 40 <= len(question["content"]) <= 60
        seen.setdefault(prompt.tag, set()).add(system["content"])
    assert sorted(seen) == [f"tenant-{g}" for g in range(4)]
    assert all(len(prompts) == 1 for prompts in seen.values())


def test_multi_turn_sends_the_whole_history_each_turn() -> None:
    workload = MultiTurnWorkload(text(), turns=3, turn_len=5)
    first = workload.next()
    workload.done(first, "reply one")
    second = workload.next()
    assert second.conversation is first.conversation
    assert second.messages[:2] == [first.messages[0], {"role": "assistant", "content": "reply one"}]
    assert second.messages[2]["role"] == "user" and len(second.messages) == 3
    workload.done(second, "reply two")
    third = workload.next()
    assert len(third.messages) == 5 and third.tag.endswith("turn-2")
    workload.done(third, "reply three")
    fourth = workload.next()  # three turns done: a new conversation starts
    assert fourth.conversation is not first.conversation and len(fourth.messages) == 1


def test_multi_turn_never_overlaps_turns_and_drops_failed_conversations() -> None:
    workload = MultiTurnWorkload(text(), turns=5, turn_len=5)
    a, b = workload.next(), workload.next()
    assert a.conversation is not b.conversation  # a's turn is in flight, so b starts another
    workload.done(a, None)
    workload.done(b, "ok")
    c = workload.next()
    assert c.conversation is b.conversation
    d = workload.next()
    assert d.conversation not in (a.conversation, b.conversation)


def test_completion_rendering_keeps_the_prefix_property() -> None:
    short = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"}]
    longer = [*short, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}]
    assert render_completion_prompt(short).removesuffix("assistant:") in render_completion_prompt(
        longer
    )
    assert render_completion_prompt(longer).startswith(
        render_completion_prompt(short).removesuffix("assistant:")
    )


def test_unknown_workload_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown workload 'chaos'"):
        make_workload("chaos", text())


def test_processes_share_tenants_but_not_questions() -> None:
    """Locust worker processes draw their own requests from the same tenants."""
    workers = [
        make_workload(
            "shared-prefix",
            text(seed=100 + w),
            shared_text=text(seed=0),
            num_tenants=3,
            system_prompt_len=50,
        )
        for w in range(2)
    ]
    assert workers[0].system_prompts == workers[1].system_prompts
    assert workers[0].next().messages[1] != workers[1].next().messages[1]
