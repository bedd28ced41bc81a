"""The group commit protocol itself (sidecar.group_commit), with real threads: writers that arrive while a
commit runs share the next one, each gets its own result or error, and a failed commit (of any exception)
fails its group only and never leaves the others waiting."""

from __future__ import annotations

import threading
import time

from sidecar.group_commit import GroupCommit, Member

DEADLINE = 30.0  # a safety net only: every wait below ends on a condition


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.001)


class Abort(BaseException):
    """Not an Exception: what a KeyboardInterrupt or SystemExit inside a commit looks like."""


class HeldCommits:
    """A commit function that records each group's items and holds every commit until the test lets it finish.

    ``fail(items)`` may return an exception for the whole group (raised by the commit); ``own(item)`` one for a
    single member (handed to it alone); every other member's result is ``item * 10``.
    """

    def __init__(self, fail=lambda items: None, own=lambda item: None, before=lambda: None):
        self.groups: list[list[int]] = []
        self.allowed = 0
        self.cond = threading.Condition()
        self.fail, self.own, self.before = fail, own, before

    def __call__(self, members: list[Member[int, int]]) -> None:
        items = [m.item for m in members]
        self.before()
        with self.cond:
            self.groups.append(items)
            n = len(self.groups)
            self.cond.notify_all()
            assert self.cond.wait_for(lambda: self.allowed >= n, DEADLINE), "commit never released"
        error = self.fail(items)
        if error is not None:
            raise error
        for m in members:
            m.error = self.own(m.item)
            if m.error is None:
                m.result = m.item * 10

    def started(self, n: int) -> None:
        """Wait until the ``n``-th commit has begun."""
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.groups) >= n, DEADLINE), f"commit {n} never began"

    def release(self, n: int = 1) -> None:
        with self.cond:
            self.allowed += n
            self.cond.notify_all()


class Writers:
    """Threads that each join one item and keep what came back: a result or the exception raised."""

    def __init__(self, gc: GroupCommit):
        self.gc = gc
        self.outcomes: dict[int, object] = {}
        self.threads: list[threading.Thread] = []

    def start(self, *items: int) -> None:
        for item in items:
            t = threading.Thread(target=self._join, args=(item,), daemon=True)
            self.threads.append(t)
            t.start()

    def _join(self, item: int) -> None:
        try:
            self.outcomes[item] = self.gc.join(item)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            self.outcomes[item] = e

    def finish(self) -> dict[int, object]:
        for t in self.threads:
            t.join(DEADLINE)
            assert not t.is_alive(), "a writer never returned"
        return self.outcomes


def _waiting(gc: GroupCommit, items: list[int]) -> None:
    _wait_for(lambda: sorted(gc.waiting()) == items, f"{items} to wait in the open group")


def test_writers_arriving_while_a_commit_runs_share_the_next_one_and_return_after_it():
    commits = HeldCommits()
    counted = []
    gc: GroupCommit[int, int] = GroupCommit(commits, on_commit=lambda: counted.append(1))
    w = Writers(gc)
    w.start(0)
    commits.started(1)  # the first writer leads a commit of its own, held
    assert gc.committing
    w.start(1, 2, 3, 4, 5)
    _waiting(gc, [1, 2, 3, 4, 5])
    assert w.outcomes == {}  # nobody returns before its group's commit
    commits.release()
    commits.started(2)
    _wait_for(lambda: 0 in w.outcomes, "the first writer to return")
    assert w.outcomes == {0: 0}  # the first group is done; the second is still committing
    commits.release()
    assert w.finish() == {i: i * 10 for i in range(6)}
    assert [sorted(g) for g in commits.groups] == [[0], [1, 2, 3, 4, 5]]
    assert (gc.commits, gc.committed, gc.failed, len(counted)) == (2, 6, 0, 2)
    assert not gc.committing and gc.waiting() == []


def test_a_members_own_error_reaches_it_alone():
    commits = HeldCommits(own=lambda item: ValueError(f"item {item} cannot be stored") if item == 3 else None)
    counted = []
    gc: GroupCommit[int, int] = GroupCommit(commits, on_commit=lambda: counted.append(1))
    w = Writers(gc)
    w.start(0)
    commits.started(1)
    w.start(1, 2, 3, 4)
    _waiting(gc, [1, 2, 3, 4])
    commits.release(2)
    out = w.finish()
    assert isinstance(out.pop(3), ValueError)
    assert out == {0: 0, 1: 10, 2: 20, 4: 40}
    # the commit itself went through: it counts, and on_commit saw it
    assert (gc.commits, gc.committed, gc.failed, len(counted)) == (2, 5, 0, 2)


