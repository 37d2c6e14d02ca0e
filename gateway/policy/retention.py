"""The retention policy: how long each kind of message is kept, and what is on hold. Pure.

A message's retention follows from its tags under the policy in force, so an
edit of policies/retention.yaml changes the expiry of mail already stored
(``mailflowr-gateway retention preview`` shows the effect before a reload):

1. Each tag of the message that has a ``keep`` gives a duration; a tenant's
   ``keep`` override replaces the tag's own.
2. If any of those tags is marked ``max: true``, the shortest of the max tags
   decides: such a tag is a ceiling (e.g. ``sensitive: {keep: 90d, max: true}``
   caps mail that is also tagged ``invoice``).
3. Otherwise the longest duration decides.
4. A message with no tag that has a duration is kept for the tenant's
   ``default``, else the policy's ``default``.

Legal holds block deletion: a hold names a tenant, an address, a tag, or a
combination (all given must match), with a reason and an optional last day.
A message carrying a tag the policy does not define is never deleted: a tag
removed by mistake must not turn into a shorter retention.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from gateway.clock import add_months
from gateway.policy.classify import CATEGORIES, Classifier
from gateway.yamlfile import Checker, KeyPath, YamlDocument

TAG_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_DURATION = re.compile(r"^\s*(\d{1,5})\s*(d|w|mo|y)\s*$")


@dataclass(frozen=True, slots=True)
class Duration:
    """A retention period in days, or in calendar months (years are 12 months)."""

    days: int = 0
    months: int = 0

    @classmethod
    def parse(cls, text: Any) -> Duration:
        """``30d``, ``6w``, ``18mo``, ``7y``; ValueError says what is accepted."""
        if isinstance(text, bool) or not isinstance(text, str | int):
            raise ValueError(f"expected a duration such as 30d, 6w, 18mo or 7y, got {text!r}")
        value = str(text)
        if re.fullmatch(r"\s*\d+\s*m\s*", value):
            raise ValueError(f"{value.strip()!r} is ambiguous: write months as 'mo' "
                             "(e.g. 6mo) or use days")
        m = _DURATION.match(value)
        if not m:
            raise ValueError(f"expected a duration such as 30d, 6w, 18mo or 7y, got {text!r}")
        n, unit = int(m.group(1)), m.group(2)
        if n == 0:
            raise ValueError("a retention of 0 would delete mail as it arrives")
        if unit == "d":
            return cls(days=n)
        if unit == "w":
            return cls(days=7 * n)
        return cls(months=n if unit == "mo" else 12 * n)

    @property
    def approx_days(self) -> float:
        """For comparing periods: a month counts as 30.44 days."""
        return self.days + self.months * 30.436875

    def after(self, start: datetime) -> datetime:
        """When something started at ``start`` expires."""
        return add_months(start, self.months) + timedelta(days=self.days)

    def before(self, end: datetime) -> datetime:
        """The cutoff: whatever started before it has expired by ``end``."""
        return add_months(end - timedelta(days=self.days), -self.months)

    def __str__(self) -> str:
        if self.months:
            return f"{self.months // 12}y" if self.months % 12 == 0 else f"{self.months}mo"
        return f"{self.days // 7}w" if self.days % 7 == 0 and self.days >= 7 else f"{self.days}d"


@dataclass(frozen=True, slots=True)
class Tag:
    name: str
    keep: Duration | None = None
    cap: bool = False  # `max: true`: a ceiling that wins over longer tags
    description: str = ""


@dataclass(frozen=True, slots=True)
class Hold:
    """A legal hold: matching messages are not deleted while it is active."""

    name: str
    reason: str
    tenant: str | None = None
    address: str | None = None
    tag: str | None = None
    until: date | None = None  # the last day it holds; None: until removed

    def active(self, now: datetime) -> bool:
        return self.until is None or now.date() <= self.until

    def covers(self, tenant: str, tags: Collection[str]) -> bool:
        """Whether the hold applies to a message of ``tenant`` with ``tags``,
        leaving its address (if any) to be checked against the message."""
        return ((self.tenant is None or self.tenant == tenant)
                and (self.tag is None or self.tag in tags))


@dataclass(frozen=True, slots=True)
class TenantRetention:
    default: Duration | None = None
    keep: dict[str, Duration] = field(default_factory=dict)  # per-tag overrides
    tags: tuple[str, ...] = ()  # set on every message of the tenant
    classify: bool = True


@dataclass(frozen=True, slots=True)
class Decision:
    keep: Duration
    rule: str  # which rule decided, for `messages show` and the preview

    def expires(self, received_at: datetime) -> datetime:
        return self.keep.after(received_at)


@dataclass(frozen=True, slots=True)
class Standing:
    """Where a stored message stands: the rule that keeps it, when it expires (None:
    not decided, or kept), the legal holds on it."""

    rule: str
    expires_at: datetime | None
    held_by: list[str]


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    default: Duration = Duration(months=12)
    tags: dict[str, Tag] = field(default_factory=dict)
    tenants: dict[str, TenantRetention] = field(default_factory=dict)
    holds: tuple[Hold, ...] = ()
    detect: dict[str, str] = field(default_factory=dict)  # classifier category -> tag
    classifier: Classifier = field(default_factory=lambda: Classifier(categories=frozenset()))

    def decide(self, tenant: str, tags: Iterable[str]) -> Decision:
        """How long a message of ``tenant`` carrying ``tags`` is kept, and why."""
        overrides = self.tenants.get(tenant, TenantRetention())
        periods: list[tuple[str, Duration, bool]] = []
        for name in dict.fromkeys(tags):
            tag = self.tags.get(name)
            keep = overrides.keep.get(name) or (tag.keep if tag else None)
            if tag is not None and keep is not None:
                periods.append((name, keep, tag.cap))
        caps = [p for p in periods if p[2]]
        if caps:
            name, keep, _ = min(caps, key=lambda p: p[1].approx_days)
            return Decision(keep, f"tag {name} ({keep}, max)")
        if periods:
            name, keep, _ = max(periods, key=lambda p: p[1].approx_days)
            others = [p[0] for p in periods if p[0] != name]
            longest = f", longest of {', '.join([name, *others])}" if others else ""
            return Decision(keep, f"tag {name} ({keep}{longest})")
        if overrides.default is not None:
            return Decision(overrides.default, f"default of tenant {tenant} ({overrides.default})")
        return Decision(self.default, f"default ({self.default})")

    def standing(self, tenant: str, tags: Collection[str], addresses: Collection[str],
                 received_at: datetime, processed: bool, now: datetime) -> Standing:
        """Where a stored message of ``tenant`` stands under this policy (``addresses``
        in lower case; a message not ``processed`` yet has no rule decided)."""
        held = self.held_by(tenant, tags, addresses, now)
        if not processed:
            return Standing("decided once the message is processed", None, held)
        unknown = self.unknown_tags(tags)
        if unknown:
            return Standing(f"kept: tag {', '.join(unknown)} is not in the retention policy",
                            None, held)
        decision = self.decide(tenant, tags)
        return Standing(decision.rule, decision.expires(received_at), held)

    def unknown_tags(self, tags: Iterable[str]) -> list[str]:
        return [t for t in tags if t not in self.tags]

    def active_holds(self, now: datetime) -> list[Hold]:
        return [h for h in self.holds if h.active(now)]

    def held_by(self, tenant: str, tags: Collection[str], addresses: Collection[str],
                now: datetime) -> list[str]:
        """The names of the active holds that cover a message of ``tenant`` with
        ``tags`` and ``addresses`` (in lower case)."""
        return [h.name for h in self.active_holds(now)
                if h.covers(tenant, tags) and (h.address is None or h.address in addresses)]

    def tags_for(self, tenant: str, findings: Iterable[str]) -> tuple[str, ...]:
        """The tags a tenant's defaults and the classifier's findings add to a message."""
        t = self.tenants.get(tenant, TenantRetention())
        found = [self.detect[f] for f in findings if f in self.detect] if t.classify else []
        return tuple(dict.fromkeys((*t.tags, *found)))

    def classifier_for(self, tenant: str) -> Classifier | None:
        """What the parser should look for in this tenant's mail (None: nothing)."""
        t = self.tenants.get(tenant, TenantRetention())
        return self.classifier if t.classify and self.classifier.categories else None


