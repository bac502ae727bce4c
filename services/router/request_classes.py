"""Request classes: configured rules map a request to its task class.

A task class is a label such as ``code`` or ``vision`` (nothing to do with
the gateway's background tasks); failures are classified elsewhere, in
:mod:`runyard.router.failures`.

Rules (``[[classifier.rules]]``, see :class:`~runyard.common.config.ClassifierRule`)
are tried in order and the first whose every condition holds names the class;
``classifier.default_class`` applies otherwise. The text examined is the new
user turn of the run (``RunPayload.input.text``, else the last user message);
attachments are those of the run input and of that message. An agent maps
classes to models with ``task_models``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from runyard._proto.v1 import common_pb2
from runyard.common.config import ClassifierConfig, ClassifierRule

__all__ = ["ClassMatch", "RequestClassifier", "looks_like_code"]

_FENCE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)
_CODE_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |#include|function |const |let |var |public |private |package "
    r"|fn |func |SELECT |INSERT |UPDATE |CREATE |return\b|if \(|for \(|while \(|@\w+|<\?php|#!/)"
    r"|[;{}]\s*$|^\s*\}",
    re.MULTILINE,
)


def looks_like_code(text: str) -> bool:
    """True for fenced code blocks or at least two code-looking lines
    (keywords such as ``def``/``import``/``function``, or lines ending in
    ``;``, ``{`` or ``}``)."""
    if _FENCE.search(text):
        return True
    return len(_CODE_LINE.findall(text)) >= 2


@dataclass(frozen=True, slots=True)
class ClassMatch:
    """The class chosen and why: ``rule`` is ``"rule <n>"`` (1-based),
    ``"default"`` or ``""`` when no class applies."""

    task_class: str
    rule: str


class _Compiled:
    def __init__(self, rule: ClassifierRule):
        self.rule = rule
        self.keywords = (
            re.compile(
                r"(?<!\w)(" + "|".join(re.escape(k.strip()) for k in rule.keywords if k.strip()) + r")(?!\w)",
                re.IGNORECASE,
            )
            if any(k.strip() for k in rule.keywords)
            else None
        )
        self.regex = re.compile(rule.regex) if rule.regex else None

    def matches(self, text: str, attachments: int, code: bool | None) -> tuple[bool, bool | None]:
        rule = self.rule
        if rule.min_chars and len(text) < rule.min_chars:
            return False, code
        if rule.max_chars and len(text) > rule.max_chars:
            return False, code
        if rule.has_attachments is not None and (attachments > 0) != rule.has_attachments:
            return False, code
        if self.keywords is not None and not self.keywords.search(text):
            return False, code
        if self.regex is not None and not self.regex.search(text):
            return False, code
        if rule.has_code is not None:
            if code is None:
                code = looks_like_code(text)
            if code != rule.has_code:
                return False, code
        return True, code


class RequestClassifier:
    """Applies ``config`` (the ``[classifier]`` section)."""

    def __init__(self, config: ClassifierConfig):
        self.config = config
        self._rules = [_Compiled(rule) for rule in config.rules]

    def classify_text(self, text: str, attachments: int = 0) -> ClassMatch:
        """The class of ``text`` with ``attachments`` attachments."""
        code: bool | None = None
        for index, compiled in enumerate(self._rules, start=1):
            matched, code = compiled.matches(text, attachments, code)
            if matched:
                return ClassMatch(compiled.rule.task_class, f"rule {index}")
        if self.config.default_class:
            return ClassMatch(self.config.default_class, "default")
        return ClassMatch("", "")

    def classify(self, run: common_pb2.RunPayload, messages: Sequence[common_pb2.Message]) -> ClassMatch:
        """The class of ``run``'s new user turn (see the module docstring)."""
        if not self._rules and not self.config.default_class:
            return ClassMatch("", "")
        last_user = next((m for m in reversed(messages) if m.role == common_pb2.ROLE_USER), None)
        text = run.input.text or (last_user.content if last_user is not None else "")
        attachments = len(run.input.attachments) + (
            len(last_user.attachments) if last_user is not None else 0
        )
        return self.classify_text(text, attachments)
