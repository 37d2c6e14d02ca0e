"""Workflow rules: match a message, plan copies, routes and tags. Pure, no I/O.

A tenant's rules are an ordered list.  Every rule whose ``match`` holds
contributes its actions, in order, until a rule says ``stop`` (then no later
rule is looked at) or ends the message with ``reject`` or ``discard``.  The
outcome is a ``Plan``: the Cc and Bcc copy targets (each address once), the
destinations to route to, whether to keep the original, the tags to set, and
why each rule matched, for ``mailflowr-gateway rules test``.

Copies come only from rules: nothing in a message's headers adds a target.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

INBOUND = "inbound"
OUTBOUND = "outbound"


@dataclass(frozen=True, slots=True)
class MessageView:
    """What rules may look at: envelope, headers, attachments, size, tags."""

    direction: str
    sender: str
    recipients: tuple[str, ...]
    headers: tuple[tuple[str, str], ...] = ()  # (lower-case name, decoded value)
    attachments: tuple[tuple[str, str], ...] = ()  # (filename, content type)
    size: int = 0
    tags: frozenset[str] = frozenset()
    auth: tuple[tuple[str, str], ...] = ()  # (method, result), e.g. ("dkim", "pass")

    def header_values(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]


@dataclass(frozen=True, slots=True)
class Pattern:
    """A text test: glob (default), exact or regex; case-insensitive unless asked."""

    kind: str  # glob | exact | regex
    text: str
    case_sensitive: bool = False
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def make(cls, kind: str, text: str, case_sensitive: bool = False) -> Pattern:
        flags = 0 if case_sensitive else re.IGNORECASE
        if kind == "regex":
            compiled = re.compile(text, flags)  # re.error is reported by the loader
        elif kind == "glob":
            compiled = re.compile(fnmatch.translate(text), flags)
        else:
            compiled = None
        return cls(kind, text, case_sensitive, compiled)

    def matches(self, value: str) -> bool:
        if self.kind == "exact":
            return value == self.text if self.case_sensitive else value.lower() == self.text.lower()
        assert self._regex is not None
        if self.kind == "regex":
            return self._regex.search(value) is not None
        return self._regex.match(value) is not None

    def __str__(self) -> str:
        return f"{self.kind} {self.text!r}"


class Condition:
    """One test on a message; ``check`` returns why it holds, or None."""

    @property
    def needs_body(self) -> bool:
        """True when the test needs the parsed MIME body (attachments), known only
        after the message is stored; tests without it can run at end of DATA."""
        return False

    def check(self, msg: MessageView) -> str | None:
        raise NotImplementedError


@dataclass(frozen=True)
class Direction(Condition):
    direction: str

    def check(self, msg: MessageView) -> str | None:
        return f"direction is {self.direction}" if msg.direction == self.direction else None


@dataclass(frozen=True)
class AddressTest(Condition):
    """Envelope sender, or any envelope recipient."""

    field: str  # sender | recipient
    pattern: Pattern

    def check(self, msg: MessageView) -> str | None:
        values = [msg.sender] if self.field == "sender" else list(msg.recipients)
        for v in values:
            if self.pattern.matches(v):
                return f"{self.field} {v!r} matches {self.pattern}"
        return None


@dataclass(frozen=True)
class HeaderTest(Condition):
    name: str
    pattern: Pattern

    def check(self, msg: MessageView) -> str | None:
        for v in msg.header_values(self.name):
            if self.pattern.matches(v):
                return f"header {self.name} {v[:80]!r} matches {self.pattern}"
        return None


@dataclass(frozen=True)
class HasAttachments(Condition):
    wanted: bool

    @property
    def needs_body(self) -> bool:
        return True

    def check(self, msg: MessageView) -> str | None:
        if bool(msg.attachments) == self.wanted:
            return f"has {len(msg.attachments)} attachments"
        return None


@dataclass(frozen=True)
class AttachmentTest(Condition):
    field: str  # type | name
    pattern: Pattern

    @property
    def needs_body(self) -> bool:
        return True

    def check(self, msg: MessageView) -> str | None:
        for filename, content_type in msg.attachments:
            value = content_type if self.field == "type" else filename
            if value and self.pattern.matches(value):
                return f"attachment {self.field} {value!r} matches {self.pattern}"
        return None


@dataclass(frozen=True)
class SizeTest(Condition):
    over: int | None
    under: int | None

    def check(self, msg: MessageView) -> str | None:
        if self.over is not None and not msg.size > self.over:
            return None
        if self.under is not None and not msg.size < self.under:
            return None
        return f"size {msg.size} is within bounds"


@dataclass(frozen=True)
class TagTest(Condition):
    tags: frozenset[str]

    def check(self, msg: MessageView) -> str | None:
        hit = sorted(self.tags & msg.tags)
        return f"tagged {', '.join(hit)}" if hit else None


@dataclass(frozen=True)
class AuthTest(Condition):
    """Authentication results (dkim/spf/dmarc); a message without them never matches."""

    method: str
    results: frozenset[str]

    def check(self, msg: MessageView) -> str | None:
        for method, result in msg.auth:
            if method == self.method and result.lower() in self.results:
                return f"{self.method} is {result.lower()}"
        return None


@dataclass(frozen=True)
class All(Condition):
    parts: tuple[Condition, ...]

    @property
    def needs_body(self) -> bool:
        return any(p.needs_body for p in self.parts)

    def check(self, msg: MessageView) -> str | None:
        reasons = []
        for part in self.parts:
            why = part.check(msg)
            if why is None:
                return None
            reasons.append(why)
        return " and ".join(reasons) if reasons else "always"


@dataclass(frozen=True)
class Any_(Condition):
    parts: tuple[Condition, ...]

    @property
    def needs_body(self) -> bool:
        return any(p.needs_body for p in self.parts)

    def check(self, msg: MessageView) -> str | None:
        for part in self.parts:
            why = part.check(msg)
            if why is not None:
                return why
        return None


@dataclass(frozen=True)
class Not(Condition):
    part: Condition

    @property
    def needs_body(self) -> bool:
        return self.part.needs_body

    def check(self, msg: MessageView) -> str | None:
        return f"not {type(self.part).__name__}" if self.part.check(msg) is None else None


@dataclass(frozen=True)
class Actions:
    cc: tuple[str, ...] = ()
    bcc: tuple[str, ...] = ()
    route: str | None = None
    tag: tuple[str, ...] = ()
    reject: str | None = None
    discard: bool = False
    stop: bool = False
    keep_original: bool = False  # keep the original on the tenant's own server


@dataclass(frozen=True)
class Rule:
    name: str
    match: Condition
    actions: Actions
    line: int = 0


@dataclass
class Plan:
    """What the rules decided for one message."""

    cc: list[str] = field(default_factory=list)
    bcc: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    reject: str | None = None
    discard: bool = False
    matched: list[tuple[str, str]] = field(default_factory=list)  # (rule name, why)
    stopped_by: str | None = None
    origin: dict[str, str] = field(default_factory=dict)  # copy address or route -> rule name
    keep_original: str | None = None  # the first rule that asked to keep the original
    partial: bool = False  # evaluated before the body: rules past one that needs it not run

    @property
    def ended(self) -> bool:
        return self.reject is not None or self.discard


def _add_once(plan: Plan, target: list[str], values: Sequence[str], seen: set[str],
              rule: str) -> None:
    for v in values:
        key = v.lower()
        if key not in seen:
            seen.add(key)
            target.append(v)
            plan.origin[v] = rule


def evaluate(rules: Sequence[Rule], msg: MessageView,
             on_match: Callable[[Rule], None] | None = None, *,
             before_body: bool = False) -> Plan:
    """Run ``rules`` over ``msg`` in order; see the module docstring for the semantics.

    With ``before_body`` (the end of DATA, before the message is stored: envelope
    and headers only) the walk ends at the first rule that needs the MIME body,
    and the plan is marked ``partial``: what follows is decided after storage.
    """
    plan = Plan()
    seen: set[str] = set()  # every copy target once, Cc winning over a later Bcc
    tags = set(msg.tags)
    view = msg
    for rule in rules:
        if before_body and rule.match.needs_body:
            plan.partial = True
            break
        why = rule.match.check(view)
        if why is None:
            continue
        plan.matched.append((rule.name, why))
        if on_match is not None:
            on_match(rule)
        a = rule.actions
        _add_once(plan, plan.cc, a.cc, seen, rule.name)
        _add_once(plan, plan.bcc, a.bcc, seen, rule.name)
        if a.route and a.route not in plan.routes:
            plan.routes.append(a.route)
            plan.origin[a.route] = rule.name
        if a.keep_original and plan.keep_original is None:
            plan.keep_original = rule.name
        for t in a.tag:
            if t not in tags:
                tags.add(t)
                plan.tags.append(t)
        if plan.tags:  # later rules see the tags earlier rules set
            view = dataclasses.replace(msg, tags=frozenset(tags))
        if a.reject is not None:
            plan.reject = a.reject
            plan.stopped_by = rule.name
            break
        if a.discard:
            plan.discard = True
            plan.stopped_by = rule.name
            break
        if a.stop:
            plan.stopped_by = rule.name
            break
    return plan


def can_reject_early(rules: Sequence[Rule]) -> bool:
    """Whether any reject rule comes before the first rule that needs the body: only
    then can ``evaluate(..., before_body=True)`` reject, so only then is it worth a
    headers-only parse at the end of DATA."""
    for rule in rules:
        if rule.match.needs_body:
            return False
        if rule.actions.reject is not None:
            return True
    return False
