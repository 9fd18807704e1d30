"""JSON Schema export of spec format v1, for editor completion (yaml-language-server) and docs."""

from __future__ import annotations

import json
from pathlib import Path

from mlplatform.spec.model import PipelineSpec, TenantFile

SCHEMAS = {"pipeline-v1.schema.json": PipelineSpec, "tenant-v1.schema.json": TenantFile}


def schema_text(model) -> str:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def write_schemas(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, model in SCHEMAS.items():
        path = out / name
        path.write_text(schema_text(model))
        paths.append(path)
    return paths
