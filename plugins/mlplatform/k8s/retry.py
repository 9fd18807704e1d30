"""Retries that follow the failure: classify a finished trainer pod, decide retry, fail fast or more memory.

Pure functions over a V1Pod-like value: a manifest-style dict (camelCase keys, as ``kubectl get -o json``
prints it) or a ``kubernetes.client.V1Pod`` (snake_case attributes). Imports only the standard library and
``mlplatform.spec``: the classifier is unit-testable without a cluster, the provider or the client.

Kinds:

- ``infrastructure``: the node or cluster failed the pod (eviction, preemption, spot reclaim, node
  shutdown, image pull back-off, admission refusal, deadline, a kill signal): retry as is.
- ``oom``: the trainer container was OOMKilled (or died of a Python ``MemoryError``): retry with twice the
  memory, capped at the tenant's ``max_memory_per_task``; no retry once the limit was already in use.
- ``user_code``: the trainer exited non-zero with a Python traceback, or with exit code 2 (its documented
  configuration/data error): fail fast, the trainer's last log lines in the error.
- ``config``: the pod can never start as configured (invalid image name, missing Secret or key): fail fast.
- ``unknown``: none of the above (non-zero exit without traceback): Airflow's normal retries apply.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mlplatform.spec.model import memory_bytes

INFRASTRUCTURE = "infrastructure"
OOM = "oom"
USER_CODE = "user_code"
CONFIG = "config"
UNKNOWN = "unknown"
RETRYABLE = frozenset({INFRASTRUCTURE, OOM, UNKNOWN})

TAIL_LINES = 30
TRACEBACK_HEAD = "Traceback (most recent call last):"
TRAINER_CONFIG_EXIT = 2  # include/trainer/train.py: "configuration error", one readable line on stderr

# Pod-level status reasons set by the kubelet, the scheduler or the node lifecycle controller.
INFRA_POD_REASONS = {
    "Evicted": "the pod was evicted (node pressure or an eviction API call)",
    "Preempting": "the pod was preempted by a higher-priority pod",
    "Preempted": "the pod was preempted by a higher-priority pod",
    "NodeShutdown": "the node shut down (graceful node shutdown, e.g. a spot instance reclaimed)",
    "Shutdown": "the node shut down (graceful node shutdown, e.g. a spot instance reclaimed)",
    "Terminated": "the node shut down (graceful node shutdown, e.g. a spot instance reclaimed)",
    "NodeLost": "the node stopped reporting (lost)",
    "UnexpectedAdmissionError": "the kubelet refused the pod (e.g. the GPU device plugin was not ready)",
    "DeadlineExceeded": "the pod ran past activeDeadlineSeconds; the retry resumes from the last checkpoint",
}
# DisruptionTarget condition reasons (Kubernetes >= 1.26): why the pod is being terminated.
DISRUPTION_REASONS = {
    "PreemptionByScheduler": "preempted by the scheduler for a higher-priority pod",
    "PreemptionByKubeScheduler": "preempted by the scheduler for a higher-priority pod",
    "DeletionByTaintManager": "the node was tainted NoExecute (e.g. spot reclaim notice, node not ready)",
    "EvictionByEvictionAPI": "evicted through the eviction API (node drain)",
    "DeletionByPodGC": "the node is gone; the pod was garbage-collected",
    "TerminationByKubelet": "terminated by the kubelet (node pressure or graceful node shutdown)",
}
# Container ``waiting`` reasons.
INFRA_WAITING = {"ImagePullBackOff", "ErrImagePull", "ContainerCreating", "PodInitializing", "CreateContainerError",
                 "RegistryUnavailable", "ContainerStatusUnknown"}
CONFIG_WAITING = {
    "InvalidImageName": "the trainer image name is invalid: fix MLPLATFORM_TRAINER_IMAGE",
    "ErrImageNeverPull": "the trainer image is not on the node and imagePullPolicy is Never",
    "CreateContainerConfigError": "the container cannot be configured, usually a missing Secret or Secret key "
                                  "(the tenant's credentials Secret, see MLPLATFORM_TRAINER_SECRET)",
}
# Exit codes of a container killed by a signal from outside (128 + signal number).
SIGNAL_EXITS = {137: "SIGKILL", 143: "SIGTERM", 129: "SIGHUP", 130: "SIGINT"}


@dataclass(frozen=True)
class Failure:
    """Why a trainer pod failed and what to do about it."""

    kind: str
    reason: str
    log_tail: tuple[str, ...] = field(default=())
    exit_code: int | None = None

    @property
    def retry(self) -> bool:
        return self.kind in RETRYABLE

    def message(self) -> str:
        """One paragraph for the task log and the exception: kind, reason, then the trainer's last lines."""
        head = f"trainer pod failure ({self.kind}): {self.reason}"
        if not self.log_tail:
            return head
        return head + f"\n--- last {len(self.log_tail)} line(s) of the trainer ---\n" + "\n".join(self.log_tail)


