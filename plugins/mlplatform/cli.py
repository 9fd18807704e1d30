"""``mlplatform`` command line: lint, render, k8s, dagfiles, sync-pools, sync, usage, schema, data, demo, ui."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mlplatform.config import REPO_ROOT, get_config

SCHEMA_DIR = REPO_ROOT / "include" / "schema"


def cmd_lint(args: argparse.Namespace) -> int:
    """Print every problem as ``file:line:col: field: message``; exit 1 when there is any."""
    from mlplatform.spec.loader import load_catalog

    config = get_config()
    # abspath, not resolve(): a spec that is a symlink must be refused as itself, never read through
    only = _lint_paths(args.files) if args.files else None
    catalog = load_catalog(config, only=only)
    problems = list(catalog.problems)
    problems += _view_clashes(catalog, config, only)
    if catalog.specs:  # a lint-clean spec always builds: the real factory and DagBag's checks (factory/check.py)
        from mlplatform.factory.check import build_problems

        problems += build_problems(catalog, config)
    if not args.files:
        problems += _dagfile_problems(catalog, config)
    if args.deep:
        problems += _deep_problems(catalog)
    for p in problems:
        print(p)
    checked = len(catalog.specs) + len(catalog.broken)
    bad = len({p.file for p in problems})
    print(f"{checked} spec(s) checked, {len(problems)} problem(s) in {bad} file(s)", file=sys.stderr)
    return 1 if problems else 0


def _lint_paths(names: list[str]) -> list[Path]:
    """Files as given; folders recursively to their *.yaml/*.yml entries. Never follows a symbolic link (lstat):
    a link, even one to a folder, is passed on as a file so the loader refuses it by name."""
    import stat

    from mlplatform.spec.loader import SPEC_SUFFIXES

    out: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                walk(path)
            elif path.suffix in SPEC_SUFFIXES:
                out.append(path)

    for name in names:
        path = Path(os.path.abspath(name))
        try:
            is_dir = stat.S_ISDIR(os.lstat(path).st_mode)
        except OSError:
            is_dir = False  # the loader says it cannot read it
        if is_dir:
            walk(path)
        else:
            out.append(path)
    return out


def _view_clashes(catalog, config, only: list[Path] | None) -> list:
    """Feature view names reused across a tenant's specs, also against the tenant's specs not being linted."""
    from mlplatform.spec.loader import LoadedSpec, feature_view_clashes, load_spec, spec_paths

    others = []
    if only is not None:
        tenants = {s.spec.metadata.tenant for s in catalog.specs}
        checked = {s.path.absolute() for s in catalog.specs} | {b.path.absolute() for b in catalog.broken}
        for path in spec_paths(config):
            if path.parent.name in tenants and path.absolute() not in checked:
                loaded = load_spec(path, config, catalog)
                if isinstance(loaded, LoadedSpec):
                    others.append(loaded)
    return feature_view_clashes(catalog.specs, others)


def _dagfile_problems(catalog, config) -> list:
    """A tenant file without its DAG file (single-deployment mode; multi-team bundles come from `mlplatform sync`)."""
    from airflow.configuration import conf

    from mlplatform.tenants.dagfiles import missing_dagfile_problems

    if conf.getboolean("core", "multi_team", fallback=False):
        return []
    return missing_dagfile_problems(catalog.tenants, config)


def _platform_catalog(action: str):
    """Tenant and template files (no specs), or None after printing their problems: nothing is changed then."""
    from mlplatform.spec.loader import load_catalog

    catalog = load_catalog(get_config(), only=[])
    if catalog.platform_problems:
        for p in catalog.platform_problems:
            print(p, file=sys.stderr)
        print(f"refusing to {action} while tenant or template files have errors", file=sys.stderr)
        return None
    return catalog


def cmd_dagfiles(args: argparse.Namespace) -> int:
    """One DAG file per tenant (dags/tenant_<tenant>.py) from the tenant files; --check: exit 1 when out of date."""
    from mlplatform.tenants.dagfiles import dags_dir, write_dagfiles

    catalog = _platform_catalog("write DAG files")
    if catalog is None:
        return 1
    folder = Path(args.out).absolute() if args.out else dags_dir()
    changes = write_dagfiles(catalog.tenants, folder, dry_run=args.check)
    stale = [c for c in changes if c.action != "unchanged"]
    for change in changes if not args.check else stale:
        print(change)
    if args.check and stale:
        print(f"{len(stale)} DAG file(s) out of date in {folder}: run `mlplatform dagfiles` and commit them",
              file=sys.stderr)
        return 1
    return 0


def _deep_problems(catalog) -> list:
    """Checks that need Great Expectations itself (slow to import, so only on request)."""
    from mlplatform.stages.validate import expectation_problems

    out = []
    for loaded in catalog.specs:
        for index, message in expectation_problems(loaded.spec.spec.validation.expectations):
            out.append(loaded.located.problem(("spec", "validation", "expectations", index), message))
    return out


def cmd_render(args: argparse.Namespace) -> int:
    """Show a pipeline DAG's tasks, pools and schedule; ``--pod`` prints the Kubernetes train pod."""
    from mlplatform.factory.build import build_dag
    from mlplatform.spec.loader import load_catalog

    config = get_config()
    catalog = load_catalog(config)
    loaded = next((s for s in catalog.specs if s.dag_id == args.dag_id), None)
    if loaded is None:
        broken = next((b for b in catalog.broken if b.dag_id == args.dag_id), None)
        if broken:
            print("\n".join(str(p) for p in broken.problems), file=sys.stderr)
        else:
            print(f"no pipeline {args.dag_id!r}; known: {', '.join(s.dag_id for s in catalog.specs)}", file=sys.stderr)
        return 1
    if args.pod:
        return _render_pod(loaded, catalog, config)
    dag = build_dag(loaded, catalog, config)
    from mlplatform.factory.build import schedule_summary

    print(f"DAG {dag.dag_id}  schedule: {schedule_summary(loaded)}  max_active_runs={dag.max_active_runs}")
    print(f"{'task':15} {'upstream':28} {'pool':16} {'slots':>5} {'retries':>7}  trigger_rule")
    for task in dag.tasks:
        ups = ",".join(sorted(task.upstream_task_ids)) or "-"
        print(f"{task.task_id:15} {ups:28} {task.pool:16} {task.pool_slots:>5} {task.retries:>7}  {task.trigger_rule}")
    print("params: " + ", ".join(sorted(dag.params.keys())))
    return 0


def _render_pod(loaded, catalog, config) -> int:
    from mlplatform.k8s.manifests import to_yaml
    from mlplatform.k8s.pod import render_train_pod
    from mlplatform.stages.context import RunContext
    from mlplatform.stages.train_local import train_env

    ctx = RunContext(spec=loaded.spec, tenant=catalog.tenants[loaded.spec.metadata.tenant], config=config,
                     run_id="manual__render", spec_sha256=loaded.sha256)
    features = {"train_path": "s3://<artifacts>/train.parquet", "holdout_path": "s3://<artifacts>/holdout.parquet",
                "feature_columns": list(loaded.spec.spec.data.features or ["<feature columns>"]),
                "fingerprint": "sha256:<training set>"}
    env = train_env(ctx, features, Path("/airflow/xcom/return.json"), Path("/scratch"))
    print(to_yaml([render_train_pod(ctx, env)]), end="")
    return 0


def cmd_k8s(args: argparse.Namespace) -> int:
    """Namespace, ResourceQuota, LimitRange and RBAC per tenant, from the same files as the pools."""
    from mlplatform.k8s.manifests import tenant_manifests, to_yaml
    from mlplatform.spec.loader import load_catalog

    catalog = load_catalog(get_config(), only=[])
    names = args.tenants or sorted(catalog.tenants)
    missing = [n for n in names if n not in catalog.tenants]
    if missing:
        print(f"unknown tenant(s): {', '.join(missing)}", file=sys.stderr)
        return 1
    print(to_yaml([doc for n in names for doc in tenant_manifests(catalog.tenants[n])]), end="")
    return 0


def cmd_sync_pools(args: argparse.Namespace) -> int:
    """Reconcile Airflow pools with the tenant files; prints what changed."""
    from mlplatform.tenants.pools import MissingTeams, sync_pools

    catalog = _platform_catalog("sync pools")
    if catalog is None:
        return 1
    try:
        changes = sync_pools(catalog.tenants, dry_run=args.dry_run)
    except MissingTeams as exc:
        print(exc, file=sys.stderr)
        return 1
    for change in changes:
        print(change)
    for problem in _dagfile_problems(catalog, get_config()):  # pools without DAGs: say so, the pools are fine
        print(f"warning: {problem}", file=sys.stderr)
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Multi-team tenancy from the tenant files: teams, bundles, team pools and connections, users."""
    from mlplatform.tenants.sync import run_sync

    return run_sync(out=args.out, admins=args.admin, dry_run=args.dry_run)


def cmd_usage(args: argparse.Namespace) -> int:
    """Per-tenant GPU-slot hours and task hours per UTC day, from Airflow's task-instance records."""
    from datetime import date, datetime, timedelta, timezone

    from mlplatform.spec.loader import load_catalog
    from mlplatform.tenants.usage import format_table, usage_report

    try:
        until = date.fromisoformat(args.until) if args.until else datetime.now(timezone.utc).date()
        since = date.fromisoformat(args.since) if args.since else until - timedelta(days=6)
    except ValueError as exc:
        print(f"--since/--until: {exc} (want YYYY-MM-DD)", file=sys.stderr)
        return 2
    tenants = load_catalog(get_config(), only=[]).tenants
    unknown = sorted(set(args.tenants) - set(tenants))
    if unknown or since > until:
        print(f"unknown tenant(s): {', '.join(unknown)}" if unknown else "--since is after --until", file=sys.stderr)
        return 2
    rows = usage_report(tenants, since, until, only=args.tenants or None)
    if args.json:
        print(json.dumps({"since": since.isoformat(), "until": until.isoformat(),
                          "rows": [r.as_json() for r in rows]}, indent=2))
    else:
        print(format_table(rows))
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Write the JSON Schemas editors use for completion (include/schema/)."""
    from mlplatform.spec.schema import write_schemas

    for path in write_schemas(Path(args.out)):
        print(path)
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    """Generate the deterministic example data sets under the platform data root."""
    from mlplatform.data.generate import generate_all

    for source, rows in generate_all(get_config(), force=args.force).items():
        print(f"{source}: {rows} rows")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run one pipeline end to end on real Airflow components and print what it produced."""
    from mlplatform.demo import run_demo

    return run_demo(args.dag_id, timeout=args.timeout)


def cmd_ui(args: argparse.Namespace) -> int:
    """``airflow standalone`` on the demo's Airflow home, so the demo's runs show in the UI."""
    import os
    import subprocess

    from mlplatform.local_airflow import BIN, airflow, airflow_env

    env = airflow_env(REPO_ROOT / ".airflow", args.port)
    airflow(env, "db", "migrate")
    subprocess.run([str(BIN / "mlplatform"), "sync-pools"], env=env, check=True)
    print(f"Airflow UI: http://127.0.0.1:{args.port}  (Ctrl-C stops it)", flush=True)
    os.execve(str(BIN / "airflow"), [str(BIN / "airflow"), "standalone"], env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlplatform", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lint", help="check specs; compiler-style output, exit 1 on problems")
    p.add_argument("files", nargs="*", help="spec files or folders (recursively; symbolic links are never followed; "
                   "default: every spec under the specs folder)")
    p.add_argument("--deep", action="store_true", help="also check expectations with Great Expectations itself")
    p.set_defaults(func=cmd_lint)
    p = sub.add_parser("render", help="show a pipeline's DAG (or, with --pod, its Kubernetes train pod)")
    p.add_argument("dag_id")
    p.add_argument("--pod", action="store_true")
    p.set_defaults(func=cmd_render)
    p = sub.add_parser("k8s", help="print tenant Kubernetes manifests (Namespace, ResourceQuota, LimitRange, RBAC)")
    p.add_argument("tenants", nargs="*")
    p.set_defaults(func=cmd_k8s)
    p = sub.add_parser("dagfiles", help="write one DAG file per tenant (dags/tenant_<tenant>.py) from the tenant files")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a file is missing or out of date")
    p.add_argument("--out", help="Airflow's DAG folder (default: $MLPLATFORM_DAGS_DIR or the repo's dags/)")
    p.set_defaults(func=cmd_dagfiles)
    p = sub.add_parser("sync-pools", help="reconcile Airflow pools with the tenant quota files")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_sync_pools)
    p = sub.add_parser("sync", help="multi-team tenancy: teams, per-tenant DAG bundles, team pools, users")
    p.add_argument("--out", help="folder for the generated Airflow env file, bundles and passwords "
                   "(default: $MLPLATFORM_TENANCY_DIR or $AIRFLOW_HOME/mlplatform)")
    p.add_argument("--admin", action="append", help="platform admin user (repeatable; default: admin)")
    p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    p.set_defaults(func=cmd_sync)
    p = sub.add_parser("usage", help="per-tenant GPU-slot hours and task hours per day (chargeback)")
    p.add_argument("tenants", nargs="*", help="only these tenants (default: all)")
    p.add_argument("--since", help="first UTC day, YYYY-MM-DD (default: 6 days before --until)")
    p.add_argument("--until", help="last UTC day, inclusive, YYYY-MM-DD (default: today)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_usage)
    p = sub.add_parser("schema", help="write JSON Schemas for specs and tenant files")
    p.add_argument("--out", default=str(SCHEMA_DIR))
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("data", help="generate the example data sets")
    p.add_argument("action", choices=["generate"])
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=cmd_data)
    p = sub.add_parser("demo", help="run one pipeline end to end on a real scheduler and print results")
    p.add_argument("dag_id", nargs="?", default="acme__churn-xgb")
    p.add_argument("--timeout", type=int, default=900)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("ui", help="start the Airflow UI (airflow standalone) on the demo's Airflow home")
    p.add_argument("--port", type=int, default=8080)
    p.set_defaults(func=cmd_ui)
    return parser


PROJECT_AIRFLOW_HOME = REPO_ROOT / ".airflow"
# Commands that read or write Airflow's metadata database.
DB_COMMANDS = ("sync-pools", "sync", "usage")


def use_project_airflow_home() -> None:
    """Without AIRFLOW_HOME, every command uses the project's ``.airflow/`` home, the one ``make demo`` and
    ``make ui`` run on (its SQLite DB, DAG and plugin folders), instead of Airflow's default ~/airflow: nothing
    is written outside the project. Settings already in the environment win. Call before importing Airflow."""
    if os.environ.get("AIRFLOW_HOME"):
        return
    from mlplatform.local_airflow import airflow_env

    env = airflow_env(PROJECT_AIRFLOW_HOME, 8080)
    os.environ.update({k: v for k, v in env.items() if k not in os.environ or k == "PATH"})


def _database_problem(exc: Exception) -> int:
    from airflow.configuration import conf

    home = os.environ.get("AIRFLOW_HOME", "")
    where = "the project's .airflow/ (AIRFLOW_HOME is unset)" if Path(home) == PROJECT_AIRFLOW_HOME else home
    print(f"the Airflow metadata database is not set up: {str(exc).splitlines()[0]}\n"
          f"  Airflow home: {where}\n"
          f"  database: {conf.get('database', 'sql_alchemy_conn', fallback='?').split('@')[-1]}\n"
          "  run `make demo` or `make ui` once (they run `airflow db migrate` there), or set AIRFLOW_HOME (and "
          "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN) to your Airflow installation", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """The console script (``argv`` None) first picks the project's Airflow home when AIRFLOW_HOME is unset;
    in-process callers (tests) keep their own environment."""
    if argv is None:
        use_project_airflow_home()
    args = build_parser().parse_args(argv)
    if args.command not in DB_COMMANDS:
        return args.func(args)
    from sqlalchemy.exc import OperationalError, ProgrammingError

    try:
        return args.func(args)
    except (OperationalError, ProgrammingError) as exc:  # e.g. "no such table: slot_pool" on an empty DB
        return _database_problem(exc)


if __name__ == "__main__":
    sys.exit(main())
