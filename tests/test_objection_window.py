"""The sub-processor objection window as agreed: it runs from the notice's delivery to the
tenant's privacy contact; a notice not delivered keeps the new sub-processor unusable for
that tenant and says why; a tenant that authorises a sub-processor later (or is added
later) gets a notice and a window of its own.  Time is injected by moving the stored
times of the notice and of its delivery back, never slept."""

from __future__ import annotations

import json
import signal
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import update

from gateway.delivery.notices import local_message
from gateway.records import Notice
from gateway.store.models import deliveries, subprocessor_notices
from tests.conftest import free_port, metrics_port, samples, simple_message, value, wait_for
from tests.sink import Sink
from tests.test_subprocessors import (
    CONSENT_REFRESH,
    _gateway,
    _policy_text,
    relays,
    with_new_relay,
)

__all__ = ["relays"]  # the fixture, used by the tests below

def _notices(gw: Any) -> list[dict[str, Any]]:
    return json.loads(gw.cli("subprocessors", "notices", "--json", check=True).stdout)


def _usable(gw: Any) -> dict[str, dict[str, str]]:
    listing = json.loads(gw.cli("subprocessors", "list", "--json", check=True).stdout)
    return listing["tenants"]


def _reload(gw: Any, policies: Any, text: str, what: str) -> None:
    (policies / "subprocessors.yaml").write_text(text)
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: what in gw.log(), what="the reload")


def _set_times(gw: Any, notice: dict[str, Any], queued: datetime, delivered: datetime,
               ) -> None:
    """Move the notice's queue time (and the window end it states, 5 days on) and its
    delivery's time: as if they had happened then."""
    with gw.store.engine.begin() as conn:
        conn.execute(update(subprocessor_notices)
                     .where(subprocessor_notices.c.message_id == notice["message"])
                     .values(created_at=queued, effective_at=queued + timedelta(days=5)))
        conn.execute(update(deliveries)
                     .where(deliveries.c.message_id == notice["message"])
                     .values(last_attempt_at=delivered))


def _copy_through(gw: Any, sinks: list[Sink], words: str) -> Sink:
    """Send acme a message; the relay its copy left through."""
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message(words))
    found = wait_for(lambda: [k for k in sinks if any(words.encode() in m.data
                                                      for m in k.messages)],
                     what=f"the copy of {words!r}")
    return found[0]


def test_the_window_runs_from_the_notices_delivery(make_gateway, tmp_path, relays):
    eu, _eu2, _us = relays
    policies, gw = _gateway(make_gateway, tmp_path, relays)
    new = Sink()
    try:
        text = with_new_relay(relays, new)
        _reload(gw, policies, text, "subprocessor relay-new added")
        # the notice to acme's privacy contact leaves through acme's relay (relay-eu)
        [notice] = wait_for(lambda: [n for n in _notices(gw) if n["state"] == "sent"],
                            what="the notice delivered")
        assert (notice["tenant"], notice["subprocessor"], notice["change"]) == (
            "acme", "relay-new", "added")
        assert [m.rcpt_tos for m in eu.messages if b"relay-new" in m.data] == [
            ["privacy@acme.test"]]
        delivered = datetime.fromisoformat(notice["delivered_at"])
        assert datetime.fromisoformat(notice["objection_window_ends"]) == \
            delivered + timedelta(days=5)
        assert "objection window" in _usable(gw)["acme"]["relay-new"]

        # queued six days ago, delivered two days ago: the window has three days to go
        now = datetime.now(UTC)
        _set_times(gw, notice, now - timedelta(days=6), now - timedelta(days=2))
        assert datetime.fromisoformat(_notices(gw)[0]["objection_window_ends"]) == \
            now + timedelta(days=3)
        time.sleep(CONSENT_REFRESH + 0.5)  # the delivery process reads consent this often
        assert _copy_through(gw, [eu, new], "within the window") is eu
        assert "objection window" in _usable(gw)["acme"]["relay-new"]

        # delivered five days and a minute ago: relay-new carries acme's copies
        _set_times(gw, notice, now - timedelta(days=6),
                   now - timedelta(days=5, minutes=1))
        time.sleep(CONSENT_REFRESH + 0.5)
        assert _copy_through(gw, [eu, new], "after the window") is new
        assert _usable(gw)["acme"]["relay-new"] == "usable"
    finally:
        new.stop()


