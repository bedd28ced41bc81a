"""One YAML reader for every config file: line numbers, duplicate keys, and otelcol's env expansion.

The file is composed once into PyYAML's node graph, which keeps each node's line and
whether a scalar was quoted. Python values are built from it on demand, for the whole
document or one subtree (the app reads only ``processors.redaction`` of the sidecar's
file, so an exporter's unset ``${env:TOKEN}`` is not its problem).

Expansion follows the OpenTelemetry Collector: ``${env:VAR}``, ``${env:VAR:-default}``
and ``${VAR}``; ``$$`` is a literal ``$``. A plain (unquoted) scalar that is exactly one
reference takes the YAML type of the value (``port: ${env:PORT}`` is an int), yet a
string field still receives the variable's text (see :class:`EnvText`); a quoted scalar
or a reference inside a longer string is always a string.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from contract.errors import ConfigError

_REF = re.compile(r"\$\$|\$\{([^}]*)\}")
_ENV = re.compile(r"^(?:env:)?([A-Za-z_][A-Za-z0-9_]*)(?::-(.*))?$", re.DOTALL)
_MAX_DEPTH = 100


class EnvText(str):
    """The text of a whole unquoted ``${env:VAR}``, typed by whoever reads it.

    A string field takes the text as is (``ID=007`` stays ``"007"``); any other field takes
    :meth:`resolve`, the value YAML reads from the text (``4317``, ``true``, ``[a, b]``).
    This is otelcol's rule: the expanded value keeps its original text for string fields.
    """

    __slots__ = ()

    def resolve(self) -> Any:
        return typed_env_value(str(self))


def resolved(value: Any) -> Any:
    """``value`` with an :class:`EnvText` replaced by its YAML value (for readers without a schema)."""
    return value.resolve() if isinstance(value, EnvText) else value


def expand_scalar(text: str, path: str, problems: list[str], environ: Mapping[str, str], *,
                  plain: bool = True) -> Any:
    """Expand the references in one scalar; problems (unset variable, unknown provider) name ``path``."""

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        ref = _ENV.match(m.group(1))
        if ref is None:
            problems.append(f"{path}: unsupported reference {m.group(0)!r} (use ${{env:VAR}} or "
                            "${env:VAR:-default}; write $$ for a literal $)")
            return m.group(0)
        name, default = ref.group(1), ref.group(2)
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set and has no default "
                        f"(use ${{env:{name}:-default}})")
        return ""

    whole = _REF.fullmatch(text)
    expanded = _REF.sub(sub, text)
    if not (plain and whole and whole.group(0) != "$$") or expanded == "":
        return expanded
    return EnvText(expanded)


def typed_env_value(text: str) -> Any:
    """What YAML reads from ``text`` in place of the reference (dates stay text: no field wants one)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, list, dict, type(None), str)) else text


def expand_env(node: Any, path: str, problems: list[str], environ: Mapping[str, str] | None = None) -> Any:
    """Expand references in already-loaded Python data (strings count as unquoted; no schema, so typed)."""
    env = os.environ if environ is None else environ
    if isinstance(node, dict):
        return {k: expand_env(v, join(path, str(k)), problems, env) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, f"{path}[{i}]", problems, env) for i, v in enumerate(node)]
    if isinstance(node, str) and "$" in node:
        return resolved(expand_scalar(node, path, problems, env))
    return node


def _syntax_error(e: yaml.YAMLError) -> str:
    """PyYAML's error as one line: where, then what (its own text quotes the input and ``<unicode string>``)."""
    mark, context, context_mark = (getattr(e, a, None) for a in ("problem_mark", "context", "context_mark"))
    if context and context_mark:
        context += f" (from line {context_mark.line + 1})"
    what = "; ".join(str(x) for x in (context, getattr(e, "problem", None)) if x) or str(e)
    return f"line {mark.line + 1}, column {mark.column + 1}: {what}" if mark else what


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


_LAST_SEGMENT = re.compile(r"(\[\d+\]|\.[^.\[]*|^[^.\[]*)$")


