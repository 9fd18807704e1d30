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
    assert body["dag_id"] == "acme__churn__monitor" and body["run_id"] == "manual__1"
    assert body["message"] == "drift in {{ ti.dag_id }}"  # a value, never a template (tenant text)


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


# --- tenant text is never template source (issue 11) ------------------------------------------------------

CONN_SECRET = "SENTINEL-conn-password-6c1f"
VAR_SECRET = "SENTINEL-variable-9e42"
PAYLOAD = "{{ conn.platform_db.password }}|{{ var.value.platform_secret }}|{% raw %}x{% endraw %}"


def _task_context(ti):
    """What a real task gives a notifier: Airflow's own ``conn`` / ``var`` accessors (they resolve secrets)."""
    from airflow.sdk.execution_time.context import ConnectionAccessor, VariableAccessor

    return {"ti": ti, "run_id": ti.run_id, "conn": ConnectionAccessor(),
            "var": {"value": VariableAccessor(deserialize_json=False), "json": VariableAccessor(deserialize_json=True)}}


def test_tenant_text_reaches_email_and_webhook_literally(monkeypatch, smtp_receiver, receiver):
    """A ``{{ conn... }}`` / ``{{ var.value... }}`` payload in tenant text (data.source, a column name, a
    rejection reason) arrives as written: through the SMTP provider's notifier, the webhook and the stage
    callback, with a real platform connection and variable defined in the environment."""
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    monkeypatch.setenv("AIRFLOW_CONN_PLATFORM_DB", json.dumps({
        "conn_type": "postgres", "host": "db.internal", "login": "airflow", "password": CONN_SECRET}))
    monkeypatch.setenv("AIRFLOW_VAR_PLATFORM_SECRET", VAR_SECRET)
    monkeypatch.setenv("AIRFLOW_CONN_TEAM_SMTP", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": smtp_receiver.port,
        "extra": {"disable_ssl": True, "disable_tls": True, "from_email": "mlplatform@example.test"}}))
    _conn(monkeypatch, "acme_alerts", host=f"{receiver.url}/a")
    ti = SimpleNamespace(dag_id="acme__churn", run_id="manual__x", task_id="evaluate")

    # Control: the upstream notifier renders this context, and the accessors do reach the secrets. Without
    # the fix this is exactly what the tenant's mailbox received.
    SmtpNotifier(to="ops@platform.test", smtp_conn_id="team_smtp", subject="control",
                 html_content=PAYLOAD)(_task_context(ti))
    control = smtp_receiver.messages.pop()[1]
    control_body = next(p for p in control.walk() if p.get_content_type() == "text/html").get_payload(decode=True)
    assert CONN_SECRET in control_body.decode() and VAR_SECRET in control_body.decode()

    tenant = _tenant({"webhook_connection": "acme_alerts", "email": ["ml-oncall@acme.test"],
                      "email_connection": "team_smtp", "events": ["drift", "retrain_rejected"]})
    details = {"drifted_columns": [{"column": PAYLOAD}], "current": f"{PAYLOAD}@dt=2026-11-08"}
    assert send_alert(tenant, "churn", "drift", f"drift in acme/{PAYLOAD}", details, _task_context(ti))
    callback = stage_alert_callback(tenant, "churn", "evaluate")
    callback(_task_context(SimpleNamespace(task_id="evaluate", dag_id="acme__churn", run_id="manual__x",
                                           xcom_pull=lambda task_ids: {"decision": "rejected", "reason": PAYLOAD})))

    mails = [next(p for p in m.walk() if p.get_content_type() == "text/html").get_payload(decode=True).decode()
             + m["Subject"] for _, m in smtp_receiver.messages]
    hooks = [json.dumps(body) for _, _, body in receiver.got]
    assert len(mails) == 2 and len(hooks) == 2
    for text in mails + hooks:
        assert CONN_SECRET not in text and VAR_SECRET not in text
        assert "{{ conn.platform_db.password }}" in text and "{% raw %}" in text, text[:500]
    assert json.loads(hooks[0])["message"] == f"drift in acme/{PAYLOAD}"
    assert json.loads(hooks[1])["details"]["reason"] == PAYLOAD


def test_notifiers_have_no_template_fields():
    from mlplatform.notify import StageOutcomeNotifier, plain_smtp_notifier_class

    for cls in (WebhookNotifier, StageOutcomeNotifier, plain_smtp_notifier_class()):
        assert tuple(cls.template_fields) == () and tuple(cls.template_ext) == (), cls
