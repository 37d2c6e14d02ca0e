"""The subprocessor policy: who may handle whose mail, and which relay a delivery takes. Pure.

policies/subprocessors.yaml holds the registry (name, purpose, legal entity,
country and region, data categories, date added, and for outbound relays how
to reach them), each tenant's authorisation (a list, or ``all`` for a general
written authorisation), regions and recorded objections, and ordered routing
rules.  For a delivery, the first routing rule whose match holds names the
relays to try, in order; of those, only the ones the tenant may use are
kept: authorised, not objected to, inside every region constraint, and past
the objection window when they were added after the tenant's agreement.
None left: the delivery is held with the reason, never sent elsewhere.

Deliveries to a tenant's own servers (``route`` to a configured destination)
do not pass through a subprocessor and are not routed here.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Literal

from gateway.records import ConsentRows
from gateway.yamlfile import Checker, KeyPath, YamlDocument

HELD_PREFIX = "no authorised subprocessor"  # the start of every hold reason from routing
PURPOSES = ("outbound-relay", "archive", "scanning", "other")
KINDS = ("cc", "bcc", "rcpt", "return")  # deliveries that leave through a relay
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
_COUNTRY = re.compile(r"^[A-Z]{2}$")


@dataclass(frozen=True, slots=True)
class Relay:
    host: str
    port: int = 25
    tls: Literal["none", "opportunistic", "required"] = "opportunistic"


@dataclass(frozen=True, slots=True)
class Subprocessor:
    name: str
    purpose: str
    entity: str
    country: str
    region: str
    data_categories: tuple[str, ...]
    added: date
    relay: Relay | None = None


@dataclass(frozen=True, slots=True)
class Objection:
    subprocessor: str
    on: date | None
    note: str = ""


@dataclass(frozen=True, slots=True)
class TenantTerms:
    privacy_contact: str | None = None
    authorised: frozenset[str] | None = None  # None: general authorisation ("all")
    regions: frozenset[str] | None = None  # None: any region
    objections: tuple[Objection, ...] = ()

    def authorises(self, name: str) -> bool:
        return self.authorised is None or name in self.authorised


@dataclass(frozen=True, slots=True)
class RoutingRule:
    name: str
    via: tuple[str, ...]
    tenants: frozenset[str] | None = None
    tagged: frozenset[str] = frozenset()
    kinds: frozenset[str] | None = None
    recipient_domains: tuple[str, ...] = ()
    regions: frozenset[str] | None = None
    line: int = 0

    def matches(self, tenant: str, tags: Collection[str], kind: str, recipient: str) -> bool:
        domain = recipient.rpartition("@")[2].lower()
        return ((self.tenants is None or tenant in self.tenants)
                and self.tagged <= set(tags)
                and (self.kinds is None or kind in self.kinds)
                and (not self.recipient_domains or any(
                    domain == d or (d.startswith("*.") and domain.endswith(d[1:]))
                    for d in self.recipient_domains)))


@dataclass(frozen=True, slots=True)
class Consent:
    """What the database knows: when each (tenant, subprocessor) became usable after
    its change notice, and the objections recorded from the command line."""

    baseline: frozenset[str] = frozenset()  # in the registry before notices were kept
    effective: Mapping[tuple[str, str], datetime] = field(default_factory=dict)
    objections: frozenset[tuple[str, str]] = frozenset()
    undelivered: Mapping[tuple[str, str], str] = field(default_factory=dict)  # and why

    @classmethod
    def of(cls, rows: ConsentRows) -> Consent:
        return cls(rows.baseline, rows.effective, rows.objections, rows.undelivered)


@dataclass(frozen=True, slots=True)
class Route:
    """The relays to try, in order, or why there is none."""

    relays: tuple[Subprocessor, ...] = ()
    rule: str = ""
    held: str = ""


@dataclass(frozen=True)
class SubprocessorPolicy:
    registry: dict[str, Subprocessor] = field(default_factory=dict)
    tenants: dict[str, TenantTerms] = field(default_factory=dict)
    routing: tuple[RoutingRule, ...] = ()
    notice_from: str = ""
    notice_subject: str = ""
    notice_template: str = ""
    window_days: int = 5

    def why_not(self, tenant: str, name: str, consent: Consent, now: datetime,
                regions: Collection[str] | None = None) -> str | None:
        """Why ``tenant`` may not use subprocessor ``name`` now (None: it may)."""
        sp = self.registry.get(name)
        if sp is None:
            return f"{name} is not in the registry"
        terms = self.tenants.get(tenant, TenantTerms(authorised=frozenset()))
        if not terms.authorises(name):
            return f"{name} is not authorised by tenant {tenant}"
        if any(o.subprocessor == name for o in terms.objections) or \
                (tenant, name) in consent.objections:
            return f"tenant {tenant} objected to {name}"
        if terms.regions is not None and sp.region not in terms.regions:
            allowed = ", ".join(sorted(terms.regions))
            return f"{name} is in {sp.region}, tenant {tenant} allows {allowed}"
        if regions is not None and sp.region not in regions:
            return f"{name} is in {sp.region}, the routing rule allows {', '.join(sorted(regions))}"
        if name not in consent.baseline:
            effective = consent.effective.get((tenant, name))
            if effective is None:
                why = consent.undelivered.get((tenant, name))
                return f"{name} is new: {why}" if why else \
                    f"{name} is new and tenant {tenant} has not been notified yet"
            if effective > now:
                return (f"{name} is usable for tenant {tenant} from {effective:%Y-%m-%d %H:%M} "
                        "UTC (objection window)")
        return None

    def route(self, tenant: str, tags: Collection[str], kind: str, recipient: str,
              consent: Consent, now: datetime) -> Route:
        rule = next((r for r in self.routing if r.matches(tenant, tags, kind, recipient)), None)
        if rule is None:
            return Route(held=f"{HELD_PREFIX}: no routing rule in subprocessors.yaml matches")
        usable, reasons = [], []
        for name in rule.via:
            reason = self.why_not(tenant, name, consent, now, rule.regions)
            if reason is None:
                usable.append(self.registry[name])
            else:
                reasons.append(reason)
        if not usable:
            return Route(rule=rule.name, held=f"{HELD_PREFIX} (rule {rule.name}): "
                         + "; ".join(reasons))
        return Route(relays=tuple(usable), rule=rule.name)

    def affected_by(self, name: str) -> list[str]:
        """Tenants whose authorisation covers ``name`` (they get its change notices)."""
        return sorted(t for t, terms in self.tenants.items() if terms.authorises(name))


# ------------------------------------------------------------------ the file
_TOP = {"subprocessors", "tenants", "routing", "notice"}
_SP = {"purpose", "entity", "country", "region", "data_categories", "added", "smtp"}
_TENANT = {"privacy_contact", "authorised", "regions", "objections"}
_RULE = {"name", "match", "via", "regions"}
_MATCH = {"tenant", "tagged", "kind", "recipient_domain"}
_NOTICE = {"from", "subject", "template", "window_days"}
DEFAULT_TEMPLATE = """Dear {tenant_name},

