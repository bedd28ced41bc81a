"""Group commit: writers that arrive together share one commit, and each returns only after it.

A durable commit (an fsync, a database commit) costs about as much for many writes as for one.
So a writer joins the open group; when no commit is running, one of the waiting writers (the
leader) takes the open group and commits it, while writers arriving meanwhile form the next
group. Every writer returns once its group's commit is over, with its own result or error:
durability is paid once per batch of concurrent writers and still precedes every acknowledgement.

Used by the persistent sending queue (one directory fsync per group), the audit store (one
transaction per group) and tail sampling's write-ahead log (one fdatasync covers every record
written before it began: the ``covered`` variant).
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, TypeVar

T = TypeVar("T")  # what a writer brings to the commit
R = TypeVar("R")  # what the commit gives back to that writer


class Member(Generic[T, R]):
    """One writer's part of a group: what it brought, and what the commit hands back to it alone.

    The commit function sets ``result``, or ``error`` for a failure of this member's own (it is
    raised to this writer only); a commit function that raises fails every member of the group.
    """

    __slots__ = ("item", "result", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.result: R | None = None
        self.error: BaseException | None = None


class _Group(Generic[T, R]):
    """Members committed together, and whether their commit is over."""

    __slots__ = ("members", "done")

    def __init__(self) -> None:
        self.members: list[Member[T, R]] = []
        self.done = False


class GroupCommit(Generic[T, R]):
    """The protocol: an open group, one leader at a time, waiting, per-member results and errors, counters.

    ``commit(members)`` commits a group (called by its leader, without the lock held). ``on_commit`` is
    called by the leader after each commit that did not raise, once the group's writers are released.

    With ``covered``, a commit covers by a watermark rather than by membership (a log's sync covers every
    record written before it began): a writer returns as soon as ``covered(item)`` holds, possibly without
    any commit of its own, and whoever finds no commit running commits on its own behalf. So a failed
    commit fails only the writer that ran it; the others, still not covered, run the next one.

    An owner that passes its own methods forms a reference cycle with its GroupCommit: owners release
    what they hold (files, locks) by an explicit close, never by being freed.
    """

    def __init__(self, commit: Callable[[list[Member[T, R]]], object], *,
                 covered: Callable[[T], bool] | None = None, on_commit: Callable[[], object] | None = None) -> None:
        self._commit = commit
        self._covered = covered
        self._on_commit = on_commit
        self._cond = threading.Condition(threading.Lock())
        self._open: _Group[T, R] = _Group()
        self._committing = False
        #: commits run (failed ones included) and the members they carried (tests, benchmarks: members per commit)
        self.commits = 0
        self.committed = 0
        #: commits whose function raised (every member of the group got the error)
        self.failed = 0

    def join(self, item: T) -> R | None:
        """Wait until ``item`` is committed with its group, leading that commit when no one else is; return
        this member's result, or raise its error (its own, or the group's). None when already ``covered``."""
        covered = self._covered
        lead = False
        with self._cond:
            if covered is not None and covered(item):
                return None
            member: Member[T, R] = Member(item)
            # with covered, each writer is a group of its own: nobody else's commit can fail it
            group = self._open if covered is None else _Group()
            group.members.append(member)
            while not group.done:
                if not self._committing:  # our group is still the open one: commit it
                    self._committing = lead = True
                    if group is self._open:
                        self._open = _Group()
                    break
                self._cond.wait()
                if covered is not None and covered(item):
                    return None
        if lead:
            self._lead(group)
        if member.error is not None:
            raise member.error
        return member.result

    def _lead(self, group: _Group[T, R]) -> None:
        """Commit ``group``, then release its writers and let the next leader in, whatever the commit raised."""
        members = group.members
        error: BaseException | None = None
        try:
            self._commit(members)
        except BaseException as e:  # noqa: BLE001 - handed to every member; each writer raises it
            error = e
        with self._cond:
            if error is not None:
                self.failed += 1
                for m in members:
                    m.error = error
            group.done = True
            self._committing = False
            self.commits += 1
            self.committed += len(members)
            self._cond.notify_all()
        if error is None and self._on_commit is not None:
            self._on_commit()

    @property
    def committing(self) -> bool:
        """Whether a leader is committing a group now (tests wait on it)."""
        return self._committing

    def waiting(self) -> list[T]:
        """The items of the open group: writers waiting for the next commit (tests wait on it)."""
        with self._cond:
            return [m.item for m in self._open.members]