def test_a_failed_commit_fails_every_member_of_its_group_and_not_the_next_group():
    commits = HeldCommits(fail=lambda items: OSError(28, "No space left on device") if 1 in items else None)
    counted = []
    gc: GroupCommit[int, int] = GroupCommit(commits, on_commit=lambda: counted.append(1))
    w = Writers(gc)
    w.start(0)
    commits.started(1)
    w.start(1, 2, 3)
    _waiting(gc, [1, 2, 3])
    commits.release()
    commits.started(2)  # the group of 1, 2, 3 commits (and will fail) ...
    w.start(4, 5)
    _waiting(gc, [4, 5])  # ... while 4 and 5 wait for the next
    commits.release(2)
    out = w.finish()
    errors = [out.pop(i) for i in (1, 2, 3)]
    assert all(isinstance(e, OSError) and e.strerror == "No space left on device" for e in errors)
    assert out == {0: 0, 4: 40, 5: 50}
    assert [sorted(g) for g in commits.groups] == [[0], [1, 2, 3], [4, 5]]
    assert (gc.commits, gc.committed, gc.failed, len(counted)) == (3, 6, 1, 2)  # on_commit: the two that committed


def test_a_commit_that_raises_a_base_exception_releases_its_group_and_the_next_leader():
    commits = HeldCommits(fail=lambda items: Abort() if 0 in items or 1 in items else None)
    gc: GroupCommit[int, int] = GroupCommit(commits)
    w = Writers(gc)
    w.start(0)
    commits.started(1)
    w.start(1, 2)
    _waiting(gc, [1, 2])
    commits.release(3)
    out = w.finish()  # nobody is left waiting
    assert isinstance(out[0], Abort) and isinstance(out[1], Abort) and out[1] is out[2]
    assert not gc.committing
    w2 = Writers(gc)
    w2.start(7)  # the protocol still works: a new writer leads and commits
    assert w2.finish() == {7: 70}
    assert (gc.commits, gc.committed, gc.failed) == (3, 4, 2)


class Log:
    """A write-ahead log's watermark: tickets written, and the highest one a finished commit covered."""

    def __init__(self) -> None:
        self.written = 0
        self.synced = 0
        self.asked: set[int] = set()  # tickets whose writers found themselves not yet covered

    def write(self, n: int = 1) -> list[int]:
        first = self.written + 1
        self.written += n
        return list(range(first, self.written + 1))

    def covered(self, ticket: int) -> bool:
        if ticket <= self.synced:
            return True
        self.asked.add(ticket)
        return False


def _watermarked(log: Log, **kw) -> tuple[HeldCommits, GroupCommit[int, int]]:
    """A commit that covers every ticket written before it began (as the WAL's fdatasync does)."""
    started: list[int] = []
    commits = HeldCommits(before=lambda: started.append(log.written), **kw)

    def commit(members: list[Member[int, int]]) -> None:
        commits(members)
        log.synced = max(log.synced, started[len(commits.groups) - 1])

    return commits, GroupCommit(commit, covered=log.covered)


def _others_wait_on_a_held_commit(log, commits, gc, tickets) -> "Writers":
    """The first ticket's writer leads a commit held open; the others arrive meanwhile and wait, not covered."""
    w = Writers(gc)
    w.start(tickets[0])
    commits.started(1)
    w.start(*tickets[1:])
    _wait_for(lambda: log.asked >= set(tickets[1:]), "the other writers to wait, not yet covered")
    return w


def test_a_covered_writer_returns_at_once_without_a_commit():
    log = Log()
    commits, gc = _watermarked(log)
    log.write(5)
    log.synced = 5
    w = Writers(gc)
    w.start(3)
    assert w.finish() == {3: None}
    assert commits.groups == [] and (gc.commits, gc.committed) == (0, 0)


def test_writers_covered_by_the_running_commit_return_after_it_without_another():
    log = Log()
    commits, gc = _watermarked(log)
    tickets = log.write(5)  # all written before the first commit reads its watermark
    w = _others_wait_on_a_held_commit(log, commits, gc, tickets)
    commits.release(10)
    assert w.finish() == {t: (10 if t == 1 else None) for t in tickets}
    assert gc.commits == 1  # one sync for five writers


def test_writers_not_covered_by_the_running_commit_share_one_more():
    log = Log()
    commits, gc = _watermarked(log)
    w = Writers(gc)
    w.start(*log.write(1))
    commits.started(1)  # its watermark is ticket 1
    later = log.write(7)
    w.start(*later)
    _wait_for(lambda: log.asked >= set(later), "the later writers to wait")
    commits.release(10)
    out = w.finish()
    assert gc.commits == 2, commits.groups  # the held one, then one for all seven: not one each
    assert all(out[t] in (None, t * 10) for t in later) and log.synced == 8


def test_with_a_watermark_a_failed_commit_fails_only_its_writer_and_the_others_commit_again():
    log = Log()
    commits, gc = _watermarked(log, fail=lambda items: OSError(5, "Input/output error") if 1 in items else None)
    tickets = log.write(3)
    w = _others_wait_on_a_held_commit(log, commits, gc, tickets)
    commits.release(10)
    out = w.finish()
    assert isinstance(out.pop(1), OSError)
    assert sorted(out) == [2, 3] and set(out.values()) in ({None, 20}, {None, 30})  # one led, one was covered
    assert (gc.commits, gc.failed) == (2, 1) and log.synced == 3