def test_a_tenant_authorising_one_more_gets_its_own_notice_and_a_held_one_says_why(
        make_gateway, tmp_path, relays):
    """globex authorises relay-eu-2 (in the registry from the start) only later: it is
    notified; its notice cannot leave (globex objected to both its relays), so the
    notice is held, visibly, and relay-eu-2 stays unusable for globex."""
    eu, eu2, us = relays
    policies, gw = _gateway(make_gateway, tmp_path, relays,
                            metrics={"listen": f"127.0.0.1:{free_port()}"})
    assert _usable(gw)["globex"]["relay-eu-2"] == "relay-eu-2 is not authorised by tenant globex"
    assert _notices(gw) == []
    for name in ("relay-us", "relay-eu"):
        gw.cli("subprocessors", "object", "--tenant", "globex", name, check=True)
    time.sleep(CONSENT_REFRESH + 0.5)

    text = _policy_text(eu, eu2, us).replace("authorised: [relay-us, relay-eu]",
                                             "authorised: [relay-us, relay-eu, relay-eu-2]")
    _reload(gw, policies, text, "policy reloaded")
    [notice] = wait_for(lambda: [n for n in _notices(gw) if n["state"] == "held"],
                        what="the notice held")
    assert (notice["tenant"], notice["subprocessor"], notice["change"]) == (
        "globex", "relay-eu-2", "added")
    assert notice["delivered_at"] is None and notice["objection_window_ends"] is None
    assert "the notice to tenant globex's privacy contact is held (no authorised " \
           "subprocessor" in notice["why"]
    assert _usable(gw)["globex"]["relay-eu-2"].startswith(
        "relay-eu-2 is new: the notice to tenant globex's privacy contact is held")
    # acme, in the baseline, goes on using it
    assert _usable(gw)["acme"]["relay-eu-2"] == "usable"

    def held_gauge() -> bool:
        _, values = samples(metrics_port(gw))
        name = "mailflowr_gateway_subprocessor_notices_undelivered"
        return value(values, name, state="held") == 1 and \
            value(values, name, state="pending") == 0

    wait_for(held_gauge, what="the gauge")
    listed = gw.cli("subprocessors", "notices", check=True).stdout.decode()
    assert "globex relay-eu-2: the notice to tenant globex's privacy contact is held" in listed


def test_a_tenant_added_later_and_a_contact_set_later_get_notices(store):
    """The registry and the pairs present at the first sync are the baseline; a pair that
    appears later (a tenant authorising one more, or added later) is notified; a notice
    that could not be sent (no privacy contact) is sent once the tenant has one."""
    now = datetime.now(UTC)
    requested: list[tuple[str, str]] = []

    def build(contacts: dict[str, bool]) -> Any:
        def notices(added: list[str], removed: list[str], pairs: list[tuple[str, str]],
                    ) -> list[Notice]:
            requested.extend(pairs)
            return [Notice(t, n, "added", now + timedelta(days=5), local_message(
                tenant=t, sender="privacy@gw.test", to=f"dpo@{t}.test", subject="notice",
                body="added", hostname="gw.test", now=now, kind="notice",
                submitted_by="(test)") if contacts[t] else None) for t, n in pairs]
        return notices

    registry = ["relay-a", "relay-b"]
    store.sync_subprocessors(registry, now, build({}), {("acme", "relay-a"): True})
    consent = store.consent_rows()
    assert consent.baseline == frozenset()  # usable per tenant, not for every tenant
    assert set(consent.effective) == {("acme", "relay-a")}

    # acme authorises relay-b too; globex (added later) authorises relay-a, no contact
    later = {("acme", "relay-a"): True, ("acme", "relay-b"): True,
             ("globex", "relay-a"): False}
    store.sync_subprocessors(registry, now, build({"acme": True, "globex": False}), later)
    assert requested == [("acme", "relay-b"), ("globex", "relay-a")]
    states = {(n["tenant_id"], n["subprocessor"]): (n["state"], n["why"])
              for n in store.list_notices()}
    assert states[("acme", "relay-b")][0] == "pending"
    assert states[("globex", "relay-a")] == (
        "unsent", "no notice could be sent to tenant globex: it has no privacy_contact")
    consent = store.consent_rows()
    assert set(consent.effective) == {("acme", "relay-a")}
    assert set(consent.undelivered) == {("acme", "relay-b"), ("globex", "relay-a")}

    store.sync_subprocessors(registry, now, build({"acme": True, "globex": False}), later)
    assert len(requested) == 2  # nothing new, nothing sent twice
    later[("globex", "relay-a")] = True  # globex has a privacy contact now
    store.sync_subprocessors(registry, now, build({"acme": True, "globex": True}), later)
    assert requested[2:] == [("globex", "relay-a")]
    assert [n["state"] for n in store.list_notices("globex")] == ["unsent", "pending"]
    assert "is pending" in store.consent_rows().undelivered[("globex", "relay-a")]
