"""The trigger form: Params with JSON-schema types, built from the spec's tunable hyperparameters."""

from __future__ import annotations

from airflow.sdk import Param

from mlplatform.spec.model import PipelineSpec

# Airflow validates every Param with jsonschema when it builds the DAG, once per Param per parse. Against
# the default 2020-12 metaschema that costs ~1.6 ms a Param; draft-07 (all these schemas need) ~0.4 ms.
DRAFT7 = {"$schema": "http://json-schema.org/draft-07/schema#"}


def trigger_params(spec: PipelineSpec) -> dict[str, Param]:
    """as-of date, hyperparameter overrides within the spec's bounds, and skip-canary."""
    params = {
        "as_of": Param(
            None,
            type=["null", "string"],
            format="date",
            title="As-of date",
            description="Partition date (YYYY-MM-DD) of the current data; earlier partitions train. Empty: newest.",
            **DRAFT7,
        ),
        "skip_canary": Param(
            False,
            type="boolean",
            title="Skip canary",
            description="Promote an accepted model straight to champion without a canary bake.",
            **DRAFT7,
        ),
    }
    training = spec.spec.training
    for name, bounds in training.tunable.items():
        default = training.hyperparameters[name]
        title = f"Hyperparameter {name}"
        if bounds.choices is not None:
            params[f"hp_{name}"] = Param(default, enum=list(bounds.choices), title=title,
                                         description=f"One of {bounds.choices}.", **DRAFT7)
            continue
        json_type = "integer" if isinstance(default, int) and float(bounds.minimum).is_integer() \
            and float(bounds.maximum).is_integer() else "number"
        lo, hi = bounds.minimum, bounds.maximum
        if json_type == "integer":
            lo, hi = int(lo), int(hi)
        params[f"hp_{name}"] = Param(default, type=json_type, minimum=lo, maximum=hi, title=title,
                                     description=f"Between {lo} and {hi} (spec default {default}).", **DRAFT7)
    return params
