"""Webhook notifier: JSON to a loopback receiver, connection parsing, stage-outcome callbacks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from mlplatform.notify import StageOutcomeNotifier, WebhookNotifier, send_alert, stage_alert_callback, webhook_target
from mlplatform.spec.model import TenantFile

TENANT = {
    "apiVersion": "mlplatform.io/v1", "kind": "Tenant", "metadata": {"name": "acme"},
    "spec": {"owner": "o", "namespace": "ml-acme", "quotas": {"gpu_slots": 0, "cpu_slots": 2},
             "data": {"allowed_prefixes": ["acme/"]}},
}


@pytest.fixture
def receiver():
    got: list[tuple[str, dict, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        status = 200

        def do_POST(self):  # noqa: N802
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            got.append((self.path, dict(self.headers), json.loads(body)))
            self.send_response(type(self).status)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{server.server_address[1]}", got=got, handler=Handler)
    server.shutdown()


def _conn(monkeypatch, conn_id, **fields):
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "http", **fields}))


def _tenant(alerts=None):
    body = dict(TENANT, spec=dict(TENANT["spec"], **({"alerts": alerts} if alerts is not None else {})))
    return TenantFile.model_validate(body)


def test_webhook_target_forms(monkeypatch):
    _conn(monkeypatch, "hook_a", host="https://hooks.example/x", extra={"headers": {"X-Team": "acme"}},
          password="tok")
    url, headers = webhook_target("hook_a")
    assert url == "https://hooks.example/x"
    assert headers["X-Team"] == "acme" and headers["Authorization"] == "Bearer tok"
    _conn(monkeypatch, "hook_b", host="127.0.0.1", port=8080, extra={"path": "/in/alerts"})
    assert webhook_target("hook_b")[0] == "http://127.0.0.1:8080/in/alerts"


def test_notifier_posts_json(monkeypatch, receiver):
    _conn(monkeypatch, "hook", host=f"{receiver.url}/alerts", extra={"headers": {"X-Team": "acme"}})
    ti = SimpleNamespace(dag_id="acme__churn__monitor", run_id="manual__1", task_id="drift_check")
    WebhookNotifier(connection_id="hook", event="drift", tenant="acme", pipeline="churn",
                    message="drift in {{ ti.dag_id }}", details={"drift_share": 0.5})({"ti": ti, "run_id": "manual__1"})
    path, headers, body = receiver.got[0]
    assert path == "/alerts" and headers["X-Team"] == "acme"
    assert body["event"] == "drift" and body["tenant"] == "acme" and body["details"] == {"drift_share": 0.5}
    assert body["message"] == "drift in acme__churn__monitor" and body["run_id"] == "manual__1"


def test_notifier_rejects_unknown_event():
    with pytest.raises(ValueError):
        WebhookNotifier(connection_id="x", event="party", tenant="a", pipeline="b")


def test_send_alert_respects_the_tenant_channel_and_never_raises(monkeypatch, receiver):
    assert send_alert(_tenant(), "churn", "drift", "m", {}, {}) is False  # no channel configured
    _conn(monkeypatch, "acme_alerts", host=f"{receiver.url}/a")
    tenant = _tenant({"webhook_connection": "acme_alerts", "events": ["drift"]})
    assert send_alert(tenant, "churn", "drift", "m", {}, {}) is True
    assert send_alert(tenant, "churn", "rollback", "m", {}, {}) is False  # event not subscribed
    receiver.handler.status = 500
    assert send_alert(tenant, "churn", "drift", "m", {}, {}) is False  # receiver down: logged, not raised
    assert len(receiver.got) == 2


def test_stage_outcome_notifier(monkeypatch, receiver):
    _conn(monkeypatch, "acme_alerts", host=f"{receiver.url}/a")
    tenant = _tenant({"webhook_connection": "acme_alerts"})
    assert stage_alert_callback(_tenant(), "churn", "evaluate") is None
    assert stage_alert_callback(tenant, "churn", "train") is None
    callback = stage_alert_callback(tenant, "churn", "evaluate")
    assert isinstance(callback, StageOutcomeNotifier)

    def ti(task_id, result):
        return SimpleNamespace(task_id=task_id, dag_id="acme__churn", run_id="r",
                               xcom_pull=lambda task_ids: result)

    callback({"ti": ti("evaluate", {"decision": "accepted"})})
    assert receiver.got == []
    callback({"ti": ti("evaluate", {"decision": "rejected", "reason": "roc_auc 0.6 < 0.7", "metric": "roc_auc"})})
    callback({"ti": ti("canary_deploy", {"decision": "rolled_back", "challenger_version": "3",
                                         "champion_version": "2", "gates": {"failed": ["p99 300ms > 250ms"]}})})
    events = [b["event"] for _, _, b in receiver.got]
    assert events == ["retrain_rejected", "rollback"]
    assert "p99 300ms" in receiver.got[1][2]["message"]
    assert receiver.got[0][2]["details"]["reason"] == "roc_auc 0.6 < 0.7"


@pytest.fixture
def smtp_receiver():
    """A minimal SMTP server on loopback that keeps every message it accepts."""
    import socketserver
    from email import message_from_bytes

    messages = []

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            self.wfile.write(b"220 test ESMTP\r\n")
            rcpt = []
            while line := self.rfile.readline():
                cmd = line.decode().strip().upper()
                if cmd.startswith(("EHLO", "HELO")):
                    self.wfile.write(b"250 test\r\n")
                elif cmd.startswith("RCPT TO:"):
                    rcpt.append(line.decode().split(":", 1)[1].strip().strip("<>"))
                    self.wfile.write(b"250 OK\r\n")
                elif cmd == "DATA":
                    self.wfile.write(b"354 end with .\r\n")
                    data = b""
                    while (chunk := self.rfile.readline()) not in (b".\r\n", b""):
                        data += chunk
                    messages.append((rcpt, message_from_bytes(data)))
                    self.wfile.write(b"250 queued\r\n")
                elif cmd == "QUIT":
                    self.wfile.write(b"221 bye\r\n")
                    return
                else:
                    self.wfile.write(b"250 OK\r\n")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield SimpleNamespace(port=server.server_address[1], messages=messages)
    server.shutdown()


def test_email_alerts_through_the_smtp_provider(monkeypatch, smtp_receiver):
    monkeypatch.setenv("AIRFLOW_CONN_TEAM_SMTP", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": smtp_receiver.port,
        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "mlplatform@example.test"}}))
    tenant = _tenant({"email": ["ml-oncall@acme.test"], "email_connection": "team_smtp", "events": ["rollback"]})
    assert send_alert(tenant, "churn", "rollback", "canary of version 3 rolled back", {"failed": ["p99"]}, {})
    assert send_alert(tenant, "churn", "drift", "m", {}, {}) is False  # not subscribed
    (rcpt, message), = smtp_receiver.messages
    assert rcpt == ["ml-oncall@acme.test"]
    assert message["Subject"] == "[mlplatform] rollback: acme/churn"
    body = next(p for p in message.walk() if p.get_content_type() == "text/html").get_payload(decode=True).decode()
    assert "canary of version 3 rolled back" in body and "p99" in body
    assert stage_alert_callback(tenant, "churn", "canary_deploy") is not None
    assert stage_alert_callback(tenant, "churn", "evaluate") is None  # retrain_rejected not subscribed


def test_bad_alert_email_is_a_clear_error():
    with pytest.raises(ValueError, match="email"):
        _tenant({"email": ["not an address"]})
