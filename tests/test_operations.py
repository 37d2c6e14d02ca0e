"""Operations: metrics read from the real /metrics, health and readiness, sd_notify,
logs without personal data, the status command, SIGHUP for certificates."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from gateway.logs import msgid_hash
from tests.conftest import (
    ROOT,
    client_context,
    free_port,
    http_get,
    metrics_port,
    need_tool,
    samples,
    simple_message,
    value,
    wait_for,
)

WORKFLOWS = """
tenants:
  acme:
    rules:
      - name: copies
        match: {recipient: "support@acme.test"}
        actions: {cc: [manager@partner.test]}
      - name: billing
        match: {recipient: "billing@acme.test"}
        actions: {route: finance}
"""


def _gateway(make_gateway, tmp_path, sinks, extra=None, start=True):
    policies = tmp_path / "policies"
    policies.mkdir(exist_ok=True)
    (policies / "workflows.yaml").write_text(WORKFLOWS)
    relay, finance = sinks
    overrides = {
        "metrics": {"listen": f"127.0.0.1:{free_port()}", "stats_interval": "0.5s"},
        "policies": {"directory": str(policies)},
        "destinations": {"finance": {"host": "127.0.0.1", "port": finance.port, "tls": "none"}},
        "delivery": {"relay": f"127.0.0.1:{relay.port}", "relay_tls": "none",
                     "poll_interval": "0.2s", "retry_base": "30s", "timeout": "10s"},
    }
    for key, settings in (extra or {}).items():
        overrides[key] = {**overrides.get(key, {}), **settings}
    return make_gateway(overrides, start=start)


def test_metrics_move_with_the_mail_and_pass_promtool(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    relay, finance = sinks
    finance.handler.mode = "tempfail"
    port = metrics_port(gw)
    before = value(samples(port)[1], "mailflowr_gateway_smtp_connections_total",
                   listener="smtp")  # the fixture's own probe of the port
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message())
        s.sendmail("a@sender.test", ["billing@acme.test"], simple_message(to="billing@acme.test"))
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail("a@sender.test", ["someone@elsewhere.test"], simple_message())
        s.mail("a@sender.test")  # no SIZE=, so the limit is found at the end of DATA
        s.rcpt("support@acme.test")
        code, _ = s.data(simple_message(body=("x" * 70 + "\r\n") * 3000))
        assert code == 552
    relay.wait(1)
    wait_for(lambda: finance.handler.attempts >= 1, what="the deferred attempt")

    def settled():
        """The pipeline's and the delivery's processes report their counters every few
        seconds: wait for the last ones of both."""
        body, values = samples(port)
        if value(values, "mailflowr_gateway_delivery_queue_messages",
                 tenant="acme", state="pending") == 1 and value(
                values, "mailflowr_gateway_deliveries_total", tenant="acme", kind="route",
                result="deferred", destination="finance") == 1 and value(
                values, "mailflowr_gateway_pipeline_messages_total", tenant="acme",
                outcome="processed") == 2:
            return body, values
        return None

    body, v = wait_for(settled, timeout=15, what="the queue gauge")
    m = "mailflowr_gateway_"
    assert value(v, m + "smtp_messages_total", listener="smtp", **{"class": "2xx"},
                 reason="ok") == 2
    assert value(v, m + "smtp_messages_total", listener="smtp", **{"class": "5xx"},
                 reason="too_big") == 1
    assert value(v, m + "smtp_recipients_refused_total", listener="smtp", reason="relay") == 1
    assert value(v, m + "smtp_replies_total", listener="smtp", code="552") == 1
    assert value(v, m + "smtp_replies_total", listener="smtp", code="354") == 3
    assert value(v, m + "smtp_connections_total", listener="smtp") == before + 1
    assert value(v, m + "smtp_connections_open", listener="smtp") == 0
    assert value(v, m + "accept_latency_seconds_count", listener="smtp") == 2
    assert value(v, m + "smtp_received_bytes_total", listener="smtp") > 300
    assert value(v, m + "messages_accepted_total", tenant="acme") == 2
    assert value(v, m + "pipeline_messages_total", tenant="acme", outcome="processed") == 2
    assert value(v, m + "workflow_rule_hits_total", tenant="acme", rule="copies") == 1
    assert value(v, m + "workflow_rule_hits_total", tenant="acme", rule="billing") == 1
    assert value(v, m + "pipeline_stage_duration_seconds_count", stage="parse") == 2
    assert value(v, m + "deliveries_total", tenant="acme", kind="cc", result="sent",
                 destination="relay") == 1
    assert value(v, m + "deliveries_total", tenant="acme", kind="route", result="deferred",
                 destination="finance") == 1
    assert value(v, m + "delivery_queue_oldest_age_seconds", tenant="acme") > 0
    # both attempts recorded, each timed from the relay's reply to its durable record
    assert value(v, m + "delivery_unrecorded_seconds_count") == 2
    assert 0 < value(v, m + "delivery_unrecorded_seconds_sum") < 5
    assert value(v, m + "ready") == 1 and value(v, m + "database_up") == 1
    assert value(v, "process_resident_memory_bytes") > 0
    # No address, no subject in any label or value.
    assert "@" not in body and "hello" not in body

    promtool = need_tool("promtool", "prometheus")
    check = subprocess.run([promtool, "check", "metrics"], input=body.encode(),
                           capture_output=True, timeout=60)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


def test_tenant_labels_can_be_turned_off(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks, {"metrics": {"tenant_labels": False}})
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message())
    sinks[0].wait(1)
    _, v = wait_for(lambda: (r := samples(metrics_port(gw))) and value(
        r[1], "mailflowr_gateway_pipeline_messages_total", tenant="all",
        outcome="processed") == 1 and r, what="the pipeline counter")
    assert value(v, "mailflowr_gateway_messages_accepted_total", tenant="all") == 1
    assert not any(("tenant", "acme") in labels for _, labels in v)


def test_every_metric_is_documented_in_the_operations_guide():
    from gateway.metrics import Metrics

    guide = (ROOT / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `(mailflowr_gateway_\w+)`", guide, re.M))
    ours = {f.name + ("_total" if f.type == "counter" else "")
            for f in Metrics().registry.collect() if f.name.startswith("mailflowr_gateway_")}
    assert ours - documented == set(), "metrics missing from the table in docs/operations.md"
    assert documented - ours == set(), "docs/operations.md documents metrics that do not exist"


def test_health_readiness_and_status(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    port = metrics_port(gw)
    code, body = http_get(port, "/healthz")
    assert code == 200 and json.loads(body)["status"] == "ok"
    code, body = http_get(port, "/readyz")
    doc = json.loads(body)
    assert code == 200 and doc["ready"] is True
    assert doc["checks"]["listeners"]["bound"] == {"smtp": f"127.0.0.1:{gw.port}"}
    assert doc["checks"]["policy"]["version"] and doc["checks"]["database"]["ok"]
    assert http_get(port, "/nothing")[0] == 404

    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["billing@acme.test"], simple_message(to="billing@acme.test"))
    sinks[1].handler.mode = "tempfail"
    wait_for(lambda: sinks[1].handler.attempts >= 1, what="the deferred attempt")
    result = wait_for(lambda: (r := gw.cli("status", check=True)) and
                      b"1 pending" in r.stdout and r, timeout=15, what="status")
    out = result.stdout.decode()
    assert f"127.0.0.1:{gw.port}" in out and "running" in out and "0 to process" in out
    status = json.loads(gw.cli("status", "--json", check=True).stdout)
    assert status["deliveries"]["pending"] == 1 and status["state"] == "running"

    gw.proc.send_signal(signal.SIGUSR1)
    line = wait_for(lambda: next((ln for ln in gw.log().splitlines() if " status: {" in ln),
                                 None), what="the SIGUSR1 status line")
    assert json.loads(line.split(" status: ", 1)[1])["pid"] == gw.proc.pid

    assert gw.terminate() == 0
    failed = gw.cli("status")
    assert failed.returncode == 1 and b"no daemon answers" in failed.stderr


# PostgreSQL only: an SQLite file cannot go away from under an open connection.
@pytest.mark.parametrize("backend", ["postgresql"])
def test_readiness_flips_when_the_database_goes_away(make_gateway, tmp_path, sinks, backend):
    gw = _gateway(make_gateway, tmp_path, sinks)
    port = metrics_port(gw)
    assert http_get(port, "/readyz")[0] == 200
    name = gw.db_url.rsplit("/", 1)[1]
    admin = create_engine(gw.db_url.rsplit("/", 1)[0] + "/postgres", isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = :n"), {"n": name})
        _, body = wait_for(lambda: (r := http_get(port, "/readyz"))[0] == 503 and r,
                              what="readiness to drop")
        doc = json.loads(body)
        assert doc["ready"] is False and doc["checks"]["database"]["ok"] is False
        assert doc["checks"]["database"]["error"]
        assert http_get(port, "/healthz")[0] == 200  # alive: systemd must not restart it
        wait_for(lambda: value(samples(port)[1], "mailflowr_gateway_database_up") == 0
                 or None, what="database_up to drop")
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        wait_for(lambda: http_get(port, "/readyz")[0] == 200, what="readiness to come back")
        wait_for(lambda: value(samples(port)[1], "mailflowr_gateway_database_up") == 1,
                 what="database_up to come back")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    assert "database reachable again" in gw.log()


class NotifySocket:
    """What systemd listens on for a Type=notify service."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.got: list[str] = []

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def wait(self, line: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.splitlines() for m in self.got):
                return
            try:
                self.got.append(self.sock.recv(4096).decode())
            except TimeoutError:
                pass
        raise AssertionError(f"no {line} in {self.got}")

    def after(self, line: str) -> list[str]:
        """The datagrams from the last one containing ``line`` on."""
        last = max(i for i, m in enumerate(self.got) if line in m.splitlines())
        return self.got[last:]


