"""Turn a rules plan into what the store records: tags, deliveries, notes. Pure."""

from __future__ import annotations

from gateway.store.repository import Outcome, PlannedDelivery
from gateway.workflow.rules import Plan


def outcome(plan: Plan, recipients: tuple[str, ...], existing_tags: tuple[str, ...],
            direction: str = "inbound", returns: tuple[str, ...] = ()) -> Outcome:
    """``returns``: where bounces to our rewritten (SRS) senders go back to."""
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
    return Outcome(tags=tags, deliveries=tuple(planned))