As your processor under our data processing agreement, we give notice of a
change in the subprocessors that may handle your mail:

  {change}: {subprocessor} ({entity}, {country}, region {region})
  purpose: {purpose}; data: {data_categories}

You may object until {objection_deadline} (UTC) by replying to this message.
Until then, and if you object, {subprocessor} does not handle your mail.
"""


class _Checker(Checker):
    def __init__(self, doc: YamlDocument, tenants: Collection[str],
                 tags: Collection[str] | None) -> None:
        super().__init__(doc)
        self.known_tenants = tenants
        self.tags = tags
        self.registry: dict[str, Subprocessor] = {}

    def text(self, spec: dict[str, Any], key: str, path: KeyPath, required: bool = True) -> str:
        value = spec.get(key)
        if value is None and not required:
            return ""
        if not isinstance(value, str) or not value.strip():
            self.problem((*path, key) if key in spec else path, f"{key} is required (text)")
            return ""
        return value

    def names(self, value: Any, path: KeyPath, what: str) -> list[str]:
        out = []
        for i, name in enumerate(self.string_list(value, path, what)):
            if name not in self.registry:
                self.problem((*path, i), f"unknown subprocessor {name!r} "
                             f"(known: {', '.join(sorted(self.registry)) or 'none'})")
            else:
                out.append(name)
        return out

    def regions(self, value: Any, path: KeyPath) -> frozenset[str] | None:
        if value is None:
            return None
        return frozenset(self.string_list(value, path, "regions"))

    def policy(self) -> SubprocessorPolicy:
        data = self.doc.data if self.doc.data is not None else {}
        top = self.mapping(data, (), _TOP, "the file")
        if top is None:
            return SubprocessorPolicy()
        self.registry = self._registry(top.get("subprocessors", {}) or {})
        tenants = self._tenants(top.get("tenants", {}) or {})
        routing = self._routing(top.get("routing", []) or [])
        notice = self.mapping(top.get("notice", {}) or {}, ("notice",), _NOTICE, "notice") or {}
        window = notice.get("window_days", 5)
        if isinstance(window, bool) or not isinstance(window, int) or window < 5:
            self.problem(("notice", "window_days"),
                         "window_days is a whole number of days, at least 5 (the agreement)")
            window = 5
        sender = self.text(notice, "from", ("notice",), required=bool(self.registry))
        if sender:
            self.address(sender, ("notice", "from"))
        policy = SubprocessorPolicy(
            registry=self.registry, tenants=tenants, routing=routing, notice_from=sender,
            notice_subject=self.text(notice, "subject", ("notice",), required=False)
            or "Notice of a change in subprocessors",
            notice_template=self.text(notice, "template", ("notice",), required=False)
            or DEFAULT_TEMPLATE,
            window_days=window,
        )
        self._template(policy.notice_template)
        self._reachability(policy)
        return policy

    def _registry(self, spec: Any) -> dict[str, Subprocessor]:
        if not isinstance(spec, dict):
            self.problem(("subprocessors",), "subprocessors must be a mapping of name to details")
            return {}
        out = {}
        for name, sspec in spec.items():
            path: KeyPath = ("subprocessors", str(name))
            if not isinstance(name, str) or not _NAME.match(name):
                self.problem(path, f"not a subprocessor name: {name!r}")
                continue
            s = self.mapping(sspec, path, _SP, f"subprocessor {name}")
            if s is None:
                continue
            purpose = s.get("purpose")
            if purpose not in PURPOSES:
                self.problem((*path, "purpose") if "purpose" in s else path,
                             f"purpose is one of {', '.join(PURPOSES)}")
            country = self.text(s, "country", path)
            if country and not _COUNTRY.match(country):
                self.problem((*path, "country"), "country is a two-letter code such as NL")
            added = self.date(s.get("added"), (*path, "added") if "added" in s else path,
                              "added", "the date it was added, such as 2026-01-15") or date.min
            relay = None
            if "smtp" in s:
                relay = self._relay(s["smtp"], (*path, "smtp"))
            elif purpose == "outbound-relay":
                self.problem(path, f"outbound relay {name} needs smtp: {{host, port, tls}}")
            out[name] = Subprocessor(
                name, str(purpose), self.text(s, "entity", path), country,
                self.text(s, "region", path),
                tuple(self.string_list(s.get("data_categories", []),
                                       (*path, "data_categories"), "data_categories")),
                added, relay)
        return out

    def _relay(self, spec: Any, path: KeyPath) -> Relay | None:
        r = self.mapping(spec, path, {"host", "port", "tls"}, "smtp")
        if r is None:
            return None
        host = self.text(r, "host", path)
        port = r.get("port", 25)
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            self.problem((*path, "port"), "port is a number from 1 to 65535")
            port = 25
        tls = r.get("tls", "opportunistic")
        if tls not in ("none", "opportunistic", "required"):
            self.problem((*path, "tls"), "tls is none, opportunistic or required")
            tls = "required"
        return Relay(host, port, tls)

    def _tenants(self, spec: Any) -> dict[str, TenantTerms]:
        if not isinstance(spec, dict):
            self.problem(("tenants",), "tenants must be a mapping of tenant id to terms")
            return {}
        out = {}
        for tid, tspec in spec.items():
            path: KeyPath = ("tenants", str(tid))
            if tid not in self.known_tenants:
                self.problem(path, f"unknown tenant {tid!r} (not in the gateway configuration)")
                continue
            t = self.mapping(tspec, path, _TENANT, f"tenant {tid}")
            if t is None:
                continue
            contact = self.text(t, "privacy_contact", path)
            if contact:
                self.address(contact, (*path, "privacy_contact"))
            authorised: frozenset[str] | None
            if t.get("authorised") == "all":
                authorised = None
            else:
                authorised = frozenset(self.names(t.get("authorised", []),
                                                  (*path, "authorised"), "authorised"))
            objections = []
            ospec = t.get("objections", []) or []
            if not isinstance(ospec, list):
                self.problem((*path, "objections"), "objections must be a list")
                ospec = []
            for i, o in enumerate(ospec):
                opath: KeyPath = (*path, "objections", i)
                om = self.mapping(o, opath, {"subprocessor", "date", "note"}, "an objection")
                if om is None:
                    continue
                named = self.names([om.get("subprocessor", "")], (*opath, "subprocessor"),
                                   "subprocessor")
                when = om.get("date")
                if when is not None:
                    when = self.date(when, (*opath, "date"), "date")
                if named:
                    objections.append(Objection(named[0], when, str(om.get("note", ""))))
            out[str(tid)] = TenantTerms(contact or None, authorised,
                                        self.regions(t.get("regions"), (*path, "regions")),
                                        tuple(objections))
        return out

    def _routing(self, spec: Any) -> tuple[RoutingRule, ...]:
        if not isinstance(spec, list):
            self.problem(("routing",), "routing must be a list of rules")
            return ()
        rules: list[RoutingRule] = []
        names: set[str] = set()
        for i, rspec in enumerate(spec):
            path: KeyPath = ("routing", i)
            r = self.mapping(rspec, path, _RULE, "a routing rule")
            if r is None:
                continue
            name = self.text(r, "name", path)
            if name in names:
                self.problem((*path, "name"), f"duplicate routing rule name {name!r}")
            names.add(name)
            m = self.mapping(r.get("match", {}) or {}, (*path, "match"), _MATCH, "match") or {}
            tenants = None
            if "tenant" in m:
                tenants = frozenset(self.string_list(m["tenant"], (*path, "match", "tenant"),
                                                     "tenant"))
                for t in sorted(tenants - set(self.known_tenants)):
                    self.problem((*path, "match", "tenant"),
                                 f"unknown tenant {t!r}: this rule can never match it")
            tagged = frozenset(self.string_list(m.get("tagged", []), (*path, "match", "tagged"),
                                                "tagged"))
            if self.tags is not None:
                for t in sorted(tagged - set(self.tags)):
                    self.problem((*path, "match", "tagged"),
                                 f"unknown tag {t!r} (tags are defined in retention.yaml)")
            kinds = None
            if "kind" in m:
                kinds = frozenset(self.string_list(m["kind"], (*path, "match", "kind"), "kind"))
                for k in sorted(kinds - set(KINDS)):
                    self.problem((*path, "match", "kind"),
                                 f"unknown kind {k!r} (known: {', '.join(KINDS)})")
            domains = tuple(d.lower() for d in self.string_list(
                m.get("recipient_domain", []), (*path, "match", "recipient_domain"),
                "recipient_domain"))
            via = self.names(r.get("via", []), (*path, "via"), "via")
            if not via and "via" not in r:
                self.problem(path, f"routing rule {name!r} needs via: [relay, ...]")
            for n in via:
                if self.registry[n].purpose != "outbound-relay":
                    self.problem((*path, "via"), f"{n} is not an outbound relay "
                                 f"(purpose {self.registry[n].purpose})")
            rule = RoutingRule(name, tuple(via), tenants, tagged, kinds, domains,
                               self.regions(r.get("regions"), (*path, "regions")),
                               self.doc.line_of(path))
            shadow = next((p for p in rules if _covers(p, rule)), None)
            if shadow is not None:
                self.problem(path, f"routing rule {name!r} can never match: rule "
                             f"{shadow.name!r} (line {shadow.line}) matches all it matches")
            rules.append(rule)
        return tuple(rules)

    def _template(self, template: str) -> None:
        try:
            template.format(**{k: "" for k in NOTICE_FIELDS})
        except (KeyError, ValueError, IndexError) as exc:
            self.problem(("notice", "template"),
                         f"template: {exc!s} (fields: {', '.join(NOTICE_FIELDS)})")

    def _reachability(self, policy: SubprocessorPolicy) -> None:
        """Every configured tenant needs an authorised outbound relay that some
        routing rule could give it; otherwise all its copies would wait forever."""
        for tenant in sorted(self.known_tenants):
            terms = policy.tenants.get(tenant)
            if terms is None:
                self.problem(("tenants",), f"tenant {tenant!r} has no terms here "
                             "(privacy_contact, authorised): its mail could not be relayed")
                continue
            reachable = any(
                r.tenants is None or tenant in r.tenants for r in policy.routing
                if any(policy.why_not(tenant, n, Consent(baseline=frozenset(policy.registry)),
                                      datetime.max, r.regions) is None for n in r.via))
            if not reachable:
                self.problem(("tenants", tenant), f"tenant {tenant!r} has no authorised "
                             "outbound relay that a routing rule would use")


NOTICE_FIELDS = ("tenant", "tenant_name", "change", "subprocessor", "entity", "country",
                 "region", "purpose", "data_categories", "objection_deadline")


def _covers(earlier: RoutingRule, later: RoutingRule) -> bool:
    """Whether every delivery ``later`` matches is matched by ``earlier`` first."""
    return ((earlier.tenants is None or (later.tenants is not None
                                         and later.tenants <= earlier.tenants))
            and earlier.tagged <= later.tagged
            and (earlier.kinds is None or (later.kinds is not None
                                           and later.kinds <= earlier.kinds))
            and (not earlier.recipient_domains
                 or (bool(later.recipient_domains)
                     and set(later.recipient_domains) <= set(earlier.recipient_domains))))


def check(doc: YamlDocument, tenants: Collection[str],
          tags: Collection[str] | None) -> tuple[SubprocessorPolicy, list[str]]:
    """Validate a parsed subprocessors.yaml; the policy, and every problem found."""
    checker = _Checker(doc, tenants, tags)
    policy = checker.policy()
    return policy, checker.problems


def notice_text(policy: SubprocessorPolicy, *, tenant: str, tenant_name: str, change: str,
                sp: Subprocessor, deadline: datetime) -> str:
    return policy.notice_template.format(
        tenant=tenant, tenant_name=tenant_name or tenant, change=change, subprocessor=sp.name,
        entity=sp.entity, country=sp.country, region=sp.region, purpose=sp.purpose,
        data_categories=", ".join(sp.data_categories) or "-",
        objection_deadline=f"{deadline:%Y-%m-%d %H:%M}")