def test_systemd_notifications(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks, start=False)
    with NotifySocket(str(tmp_path / "notify.sock")) as notify:
        _notifications(gw, notify, tmp_path)


def _notifications(gw, notify, tmp_path):
    gw.start(wait=False, env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
                              "WATCHDOG_USEC": "1000000"})
    notify.wait("READY=1")
    # READY=1 comes once the listener is bound: a client connects at once.
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as c:
        assert c.recv(100).startswith(b"220 ")
    ready = next(m for m in notify.got if "READY=1" in m.splitlines())
    assert f"MAINPID={gw.proc.pid}" in ready and "STATUS=running on 127.0.0.1" in ready
    for _ in range(2):  # pings keep coming, twice per interval
        notify.got.clear()
        notify.wait("WATCHDOG=1", timeout=3)
    gw.proc.send_signal(signal.SIGHUP)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.wait("RELOADING=1")
    [reloading] = [m for m in notify.got if "RELOADING=1" in m.splitlines()]
    began = int(re.search(r"^MONOTONIC_USEC=(\d+)$", reloading, re.M).group(1))
    assert before - 5_000_000 < began <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notify.wait("READY=1")  # told again once the reload is done
    assert "READY=1" in "\n".join(notify.after("RELOADING=1"))
    notify.got.clear()
    gw.proc.send_signal(signal.SIGTERM)
    notify.wait("STOPPING=1")
    assert gw.proc.wait(30) == 0


