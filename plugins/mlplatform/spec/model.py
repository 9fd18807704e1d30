"""Spec format v1: the pipeline spec a tenant writes and the tenant file the platform team owns.

Every field has a default a newcomer would pick, so the smallest useful spec is about ten lines:

    apiVersion: mlplatform.io/v1
    kind: Pipeline
    metadata: {name: churn, tenant: acme}
    spec:
      data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}
      training: {framework: xgboost}

This module imports only pydantic (already loaded by Airflow), never an ML library.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from mlplatform.spec.expectations import Where, expectation_json_schema
from mlplatform.spec.safetext import check_line, check_text

API_VERSION = "mlplatform.io/v1"
NAME_RE = r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$"
COLUMN_RE = r"^[A-Za-z_][A-Za-z0-9_]*$"
Name = Annotated[str, Field(pattern=NAME_RE, min_length=2, max_length=40)]
Column = Annotated[str, Field(pattern=COLUMN_RE, max_length=64)]
# Free text: no template syntax or control characters (spec/safetext.py says why).
Text = Annotated[str, AfterValidator(check_text)]
Line = Annotated[str, AfterValidator(check_line)]

# Pipeline names the platform uses for its own DAG ids (<tenant>__deployments: factory/control.py).
RESERVED_NAMES = {"deployments"}
RESERVED_TAGS = {"invalid-spec"}  # and every tag starting with "mlplatform" or holding ":" (tenant:, template:)


def _not_reserved_name(value: str) -> str:
    if value in RESERVED_NAMES:
        raise ValueError(f"pipeline name {value!r} is reserved: <tenant>__{value} is the platform's own DAG; "
                         "pick another name")
    return value


def _not_reserved_tag(value: str) -> str:
    low = value.lower()
    if low in RESERVED_TAGS or low.startswith("mlplatform") or ":" in value:
        raise ValueError(f"tag {value!r} is reserved for the platform: tags with ':' (tenant:, template:), "
                         "'mlplatform*' and 'invalid-spec' are set by the platform and filter DAGs in the UI")
    return value

_DURATION_RE = re.compile(r"^(\d{1,30})(s|m|h|d)$")
# Absolute cap on every duration of a spec or tenant file: far above any sane value, far below what
# datetime.timedelta can hold (999,999,999 days), so no duration can overflow when the DAG is built.
MAX_DURATION_SECONDS = 3650 * 86400
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_CPU_RE = re.compile(r"^(\d{1,9}(\.\d{1,9})?)(m?)$")
_MEM_RE = re.compile(r"^(\d{1,15}(\.\d{1,9})?)(Ki|Mi|Gi|Ti|K|M|G|T)?$")
_MEM_UNITS = {None: 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
              "Ti": 2**40}


def duration_seconds(value: str | int) -> int:
    """``"90s"``, ``"15m"``, ``"2h"``, ``"30d"`` or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 15m, 2h or 7d")
    if isinstance(value, int):
        seconds = value
    else:
        m = _DURATION_RE.match(str(value).strip())
        if not m:
            raise ValueError(f"{value!r} is not a duration: write a number and a unit, e.g. 30s, 15m, 2h or 7d")
        seconds = int(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not 0 <= seconds <= MAX_DURATION_SECONDS:
        raise ValueError(f"{value!r} is above the platform's limit of 3650d for any duration")
    return seconds


def cpu_cores(value: str | float | int) -> float:
    """Kubernetes CPU quantity (``2``, ``"500m"``, ``"1.5"``) -> cores."""
    m = _CPU_RE.match(str(value).strip())
    if not m or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a CPU quantity: write cores (2, 0.5) or millicores (500m)")
    cores = float(m.group(1))
    return cores / 1000 if m.group(3) else cores


def memory_bytes(value: str | int) -> int:
    """Kubernetes memory quantity (``"4Gi"``, ``"512Mi"``) -> bytes."""
    m = _MEM_RE.match(str(value).strip())
    if not m or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a memory quantity: write e.g. 512Mi or 4Gi")
    return int(float(m.group(1)) * _MEM_UNITS[m.group(3)])


class Strict(BaseModel):
    """Base model: unknown keys are errors (the loader adds a "did you mean")."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


# --------------------------------------------------------------------------------------------- pipeline


class Metadata(Strict):
    name: Annotated[Name, AfterValidator(_not_reserved_name)] = Field(
        description="Pipeline name; must equal the file name without .yaml. Reserved: deployments.")
    tenant: Name = Field(description="Owning tenant; must equal the directory the spec lives in.")
    owner: Line | None = Field(None, max_length=120, description="Shown as the DAG owner; defaults to the tenant's.")
    description: Text = Field("", max_length=2000)
    tags: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,40}$"), AfterValidator(_not_reserved_tag)]] = Field(
        default_factory=list, max_length=10,
        description="UI tags; 'mlplatform*', 'invalid-spec' and tags with ':' are the platform's.")


class DataSpec(Strict):
    source: Line = Field(
        description="Folder of parquet files (optionally in dt=YYYY-MM-DD partitions): a path under the "
        "platform data root (e.g. acme/churn) or an s3:// URI; must sit inside the tenant's allowed prefixes.",
        min_length=1,
        max_length=512,
    )
    entity: Column = Field(description="Entity id column, e.g. customer_id.")
    timestamp: Column = Field(description="Event timestamp column.")
    label: Column = Field(description="Label (target) column.")
    features: list[Column] | None = Field(
        None, max_length=500, description="Feature columns (at most 500); default: every other column of the source."
    )
    connection_id: Line | None = Field(
        None, max_length=200, pattern=r"^[A-Za-z0-9_.-]+$",
        description="Airflow connection for s3:// sources; must be allowed for the tenant."
    )


class Expectation(Strict):
    """A Great Expectations check. Types and kwargs are an allowlist (spec/gx_expectations.json, checked by
    the loader); a row condition is ``where``, never a ``row_condition`` string."""

    model_config = ConfigDict(json_schema_extra=expectation_json_schema)

    type: str = Field(pattern=r"^expect_[a-z0-9_]+$", description="A Great Expectations 1.x expectation type.")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    where: Where | None = Field(
        None, description="Only rows matching this condition are checked: {column, op, value}, {all: [...]} or "
        "{any: [...]}; ops ==, !=, <, <=, >, >=, in, not_in, is_null, not_null.")
    severity: Literal["error", "warning"] = "error"


class ValidationSpec(Strict):
    expectations: list[Expectation] = Field(
        default_factory=list,
        max_length=50,
        description="Checks on the input data (at most 50); by default the entity, timestamp and label must be non-null.",
    )
    min_rows: int = Field(100, ge=1)


class FeatureView(Strict):
    name: Name
    features: list[Column] = Field(min_length=1, max_length=200, description="At most 200 per view, 500 in all views.")
    ttl: str = Field("30d", description="How far back a point-in-time join may look, e.g. 30d.")

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: str) -> str:
        duration_seconds(v)
        return v


class FeaturesSpec(Strict):
    views: list[FeatureView] = Field(
        default_factory=list,
        max_length=20,
        description="Feast feature views over the source; default: one view holding every feature column.",
    )


class Resources(Strict):
    cpu: str | float = Field("1", description="CPU request (cores or millicores).")
    memory: str = Field("2Gi", description="Memory request and limit.")
    gpu: int = Field(0, ge=0, le=64, description="GPUs; the train task takes this many slots of the tenant's GPU pool.")

    @field_validator("cpu")
    @classmethod
    def _cpu(cls, v: Any) -> Any:
        if cpu_cores(v) <= 0:
            raise ValueError("cpu must be above 0")
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str) -> str:
        if memory_bytes(v) < 64 * 2**20:
            raise ValueError("memory must be at least 64Mi")
        return v


HyperValue = int | float | str | bool


class Tunable(Strict):
    """Bounds within which a person may override one hyperparameter from the trigger form."""

    minimum: float | None = Field(None, alias="min")
    maximum: float | None = Field(None, alias="max")
    choices: list[HyperValue] | None = Field(None, min_length=1, max_length=20)

    @model_validator(mode="after")
    def _one_kind(self) -> Tunable:
        if self.choices is None and (self.minimum is None or self.maximum is None):
            raise ValueError("give either min and max, or choices")
        if self.choices is not None and (self.minimum is not None or self.maximum is not None):
            raise ValueError("give either min and max, or choices, not both")
        if self.minimum is not None and self.maximum is not None and self.minimum > self.maximum:
            raise ValueError(f"min {self.minimum} is above max {self.maximum}")
        return self


class TrainingSpec(Strict):
    framework: Literal["xgboost", "sklearn", "pytorch"] = "xgboost"
    model: Literal["gradient_boosting", "random_forest", "logistic_regression"] = Field(
        "gradient_boosting", description="Estimator for framework sklearn (ignored for xgboost)."
    )
    hyperparameters: dict[Annotated[str, Field(pattern=COLUMN_RE)], HyperValue] = Field(
        default_factory=dict, max_length=32,
        description="At most 32; names and ranges per framework (and sklearn model) are the platform's "
        "(include/platform/bounds.yaml). device, n_jobs/nthread and other thread counts are set by the platform "
        "from resources.",
    )
    tunable: dict[Annotated[str, Field(pattern=COLUMN_RE)], Tunable] = Field(
        default_factory=dict, max_length=10,
        description="Hyperparameters a person may override in the trigger form, with bounds (at most 10, each "
        "inside the platform's range).",
    )
    resources: Resources = Field(default_factory=Resources)
    holdout_fraction: float = Field(0.2, gt=0.0, lt=0.9)
    timeout: str = Field("2h", description="Train task timeout; at most the tenant's max_training_timeout "
                         "(platform default 24h).")

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: str) -> str:
        duration_seconds(v)
        return v


class EvaluationSpec(Strict):
    metric: Literal["roc_auc", "accuracy", "f1", "log_loss"] = "roc_auc"
    minimum: float = Field(0.6, description="The challenger must reach this on the held-out split.")
    margin_over_champion: float = Field(
        0.0, ge=-1.0, le=1.0, description="...and beat the current champion by more than this much (a tie never wins)."
    )


class Gates(Strict):
    """Checked on the challenger's own traffic at the end of every canary step (Flagger/Argo-style analysis)."""

    max_error_rate: float = Field(0.01, ge=0.0, le=1.0, description="Highest share of failed requests.")
    max_p99_latency_ms: float = Field(250.0, gt=0.0, description="Highest p99 latency in milliseconds.")
    max_p99_latency_ratio: float | None = Field(
        None, gt=0.0, le=100.0,
        description="Highest challenger p99 / champion p99 (same step, or the last step the champion served); "
        "null: off.",
    )
    max_prediction_shift: float | None = Field(
        None, ge=0.0, le=1.0,
        description="Highest two-sample Kolmogorov-Smirnov statistic between the challenger's and the "
        "champion's predictions; null: off.",
    )
    min_requests: int = Field(20, ge=1, description="Requests the challenger must serve in each step.")


class DeploymentSpec(Strict):
    target: Literal["gateway", "kserve"] = "gateway"
    canary_traffic: float = Field(
        0.2, gt=0.0, le=1.0,
        description="Share of traffic the challenger gets while baking (the single step when steps is unset).",
    )
    steps: list[Annotated[float, Field(gt=0.0, le=1.0)]] | None = Field(
        None, min_length=1, max_length=10,
        description="Challenger traffic share per canary step, increasing, e.g. [0.1, 0.5, 1.0]; "
        "default: [canary_traffic].",
    )
    bake_time: str = Field("20s", description="How long each canary step bakes before its gates are checked.")
    gates: Gates = Field(default_factory=Gates)
    auto_rollback: bool = Field(
        True, description="Roll back as soon as a gate fails; false: hold the step's traffic and fail the task "
        "for a person to promote or abort from the control DAG.",
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(cpu="1", memory="1Gi"),
        description="Serving container resources (target kserve).",
    )
    min_replicas: int = Field(1, ge=0, le=100, description="Serving replicas at least (target kserve).")
    max_replicas: int = Field(3, ge=1, le=100, description="Serving replicas at most (target kserve).")

    @field_validator("bake_time")
    @classmethod
    def _bake(cls, v: str) -> str:
        if duration_seconds(v) > 24 * 3600:
            raise ValueError("bake_time above 24h")
        return v

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"steps must increase strictly, got {v}")
        return v

    @model_validator(mode="after")
    def _replicas(self) -> DeploymentSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self

    @property
    def traffic_steps(self) -> list[float]:
        """The challenger's traffic share per step."""
        return list(self.steps) if self.steps else [self.canary_traffic]


