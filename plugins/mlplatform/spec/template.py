"""Pipeline templates (``dag_templates/<name>-v<N>.yaml``): the stage graph and task defaults, platform-owned."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from mlplatform.spec.model import Strict

STAGES = ("validate", "features", "train", "evaluate", "register", "canary_deploy", "drift_monitor")
Stage = Literal["validate", "features", "train", "evaluate", "register", "canary_deploy", "drift_monitor"]


class StageNode(Strict):
    name: Stage
    after: list[Stage] = Field(default_factory=list)
    trigger_rule: Literal["all_success", "none_failed", "all_done"] = "all_success"
    retries: int | None = Field(None, ge=0, le=10)
    timeout: str | None = None


class TemplateDefaults(Strict):
    retries: int = Field(1, ge=0, le=10)
    retry_delay: str = "30s"
    timeout: str = "30m"


class TemplateMeta(Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9-]*-v[0-9]+$")
    description: str = ""


class PipelineTemplate(Strict):
    api_version: Literal["mlplatform.io/v1"] = Field(alias="apiVersion")
    kind: Literal["PipelineTemplate"]
    metadata: TemplateMeta
    defaults: TemplateDefaults = Field(default_factory=TemplateDefaults)
    stages: list[StageNode] = Field(min_length=1)

    @model_validator(mode="after")
    def _graph(self) -> PipelineTemplate:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError("a stage is listed twice")
        seen: set[str] = set()
        for s in self.stages:
            missing = [a for a in s.after if a not in seen]
            if missing:
                raise ValueError(f"stage {s.name} runs after {missing}, which must be listed before it")
            seen.add(s.name)
        return self

    def has(self, stage: str) -> bool:
        return any(s.name == stage for s in self.stages)