# ------------------------------------------------------------------ the file
_TOP_KEYS = {"default", "tags", "tenants", "holds", "classifier"}
_TAG_KEYS = {"keep", "max", "description"}
_TENANT_KEYS = {"default", "keep", "tags", "classify"}
_HOLD_KEYS = {"name", "reason", "tenant", "address", "tag", "until"}
_CLASSIFIER_KEYS = {"detect", "health_keywords", "bsn_needs_context"}


class _RetentionChecker(Checker):
    def __init__(self, doc: YamlDocument, tenants: Collection[str]) -> None:
        super().__init__(doc)
        self.tenants = tenants
        self.tag_names: set[str] = set()

    def duration(self, value: Any, path: KeyPath) -> Duration | None:
        try:
            return Duration.parse(value)
        except ValueError as exc:
            self.problem(path, str(exc))
            return None

    def known_tag(self, name: Any, path: KeyPath) -> str | None:
        if not isinstance(name, str) or name not in self.tag_names:
            self.problem(path, f"unknown tag {name!r} (define it under tags:)")
            return None
        return name

    def known_tenant(self, name: Any, path: KeyPath) -> str | None:
        if not isinstance(name, str) or name not in self.tenants:
            self.problem(path, f"unknown tenant {name!r} (not in the gateway configuration)")
            return None
        return name

    def policy(self) -> RetentionPolicy:
        data = self.doc.data if self.doc.data is not None else {}
        top = self.mapping(data, (), _TOP_KEYS, "the file")
        if top is None:
            return RetentionPolicy()
        tags = self._tags(top.get("tags", {}) or {})
        default = Duration(months=12)
        if "default" not in top:
            self.problem((), "default is required: how long untagged mail is kept (e.g. 1y)")
        else:
            default = self.duration(top["default"], ("default",)) or default
        detect, classifier = self._classifier(top.get("classifier"))
        return RetentionPolicy(
            default=default, tags=tags, tenants=self._tenants(top.get("tenants", {}) or {}),
            holds=self._holds(top.get("holds", []) or []), detect=detect, classifier=classifier,
        )

    def _tags(self, spec: Any) -> dict[str, Tag]:
        if not isinstance(spec, dict):
            self.problem(("tags",), "tags must be a mapping of tag name to {keep: DURATION}")
            return {}
        self.tag_names = {str(n) for n in spec}
        tags = {}
        for name, tspec in spec.items():
            path: KeyPath = ("tags", str(name))
            if not isinstance(name, str) or not TAG_NAME.match(name):
                self.problem(path, f"not a tag name: {name!r} (lower-case letters, digits, "
                             "- and _)")
                continue
            if tspec is None:
                tspec = {}
            if isinstance(tspec, str):  # `invoice: 7y` is short for `invoice: {keep: 7y}`
                tspec = {"keep": tspec}
            t = self.mapping(tspec, path, _TAG_KEYS, f"tag {name}")
            if t is None:
                continue
            keep = self.duration(t["keep"], (*path, "keep")) if "keep" in t else None
            cap = self.boolean(t, "max", path, False)
            if cap and keep is None:
                self.problem((*path, "max"), "max needs a keep duration to cap with")
            description = t.get("description", "")
            if not isinstance(description, str):
                self.problem((*path, "description"), "description must be text")
                description = ""
            tags[name] = Tag(name, keep, cap, description)
        return tags

    def _tenants(self, spec: Any) -> dict[str, TenantRetention]:
        if not isinstance(spec, dict):
            self.problem(("tenants",), "tenants must be a mapping of tenant id to settings")
            return {}
        result = {}
        for tid, tspec in spec.items():
            path: KeyPath = ("tenants", str(tid))
            if self.known_tenant(tid, path) is None:
                continue
            t = self.mapping(tspec, path, _TENANT_KEYS, f"tenant {tid}")
            if t is None:
                continue
            default = self.duration(t["default"], (*path, "default")) if "default" in t else None
            keep: dict[str, Duration] = {}
            kspec = t.get("keep", {}) or {}
            if not isinstance(kspec, dict):
                self.problem((*path, "keep"), "keep must be a mapping of tag to duration")
                kspec = {}
            for tag, value in kspec.items():
                kpath: KeyPath = (*path, "keep", str(tag))
                d = self.duration(value, kpath)
                if self.known_tag(tag, kpath) and d is not None:
                    keep[tag] = d
            defaults = self.string_list(t.get("tags", []), (*path, "tags"), "tags")
            for i, tag in enumerate(defaults):
                self.known_tag(tag, (*path, "tags", i))
            result[str(tid)] = TenantRetention(
                default, keep, tuple(defaults), self.boolean(t, "classify", path, True))
        return result

    def _holds(self, spec: Any) -> tuple[Hold, ...]:
        if not isinstance(spec, list):
            self.problem(("holds",), "holds must be a list")
            return ()
        holds = []
        names: set[str] = set()
        for i, hspec in enumerate(spec):
            path: KeyPath = ("holds", i)
            h = self.mapping(hspec, path, _HOLD_KEYS, "a hold")
            if h is None:
                continue
            name, reason = h.get("name"), h.get("reason")
            if not isinstance(name, str) or not name.strip():
                self.problem(path, "every hold needs a name")
                continue
            if name in names:
                self.problem((*path, "name"), f"duplicate hold name {name!r}")
            names.add(name)
            if not isinstance(reason, str) or not reason.strip():
                self.problem(path, f"hold {name!r} needs a reason")
            if not any(k in h for k in ("tenant", "address", "tag")):
                self.problem(path, f"hold {name!r} must name a tenant, an address or a tag")
                continue
            tenant = h.get("tenant")
            if tenant is not None and self.known_tenant(tenant, (*path, "tenant")) is None:
                continue
            tag = h.get("tag")
            if tag is not None and self.known_tag(tag, (*path, "tag")) is None:
                continue
            address = h.get("address")
            if address is not None and self.address(address, (*path, "address")) is None:
                continue
            until = h.get("until")
            if until is not None and self.date(until, (*path, "until"), "until") is None:
                continue
            holds.append(Hold(name, str(reason or ""), tenant,
                              address.lower() if address else None, tag, until))
        return tuple(holds)

    def _classifier(self, spec: Any) -> tuple[dict[str, str], Classifier]:
        off = Classifier(categories=frozenset())
        if spec is None:
            return {}, off
        path: KeyPath = ("classifier",)
        c = self.mapping(spec, path, _CLASSIFIER_KEYS, "classifier")
        if c is None:
            return {}, off
        detect: dict[str, str] = {}
        dspec = c.get("detect", {}) or {}
        if not isinstance(dspec, dict):
            self.problem((*path, "detect"), "detect must be a mapping of category to tag "
                         f"(categories: {', '.join(CATEGORIES)})")
            dspec = {}
        for category, tag in dspec.items():
            dpath: KeyPath = (*path, "detect", str(category))
            if category not in CATEGORIES:
                self.problem(dpath, f"unknown category {category!r} "
                             f"(known: {', '.join(CATEGORIES)})")
            elif self.known_tag(tag, dpath):
                detect[category] = tag
        keywords = self.string_list(c.get("health_keywords", []), (*path, "health_keywords"),
                                    "health_keywords")
        if "health" in detect and not keywords:
            self.problem((*path, "detect", "health"), "health needs health_keywords")
        for i, k in enumerate(keywords):
            if not k.strip() or len(k) > 100:
                self.problem((*path, "health_keywords", i), f"not a keyword: {k!r}")
        return detect, Classifier(
            categories=frozenset(detect), health_keywords=tuple(k.strip() for k in keywords),
            bsn_needs_context=self.boolean(c, "bsn_needs_context", path, True),
        )


def check(doc: YamlDocument, tenants: Collection[str]) -> tuple[RetentionPolicy, list[str]]:
    """Validate a parsed retention.yaml; the policy, and every problem found."""
    checker = _RetentionChecker(doc, tenants)
    policy = checker.policy()
    return policy, checker.problems
