"""The attribute contract is spelled once: in contract.attributes, imported by both sides."""

from __future__ import annotations

import ast
from pathlib import Path

from contract import attributes

ROOT = Path(__file__).resolve().parents[2]


def _literals(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, (str, bytes)):
            value = node.value.decode("utf-8", "replace") if isinstance(node.value, bytes) else node.value
            yield node.lineno, value


def test_no_module_spells_a_contract_name_as_a_literal():
    found = []
    for package in ("instrumentation", "sidecar", "redaction"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for line, value in _literals(path):
                if value in attributes.ALL:
                    found.append(f"{path.relative_to(ROOT)}:{line}: {value!r}")
    assert found == [], "use the constant from contract.attributes:\n" + "\n".join(found)


def test_the_contract_lists_the_names_both_sides_rely_on():
    for name in ("request.id", "user.id", "sampling.force_keep", "sampling.policy", "ml.model.id",
                 "ml.model.version", "gen_ai.request.model", "service.name", "tag."):
        assert name in attributes.ALL
    constants = [k for k in vars(attributes) if k.isupper() and k not in ("ALL", "INTENT_TAG")]
    assert len(attributes.ALL) == len(constants), "two constants spell the same name"
