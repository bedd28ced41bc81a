"""Redaction of plain Python values: attribute mappings, strings, and nested log bodies.

The in-process SDK adapters hand over one item (a span's attributes, its events'
and links' attributes, its status description; or a log record's attributes and body)
as a list of roots. Every string leaf is collected and scanned in one batch, and new
containers are built only along the paths that changed, so a clean item allocates
nothing and comes back as ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Sequence

from redaction._config import Action
from redaction._engine import DROP, IGNORE, SCAN, KeyAction, RedactionEngine, Tally

__all__ = ["Redacted", "redact_roots"]


class Redacted(NamedTuple):
    """The new roots (unchanged ones are the same objects) and the keys that changed, for summaries."""

    roots: list[Any]
    masked: list[str]
    dropped: list[str]


def redact_roots(engine: RedactionEngine, roots: Sequence[Any], labels: Sequence[str | None],
                 tally: Tally) -> Redacted | None:
    """Redact one item's ``roots``; ``labels[i]`` names a bare root (``body``), None for an attribute mapping.

    Returns None when nothing changed.
    """
    leaves: list[tuple[tuple, str]] = []
    results: dict[tuple, Any] = {}
    for i, root in enumerate(roots):
        if root is not None:
            _walk(engine, root, (i,), leaves, results, tally)
    if leaves:
        bufs = [s.encode() for _, s in leaves]
        for j in engine.candidates(bufs):
            out = engine.scan(bufs[j], tally)
            if out is not None:
                results[leaves[j][0]] = out if out is DROP else out.decode()
    if not results:
        return None

    masked: list[str] = []
    dropped: list[str] = []
    for path, out in results.items():
        label = labels[path[0]] or (str(path[1]) if len(path) > 1 else "")
        (dropped if out is DROP else masked).append(label)
    dirty = {path[:n] for path in results for n in range(1, len(path))}
    new_roots = [_rebuild(root, (i,), results, dirty) if (i,) in dirty or (i,) in results else root
                 for i, root in enumerate(roots)]
    return Redacted(new_roots, masked, dropped)


_SCALARS = (int, float, bool, bytes, type(None))


def _walk(engine: RedactionEngine, node: Any, path: tuple, leaves: list, results: dict, tally: Tally) -> None:
    if isinstance(node, str):
        if node:
            leaves.append((path, node))
    elif isinstance(node, Mapping):
        cached = engine._key_cache.get  # noqa: SLF001 - the hot path: one dict lookup per key
        for key, value in node.items():
            decision = cached(key)
            if decision is None:
                decision = engine.key_action(str(key))
            if decision is SCAN:
                kind = type(value)
                if kind is str:  # the common case, without a call
                    if value:
                        leaves.append((path + (key,), value))
                elif kind not in _SCALARS:
                    _walk(engine, value, path + (key,), leaves, results, tally)
            elif decision is not IGNORE:
                results[path + (key,)] = _key_rule(engine, decision, value, tally)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _walk(engine, value, path + (i,), leaves, results, tally)
    # numbers, booleans and bytes carry no text to scan


def _key_rule(engine: RedactionEngine, decision: KeyAction, value: Any, tally: Tally) -> Any:
    tally[decision.stat] = tally.get(decision.stat, 0) + 1
    if decision.action is Action.DROP:
        return DROP
    if decision.action is Action.HASH:
        text = value.hex() if isinstance(value, bytes) else value if isinstance(value, str) else repr(value)
        return engine.key_replacement(decision, text)
    return decision.replacement


def _rebuild(node: Any, path: tuple, results: dict, dirty: set) -> Any:
    if path in results:
        return results[path]
    if path not in dirty:
        return node
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            new = _rebuild(value, path + (key,), results, dirty)
            if new is not DROP:
                out[key] = new
        return out
    items = [_rebuild(v, path + (i,), results, dirty) for i, v in enumerate(node)]
    items = [v for v in items if v is not DROP]
    return tuple(items) if isinstance(node, tuple) else items
