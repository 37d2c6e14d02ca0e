"""The record of processing (GDPR art. 30(2)) the gateway can state for one tenant from its
own configuration and data: the categories of data it holds (from the classifier's
tags), how long each is kept, the sub-processors the tenant's mail may go through and
where they are, whether originals are encrypted at rest, where originals are also kept,
and how much of each category there is.  As JSON (``register.as_dict``) and Markdown
(``as_markdown``); ``processing-register`` and ``GET /api/v1/register`` serve it.

What the gateway cannot know (the controller's purposes and legal bases, the
organisational measures) is named as such, for the operator to complete."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from gateway.config import GatewayConfig
from gateway.policy.subprocessors import Consent
from gateway.policyset import PolicySet, retention_in_force
from gateway.store.pages import Pages
from gateway.store.repository import Store

EEA = "EU"  # the region name the registry uses for the EU/EEA


@dataclass
class Register:
    tenant: str
    tenant_name: str
    generated_at: datetime
    processor: str  # the gateway's host name
    privacy_contact: str | None
    categories: list[dict[str, Any]] = field(default_factory=list)
    retention: dict[str, Any] = field(default_factory=dict)
    subprocessors: list[dict[str, Any]] = field(default_factory=list)
    own_servers: list[dict[str, str]] = field(default_factory=list)
    security: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    not_stated: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"tenant": self.tenant, "tenant_name": self.tenant_name,
                "generated_at": self.generated_at.isoformat(), "processor": self.processor,
                "privacy_contact": self.privacy_contact, "categories": self.categories,
                "retention": self.retention, "subprocessors": self.subprocessors,
                "own_servers": self.own_servers, "security": self.security,
                "counts": self.counts, "not_stated": self.not_stated}


def build(config: GatewayConfig, policies: PolicySet, store: Store, tenant: str,
          now: datetime) -> Register:
    tenant_config = config.tenants.get(tenant)
    routing = policies.subprocessors
    terms = routing.tenants.get(tenant) if routing is not None else None
    held = Pages(store).holdings(tenant)
    retention = retention_in_force(policies.retention, store)
    reg = Register(tenant, (tenant_config.name if tenant_config else "") or tenant, now,
                   config.smtp.hostname, terms.privacy_contact if terms else None)

    # categories: every message is e-mail content and metadata; tags say more
    total = [sum(v[0] for v in held["directions"].values()),
             sum(v[1] for v in held["directions"].values())]
    reg.categories = [{"category": "e-mail messages (content, attachments, headers, "
                                   "envelope)", "tag": None, "messages": total[0],
                       "bytes": total[1]}]
    for name in sorted(set(held["tags"]) | set(retention.tags)):
        count, size = held["tags"].get(name, [0, 0])
        tag = retention.tags.get(name)
        reg.categories.append({"category": (tag.description if tag and tag.description
                                            else f"messages tagged {name}"),
                               "tag": name, "messages": count, "bytes": size})

    default = retention.decide(tenant, [])
    reg.retention = {
        "default": {"keep": str(default.keep), "rule": default.rule},
        "tags": {name: {"keep": str((d := retention.decide(tenant, [name])).keep),
                        "rule": d.rule} for name in sorted(retention.tags)},
        "legal_holds": [h.name for h in retention.active_holds(now)
                        if h.tenant in (None, tenant)]}

    if routing is not None:
        rows = store.consent_rows()
        consent = Consent.of(rows)
        for sp in routing.registry.values():
            why = routing.why_not(tenant, sp.name, consent, now)
            if terms is None or not terms.authorises(sp.name):
                continue
            reg.subprocessors.append({
                "name": sp.name, "entity": sp.entity, "purpose": sp.purpose,
                "country": sp.country, "region": sp.region,
                "outside_eea": sp.region != EEA,
                "data_categories": list(sp.data_categories),
                "in_use": why is None, "why_not": why})
    reg.own_servers = _own_servers(config, tenant)
    reg.security = {
        "encryption_at_rest": bool(config.privacy.master_key_file
                                   or config.privacy.master_key_env),
        "smtp_tls": config.smtp.tls.cert_file is not None,
        "audit_log": "hash-chained, keyed (audit verify)",
        "personal_data_in_logs": config.logging.personal_data}
    reg.counts = {"messages": dict(sorted((d, v[0]) for d, v in held["directions"].items())),
                  "addresses": held["contacts"],
                  "users": len(tenant_config.users) if tenant_config else 0,
                  "deliveries": held["deliveries"]}
    reg.not_stated = [
        "the purposes of the processing and their legal bases (the controller's)",
        "the categories of data subjects beyond senders, recipients and users",
        "technical and organisational measures outside the gateway (hosting, access, "
        "backups)"]
    return reg


def _own_servers(config: GatewayConfig, tenant: str) -> list[dict[str, str]]:
    """Where the tenant's originals also go that is not a sub-processor: its own IMAP
    server (keep_original, imap_pull) and its own SMTP destinations."""
    t = config.tenants.get(tenant)
    if t is None:
        return []
    out = []
    keep = t.keep_original
    if keep is not None and keep.imap is not None:
        account = config.imap_accounts[keep.imap]
        out.append({"what": "originals kept (IMAP)", "where": f"{account.host} "
                    f"folder {keep.folder}"})
    if keep is not None and keep.destination is not None:
        out.append({"what": "originals kept (SMTP)", "where": keep.destination})
    for name, pull in sorted(t.imap_pull.items()):
        account = config.imap_accounts[pull.account]
        out.append({"what": f"mail imported ({name})", "where": account.host})
    return out


def as_markdown(reg: Register) -> str:
    lines = [f"# Record of processing: {reg.tenant_name} ({reg.tenant})", "",
             f"Processor: MailFlowr Gateway at {reg.processor}. Generated "
             f"{reg.generated_at:%Y-%m-%d %H:%M} UTC from the gateway's configuration and "
             "data.", "", f"Controller's privacy contact: {reg.privacy_contact or '(none set)'}",
             "", "## Categories of personal data", "",
             "| category | tag | messages | bytes |", "|---|---|---|---|"]
    lines += [f"| {c['category']} | {c['tag'] or '-'} | {c['messages']} | {c['bytes']} |"
              for c in reg.categories]
    lines += ["", "## Retention", "",
              f"- by default: {reg.retention['default']['keep']}"]
    lines += [f"- tag {name}: {r['keep']} ({r['rule']})"
              for name, r in reg.retention["tags"].items()]
    holds = reg.retention["legal_holds"]
    lines += [f"- legal holds in force: {', '.join(holds) if holds else 'none'}", "",
              "## Sub-processors", ""]
    if reg.subprocessors:
        lines += ["| name | entity | purpose | country | region | in use |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {s['name']} | {s['entity']} | {s['purpose']} | {s['country']} | "
                  f"{s['region']}{' (outside the EEA)' if s['outside_eea'] else ''} | "
                  f"{'yes' if s['in_use'] else 'no: ' + str(s['why_not'])} |"
                  for s in reg.subprocessors]
    else:
        lines += ["None authorised (or no subprocessors.yaml): copies leave through the "
                  "gateway's own relay."]
    lines += ["", "## Where the mail also goes (the controller's own systems)", ""]
    lines += [f"- {o['what']}: {o['where']}" for o in reg.own_servers] or ["- nowhere else"]
    sec = reg.security
    lines += ["", "## Security", "",
              f"- originals encrypted at rest: {'yes' if sec['encryption_at_rest'] else 'no'}",
              f"- SMTP with TLS: {'yes' if sec['smtp_tls'] else 'no'}",
              f"- audit log: {sec['audit_log']}",
              f"- personal data in logs: {'yes' if sec['personal_data_in_logs'] else 'no'}",
              "", "## Counts", ""]
    c = reg.counts
    lines += [f"- messages {direction}: {n}" for direction, n in c["messages"].items()]
    lines += [f"- addresses held: {c['addresses']}", f"- submission users: {c['users']}"]
    lines += [f"- deliveries {state}: {n}" for state, n in sorted(c["deliveries"].items())]
    lines += ["", "## Not stated here", ""] + [f"- {n}" for n in reg.not_stated]
    return "\n".join(lines) + "\n"
