"""``doc_md`` for the Airflow UI, rendered from the spec (and from the errors of a broken spec)."""

from __future__ import annotations

from mlplatform.spec.loader import BrokenSpec, LoadedSpec
from mlplatform.spec.model import TenantFile
from mlplatform.spec.template import PipelineTemplate


def spec_doc_md(loaded: LoadedSpec, tenant: TenantFile, template: PipelineTemplate) -> str:
    spec = loaded.spec
    b = spec.spec
    t, e, d, m = b.training, b.evaluation, b.deployment, b.monitoring
    res = t.resources
    hp = ", ".join(f"`{k}={v}`" for k, v in sorted(t.hyperparameters.items())) or "framework defaults"
    stages = " → ".join(s.name for s in template.stages)
    lines = [
        f"# {spec.metadata.tenant} / {spec.metadata.name}",
        "",
        spec.metadata.description or "",
        "",
        f"**Spec** `{loaded.display}` (sha256 `{loaded.sha256[:12]}`) · **template** `{b.template}`: {stages}",
        "",
        "| | |",
        "|---|---|",
        f"| Data | `{b.data.source}` · entity `{b.data.entity}` · timestamp `{b.data.timestamp}` · label `{b.data.label}` |",
        f"| Validation | {len(b.validation.expectations)} expectations, at least {b.validation.min_rows} rows |",
        f"| Training | {t.framework}{' ' + t.model if t.framework == 'sklearn' else ''} · {hp} |",
        f"| Resources | cpu {res.cpu} · memory {res.memory} · gpu {res.gpu} (pool `{tenant.gpu_pool if res.gpu else tenant.cpu_pool}`) |",
        f"| Evaluation | {e.metric} ≥ {e.minimum}, beat champion by more than {e.margin_over_champion} |",
        f"| Deployment | {d.target} · canary {d.canary_traffic:.0%} for {d.bake_time} · max error rate {d.gates.max_error_rate}"
        f" · p99 ≤ {d.gates.max_p99_latency_ms} ms · ≥ {d.gates.min_requests} requests |",
        f"| Monitoring | drift threshold {m.drift_threshold:.0%} of columns · retrain on drift: {'yes' if m.retrain_on_drift else 'no'} |",
        f"| Registry | model `{spec.model_name}` (aliases `champion`, `challenger`, `previous`) |",
        "",
        "Trigger with parameters to pick the as-of partition, override tunable hyperparameters or skip the canary.",
    ]
    return "\n".join(lines)


def broken_doc_md(broken: BrokenSpec) -> str:
    rows = "\n".join(f"    {p}" for p in broken.problems)
    return (
        f"# Invalid spec: {broken.display}\n\n"
        "This pipeline's spec does not validate, so the platform built this paused stand-in instead of the "
        "pipeline. Fix the file (or run `mlplatform lint` locally) and the pipeline returns on the next parse.\n\n"
        f"{rows}\n"
    )
