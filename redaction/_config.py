"""The redaction config: one typed model shared by the sidecar processor and the in-process SDK adapters.

Key names follow the OpenTelemetry Collector's redaction processor where the concept
exists (``allow_all_keys``, ``allowed_keys``, ``ignored_keys``, ``blocked_key_patterns``,
``blocked_values``, ``allowed_values``, ``hash_function``, ``summary``); ``detectors``
adds the named built-ins. Every regex is compiled with RE2 while validating, so a
bad rule fails with its YAML path (``blocked_values[1]: invalid regex '(foo': missing )``).
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import re2
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from contract.config import ConfigError, ConfigModel, YamlFile, format_problems, resolved
from redaction._detectors import DETECTOR_NAMES
from redaction._regex import options


class RedactionConfigError(ConfigError):
    """The config cannot be used. ``problems`` holds one ``yaml.path: message`` line per problem."""

    title = "invalid redaction configuration"


class Action(str, enum.Enum):
    """What a rule does to what it matched.

    ``mask`` replaces only the matched span (key rules: the whole value);
    ``replace`` replaces the whole value; ``drop`` removes the attribute;
    ``hash`` replaces the match with its keyed HMAC (hex), stable for one key.
    """

    MASK = "mask"
    REPLACE = "replace"
    DROP = "drop"
    HASH = "hash"


_OPTIONS = options()


def linear_regex(pattern: str) -> "re2._Regexp":
    """Compile with RE2: linear time whatever the pattern and input, so no rule can stall a pipeline.

    Raises ValueError with RE2's reason (``invalid regex '(a': missing )``); RE2 logs nothing.
    """
    try:
        return re2.compile(pattern, _OPTIONS)
    except re2.error as e:
        reason = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        reason = reason.split(": ", 1)[0]  # RE2 appends the offending fragment after ": "
        raise ValueError(f"invalid regex {pattern!r}: {reason}") from None


def compile_regex(pattern: str) -> "re2._Regexp":
    """A redaction rule's regex: :func:`linear_regex`, and it must not match the empty string."""
    rx = linear_regex(pattern)
    if rx.search("") is not None:
        raise ValueError(f"regex {pattern!r} matches the empty string, so it would match everywhere")
    return rx


class _Model(ConfigModel):
    model_config = ConfigDict(frozen=True)


def _pattern_shorthand(value: Any) -> Any:
    """A bare string in a rule list means ``{pattern: <string>}``."""
    return {"pattern": value} if isinstance(value, str) else value


class _Rule(_Model):
    #: The rule's name in counters and summaries; defaults to its YAML path (``blocked_values[1]``).
    name: str | None = None
    pattern: str
    replacement: str = "[REDACTED]"

    @model_validator(mode="after")
    def _compiles(self) -> "_Rule":
        try:
            compile_regex(self.pattern)
        except ValueError as e:
            raise ValueError(f"rule {self.name!r}: {e}" if self.name else str(e)) from None
        return self


class ValueRule(_Rule):
    """A regex over string values; by default only the matched span is masked."""

    action: Action = Action.MASK


class KeyRule(_Rule):
    """A regex over attribute keys; the value of a matching key is replaced (or dropped, or hashed).

    Without ``action`` the rule uses the config's ``blocked_key_action``.
    """

    action: Action | None = None


def _detector_shorthand(value: Any) -> Any:
    """``email: false`` / ``email: true`` switch a detector without spelling out its settings."""
    return {"enabled": value} if isinstance(value, bool) else value


class DetectorConfig(_Model):
    enabled: bool = True
    action: Action = Action.MASK
    #: Text put in place of the match; defaults to the detector's placeholder (``[EMAIL]``).
    replacement: str | None = None


Detector = Annotated[DetectorConfig, BeforeValidator(_detector_shorthand)]


class DetectorsConfig(_Model):
    """The built-in detectors, each on by default; ``name: false`` switches one off."""

    email: Detector = Field(default_factory=DetectorConfig)
    payment_card: Detector = Field(default_factory=DetectorConfig)
    us_ssn: Detector = Field(default_factory=DetectorConfig)
    phone: Detector = Field(default_factory=DetectorConfig)
    ipv4: Detector = Field(default_factory=DetectorConfig)
    ipv6: Detector = Field(default_factory=DetectorConfig)
    jwt: Detector = Field(default_factory=DetectorConfig)
    bearer_token: Detector = Field(default_factory=DetectorConfig)
    api_key: Detector = Field(default_factory=DetectorConfig)
    iban: Detector = Field(default_factory=DetectorConfig)


assert set(DetectorsConfig.model_fields) == set(DETECTOR_NAMES), "one config field per built-in detector"


def _checked_regex(pattern: str) -> str:
    compile_regex(pattern)
    return pattern


class RedactionConfig(_Model):
    """Settings of one redaction engine (the ``processors.redaction`` section)."""

    #: false = allowlist mode: keys not in ``allowed_keys`` (nor ``ignored_keys``) get ``disallowed_key_action``.
    allow_all_keys: bool = True
    allowed_keys: list[str] = Field(default_factory=list)
    disallowed_key_action: Action = Action.DROP
    #: Keys left exactly as they are: no key rule, no value rule.
    ignored_keys: list[str] = Field(default_factory=list)
    #: Extra key regexes, on top of the built-ins unless ``builtin_blocked_key_patterns`` is false.
    blocked_key_patterns: list[Annotated[KeyRule, BeforeValidator(_pattern_shorthand)]] = Field(default_factory=list)
    builtin_blocked_key_patterns: bool = True
    blocked_key_action: Action = Action.REPLACE
    blocked_values: list[Annotated[ValueRule, BeforeValidator(_pattern_shorthand)]] = Field(default_factory=list)
    #: Exceptions: a match that fully matches one of these regexes is left alone.
    allowed_values: list[Annotated[str, AfterValidator(_checked_regex)]] = Field(default_factory=list)
    detectors: DetectorsConfig = Field(default_factory=DetectorsConfig)
    hash_function: Literal["hmac-sha256"] = "hmac-sha256"
    #: Environment variable holding the HMAC key; required (at start-up) when any rule hashes.
    hash_key_env: str = Field(default="REDACTION_HMAC_KEY", min_length=1)
    #: silent: no attributes; info: ``redaction.*.count`` on items that were changed; debug: also the keys.
    summary: Literal["silent", "info", "debug"] = "info"


def load_redaction_config(source: "str | os.PathLike | dict | RedactionConfig | None",
                          environ: Mapping[str, str] | None = None) -> RedactionConfig:
    """The redaction config from code, a dict, or a YAML file.

    A YAML file may be a whole sidecar config (its ``processors.redaction`` section is
    used, so the app and the sidecar share one file) or just the section's body. The file
    is read as the sidecar reads it (:class:`contract.config.YamlFile`): ``${env:…}`` in the
    section is expanded from ``environ`` (default: the process environment). Errors name
    the YAML path and line and raise :class:`RedactionConfigError`.
    """
    if isinstance(source, RedactionConfig):
        return source
    if source is None or isinstance(source, dict):
        try:
            return RedactionConfig.model_validate(source or {})
        except ValidationError as e:
            raise RedactionConfigError(format_problems(e)) from None
    try:
        doc = YamlFile.read(source)
    except ConfigError as e:
        raise RedactionConfigError(e.problems, e.locations) from None
    keys: tuple[str, ...] = ()
    if "processors" in (doc.keys() or []):
        names = [k for k in doc.keys("processors") or [] if k == "redaction" or k.startswith("redaction/")]
        if not names:
            raise RedactionConfigError([f"{source}: processors: no redaction processor defined"])
        keys = ("processors", names[0])
    prefix = ".".join(keys)
    body = resolved(doc.value(*keys, environ=environ))
    problems = list(doc.problems)  # every problem at once, in the sidecar's order
    if body is None:
        body = {}
    if not isinstance(body, dict):
        problems.append(f"{prefix or source}: must be a mapping")
    else:
        try:
            config = RedactionConfig.model_validate(body)
        except ValidationError as e:
            problems.extend(format_problems(e, prefix))
    if problems:
        raise doc.error(problems, RedactionConfigError)
    return config