class YamlFile:
    """One YAML document: values with env expansion, and the line of every YAML path.

    ``problems`` collects expansion and structure problems (duplicate keys, unsupported
    references) as ``yaml.path: message`` lines; the caller reports them with its own.
    """

    def __init__(self, text: str, source: str = "<config>"):
        self.source = source
        self.problems: list[str] = []
        self._lines: dict[str, int] = {}
        self._merged: dict[int, int] = {}
        self._loader = yaml.SafeLoader(text)
        try:
            self._root = self._loader.get_single_node()
        except yaml.YAMLError as e:
            raise ConfigError([f"{source}: not valid YAML: {_syntax_error(e)}"]) from None
        finally:
            self._loader.dispose()

    @classmethod
    def read(cls, path: str | os.PathLike) -> "YamlFile":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError([f"{path}: cannot read config: {e.strerror}"]) from None
        return cls(text, str(path))

    def _pairs(self, node: yaml.MappingNode) -> tuple[list, int]:
        """The mapping's (key, value) node pairs with ``<<`` merges applied, and how many were merged in."""
        if id(node) not in self._merged:
            own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
            self._loader.flatten_mapping(node)  # merged pairs first, then the mapping's own
            self._merged[id(node)] = len(node.value) - own
        return node.value, self._merged[id(node)]

    def _node(self, keys: tuple[str, ...]) -> yaml.Node | None:
        node = self._root
        for key in keys:
            if not isinstance(node, yaml.MappingNode):
                return None
            pairs, _ = self._pairs(node)
            node = next((v for k, v in reversed(pairs) if isinstance(k, yaml.ScalarNode) and k.value == key), None)
        return node

    def keys(self, *keys: str) -> list[str] | None:
        """The keys of the mapping at ``keys`` (no expansion), or None when there is no mapping there."""
        node = self._node(keys)
        if not isinstance(node, yaml.MappingNode):
            return None
        keys_ = [str(self._loader.construct_object(k, deep=True)) for k, _ in self._pairs(node)[0]]
        return list(dict.fromkeys(keys_))

    def value(self, *keys: str, environ: Mapping[str, str] | None = None) -> Any:
        """The Python value at ``keys`` (the whole document without), references expanded from ``environ``."""
        node = self._node(keys)
        if node is None:
            return None
        env = os.environ if environ is None else environ
        return self._build(node, ".".join(keys), env, 0)

    def _build(self, node: yaml.Node, path: str, env: Mapping[str, str], depth: int) -> Any:
        self._lines.setdefault(path, node.start_mark.line + 1)
        if depth > _MAX_DEPTH:
            self.problems.append(f"{path}: nested more than {_MAX_DEPTH} levels deep (a recursive alias?)")
            return None
        if isinstance(node, yaml.MappingNode):
            pairs, merged = self._pairs(node)
            out: dict[Any, Any] = {}
            inherited = set()  # keys that came from a << merge: the mapping's own may override them
            for i, (key_node, value_node) in enumerate(pairs):
                key = self._construct(key_node, path)
                if isinstance(key, (list, dict)):
                    key = str(key)  # a complex key: no config section has one, so it fails as unknown
                where = join(path, str(key))
                if key in out and key not in inherited:
                    self.problems.append(f"{where}: duplicate key (first on line {self._lines.get(where, '?')})")
                    continue
                if i < merged:
                    inherited.add(key)
                    self._lines.setdefault(where, key_node.start_mark.line + 1)
                else:
                    inherited.discard(key)
                    self._lines[where] = key_node.start_mark.line + 1  # errors point at the key
                out[key] = self._build(value_node, where, env, depth + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self._build(n, f"{path}[{i}]", env, depth + 1) for i, n in enumerate(node.value)]
        value = self._construct(node, path)
        if isinstance(value, str) and "$" in value:
            return expand_scalar(value, path, self.problems, env, plain=node.style is None)
        return value

    def _construct(self, node: yaml.Node, path: str) -> Any:
        try:
            value = self._loader.construct_object(node, deep=True)
        except yaml.YAMLError as e:
            self.problems.append(f"{path or self.source}: {getattr(e, 'problem', None) or e}")
            return None
        if not isinstance(value, (str, int, float, bool, type(None))) and isinstance(node, yaml.ScalarNode):
            return node.value  # dates, binary: config fields want the text
        return value

    def line(self, path: str) -> int | None:
        """The line of the YAML path, or of its nearest enclosing node that exists in the file."""
        while True:
            if path in self._lines:
                return self._lines[path]
            shorter = _LAST_SEGMENT.sub("", path)
            if shorter == path:
                return self._lines.get("")
            path = shorter

    def locate(self, problem: str) -> str | None:
        """``file:line`` for a ``yaml.path: message`` problem, when the path is in this file."""
        path = problem.split(": ", 1)[0] if ": " in problem else ""
        if path == self.source or path.startswith(f"{self.source}:"):
            return None
        line = self.line(path)
        return f"{self.source}:{line}" if line else None

    def error(self, problems: list[str], cls: type[ConfigError] = ConfigError) -> ConfigError:
        """``cls(problems)`` with the ``file:line`` of each problem this file can place."""
        return cls(problems, [self.locate(p) for p in problems])
