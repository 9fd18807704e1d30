"""Alerts to a tenant's channel through Airflow notifiers: drift, a rejected retrain, a rollback.

The channel is the tenant file's ``spec.alerts.webhook_connection``: an Airflow connection whose ``host`` is
the webhook URL (``http(s)://...``; or host + port + schema + ``extra.path``), with optional
``extra.headers`` and a password sent as a bearer token. The body is one JSON object::

    {"source": "mlplatform", "event": "drift", "tenant": "acme", "pipeline": "churn-xgb",
     "dag_id": ..., "run_id": ..., "task_id": ..., "message": "...", "details": {...}, "sent_at": "..."}

Email (``spec.alerts.email``) goes through the SMTP provider's ``SmtpNotifier`` and the tenant's
``email_connection`` (default ``smtp_default``), imported only when an alert is sent.
Imports nothing heavy: it is used at DAG-parse time to attach callbacks.

No template rendering, ever: alert text carries tenant-controlled strings (``data.source``, column names,
rejection reasons, drifted category values), and Airflow renders a notifier's ``template_fields`` as Jinja with
``conn`` and ``var`` in the context, so ``{{ conn.x.password }}`` in a column name would mail a platform secret
to the tenant. Both notifiers here have no template fields and never render (``_PlainText``); tenant text is
only ever a value (a JSON string, HTML-escaped text), never template source.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Any

from airflow.sdk import BaseNotifier

log = logging.getLogger(__name__)

EVENTS = ("drift", "retrain_rejected", "rollback")
TIMEOUT_S = 10.0


def webhook_target(connection_id: str) -> tuple[str, dict[str, str]]:
    """(URL, headers) of a webhook connection."""
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(connection_id)
    extra = conn.extra_dejson or {}
    host = (conn.host or "").strip()
    if extra.get("url"):
        url = str(extra["url"])
    elif host.startswith(("http://", "https://")):
        url = host
    elif host:
        scheme = conn.schema if conn.schema in ("http", "https") else ("https" if conn.conn_type == "https" else "http")
        port = f":{conn.port}" if conn.port else ""
        url = f"{scheme}://{host}{port}/{str(extra.get('path', '')).lstrip('/')}"
    else:
        raise ValueError(f"connection {connection_id!r} has no host or extra.url: cannot tell where to post")
    headers = {"Content-Type": "application/json", **{str(k): str(v) for k, v in (extra.get("headers") or {}).items()}}
    if conn.password:
        headers.setdefault("Authorization", f"Bearer {conn.password}")
    return url, headers


def alert_payload(event: str, tenant: str, pipeline: str, message: str, details: dict | None,
                  context: dict | None = None) -> dict[str, Any]:
    context = context or {}
    ti = context.get("ti")
    return {
        "source": "mlplatform",
        "event": event,
        "tenant": tenant,
        "pipeline": pipeline,
        "dag_id": getattr(ti, "dag_id", None) or getattr(context.get("dag"), "dag_id", None),
        "run_id": context.get("run_id") or getattr(ti, "run_id", None),
        "task_id": getattr(ti, "task_id", None),
        "message": message,
        "details": details or {},
        "sent_at": datetime.now(timezone.utc).isoformat(),
    }


class _PlainText:
    """Mixin for a notifier whose fields are sent as they are: nothing is rendered as a Jinja template.

    ``BaseNotifier.__call__`` renders ``template_fields``, and the SMTP provider's notifier re-renders fields it
    fills from the connection's templates; both go through these two methods. Tenant text must never be
    template source (see the module docstring).
    """

    template_fields: tuple[str, ...] = ()
    template_ext: tuple[str, ...] = ()

    def render_template_fields(self, context, jinja_env=None) -> None:
        return None

    def _do_render_template_fields(self, parent, template_fields, context, jinja_env, seen_oids) -> None:
        return None


class WebhookNotifier(_PlainText, BaseNotifier):
    """Posts one JSON alert to the generic webhook of an Airflow connection.

    Use as a callback (``on_failure_callback=WebhookNotifier(...)``) or call it with a task's context. The
    message is sent as given: it is not a template (it carries tenant text).
    """

    def __init__(self, *, connection_id: str, event: str, tenant: str, pipeline: str, message: str = "",
                 details: dict | None = None, timeout: float = TIMEOUT_S):
        super().__init__()
        if event not in EVENTS:
            raise ValueError(f"unknown alert event {event!r}; use one of {', '.join(EVENTS)}")
        self.connection_id = connection_id
        self.event = event
        self.tenant = tenant
        self.pipeline = pipeline
        self.message = message
        self.details = details or {}
        self.timeout = timeout

    def payload(self, context: dict) -> dict[str, Any]:
        return alert_payload(self.event, self.tenant, self.pipeline, self.message, self.details, context)

    def notify(self, context: dict) -> None:
        import httpx

        url, headers = webhook_target(self.connection_id)
        body = json.dumps(self.payload(context), default=str)
        response = httpx.post(url, content=body, headers=headers, timeout=self.timeout)
        response.raise_for_status()
        log.info("alert %s sent to connection %s (HTTP %s)", self.event, self.connection_id, response.status_code)


def tenant_channel(tenant: Any, event: str) -> str | None:
    """The tenant's webhook connection id when it wants ``event`` alerts, else None."""
    alerts = getattr(tenant.spec, "alerts", None)
    if alerts is None or not alerts.webhook_connection or event not in alerts.events:
        return None
    return alerts.webhook_connection