def test_abstract_notify_socket_is_understood(monkeypatch):
    from gateway.sdnotify import Notifier

    name = f"mailflowr-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "30000000",
                             "WATCHDOG_PID": str(os.getpid())})
        assert notifier.watchdog == 15.0
        assert notifier.ping()
        assert sock.recv(100) == b"WATCHDOG=1"
        notifier.close()
    other = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"})
    assert other.watchdog is None  # meant for another process
    assert not Notifier({}).notify("READY=1")  # outside systemd: nothing, no error


PRIVATE = "jan.jansen@private-person.test"
SUBJECT = "Diagnose van Jan"


def _personal_traffic(gw, sinks):
    relay = sinks[0]
    relay.handler.mode = "permfail_echo"  # the remote reply names the address
    message = simple_message(subject=SUBJECT, sender=PRIVATE)
    with gw.smtp() as s:
        s.sendmail(PRIVATE, ["support@acme.test"], message)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            s.sendmail(PRIVATE, ["nobody@unknown-domain.test"], message)
    wait_for(lambda: relay.handler.attempts >= 1, what="the delivery attempt")
    wait_for(lambda: "bounced queue_id=" in gw.log(), what="the bounce line")
    return message


def test_logs_hold_no_address_or_subject_by_default(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks)
    message = _personal_traffic(gw, sinks)
    log = gw.log()
    assert PRIVATE not in log and "private-person" not in log
    assert "manager@partner.test" not in log and "support@acme.test" not in log
    assert SUBJECT not in log and "Jan" not in log
    msgid = re.search(rb"Message-ID: <(.*?)>", message).group(1).decode()
    assert msgid not in log
    hashed = msgid_hash(f"<{msgid}>")
    accepted = [ln for ln in log.splitlines() if " accepted queue_id=" in ln]
    assert len(accepted) == 1
    assert f"msgid={hashed}" in accepted[0] and "code=250" in accepted[0]
    assert "tenant=acme" in accepted[0] and "sender=[address]" in accepted[0]
    queue_id = re.search(r"queue_id=(\w+)", accepted[0]).group(1)
    events = {ln.split(": ", 1)[1].split(" ")[0] for ln in log.splitlines()
              if f"queue_id={queue_id}" in ln}
    assert {"accepted", "processed", "bounced"} <= events
    bounced = next(ln for ln in log.splitlines() if " bounced queue_id=" in ln)
    assert "code=550" in bounced and "[address]" in bounced and f"msgid={hashed}" in bounced


