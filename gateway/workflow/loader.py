"""Read policies/workflows.yaml into rules, or say exactly what is wrong with it.

Every problem is ``file:line:column: message``; all of them are collected, and a
file with any problem yields no rules at all (never half a configuration).
Checked here: unknown keys, wrong types, bad regular expressions, unknown
tenants, destinations and tags, reject replies that are not 5xx, and copy
addresses that could inject anything into SMTP (CR, LF, spaces, no domain).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import parse_size
from gateway.errors import ConfigError
from gateway.workflow.rules import (
    INBOUND,
    OUTBOUND,
    Actions,
    AddressTest,
    All,
    Any_,
    AttachmentTest,
    AuthTest,
    Condition,
    Direction,
    HasAttachments,
    HeaderTest,
    Not,
    Pattern,
    Rule,
    SizeTest,
    TagTest,
    can_reject_early,
)
from gateway.yamlfile import Checker, KeyPath, YamlDocument, YamlFileError, load_yaml

_ADDRESS = re.compile(
    r"^[A-Za-z0-9!#$&'*+/=?^_`{|}~.-]{1,64}@[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$"
)
_REJECT = re.compile(r"^5[0-9]{2} 5\.[0-9]{1,3}\.[0-9]{1,3} [\x20-\x7e]{1,400}$")
_HEADER_NAME = re.compile(r"^[!-9;-~]{1,76}$")  # RFC 5322 field name
_AUTH_RESULTS = {"pass", "fail", "softfail", "neutral", "none", "temperror", "permerror", "policy"}

MATCH_KEYS = {"all", "any", "not", "direction", "sender", "recipient", "header",
              "has_attachments", "attachment_type", "attachment_name", "size_over",
              "size_under", "tagged", "auth"}
ACTION_KEYS = {"cc", "bcc", "route", "tag", "reject", "discard", "stop", "keep_original"}


@dataclass
class Workflows:
    """Each tenant's ordered rules, and the tags rules may set."""

    tags: frozenset[str] = frozenset()
    rules: dict[str, list[Rule]] = field(default_factory=dict)

    def for_tenant(self, tenant: str) -> list[Rule]:
        return self.rules.get(tenant, [])

    def rejects_early(self, tenant: str) -> bool:
        """Whether this tenant's rules can reject a message at end of DATA."""
        return can_reject_early(self.for_tenant(tenant))


