"""What the platform page shows, gathered per request, and its server-rendered HTML.

Sources: the tenant files and specs (:func:`mlplatform.spec.loader.load_catalog`: quotas, pipelines, specs
that failed to load with their lint errors), Airflow's metadata DB (``Pool.slots_stats`` for live pool
usage, the latest ``DagRun`` per DAG, ``DagModel`` for paused/parsed) and the MLflow registry (model
versions, aliases, canary state tags). MLflow and Airflow's models are imported inside the functions: this
module runs only in the api-server, on a request. Every section fails on its own: an unreachable MLflow
shows its error in the models section, never a blank page.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from mlplatform.config import PlatformConfig
from mlplatform.ui.access import ALL, visible

log = logging.getLogger(__name__)

MAX_VERSIONS = 10  # newest model versions shown per registered model


@dataclass
class PoolRow:
    name: str
    kind: str  # gpu | cpu
    exists: bool
    slots: float = 0
    occupied: float = 0
    running: int = 0
    queued: int = 0
    deferred: int = 0
    scheduled: int = 0
    open: float = 0
    include_deferred: bool = False


@dataclass
class TenantRow:
    name: str
    owner: str
    tier: str
    gpu_slots: int
    cpu_slots: int
    max_active_runs: int
    pools: list[PoolRow] = field(default_factory=list)


@dataclass
class RunRow:
    run_id: str
    state: str
    run_type: str
    run_after: str | None
    start_date: str | None
    end_date: str | None
    conf: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineRow:
    tenant: str
    pipeline: str
    dag_id: str
    schedule: str | None
    parsed: bool = False
    paused: bool | None = None
    latest: RunRow | None = None
    monitor_latest: RunRow | None = None


@dataclass
class VersionRow:
    version: str
    aliases: list[str]
    created: str | None
    canary_state: str | None = None  # pending | baking | held | promoting | promoted | rolled_back | aborted
    canary_step: str | None = None  # "2/3" while a canary runs
    canary_decision: str | None = None  # the deploy stage's decision tag


@dataclass
class ModelRow:
    name: str
    tenant: str
    canary_share: str | None
    aliases: dict[str, str]
    versions: list[VersionRow] = field(default_factory=list)


@dataclass
class BrokenRow:
    tenant: str
    dag_id: str
    file: str
    errors: list[str]


@dataclass
class PageData:
    user: str
    scope: str  # "all tenants" | comma-separated tenant names | "no tenant"
    tenants: list[TenantRow] = field(default_factory=list)
    pipelines: list[PipelineRow] = field(default_factory=list)
    models: list[ModelRow] = field(default_factory=list)
    broken: list[BrokenRow] = field(default_factory=list)
    platform_problems: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # section -> why it could not be loaded

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def collect(config: PlatformConfig, scope, user_label: str) -> PageData:
    """Everything the page shows for a user whose tenants are ``scope`` (a set, or ``ALL``)."""
    from mlplatform.spec.loader import load_catalog

    catalog = load_catalog(config)
    tenants = visible(scope, catalog.tenants)
    label = "all tenants" if scope is ALL else (", ".join(tenants) or "no tenant")
    data = PageData(user=user_label, scope=label)
    for name in tenants:
        t = catalog.tenants[name]
        q = t.spec.quotas
        data.tenants.append(TenantRow(name, t.spec.owner, str(getattr(t.spec, "tier", "") or ""), q.gpu_slots,
                                      q.cpu_slots, q.max_active_runs,
                                      [PoolRow(t.gpu_pool, "gpu", False), PoolRow(t.cpu_pool, "cpu", False)]))
    for s in sorted(catalog.specs, key=lambda s: s.dag_id):
        md = s.spec.metadata
        if md.tenant in scope:
            data.pipelines.append(PipelineRow(md.tenant, md.name, s.dag_id, s.spec.spec.schedule))
    for b in sorted(catalog.broken, key=lambda b: b.display):
        if b.tenant in scope:
            data.broken.append(BrokenRow(b.tenant, b.dag_id, b.display, [str(p) for p in b.problems]))
    if scope is ALL:
        data.platform_problems = [str(p) for p in catalog.platform_problems]

    for section, fill in (("pools", _fill_pools), ("runs", _fill_runs), ("models", _fill_models)):
        try:
            fill(data, config, set(tenants))
        except Exception as exc:  # noqa: BLE001 - one failing source must not blank the page
            log.exception("platform page: %s unavailable", section)
            data.errors[section] = f"{type(exc).__name__}: {exc}"
    return data


def _fill_pools(data: PageData, config: PlatformConfig, tenants: set[str]) -> None:
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session
    from sqlalchemy import select

    with create_session() as session:
        stats = Pool.slots_stats(session=session)
        include = {p.pool: bool(p.include_deferred) for p in session.scalars(select(Pool))}
    for t in data.tenants:
        for row in t.pools:
            s = stats.get(row.name)
            if s is None:
                continue
            row.exists = True
            row.slots, row.open = s["total"], s["open"]
            row.running, row.queued, row.deferred, row.scheduled = s["running"], s["queued"], s["deferred"], s["scheduled"]
            row.include_deferred = include.get(row.name, False)
            row.occupied = row.slots - row.open  # what Airflow counts against the pool


def _run_row(run) -> RunRow:
    state = getattr(run.state, "value", run.state)
    run_type = getattr(run.run_type, "value", run.run_type)
    return RunRow(run.run_id, str(state), str(run_type), _iso(run.run_after), _iso(run.start_date),
                  _iso(run.end_date), dict(run.conf or {}))


def _fill_runs(data: PageData, config: PlatformConfig, tenants: set[str]) -> None:
    from airflow.models.dag import DagModel
    from airflow.models.dagrun import DagRun
    from airflow.utils.session import create_session
    from sqlalchemy import func, select

    ids = [p.dag_id for p in data.pipelines] + [f"{p.dag_id}__monitor" for p in data.pipelines]
    if not ids:
        return
    with create_session() as session:
        dags = {d.dag_id: d for d in session.scalars(select(DagModel).where(DagModel.dag_id.in_(ids)))}
        newest = (select(DagRun.dag_id, func.max(DagRun.id).label("id"))
                  .where(DagRun.dag_id.in_(ids)).group_by(DagRun.dag_id).subquery())
        latest = {r.dag_id: _run_row(r) for r in session.scalars(select(DagRun).join(newest, DagRun.id == newest.c.id))}
    for p in data.pipelines:
        dag = dags.get(p.dag_id)
        p.parsed = dag is not None and not getattr(dag, "is_stale", False)
        p.paused = None if dag is None else bool(dag.is_paused)
        p.latest = latest.get(p.dag_id)
        p.monitor_latest = latest.get(f"{p.dag_id}__monitor")


def _fill_models(data: PageData, config: PlatformConfig, tenants: set[str]) -> None:
    if not tenants:
        return
    from mlflow import MlflowClient

    from mlplatform.stages.canary_state import CANARY_TAG, SHARE_TAG, STATE_TAG

    client = MlflowClient(tracking_uri=config.tracking_uri, registry_uri=config.tracking_uri)
    models, token = [], None
    while True:
        page = client.search_registered_models(max_results=200, page_token=token)
        models.extend(page)
        token = page.token
        if not token:
            break
    for rm in sorted(models, key=lambda m: m.name):
        tenant = rm.name.split(".", 1)[0]
        if tenant not in tenants:
            continue
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(version, []).append(alias)
        row = ModelRow(rm.name, tenant, (rm.tags or {}).get(SHARE_TAG), aliases)
        versions = client.search_model_versions(f"name = '{rm.name}'", max_results=1000)
        for mv in sorted(versions, key=lambda v: int(v.version), reverse=True)[:MAX_VERSIONS]:
            tags = mv.tags or {}
            v = VersionRow(str(mv.version), sorted(by_version.get(str(mv.version), [])),
                           _iso(datetime.fromtimestamp(mv.creation_timestamp / 1000)) if mv.creation_timestamp else None,
                           canary_decision=tags.get(CANARY_TAG))
            if STATE_TAG in tags:
                try:
                    st = json.loads(tags[STATE_TAG])
                    v.canary_state = st.get("state")
                    steps = st.get("steps") or []
                    if v.canary_state not in ("promoted", "rolled_back", "aborted") and steps:
                        v.canary_step = f"{min(int(st.get('step', 0)) + 1, len(steps))}/{len(steps)}"
                except (ValueError, TypeError):
                    v.canary_state = "unreadable"
            row.versions.append(v)
        data.models.append(row)


# ------------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:16px 20px;color:#1f2937;background:#fff}
h1{font-size:20px;margin:0 0 4px} h2{font-size:16px;margin:22px 0 8px;border-bottom:1px solid #e5e7eb;padding-bottom:4px}
.who{color:#6b7280;font-size:13px;margin-bottom:8px}
table{border-collapse:collapse;font-size:13px;margin-bottom:6px}
th,td{border:1px solid #e5e7eb;padding:4px 8px;text-align:left;vertical-align:top} th{background:#f9fafb;font-weight:600}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.state{display:inline-block;padding:1px 7px;border-radius:9px;font-size:12px;background:#e5e7eb}
.success,.promoted,.promoted_first,.promoted_skip_canary{background:#d1fae5;color:#065f46}
.failed,.rolled_back,.aborted,.upstream_failed{background:#fee2e2;color:#991b1b}
.running,.baking,.queued,.promoting,.pending,.held{background:#dbeafe;color:#1e40af}
.alias{display:inline-block;padding:1px 6px;margin-right:3px;border-radius:4px;font-size:12px;background:#ede9fe;color:#5b21b6}
.alias.champion{background:#fef3c7;color:#92400e}
.bar{display:inline-block;width:90px;height:8px;background:#e5e7eb;border-radius:4px;vertical-align:middle;margin-left:6px}
.bar>span{display:block;height:8px;background:#3b82f6;border-radius:4px}
pre.err{background:#fef2f2;color:#991b1b;padding:6px 8px;margin:4px 0;white-space:pre-wrap;font-size:12px}
.muted{color:#9ca3af} .warn{color:#991b1b}
a{color:#1d4ed8;text-decoration:none} a:hover{text-decoration:underline}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: float) -> str:
    return "∞" if value == float("inf") else f"{value:g}"


def _state(value: str | None, testid: str) -> str:
    if not value:
        return f'<span class="muted" data-testid="{testid}">never run</span>'
    return f'<span class="state {_e(value)}" data-testid="{testid}">{_e(value)}</span>'


def _dag_link(dag_id: str, run_id: str | None = None) -> str:
    """A link into the Airflow UI (the page runs in its iframe: open in the top window)."""
    href = f"/dags/{dag_id}" + (f"/runs/{run_id}" if run_id else "")
    return f'<a href="{_e(href)}" target="_top">{_e(run_id or dag_id)}</a>'


def render(data: PageData) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>ML Platform</title><style>{_CSS}</style>"
           "</head><body>",
           "<h1>ML Platform</h1>",
           f'<div class="who">Signed in as <b data-testid="user">{_e(data.user)}</b> · showing '
           f'<b data-testid="scope">{_e(data.scope)}</b></div>']
    for section, err in sorted(data.errors.items()):
        out.append(f'<pre class="err" data-testid="error-{_e(section)}">{_e(section)} unavailable: {_e(err)}</pre>')

    out.append("<h2>Tenants, quotas and pools</h2>")
    if not data.tenants:
        out.append('<p class="muted" data-testid="no-tenant">No tenant is assigned to this user.</p>')
    else:
        out.append("<table data-testid='pools'><tr><th>tenant</th><th>owner</th><th>quota</th><th>pool</th>"
                   "<th>slots</th><th>occupied</th><th>running</th><th>queued</th><th>deferred</th>"
                   "<th>scheduled</th><th>open</th></tr>")
        for t in data.tenants:
            quota = f"GPU {t.gpu_slots} · tasks {t.cpu_slots} · runs/pipeline {t.max_active_runs}"
            for i, p in enumerate(t.pools):
                head = (f'<td rowspan="{len(t.pools)}" data-testid="tenant">{_e(t.name)}</td>'
                        f'<td rowspan="{len(t.pools)}">{_e(t.owner)}</td><td rowspan="{len(t.pools)}">{_e(quota)}</td>') \
                    if i == 0 else ""
                if not p.exists:
                    out.append(f'<tr data-pool="{_e(p.name)}">{head}<td>{_e(p.name)}</td>'
                               f'<td colspan="7" class="warn">pool missing: run <code>mlplatform sync-pools</code></td></tr>')
                    continue
                pct = 0 if not p.slots or p.slots == float("inf") else min(100, round(100 * p.occupied / p.slots))
                deferred_note = " (counts deferred)" if p.include_deferred else ""
                cells = "".join(f'<td class="n" data-field="{k}">{_num(getattr(p, k))}</td>'
                                for k in ("running", "queued", "deferred", "scheduled", "open"))
                out.append(f'<tr data-pool="{_e(p.name)}">{head}<td>{_e(p.name)}<span class="muted">{deferred_note}</span></td>'
                           f'<td class="n" data-field="slots">{_num(p.slots)}</td>'
                           f'<td class="n"><span data-field="occupied">{_num(p.occupied)}</span>'
                           f'<span class="bar"><span style="width:{pct}%"></span></span></td>{cells}</tr>')
        out.append("</table>")

    out.append("<h2>Pipelines</h2>")
    if not data.pipelines:
        out.append('<p class="muted">No pipelines.</p>')
    else:
        out.append("<table data-testid='pipelines'><tr><th>tenant</th><th>pipeline (DAG)</th><th>schedule</th>"
                   "<th>latest run</th><th>run date</th><th>type</th><th>monitor</th></tr>")
        for p in data.pipelines:
            run = p.latest
            dag = _dag_link(p.dag_id) + ("" if p.parsed else ' <span class="warn">not parsed yet</span>') + \
                (' <span class="muted">paused</span>' if p.paused else "")
            date = (run.start_date or run.run_after) if run else None
            out.append(f'<tr data-dag="{_e(p.dag_id)}"><td>{_e(p.tenant)}</td><td>{dag}</td>'
                       f'<td>{_e(p.schedule or "manual / on drift")}</td>'
                       f'<td>{_state(run.state if run else None, "run-state")}'
                       f'{(" " + _dag_link(p.dag_id, run.run_id)) if run else ""}</td>'
                       f'<td data-testid="run-date">{_e(date[:19].replace("T", " ") if date else "")}</td>'
                       f'<td>{_e(run.run_type if run else "")}</td>'
                       f'<td>{_state(p.monitor_latest.state if p.monitor_latest else None, "monitor-state")}</td></tr>')
        out.append("</table>")

    out.append("<h2>Models (MLflow registry)</h2>")
    if not data.models:
        out.append('<p class="muted">No registered models.</p>')
    for m in data.models:
        share = f' · canary traffic share <b data-testid="canary-share">{_e(m.canary_share)}</b>' if m.canary_share else ""
        out.append(f'<div data-model="{_e(m.name)}"><b>{_e(m.name)}</b>{share}'
                   "<table><tr><th>version</th><th>aliases</th><th>canary</th><th>decision</th><th>created</th></tr>")
        for v in m.versions:
            aliases = "".join(f'<span class="alias {_e(a)}">{_e(a)}</span>' for a in v.aliases)
            canary = ""
            if v.canary_state:
                canary = f'<span class="state {_e(v.canary_state)}">{_e(v.canary_state)}</span>' + \
                    (f" step {_e(v.canary_step)}" if v.canary_step else "")
            out.append(f'<tr data-version="{_e(v.version)}"><td class="n">{_e(v.version)}</td>'
                       f'<td data-field="aliases" data-aliases="{_e(",".join(v.aliases))}">{aliases}</td>'
                       f'<td data-field="canary" data-canary="{_e(v.canary_state or "")}">{canary}</td>'
                       f'<td>{_e(v.canary_decision or "")}</td><td>{_e((v.created or "")[:19].replace("T", " "))}</td></tr>')
        out.append("</table></div>")

    out.append("<h2>Specs that failed to load</h2>")
    if not data.broken and not data.platform_problems:
        out.append('<p class="muted" data-testid="no-broken">Every spec loads.</p>')
    for b in data.broken:
        out.append(f'<div data-broken="{_e(b.dag_id)}"><b>{_e(b.file)}</b> → paused stand-in DAG '
                   f'{_dag_link(b.dag_id)} <span class="state failed">invalid-spec</span>'
                   f'<pre class="err">{_e(chr(10).join(b.errors))}</pre></div>')
    if data.platform_problems:
        out.append('<div data-testid="platform-problems"><b>Platform files</b><pre class="err">'
                   f'{_e(chr(10).join(data.platform_problems))}</pre></div>')
    out.append("</body></html>")
    return "".join(out)
