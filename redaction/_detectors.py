"""The built-in named detectors: what each one matches, and the checks that keep look-alikes out.

Each detector is one RE2 pattern. When the pattern has a capturing group, only that
group is the secret (the rest is context such as ``Bearer `` or the boundary
character before a phone number). A ``validator`` runs on the matched bytes and
rejects look-alikes the regex cannot: card numbers failing Luhn, IBANs failing
mod-97. Validators only run on candidates, never on clean text.

Decisions worth knowing:

- ``ipv4`` treats every dotted quad of 0-255 as an address, so a four-part version
  ``1.2.3.4`` is masked (there is no way to tell it from the address 1.2.3.4).
  Dotted quads glued to a word (``v1.2.3.4``) or to more dots (``1.2.3.4.5``) are
  left alone, and three-part versions (``2.13.0``) never match. Put version
  attributes in ``ignored_keys`` if they have four parts.
- ``payment_card`` needs 13-19 digits written contiguously or in the usual 4-4-4-4 /
  4-6-5 groups, a known issuer prefix (2-6) and a valid Luhn checksum, so order ids
  and nanosecond timestamps stay readable.
- ``phone`` needs separators (``555-123-4567``, ``(555) 123-4567``) or a leading
  ``+`` (E.164, 8-15 digits); bare digit runs are never phone numbers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Callable

from contract.attributes import (
    GEN_AI_CLIENT_TIME_PER_OUTPUT_TOKEN,
    GEN_AI_CLIENT_TIME_TO_FIRST_TOKEN,
    GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
    GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
)

Validator = Callable[[bytes], bool]


@dataclass(frozen=True)
class Detector:
    name: str
    pattern: str
    placeholder: str
    validator: Validator | None = None
    #: A pattern with no anchors or word boundaries that matches somewhere inside every
    #: match of ``pattern``: safe to run over a serialized protobuf request, where the
    #: bytes around a string are tags and lengths (see RedactionEngine.wire_candidates).
    #: Binary ids and timestamps sit between the strings there, so hints avoid short shapes
    #: that random bytes produce (``x@y``, ``::``).
    wire_hint: str = ""


_NON_DIGITS = bytes(c for c in range(256) if not 48 <= c <= 57)


def _digits(text: bytes) -> bytes:
    return text.translate(None, _NON_DIGITS)  # the ASCII digits of ``text``, in C


#: A Luhn digit doubled, its two digits summed: 0 2 4 6 8 1 3 5 7 9.
_LUHN_DOUBLE = bytes.maketrans(b"0123456789", b"0246813579")
#: ISO 13616: a letter counts as its number 10..35, every other character as itself.
_IBAN_CHARS = tuple(str(c - 55) if 65 <= c <= 90 else chr(c) for c in range(256))


def luhn_ok(text: bytes) -> bool:
    """Luhn checksum plus an issuer prefix check (Visa 4, Mastercard 2/5, Amex 3, Discover 6)."""
    digits = text.translate(None, _NON_DIGITS)
    n = len(digits)
    if not 13 <= n <= 19 or digits[0] not in b"23456":
        return False
    # every second digit from the right is doubled (a table lookup), and all are summed in C: counted from
    # the left, the doubled ones start at index n % 2
    odd = n & 1
    return (sum(digits[1 - odd::2]) + sum(digits[odd::2].translate(_LUHN_DOUBLE)) - 48 * n) % 10 == 0


def iban_ok(text: bytes) -> bool:
    """ISO 13616 mod-97 check: move the first four characters to the end, letters become 10..35."""
    s = text.replace(b" ", b"").upper()
    if not 15 <= len(s) <= 34:
        return False
    return int("".join(map(_IBAN_CHARS.__getitem__, s[4:] + s[:4]))) % 97 == 1


def ssn_ok(text: bytes) -> bool:
    """Area 000, 666 and 9xx, group 00 and serial 0000 are never issued."""
    area, group, serial = text[:3], text[4:6], text[7:]
    return area not in (b"000", b"666") and area[:1] != b"9" and group != b"00" and serial != b"0000"


def phone_ok(text: bytes) -> bool:
    return 8 <= len(text.translate(None, _NON_DIGITS)) <= 15


def ipv6_ok(text: bytes) -> bool:
    """A real IPv6 address, with at least one digit: ``ns::fn`` and ``dead::beef`` are code, not hosts."""
    if not any(48 <= c <= 57 for c in text):
        return False
    try:
        ipaddress.IPv6Address(text.decode("ascii"))
    except ValueError:
        return False
    return True


def bearer_ok(text: bytes) -> bool:
    """Real tokens have digits or padding; ``bearer authentication`` is prose."""
    return len(text) >= 20 or any(48 <= c <= 57 or c == 61 for c in text)


_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_H = r"[0-9A-Fa-f]"

#: In scan order: at one start position the first detector that matches wins.
DETECTORS: tuple[Detector, ...] = (
    Detector("jwt", r"\beyJ[A-Za-z0-9_-]{4,}\.eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*", "[JWT]", wire_hint=r"eyJ[A-Za-z0-9_-]{4,}\.eyJ"),
    Detector("bearer_token", r"(?i:\b(?:bearer|basic)[ \t]+)([A-Za-z0-9._~+/-]{8,}=*)", "[TOKEN]", bearer_ok,
             wire_hint=r"(?i:bearer|basic)[ \t]+[A-Za-z0-9._~+/-]{8}"),
    Detector(
        "api_key",
        r"\b(?:sk-(?:proj-|ant-|live-|test-)?[A-Za-z0-9_-]{16,}"
        r"|[sr]k_(?:live|test)_[A-Za-z0-9]{16,}"
        r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}"
        r"|gh[pousr]_[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}"
        r"|xox[abposr]-[A-Za-z0-9-]{10,}"
        r"|AIza[0-9A-Za-z_-]{35}"
        r"|hf_[A-Za-z0-9]{30,})\b",
        "[API_KEY]",
        wire_hint=r"sk-[A-Za-z0-9_-]{16}|[sr]k_(?:live|test)_[A-Za-z0-9]{16}"
        r"|(?:AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA|APKA)[A-Z0-9]{16}"
        r"|gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{22}|xox[abposr]-[A-Za-z0-9-]{10}"
        r"|AIza[0-9A-Za-z_-]{35}|hf_[A-Za-z0-9]{30}",
    ),
    # ``%40`` is ``@`` percent-encoded: an email in a URL query string (``?user=jane.doe%40example.com``)
    Detector("email", r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b", "[EMAIL]",
             wire_hint=r"[A-Za-z0-9._%+-](?:@|%40)[A-Za-z0-9-]+\.[A-Za-z0-9-]"),
    Detector("iban", r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b", "[IBAN]", iban_ok,
             wire_hint=r"[A-Z]{2}[0-9]{2} ?[A-Z0-9]{4} ?[A-Z0-9]{4}"),
    Detector(
        "payment_card",
        r"\b(?:[0-9]{4}[ -][0-9]{4}[ -][0-9]{4}[ -][0-9]{1,7}|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4,5}|[0-9]{13,19})\b",
        "[CARD]",
        luhn_ok,
        # the pattern less its word boundaries: hex ids and timestamps rarely hold 13 digits in a row
        wire_hint=r"[0-9]{4}[ -][0-9]{4}[ -][0-9]{4}[ -][0-9]|[0-9]{4}[ -][0-9]{6}[ -][0-9]{4}|[0-9]{13}",
    ),
    Detector("us_ssn", r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", "[SSN]", ssn_ok, wire_hint=r"[0-9]{3}-[0-9]{2}-[0-9]{4}"),
    Detector(
        "phone",
        r"(?:^|[^\w+.\-])("
        r"(?:\+1[ .-]?)?(?:\([0-9]{3}\) ?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}"
        r"|\+[1-9][0-9]{0,2}(?:[ -]?\(?[0-9]{1,4}\)?){2,5}"
        r")(?:$|[^\w.\-]|[.\-](?:$|[^\w]))",
        "[PHONE]",
        phone_ok,
        # the first branch as it is; E.164: phone_ok wants 8+ digits, with at most ``) -(`` between two
        wire_hint=r"(?:\([0-9]{3}\) ?|[0-9]{3}[ .-])[0-9]{3}[ .-][0-9]{4}|\+[1-9](?:[ ()-]*[0-9]){7}",
    ),
    Detector(
        "ipv6",
        r"(?:^|[^\w:.])((?:" + _H + r"{0,4}:){2,7}(?:" + _H + r"{1,4}|" + _OCTET + r"(?:\." + _OCTET + r"){3})?)"
        r"(?:$|[^\w:])",
        "[IP]",
        ipv6_ok,
        wire_hint=r"[0-9A-Fa-f]::|::[0-9A-Fa-f]|(?:[0-9A-Fa-f]{1,4}:){7}|(?:[0-9A-Fa-f]{1,4}:){6}[0-9]",
    ),
    Detector(
        "ipv4",
        r"(?:^|[^\w.])(" + _OCTET + r"(?:\." + _OCTET + r"){3})(?:$|[^\w.]|\.(?:$|[^\w]))",
        "[IP]",
        wire_hint=r"[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}",
    ),
)

DETECTOR_NAMES: tuple[str, ...] = tuple(d.name for d in DETECTORS)

#: What follows a key in a serialized KeyValue, where a key pattern says ``$``: the value's tag
#: (0x12), or, when the value is unset, the next field's tag: any one-byte tag but ``S``/``s``
#: (0x53/0x73 start groups, which OTLP never uses), or a two-byte one (fields 16-255; ``\C`` is
#: one raw byte, which a class cannot match when it is not UTF-8), or the end of the bytes.
#: Excluding ``s`` is what keeps ``gen_ai.usage.input_tokens`` from flagging every GenAI span.
_KEY_END = r"(?:[^sS]|$|\C[\x01-\x0f])"

#: OpenTelemetry semantic-convention keys that a built-in key pattern would match but that hold
#: measurements, not secrets (the GenAI latency of the first / each output *token*). The
#: built-in key rules skip them; their values are still scanned by the detectors.
SEMCONV_MEASUREMENT_KEYS: frozenset[str] = frozenset({
    GEN_AI_SERVER_TIME_TO_FIRST_TOKEN,
    GEN_AI_SERVER_TIME_PER_OUTPUT_TOKEN,
    GEN_AI_CLIENT_TIME_TO_FIRST_TOKEN,
    GEN_AI_CLIENT_TIME_PER_OUTPUT_TOKEN,
})

#: Built-in key patterns (name, regex, wire hint), matched anywhere in the key, case-insensitively.
#: ``token`` only matches keys that *end* in token, so ``gen_ai.usage.input_tokens`` and
#: ``token_count`` stay readable while ``access_token`` and ``x-auth-token`` do not.
BUILTIN_KEY_PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("authorization", r"(?i)authorization", r"(?i:authorization)"),
    ("cookie", r"(?i)cookie", r"(?i:cookie)"),
    ("password", r"(?i)passw(?:or)?d|passphrase", r"(?i:passw(?:or)?d|passphrase)"),
    ("secret", r"(?i)secret", r"(?i:secret)"),
    ("token", r"(?i)token$", r"(?i:token)" + _KEY_END),
    ("api_key", r"(?i)api[-_ .]?key", r"(?i:api[-_ .]?key)"),
    ("private_key", r"(?i)private[-_ .]?key", r"(?i:private[-_ .]?key)"),
    ("credential", r"(?i)credential", r"(?i:credential)"),
    ("session", r"(?i)session[-_.]?(?:id|key|token|secret)?$",
     r"(?i:session(?:[-_.]?(?:id|key|token|secret))?)" + _KEY_END),
)