DriftMethod = Literal["ks", "chisquare", "z", "wasserstein", "jensenshannon", "psi", "kl_div", "hellinger",
                      "anderson", "cramer_von_mises", "mannw", "t_test", "ed", "es", "empirical_mmd", "g_test",
                      "fisher_exact", "TVD"]


class ColumnDrift(Strict):
    """Per-column drift test; unset fields keep Evidently's choice for the column's type and size."""

    method: DriftMethod | None = Field(None, description="Evidently stat test, e.g. psi, ks, wasserstein, jensenshannon.")
    threshold: float | None = Field(
        None, gt=0.0, description="Drift when the score is above it (distances, psi) or the p-value below it (tests)."
    )


class MonitoringSpec(Strict):
    schedule: str | None = Field("@daily", description="When the drift monitor runs on its own.")
    drift_threshold: float = Field(0.3, gt=0.0, le=1.0, description="Share of drifted columns that counts as drift.")
    retrain_on_drift: bool = True
    columns: dict[Column, ColumnDrift] = Field(
        default_factory=dict, max_length=500,
        description="Per-column drift method and threshold, e.g. {monthly_charges: {method: psi, threshold: 0.2}}.",
    )
    cooldown: str = Field("6h", description="Minimum time between two drift-triggered retrains, e.g. 6h.")
    max_retrains_per_day: int = Field(2, ge=0, le=48, description="At most this many drift-triggered retrains in 24h.")
    prediction_window: str = Field(
        "1d", description="Window of the gateway prediction log used as current data when the gateway logs predictions."
    )

    @field_validator("cooldown", "prediction_window")
    @classmethod
    def _duration(cls, v: str) -> str:
        duration_seconds(v)
        return v