@pytest.mark.sqlite_only  # the log's form: any database
def test_logs_to_the_journal_carry_priorities_and_no_time_of_their_own(make_gateway):
    """Under systemd, stderr is the journal (JOURNAL_STREAM names it): each line starts
    with its syslog priority, so journalctl -p warning works, and without a timestamp,
    which journald adds."""
    gw = make_gateway(start=False)
    gw.log_path.touch()
    st = os.stat(gw.log_path)
    gw.start(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    with gw.smtp() as s:
        s.sendmail("a@sender.test", ["support@acme.test"], simple_message("journal"))
    gw.wait_processed(1)
    gw.terminate()
    lines = gw.log().splitlines()
    assert lines and all(re.match(r"<[2-7]>[A-Z]+ [\w.]+: ", ln) for ln in lines), lines[:5]
    assert not any(re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", ln) for ln in lines)
    assert any(ln.startswith("<4>WARNING gateway.startup: encryption at rest is off")
               for ln in lines)
    assert any(ln.startswith("<6>INFO gateway.ingress.smtp: accepted queue_id=") for ln in lines)
    # another stream (a terminal, a file) gets the time as before
    elsewhere = make_gateway()
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ", elsewhere.log())


def test_personal_data_in_json_logs_when_asked(make_gateway, tmp_path, sinks):
    gw = _gateway(make_gateway, tmp_path, sinks,
                  {"logging": {"format": "json", "personal_data": True}})
    _personal_traffic(gw, sinks)
    lines = [json.loads(ln) for ln in gw.log().splitlines() if ln.startswith("{")]
    assert lines and all({"time", "level", "logger", "message"} <= set(ln) for ln in lines)
    accepted = next(ln for ln in lines if ln.get("event") == "accepted")
    assert accepted["sender"] == PRIVATE and accepted["tenant"] == "acme"
    assert accepted["code"] == 250
    processed = next(ln for ln in lines if ln.get("event") == "processed")
    assert processed["subject"] == SUBJECT
    bounced = next(ln for ln in lines if ln.get("event") == "bounced")
    assert bounced["recipient"] == "manager@partner.test" and bounced["code"] == 550


def test_sighup_loads_a_renewed_certificate(make_gateway, tmp_path, sinks):
    import trustme

    old_ca, new_ca = trustme.CA(), trustme.CA()
    chain, key = tmp_path / "chain.pem", tmp_path / "key.pem"

    def install(ca: Any) -> None:
        cert = ca.issue_cert("mx.gateway.test", "127.0.0.1")
        cert.private_key_and_cert_chain_pem.write_to_path(str(chain))
        cert.private_key_pem.write_to_path(str(key))

    install(old_ca)
    gw = _gateway(make_gateway, tmp_path, sinks,
                  {"smtp": {"tls": {"cert_file": str(chain), "key_file": str(key)}}})

    def starttls(ca: Any) -> None:
        with gw.smtp() as s:
            s.starttls(context=client_context(ca))
            assert s.noop()[0] == 250

    starttls(old_ca)
    install(new_ca)
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "TLS certificate reloaded" in gw.log(), what="the reload")
    starttls(new_ca)
    with pytest.raises(ssl.SSLError):
        starttls(old_ca)

    key.write_text("not a key\n")  # a broken renewal: refused, the loaded one stays
    gw.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "TLS reload refused" in gw.log(), what="the refusal")
    starttls(new_ca)
    _, v = samples(metrics_port(gw))
    assert value(v, "mailflowr_gateway_tls_reloads_total", result="success") == 1
    assert value(v, "mailflowr_gateway_tls_reloads_total", result="failure") == 1
