"""What ``mlplatform sync`` reports: one change per managed object, and problems that point into tenant files."""

from __future__ import annotations

from dataclasses import dataclass

from mlplatform.config import REPO_ROOT, PlatformConfig
from mlplatform.spec.errors import SpecError
from mlplatform.spec.loader import SPEC_SUFFIXES
from mlplatform.spec.yamlsafe import load_file


@dataclass(frozen=True)
class Change:
    kind: str  # team | connection | pool | bundle | user | env-file
    action: str  # create | update | delete | unchanged | keep | missing
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action:9} {self.kind:10} {self.name}{'  ' + self.detail if self.detail else ''}"


def tenant_problem(config: PlatformConfig, tenant: str, path: tuple, message: str) -> str:
    """``file:line:col: field: message`` at ``path`` of the tenant's file."""
    files = [config.tenants_dir / f"{tenant}{suffix}" for suffix in SPEC_SUFFIXES]
    file = next((f for f in files if f.is_file()), files[0]).absolute()
    display = str(file.relative_to(REPO_ROOT)) if file.is_relative_to(REPO_ROOT) else str(file)
    try:
        return str(load_file(file, display).problem(path, message))
    except SpecError:  # unreadable now: still name the file and field
        return f"{display}: {'.'.join(map(str, path))}: {message}"
