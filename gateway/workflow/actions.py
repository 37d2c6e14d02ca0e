"""Turn a rules plan into what the store records: tags, deliveries, notes. Pure."""

from __future__ import annotations

from gateway.config import KeepOriginalConfig
from gateway.records import Outcome, PlannedDelivery
from gateway.workflow.rules import Plan

APPEND = "append"  # keep the original by IMAP APPEND: recipient is the folder
KEEP = "keep"  # keep the original by SMTP, untouched, at a destination


def keep_original(plan: Plan, keep: KeepOriginalConfig | None, recipients: tuple[str, ...],
                  direction: str) -> tuple[PlannedDelivery, ...]:
    """The jobs that keep an inbound original on the tenant's own server: for all of
    its mail, or when a rule asked (``keep_original: true``)."""
    if keep is None or direction != "inbound":
        return ()
    if keep.all_mail:
        why = "(keep_original)"
    elif plan.keep_original is not None:
        why = plan.keep_original
    else:
        return ()
    if keep.imap is not None:
        return (PlannedDelivery(APPEND, keep.folder, keep.imap, why),)
    return tuple(PlannedDelivery(KEEP, r, keep.destination, why) for r in recipients)


def outcome(plan: Plan, recipients: tuple[str, ...], existing_tags: tuple[str, ...],
            direction: str = "inbound", returns: tuple[str, ...] = (),
            keep: KeepOriginalConfig | None = None) -> Outcome:
    """``returns``: where bounces to our rewritten (SRS) senders go back to; ``keep``:
    the tenant's keep_original setting (None: it keeps nothing, or the message came
    from its own server)."""
    tags = tuple(dict.fromkeys((*existing_tags, *plan.tags)))
    if plan.reject is not None:
        # The rule needed more than the envelope and headers, so it could only be
        # decided after the 250: the message is kept, nothing is sent onward.
        return Outcome(tags=tags, notes=(
            f"rejected by rule {plan.stopped_by} after acceptance: {plan.reject}",))
    if plan.discard:
        return Outcome(tags=tags, notes=(f"discarded by rule {plan.stopped_by}",))
    planned = []
    if direction == "outbound":  # a user's message goes to its own recipients first
        planned += [PlannedDelivery("rcpt", r, None, "(recipient)") for r in recipients]
    planned += [PlannedDelivery("cc", a, None, plan.origin[a]) for a in plan.cc]
    planned += [PlannedDelivery("bcc", a, None, plan.origin[a]) for a in plan.bcc]
    for destination in plan.routes:
        planned += [PlannedDelivery("route", r, destination, plan.origin[destination])
                    for r in recipients]
    planned += [PlannedDelivery("return", r, None, "(srs)") for r in returns]
    planned += keep_original(plan, keep, recipients, direction)
    notes: tuple[str, ...] = ()
    if plan.keep_original is not None and keep is None and direction == "inbound":
        notes = (f"rule {plan.keep_original} keeps the original, but no keep_original target "
                 "applies (none configured, or the message came from the tenant's own server)",)
    return Outcome(tags=tags, deliveries=tuple(planned), notes=notes)
