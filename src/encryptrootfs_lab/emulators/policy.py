"""A small evaluator of KMS key-policy statements, for the emulator and the example tests.

moto does not evaluate key policies (shared/reference/kms-emulation.md). This evaluates the
part encryptrootfs relies on: Allow/Deny statements, ``Action`` with ``*`` wildcards, the
``Principal`` ``AWS`` ARNs, and the condition operators the examples use (``StringEquals``,
``StringLike``, ``Null``, ``ForAllValues:StringEquals``, ``ForAnyValue:StringEquals``, and the
``...IfExists`` forms) with policy variables such as ``${ec2:SourceInstanceARN}``. An operator
it does not know is an error, never a silent "allowed": a test then says what to add.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

RequestValue = Union[str, Sequence[str]]
_VARIABLE = re.compile(r"\$\{([A-Za-z0-9:_/-]+)\}")


class PolicyError(ValueError):
    """The policy uses something this evaluator does not know."""


@dataclass(frozen=True)
class KmsRequestFacts:
    """What a KMS request looks like to a key policy."""

    action: str  # e.g. "kms:Decrypt"
    principal: str  # the role ARN, arn:aws:iam::<account>:role/<name>
    encryption_context: Mapping[str, str] = field(default_factory=dict)
    # Other condition keys of the request, e.g. {"ec2:SourceInstanceARN": "arn:aws:ec2:..."}
    keys: Mapping[str, str] = field(default_factory=dict)

    def condition_keys(self) -> dict[str, RequestValue]:
        values: dict[str, RequestValue] = dict(self.keys)
        values["kms:EncryptionContextKeys"] = sorted(self.encryption_context)
        for name, value in self.encryption_context.items():
            values[f"kms:EncryptionContext:{name}"] = value
        return values


def allows(policy: Mapping[str, Any], request: KmsRequestFacts) -> bool:
    """True when an Allow statement matches ``request`` and no Deny statement does."""
    allowed = False
    for statement in _statements(policy):
        if not _matches(statement, request):
            continue
        if statement.get("Effect") == "Deny":
            return False
        if statement.get("Effect") == "Allow":
            allowed = True
    return allowed


def _statements(policy: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    statements = policy.get("Statement", [])
    if isinstance(statements, Mapping):
        return [statements]
    if not isinstance(statements, list):
        raise PolicyError("Statement must be an object or a list")
    return statements


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _matches(statement: Mapping[str, Any], request: KmsRequestFacts) -> bool:
    actions = _as_list(statement.get("Action", []))
    if not any(fnmatch.fnmatchcase(request.action.lower(), a.lower()) for a in actions):
        return False
    principal = statement.get("Principal")
    if principal is not None and principal != "*":
        arns = _as_list(principal.get("AWS", [])) if isinstance(principal, Mapping) else []
        if request.principal not in arns and "*" not in arns:
            return False
    conditions = statement.get("Condition", {})
    keys = request.condition_keys()
    return all(_condition(op, tests, keys) for op, tests in conditions.items())


def _substitute(text: str, keys: Mapping[str, RequestValue]) -> str:
    def value(match: re.Match[str]) -> str:
        got = keys.get(match.group(1))
        if not isinstance(got, str):
            # An unresolved variable matches nothing (AWS: the condition is false).
            return "\x00unresolved\x00"
        return got

    return _VARIABLE.sub(value, text)


def _condition(
    operator: str,
    tests: Mapping[str, Any],
    keys: Mapping[str, RequestValue],
) -> bool:
    if_exists = operator.endswith("IfExists")
    base = operator[: -len("IfExists")] if if_exists else operator
    qualifier, _, name = base.rpartition(":")
    for key, wanted in tests.items():
        patterns = [_substitute(str(w), keys) for w in _as_list(wanted)]
        got = keys.get(key)
        if name == "Null":
            want_null = str(wanted).lower() == "true"
            if (got is None) != want_null:
                return False
            continue
        if name not in ("StringEquals", "StringLike"):
            raise PolicyError(f"condition operator {operator} is not supported")
        like = name == "StringLike"

        def one(value: str, like: bool = like, patterns: list[str] = patterns) -> bool:
            if like:
                return any(fnmatch.fnmatchcase(value, p) for p in patterns)
            return value in patterns

        if qualifier == "ForAllValues":
            values = _as_list(got) if got is not None else []
            if not all(one(v) for v in values):
                return False
        elif qualifier == "ForAnyValue":
            values = _as_list(got) if got is not None else []
            if not any(one(v) for v in values):
                return False
        elif qualifier:
            raise PolicyError(f"condition qualifier {qualifier} is not supported")
        else:
            if got is None:
                if if_exists:
                    continue
                return False
            if not isinstance(got, str) or not one(got):
                return False
    return True
