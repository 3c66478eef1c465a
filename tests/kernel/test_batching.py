"""Group commit (services/kernel/batching.py): what arrives while a group's batch runs is the
next batch; one batch at a time per group; each caller gets its own result or exception."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import pytest

from services.kernel.batching import GroupCommit, arrivals


class Recorder:
    """A flush that records its batches and can be held until released."""

    def __init__(self) -> None:
        self.batches: list[tuple[str, list[str]]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.running: set[str] = set()
        self.overlapped = False

    async def flush(self, group: str, items: Sequence[str]) -> list[str | BaseException]:
        if group in self.running:
            self.overlapped = True
        self.running.add(group)
        self.batches.append((group, list(items)))
        await self.release.wait()
        self.running.discard(group)
        return [ValueError(i) if i.startswith("bad") else i.upper() for i in items]


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


async def test_what_arrives_during_a_batch_is_the_next_batch_and_each_gets_its_result() -> None:
    r = Recorder()
    commit: GroupCommit[str, str, str] = GroupCommit(r.flush)
    r.release.clear()
    first = asyncio.create_task(commit.submit("phone", "a"))
    await until(lambda: len(r.batches) == 1, "the first batch started")
    rest = [asyncio.create_task(commit.submit("phone", x)) for x in "bcde"]
    await asyncio.sleep(0.02)
    assert len(r.batches) == 1  # they wait for the running batch
    r.release.set()
    assert await first == "A"
    assert await asyncio.gather(*rest) == ["B", "C", "D", "E"]
    assert r.batches == [("phone", ["a"]), ("phone", ["b", "c", "d", "e"])]
    assert (commit.stats.batches, commit.stats.items, commit.stats.largest) == (2, 5, 4)
    assert not r.overlapped


async def test_groups_run_side_by_side_but_one_batch_at_a_time_each() -> None:
    r = Recorder()
    commit: GroupCommit[str, str, str] = GroupCommit(r.flush, max_batch=2)
    results = await asyncio.gather(
        *(commit.submit(group, f"{group}{i}") for i in range(5) for group in ("tv", "phone"))
    )
    assert sorted(results) == sorted(f"{g}{i}".upper() for i in range(5) for g in ("tv", "phone"))
    assert not r.overlapped
    assert all(len(items) <= 2 for _, items in r.batches)
    for group in ("tv", "phone"):  # arrival order is kept within a group
        seen = [i for g, items in r.batches if g == group for i in items]
        assert seen == [f"{group}{i}" for i in range(5)]


async def test_a_second_item_for_the_same_key_waits_for_the_next_batch() -> None:
    r = Recorder()
    commit: GroupCommit[str, str, str] = GroupCommit(r.flush, distinct=lambda item: item[0])
    r.release.clear()
    first = asyncio.create_task(commit.submit("g", "x0"))
    await until(lambda: len(r.batches) == 1, "the first batch started")
    later = [asyncio.create_task(commit.submit("g", i)) for i in ("a1", "a2", "b1", "a3")]
    await asyncio.sleep(0.01)
    r.release.set()
    await asyncio.gather(first, *later)
    assert [items for _, items in r.batches] == [["x0"], ["a1", "b1"], ["a2"], ["a3"]]


async def test_an_item_refused_fails_alone_and_a_failed_flush_fails_its_whole_batch() -> None:
    r = Recorder()
    commit: GroupCommit[str, str, str] = GroupCommit(r.flush)
    good, bad = await asyncio.gather(
        commit.submit("g", "ok"), commit.submit("g", "bad"), return_exceptions=True
    )
    assert good == "OK"
    assert isinstance(bad, ValueError) and str(bad) == "bad"

    async def broken(group: str, items: Sequence[str]) -> list[str | BaseException]:
        raise RuntimeError("database gone")

    failing: GroupCommit[str, str, str] = GroupCommit(broken)
    outcomes = await asyncio.gather(
        failing.submit("g", "a"), failing.submit("g", "b"), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [RuntimeError, RuntimeError]
    with pytest.raises(RuntimeError):  # and the group is usable again after
        await failing.submit("g", "c")


async def test_a_caller_who_gave_up_before_its_batch_is_left_out_of_it() -> None:
    r = Recorder()
    commit: GroupCommit[str, str, str] = GroupCommit(r.flush)
    r.release.clear()
    first = asyncio.create_task(commit.submit("g", "a"))
    await until(lambda: len(r.batches) == 1, "the first batch started")
    gone = asyncio.create_task(commit.submit("g", "gone"))
    stays = asyncio.create_task(commit.submit("g", "stays"))
    await asyncio.sleep(0.01)
    gone.cancel()
    r.release.set()
    assert (await first, await stays) == ("A", "STAYS")
    assert [items for _, items in r.batches] == [["a"], ["stays"]]


async def test_under_load_the_next_batch_lingers_to_gather_more_a_lone_call_does_not() -> None:
    r = Recorder()
    commit: GroupCommit[str, str, str] = GroupCommit(r.flush, linger_s=0.1)

    async def later(item: str, after_s: float) -> str:
        await asyncio.sleep(after_s)
        return await commit.submit("g", item)

    loop = asyncio.get_running_loop()
    started = loop.time()
    assert await commit.submit("g", "alone") == "ALONE"
    assert loop.time() - started < 0.05  # nothing was busy: no lingering
    r.release.clear()
    first = asyncio.create_task(commit.submit("g", "a"))
    await until(lambda: len(r.batches) == 2, "the batch of a started")
    during = asyncio.create_task(commit.submit("g", "b"))  # busy: the next batch lingers
    await asyncio.sleep(0.01)
    r.release.set()
    await asyncio.gather(first, during, later("c", 0.04), later("d", 0.06))
    assert [items for _, items in r.batches] == [["alone"], ["a"], ["b", "c", "d"]]


async def _turns_until(waiting: list[int], join_at: set[int]) -> int:
    """How many turns of the loop ``arrivals`` took, a caller joining at each turn in
    ``join_at``."""
    turns = 0

    async def count() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1
            if turns in join_at:
                waiting.append(turns)

    counter = asyncio.create_task(count())
    await asyncio.sleep(0)  # the counter runs one turn ahead of arrivals' first
    try:
        await arrivals(waiting, idle=3, most=10)
    finally:
        counter.cancel()
    return turns


async def test_arrivals_waits_while_callers_keep_joining_and_no_longer() -> None:
    # Nobody comes: three idle turns and the batch goes.
    assert await _turns_until([], set()) <= 4
    # Callers every other turn: the idle count starts again at each one, up to the most.
    waiting: list[int] = []
    assert await _turns_until(waiting, {2, 4, 6, 8, 10, 12, 14}) >= 10
    assert len(waiting) >= 4
    # A caller after a gap of more idle turns than allowed does not hold the batch.
    late: list[int] = []
    await _turns_until(late, {9})
    assert late == []
