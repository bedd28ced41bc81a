"""The one config error and the one way to phrase a validation problem: ``yaml.path: message``.

Both the sidecar's loader and the app's loader of the redaction section raise
:class:`ConfigError` (or a subclass), so ``validate`` and the app word problems alike.
"""

from __future__ import annotations

from pydantic import ValidationError


class ConfigError(ValueError):
    """The config is invalid. ``problems`` holds one ``yaml.path: message`` line per problem.

    ``locations`` holds the ``file:line`` of each problem where it is known (None elsewhere);
    ``located`` joins the two, which is what a person reading the file wants printed.
    """

    title = "invalid configuration"

    def __init__(self, problems: list[str], locations: list[str | None] | None = None):
        self.problems = list(problems)
        located = list(locations or [])[: len(self.problems)]
        self.locations: list[str | None] = located + [None] * (len(self.problems) - len(located))
        super().__init__(f"{self.title}:\n  " + "\n  ".join(self.located))

    @property
    def located(self) -> list[str]:
        return [f"{loc}: {p}" if loc else p for p, loc in zip(self.problems, self.locations)]


def format_problems(exc: ValidationError, prefix: str = "") -> list[str]:
    """pydantic errors -> ``yaml.path[2].key: message`` lines (``prefix`` is the section's own path)."""
    out = []
    for err in exc.errors():
        path = prefix
        loc = err["loc"]
        for i, part in enumerate(loc):
            if loc[i + 1:i + 2] == ("[key]",):  # a bad mapping key: pydantic gives True as 1, so say the key
                path = f"{path}.{err.get('input', part)}" if path else str(err.get("input", part))
            elif isinstance(part, int):
                path += f"[{part}]"
            elif str(part).startswith("function-") or part in ("tagged-union", "[key]"):
                continue  # pydantic's validator markers are not YAML
            else:
                path = f"{path}.{part}" if path else str(part)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        elif err["type"] == "string_type" and isinstance(err.get("input"), (bool, int, float)):
            msg += f" (YAML read {err['input']!r}; quote the value to keep it text)"
        out.append(f"{path}: {msg}" if path else msg)
    return out
