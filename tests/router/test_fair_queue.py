"""The router queue's data structure alone: per-key FIFO sub-queues served round-robin."""

from __future__ import annotations

from router.queueing.fair_queue import FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    out = []
    while queue:
        out.append(queue.pop())
    return out


def test_keys_take_turns_and_each_key_stays_in_order() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(4):
        queue.push("big", f"b{i}")
    queue.push("small", "s0")
    queue.push("small", "s1")
    assert len(queue) == 6 and queue.count("big") == 4 and queue.keys == 2
    assert drain(queue) == ["b0", "s0", "b1", "s1", "b2", "b3"]
    assert queue.keys == 0


def test_a_key_that_arrives_late_is_served_after_at_most_one_turn_of_each_other_key() -> None:
    queue: FairQueue[str] = FairQueue()
    for i in range(100):
        queue.push("big", f"b{i}")
    assert queue.pop() == "b0"
    queue.push("late", "l0")
    assert [queue.pop(), queue.pop()] == ["b1", "l0"]


def test_skip_passes_the_turn_without_losing_the_head() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a0")
    queue.push("b", "b0")
    assert queue.peek() == "a0"
    queue.skip()
    assert queue.peek() == "b0"
    assert drain(queue) == ["b0", "a0"]


def test_remove_takes_an_item_out_from_anywhere_and_forgets_empty_keys() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a", "a0")
    queue.push("a", "a1")
    queue.push("b", "b0")
    assert queue.remove("a", "a1") and not queue.remove("a", "a1")
    assert queue.remove("b", "b0")
    assert queue.keys == 1 and len(queue) == 1 and queue.count("b") == 0
    assert drain(queue) == ["a0"]
