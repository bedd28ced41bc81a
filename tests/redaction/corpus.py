"""Shared test data: PII and secrets that must never leave, and look-alikes that must stay readable."""

from __future__ import annotations

#: (detector, secret) — every one of these must be gone after redaction.
PII: list[tuple[str, str]] = [
    ("email", "jane.doe@example.com"),
    ("email", "bob+ml_team@sub.example.co.uk"),
    ("email", "jane.doe%40example.com"),  # percent-encoded, as in a URL query string
    ("payment_card", "4111 1111 1111 1111"),
    ("payment_card", "5500-0000-0000-0004"),
    ("payment_card", "378282246310005"),
    ("payment_card", "6011111111111117"),
    ("payment_card", "3714 496353 98431"),
    ("us_ssn", "123-45-6789"),
    ("phone", "(555) 123-4567"),
    ("phone", "555-867-5309"),
    ("phone", "+1 415 555 0132"),
    ("phone", "+44 20 7946 0958"),
    ("phone", "+4915112345678"),
    ("ipv4", "192.168.10.23"),
    ("ipv4", "8.8.4.4"),
    ("ipv6", "2001:db8:85a3::8a2e:370:7334"),
    ("ipv6", "fe80::1ff:fe23:4567:890a"),
    ("jwt", "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4ifQ"
            ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"),
    ("bearer_token", "Bearer abc123def456ghi789"),
    ("api_key", "sk-proj-4f8a9b2c1d3e5f6a7b8c9d0e"),
    ("api_key", "AKIAIOSFODNN7EXAMPLE"),
    ("api_key", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
    ("api_key", "xoxb-123456789012-abcdefghijkl"),
    ("iban", "DE89 3704 0044 0532 0130 00"),
    ("iban", "GB82WEST12345698765432"),
]

#: The part of each secret that must not survive (a bearer token's prefix is fine to keep).
def secret_core(secret: str) -> str:
    return secret.split(" ", 1)[1] if secret.startswith("Bearer ") else secret


#: Text around the secret that must survive.
PREFIX = "classify the photo sent by"
SUFFIX = "please, thanks"


def sentence(secret: str) -> str:
    return f"{PREFIX} {secret} {SUFFIX}"


#: Strings that look like PII but are not; detectors must leave them exactly as they are.
LOOKALIKES: list[str] = [
    "order 4111111111111112",            # 16 digits failing Luhn
    "order 1234-5678-9012-3456",         # grouped, failing Luhn
    "ts 1712345678901234567",            # nanosecond timestamp (issuer prefix 1)
    "version 2.13.0",                    # semver
    "torch 2.13.0+cpu build 20240115.3",  # build strings
    "release 10.0.19041",
    "at 2024-01-15T10:30:00.123Z",       # timestamps
    "2024-01-15 10:30:00,123 INFO ready",
    "took 10:30:00",
    "request 123e4567-e89b-12d3-a456-426614174000",  # UUID
    "trace 4bf92f3577b34da6a3ce929d0e0e4736",  # hex trace id
    "span 00f067aa0ba902b7",             # hex span id
    "loss 3.14159 lr 0.0003 eps 1e-08 -0.5",  # floats
    "offset +05:00",
    "bearer authentication is required",  # prose, not a token
    "std::vector<int> ns::fn dead::beef",  # C++ scopes, not IPv6
    "gen_ai.usage.input_tokens",
    "see v1.2.3.4 and 1.2.3.4.5",        # version-ish dotted runs glued to other text
    "sku DE-123 room 555-12",
    "ID 987-65-43210",                   # not an SSN shape
]