def tenant_emails(tenant: Any, event: str) -> list[str]:
    """The addresses that get ``event`` alerts by email (none when the tenant set none)."""
    alerts = getattr(tenant.spec, "alerts", None)
    return list(alerts.email) if alerts is not None and event in alerts.events else []


def email_notifier(tenant: Any, pipeline: str, event: str, message: str, details: dict | None):
    """The SMTP provider's notifier for one alert (subject and an HTML body with the details)."""
    from html import escape

    rows = "".join(f"<tr><th align=left>{escape(str(k))}</th><td><pre>{escape(json.dumps(v, default=str, indent=1))}"
                   f"</pre></td></tr>" for k, v in (details or {}).items())
    return plain_smtp_notifier_class()(to=tenant_emails(tenant, event), smtp_conn_id=tenant.spec.alerts.email_connection,
                                       subject=f"[mlplatform] {event}: {tenant.name}/{pipeline}",
                                       html_content=f"<p>{escape(message)}</p><table>{rows}</table>")


_PLAIN_SMTP: type | None = None


def plain_smtp_notifier_class() -> type:
    """The SMTP provider's ``SmtpNotifier`` with rendering disabled (subject and HTML body are sent as built).

    Made on first use: the provider is imported only when an alert is emailed.
    """
    global _PLAIN_SMTP
    if _PLAIN_SMTP is None:
        from airflow.providers.smtp.notifications.smtp import SmtpNotifier

        _PLAIN_SMTP = type("PlainSmtpNotifier", (_PlainText, SmtpNotifier), {"__module__": __name__})
    return _PLAIN_SMTP


def send_alert(tenant: Any, pipeline: str, event: str, message: str, details: dict | None, context: dict) -> bool:
    """Send one alert to each of the tenant's channels (webhook, email); True when at least one got it.

    Never raises: an alert outage must not fail the pipeline.
    """
    sent = False
    connection_id = tenant_channel(tenant, event)
    if connection_id is not None:
        try:
            WebhookNotifier(connection_id=connection_id, event=event, tenant=tenant.name, pipeline=pipeline,
                            message=message, details=details)(dict(context))
            sent = True
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            log.warning("could not send the %s alert to connection %s: %s", event, connection_id, exc)
    if tenant_emails(tenant, event):
        try:
            email_notifier(tenant, pipeline, event, message, details)(dict(context))
            log.info("alert %s emailed to %s", event, ", ".join(tenant_emails(tenant, event)))
            sent = True
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            log.warning("could not email the %s alert through %s: %s", event, tenant.spec.alerts.email_connection,
                        exc)
    if connection_id is None and not tenant_emails(tenant, event):
        log.info("no %s alert channel configured for tenant %s", event, tenant.name)
    return sent


class StageOutcomeNotifier(_PlainText, BaseNotifier):
    """An ``on_success_callback`` for the evaluate and canary_deploy tasks of a training DAG.

    Reads the task's own result (XCom ``return_value``) and alerts on ``decision == "rejected"`` (evaluate)
    or ``decision == "rolled_back"`` (canary_deploy); any other outcome sends nothing.
    """

    def __init__(self, *, tenant: Any, pipeline: str):
        super().__init__()
        self.tenant = tenant
        self.pipeline = pipeline

    @staticmethod
    def event_for(task_id: str, result: dict | None) -> tuple[str, str] | None:
        """(event, message) for a stage result that deserves an alert."""
        if not isinstance(result, dict):
            return None
        decision = result.get("decision")
        if task_id == "evaluate" and decision == "rejected":
            return "retrain_rejected", f"retrained model rejected: {result.get('reason', '')}"
        if task_id == "canary_deploy" and decision == "rolled_back":
            failed = "; ".join((result.get("gates") or {}).get("failed") or [])
            return "rollback", (f"canary of version {result.get('challenger_version')} rolled back; champion stays "
                                f"{result.get('champion_version')}" + (f" ({failed})" if failed else ""))
        return None

    def notify(self, context: dict) -> None:
        ti = context.get("ti")
        if ti is None:
            return
        found = self.event_for(ti.task_id, ti.xcom_pull(task_ids=ti.task_id))
        if found is None:
            return
        event, message = found
        result = ti.xcom_pull(task_ids=ti.task_id) or {}
        details = {k: result.get(k) for k in ("decision", "reason", "metric", "value", "champion_value",
                                              "champion_version", "challenger_version", "gates") if k in result}
        send_alert(self.tenant, self.pipeline, event, message, details, context)


def stage_alert_callback(tenant: Any, pipeline: str, task_id: str) -> StageOutcomeNotifier | None:
    """The callback to attach to ``task_id`` of a training DAG, or None when nothing would be sent."""
    wanted = {"evaluate": "retrain_rejected", "canary_deploy": "rollback"}.get(task_id)
    if wanted is None or (tenant_channel(tenant, wanted) is None and not tenant_emails(tenant, wanted)):
        return None
    return StageOutcomeNotifier(tenant=tenant, pipeline=pipeline)