class PipelineBody(Strict):
    template: str = Field("standard-v1", pattern=r"^[a-z][a-z0-9-]*-v[0-9]+$")
    schedule: str | None = Field(None, description="Cron expression or preset (@daily, @weekly); null for none.")
    data: DataSpec
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    features: FeaturesSpec = Field(default_factory=FeaturesSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    deployment: DeploymentSpec = Field(default_factory=DeploymentSpec)
    monitoring: MonitoringSpec = Field(default_factory=MonitoringSpec)


class PipelineSpec(Strict):
    api_version: Literal["mlplatform.io/v1"] = Field(alias="apiVersion")
    kind: Literal["Pipeline"]
    metadata: Metadata
    spec: PipelineBody

    @property
    def dag_id(self) -> str:
        return dag_id_for(self.metadata.tenant, self.metadata.name)

    @property
    def model_name(self) -> str:
        return f"{self.metadata.tenant}.{self.metadata.name}"

    def feature_columns(self, available: list[str]) -> list[str]:
        """Feature columns: declared ones, else every column but entity, timestamp and label."""
        d = self.spec.data
        if d.features:
            return list(d.features)
        return [c for c in available if c not in {d.entity, d.timestamp, d.label}]


def dag_id_for(tenant: str, pipeline: str) -> str:
    return f"{tenant}__{pipeline}"


# ------------------------------------------------------------------------------------------------ tenant


class Quotas(Strict):
    gpu_slots: int = Field(ge=0, le=1024, description="GPUs the tenant's tasks may hold at once (Airflow pool + ResourceQuota).")
    cpu_slots: int = Field(ge=1, le=10_000, description="Non-GPU tasks the tenant may run at once.")
    max_active_runs: int = Field(1, ge=1, le=100, description="Per pipeline DAG.")
    max_cpu_per_task: str | float = "8"
    max_memory_per_task: str = "32Gi"
    # Unset: the platform default from include/platform/bounds.yaml (tenant_defaults), see spec/bounds.py.
    max_training_timeout: str | None = Field(
        None, description="Longest spec.training.timeout the tenant's specs may ask for; default 24h.")
    min_schedule_interval: str | None = Field(
        None, description="Shortest gap between two runs of a pipeline's schedule or its monitoring schedule "
        "(a cron's closest two runs); default 1h.")
    schedule_presets: list[Literal["@once", "@continuous", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly",
                                   "@yearly", "@annually"]] | None = Field(
        None, description="Schedule presets the tenant's specs may use; default every preset but @continuous.")
    max_serving_replicas: int | None = Field(
        None, ge=1, le=100, description="Most min_replicas/max_replicas of a KServe deployment; default 10.")

    @field_validator("max_training_timeout", "min_schedule_interval")
    @classmethod
    def _durations(cls, v: str | None) -> str | None:
        if v is not None:
            duration_seconds(v)
        return v

    @field_validator("max_cpu_per_task")
    @classmethod
    def _cpu(cls, v: Any) -> Any:
        cpu_cores(v)
        return v

    @field_validator("max_memory_per_task")
    @classmethod
    def _mem(cls, v: str) -> str:
        memory_bytes(v)
        return v


class TenantData(Strict):
    allowed_prefixes: list[str] = Field(min_length=1, description="Data root paths or s3:// prefixes the tenant may read.")


class TenantBody(Strict):
    owner: str = Field(max_length=120)
    namespace: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    service_account: str = Field("mlplatform-trainer", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    tier: Literal["standard", "priority"] = "standard"
    quotas: Quotas
    data: TenantData
    connections: list[str] = Field(default_factory=list, description="Airflow connection ids the tenant's specs may name.")
    alerts: TenantAlerts | None = Field(None, description="Where drift, rejected-retrain and rollback alerts go.")
    users: list[TenantUser] = Field(
        default_factory=list, max_length=200,
        description="Airflow users of the tenant's team (multi-team mode, `mlplatform sync`).",
    )


class TenantUser(Strict):
    """An Airflow user who sees and runs only its tenants' DAGs (a name in several tenant files: several teams)."""

    name: str = Field(pattern=r"^[a-z][a-z0-9._-]{1,63}$", description="Login name.")
    role: Literal["viewer", "user"] = Field(
        "user", description="viewer: read only; user: also trigger, pause and clear the tenant's DAGs.",
    )


class TenantAlerts(Strict):
    webhook_connection: str | None = Field(
        None, max_length=200, description="Airflow connection of a generic JSON webhook (its host is the URL)."
    )
    email: list[Annotated[str, Field(pattern=r"^[^@\s,;<>]+@[^@\s,;<>]+\.[^@\s,;<>]+$", max_length=254)]] = Field(
        default_factory=list, max_length=20, description="Addresses that get the alerts by email (SMTP provider)."
    )
    email_connection: str = Field(
        "smtp_default", max_length=200, description="Airflow SMTP connection the email alerts go through."
    )
    events: list[Literal["drift", "retrain_rejected", "rollback"]] = Field(
        default_factory=lambda: ["drift", "retrain_rejected", "rollback"], description="Which events are sent."
    )


TenantBody.model_rebuild()


class TenantMetadata(Strict):
    name: Name


class TenantFile(Strict):
    api_version: Literal["mlplatform.io/v1"] = Field(alias="apiVersion")
    kind: Literal["Tenant"]
    metadata: TenantMetadata
    spec: TenantBody

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def gpu_pool(self) -> str:
        return f"{self.name}__gpu"

    @property
    def cpu_pool(self) -> str:
        return f"{self.name}__cpu"