# --- V1Pod-or-dict access -------------------------------------------------------------------------------

def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _get(obj: Any, camel: str) -> Any:
    """``obj[camel]`` for dicts, ``obj.<snake_case>`` for client model objects; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(camel, obj.get(_snake(camel)))
    return getattr(obj, _snake(camel), None)


def _base_status(pod: Any, container: str) -> Any:
    for status in _get(_get(pod, "status"), "containerStatuses") or ():
        if _get(status, "name") == container:
            return status
    return None


def _terminated(status: Any) -> Any:
    """The container's terminated state, else the last terminated state (restarts), else None."""
    current = _get(_get(status, "state"), "terminated")
    return current if current is not None else _get(_get(status, "lastState"), "terminated")


# --- log lines ------------------------------------------------------------------------------------------

def split_lines(text: str | bytes | Iterable[str | bytes] | None) -> list[str]:
    """Log text (str, bytes or an iterable of chunks) -> non-empty lines without trailing whitespace."""
    if text is None:
        return []
    if isinstance(text, (str, bytes)):
        chunks: Iterable[str | bytes] = [text]
    else:
        chunks = text
    joined = "".join(c.decode("utf-8", "backslashreplace") if isinstance(c, bytes) else c for c in chunks)
    return [line.rstrip() for line in joined.splitlines() if line.strip()]


def last_traceback(lines: Sequence[str]) -> list[str]:
    """The last Python traceback in ``lines`` (from its header to the end), or []."""
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].strip().endswith(TRACEBACK_HEAD):
            return list(lines[i:])
    return []


def exception_line(traceback: Sequence[str]) -> str:
    """``ValueError: ...`` — the final line of a traceback that is not indented."""
    for line in reversed(traceback):
        if line and not line.startswith((" ", "\t")):
            return line.strip()
    return ""


# --- the classifier -------------------------------------------------------------------------------------