class _Checker(Checker):
    def __init__(self, doc: YamlDocument, tenants: Collection[str],
                 destinations: Collection[str], tags: Collection[str] | None) -> None:
        super().__init__(doc)
        self.tenants = tenants
        self.destinations = destinations
        self.check_tags = tags is not None  # None: tags are not known, so not checked
        self.tags = frozenset(tags or ())

    def pattern(self, value: Any, path: KeyPath) -> Pattern | None:
        case_sensitive = False
        if isinstance(value, str):
            kind, text = "glob", value
        elif isinstance(value, dict):
            spec = self.mapping(value, path, {"glob", "exact", "regex", "case_sensitive"},
                                "a pattern")
            if spec is None:
                return None
            kinds = [k for k in ("glob", "exact", "regex") if k in spec]
            if len(kinds) != 1:
                self.problem(path, "a pattern needs exactly one of glob, exact or regex")
                return None
            if not isinstance(spec[kinds[0]], str):
                got = type(spec[kinds[0]]).__name__
                self.problem((*path, kinds[0]),
                             f"{kinds[0]} takes a string, got a {got} (put it in quotes)")
                return None
            kind, text = kinds[0], spec[kinds[0]]
            case_sensitive = spec.get("case_sensitive", False)
            if not isinstance(case_sensitive, bool):
                self.problem((*path, "case_sensitive"), "case_sensitive must be true or false")
                return None
        else:
            self.problem(path, "a pattern is a string (glob) or {glob|exact|regex: ...}")
            return None
        try:
            return Pattern.make(kind, text, case_sensitive)
        except re.error as exc:
            self.problem(path, f"bad regular expression {text!r}: {exc}")
            return None
        except (OverflowError, RecursionError):  # a{4294967296}, or 5,000 nested groups
            self.problem(path, f"{kind} too large or too deeply nested to compile")
            return None

    def condition(self, value: Any, path: KeyPath) -> Condition | None:
        spec = self.mapping(value, path, MATCH_KEYS, "match")
        if spec is None:
            return None
        parts: list[Condition] = []
        for key, v in spec.items():
            p = (*path, str(key))
            part = self._condition_part(key, v, p)
            if part is not None:
                parts.append(part)
        return parts[0] if len(parts) == 1 else All(tuple(parts))

    def _condition_part(self, key: str, v: Any, p: KeyPath) -> Condition | None:
        if key in ("all", "any"):
            if not isinstance(v, list) or not v:
                self.problem(p, f"{key} takes a non-empty list of conditions")
                return None
            subs = [self.condition(item, (*p, i)) for i, item in enumerate(v)]
            good = tuple(s for s in subs if s is not None)
            return All(good) if key == "all" else Any_(good)
        if key == "not":
            sub = self.condition(v, p)
            return Not(sub) if sub is not None else None
        if key == "direction":
            if v not in (INBOUND, OUTBOUND):
                self.problem(p, f"direction is {INBOUND} or {OUTBOUND}")
                return None
            return Direction(v)
        if key in ("sender", "recipient"):
            pat = self.pattern(v, p)
            return AddressTest(key, pat) if pat else None
        if key == "header":
            spec = v if isinstance(v, dict) and v else None
            if spec is None:
                self.problem(p, "header takes a mapping of header name to pattern")
                return None
            tests: list[Condition] = []
            for name, pv in spec.items():
                if not isinstance(name, str) or not _HEADER_NAME.match(name):
                    self.problem((*p, str(name)), f"not a header name: {name!r}")
                    continue
                pat = self.pattern(pv, (*p, name))
                if pat:
                    tests.append(HeaderTest(name.lower(), pat))
            return tests[0] if len(tests) == 1 else All(tuple(tests))
        if key == "has_attachments":
            if not isinstance(v, bool):
                self.problem(p, "has_attachments must be true or false")
                return None
            return HasAttachments(v)
        if key in ("attachment_type", "attachment_name"):
            pat = self.pattern(v, p)
            return AttachmentTest(key.split("_")[1], pat) if pat else None
        if key in ("size_over", "size_under"):
            try:
                size = int(parse_size(v))
            except (ValueError, TypeError):
                self.problem(p, f"{key} takes a size such as 1000000 or 1MB")
                return None
            return SizeTest(size if key == "size_over" else None,
                            size if key == "size_under" else None)
        if key == "tagged":
            tags = self.string_list(v, p, "tagged")
            self._known_tags(tags, p)
            return TagTest(frozenset(tags)) if tags else None
        if key == "auth":
            spec = self.mapping(v, p, {"dkim", "spf", "dmarc", "arc"}, "auth")
            if spec is None:
                return None
            tests = []
            for method, results in spec.items():
                values = [r.lower() for r in self.string_list(results, (*p, method), method)]
                bad = [r for r in values if r not in _AUTH_RESULTS]
                if bad:
                    self.problem((*p, method), f"unknown result {bad[0]!r}")
                    continue
                tests.append(AuthTest(method, frozenset(values)))
            return tests[0] if len(tests) == 1 else All(tuple(tests))
        return None  # unknown keys were reported by mapping()

    def _known_tags(self, tags: list[str], path: KeyPath) -> None:
        for t in tags:
            if self.check_tags and t not in self.tags:
                self.problem(path, f"unknown tag {t!r} (tags are defined in retention.yaml)")

    def addresses(self, value: Any, path: KeyPath, what: str) -> tuple[str, ...]:
        out = []
        for i, a in enumerate(self.string_list(value, path, what)):
            if not _ADDRESS.match(a) or ".." in a:
                self.problem((*path, i), f"{what}: not a plain address: {a!r}")
            else:
                out.append(a)
        return tuple(out)

    def actions(self, value: Any, path: KeyPath) -> Actions | None:
        spec = self.mapping(value, path, ACTION_KEYS, "actions")
        if spec is None:
            return None
        route = spec.get("route")
        if route is not None and (not isinstance(route, str) or route not in self.destinations):
            known = ", ".join(sorted(self.destinations)) or "none configured"
            self.problem((*path, "route"), f"unknown destination {route!r} (known: {known})")
            route = None
        tags = self.string_list(spec.get("tag", []), (*path, "tag"), "tag")
        self._known_tags(tags, (*path, "tag"))
        reject = spec.get("reject")
        if reject is not None and (not isinstance(reject, str) or not _REJECT.match(reject)):
            self.problem((*path, "reject"), "reject takes a reply such as "
                         "'550 5.7.1 Not accepted here' (5xx, one line)")
            reject = None
        flags = {key: self.boolean(spec, key, path, False)
                 for key in ("discard", "stop", "keep_original")}
        return Actions(
            cc=self.addresses(spec.get("cc", []), (*path, "cc"), "cc"),
            bcc=self.addresses(spec.get("bcc", []), (*path, "bcc"), "bcc"),
            route=route, tag=tuple(tags), reject=reject,
            discard=flags["discard"], stop=flags["stop"], keep_original=flags["keep_original"],
        )

    def workflows(self) -> Workflows:
        data = self.doc.data if self.doc.data is not None else {}
        top = self.mapping(data, (), {"tenants"}, "the file")
        if top is None:
            return Workflows()
        result = Workflows(tags=self.tags)
        tenants = top.get("tenants", {}) or {}
        if not isinstance(tenants, dict):
            self.problem(("tenants",), "tenants must be a mapping of tenant id to rules")
            return result
        for tid, tspec in tenants.items():
            tpath: KeyPath = ("tenants", str(tid))
            if tid not in self.tenants:
                self.problem(tpath, f"unknown tenant {tid!r} (not in the gateway configuration)")
                continue
            tspec = self.mapping(tspec, tpath, {"rules"}, f"tenant {tid}")
            if tspec is None:
                continue
            rules_spec = tspec.get("rules", [])
            if not isinstance(rules_spec, list):
                self.problem((*tpath, "rules"), "rules must be a list")
                continue
            rules: list[Rule] = []
            names: set[str] = set()
            for i, rspec in enumerate(rules_spec):
                rpath: KeyPath = (*tpath, "rules", i)
                rule = self._rule(rspec, rpath, names)
                if rule is not None:
                    rules.append(rule)
            result.rules[str(tid)] = rules
        return result

    def _rule(self, spec: Any, path: KeyPath, names: set[str]) -> Rule | None:
        spec = self.mapping(spec, path, {"name", "match", "actions"}, "a rule")
        if spec is None:
            return None
        name = spec.get("name")
        if not isinstance(name, str) or not name.strip():
            self.problem(path, "every rule needs a name")
            return None
        if name in names:
            self.problem((*path, "name"), f"duplicate rule name {name!r}")
        names.add(name)
        match = self.condition(spec["match"], (*path, "match")) if "match" in spec else All(())
        if "actions" not in spec:
            self.problem(path, f"rule {name!r} has no actions")
            return None
        actions = self.actions(spec["actions"], (*path, "actions"))
        if match is None or actions is None:
            return None
        return Rule(name, match, actions, self.doc.line_of(path))


def check(doc: YamlDocument, tenants: Collection[str], destinations: Collection[str],
          tags: Collection[str] | None) -> tuple[Workflows, list[str]]:
    """Validate a parsed workflows.yaml; the rules, and every problem found."""
    checker = _Checker(doc, tenants, destinations, tags)
    workflows = checker.workflows()
    return workflows, checker.problems


def load(path: str | Path, tenants: Collection[str], destinations: Collection[str],
         tags: Collection[str] = ()) -> Workflows:
    """Load and validate one file; raises ConfigError with every problem found.

    A missing file means no rules at all (nothing is copied or routed).
    """
    if not Path(path).exists():
        return Workflows()
    try:
        doc = load_yaml(path)
    except YamlFileError as exc:
        raise ConfigError([str(exc)]) from None
    workflows, problems = check(doc, tenants, destinations, tags)
    if problems:
        raise ConfigError(problems)
    return workflows