def classify(pod: Any, log_lines: Sequence[str] | None = None, *, container: str = "base",
             tail: int = TAIL_LINES) -> Failure:
    """Classify a failed (or stuck) trainer pod. ``log_lines``: the trainer container's log, any length.

    When no log is given, the container's termination message is used: the trainer pod sets
    ``terminationMessagePolicy: FallbackToLogsOnError``, so the kubelet copies the last log lines there.
    """
    if pod is None:
        return Failure(INFRASTRUCTURE, "the pod no longer exists (deleted or garbage-collected by the cluster)")
    status = _get(pod, "status")
    base = _base_status(pod, container)
    terminated = _terminated(base)
    lines = list(log_lines or [])
    if not lines and terminated is not None:
        lines = split_lines(_get(terminated, "message"))
    tail_lines = tuple(lines[-tail:])
    exit_code = _get(terminated, "exitCode")
    term_reason = _get(terminated, "reason") or ""

    if term_reason == "OOMKilled":
        return Failure(OOM, f"container {container!r} was OOMKilled (exit code {exit_code})", tail_lines, exit_code)

    pod_reason = _get(status, "reason") or ""
    if pod_reason in INFRA_POD_REASONS or pod_reason.startswith("OutOf"):
        why = INFRA_POD_REASONS.get(pod_reason, "the node had no room for the pod's resources at admission")
        message = _get(status, "message")
        return Failure(INFRASTRUCTURE, f"{pod_reason}: {why}" + (f" ({message})" if message else ""),
                       tail_lines, exit_code)
    for condition in _get(status, "conditions") or ():
        if _get(condition, "type") == "DisruptionTarget" and str(_get(condition, "status")) == "True":
            reason = _get(condition, "reason") or "DisruptionTarget"
            why = DISRUPTION_REASONS.get(reason, "the cluster is terminating the pod")
            return Failure(INFRASTRUCTURE, f"{reason}: {why}", tail_lines, exit_code)

    waiting = _get(_get(base, "state"), "waiting")
    waiting_reason = _get(waiting, "reason") or ""
    if waiting_reason in CONFIG_WAITING:
        detail = _get(waiting, "message")
        return Failure(CONFIG, f"{waiting_reason}: {CONFIG_WAITING[waiting_reason]}" + (f" ({detail})" if detail else ""),
                       tail_lines)
    if waiting_reason in INFRA_WAITING:
        detail = _get(waiting, "message")
        return Failure(INFRASTRUCTURE, f"{waiting_reason}: the container never started" + (f" ({detail})" if detail else ""),
                       tail_lines)

    if terminated is not None:
        traceback = last_traceback(lines)
        if traceback:
            last = exception_line(traceback)
            if last.startswith("MemoryError"):
                return Failure(OOM, f"the trainer raised MemoryError (exit code {exit_code})", tail_lines, exit_code)
            if exit_code not in (0, None) and exit_code not in SIGNAL_EXITS:
                shown = tuple(traceback[-tail:]) if len(traceback) >= len(tail_lines) else tail_lines
                return Failure(USER_CODE, f"the trainer raised {last or 'an exception'} (exit code {exit_code})",
                               shown, exit_code)
        if exit_code == TRAINER_CONFIG_EXIT:
            last = tail_lines[-1] if tail_lines else "configuration error"
            return Failure(USER_CODE, f"the trainer rejected its configuration or data (exit code 2): {last}",
                           tail_lines, exit_code)
        if exit_code in SIGNAL_EXITS:
            return Failure(INFRASTRUCTURE, f"the container was killed by {SIGNAL_EXITS[exit_code]} (exit code "
                           f"{exit_code}, reason {term_reason or 'none'}): node shutdown, preemption or eviction",
                           tail_lines, exit_code)
        if exit_code == 0:
            return Failure(INFRASTRUCTURE, "the trainer exited 0 but the pod failed (sidecar or result retrieval)",
                           tail_lines, exit_code)
        return Failure(UNKNOWN, f"the trainer exited with code {exit_code} ({term_reason or 'no reason'}) "
                       "without a Python traceback", tail_lines, exit_code)

    phase = _get(status, "phase") or "Unknown"
    if phase in ("Pending", "Unknown"):
        return Failure(INFRASTRUCTURE, f"the pod never started (phase {phase}): no node with the requested "
                       "resources became available in time, or the image is still being pulled", tail_lines)
    return Failure(INFRASTRUCTURE, f"the pod stopped being watched in phase {phase} (timeout or API error)",
                   tail_lines)


# --- memory escalation ----------------------------------------------------------------------------------

def format_memory(size: int) -> str:
    """Bytes -> the shortest exact binary quantity (``8Gi``, ``1536Mi``), rounded up to whole Mi."""
    mib = math.ceil(size / 2**20)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def next_memory(current: str, maximum: str) -> str | None:
    """Twice ``current`` capped at ``maximum``; None when ``current`` already is (at least) the maximum."""
    now, top = memory_bytes(current), memory_bytes(maximum)
    if now >= top:
        return None
    return format_memory(min(2 * now, top))


def attempt_memory(spec_memory: str, maximum: str, stored: Any) -> str:
    """Memory for this try: the escalated value a previous OOM stored, if valid and within limits."""
    if isinstance(stored, str):
        try:
            value = memory_bytes(stored)
        except ValueError:
            return spec_memory
        if memory_bytes(spec_memory) <= value <= memory_bytes(maximum):
            return stored
    return spec_memory
