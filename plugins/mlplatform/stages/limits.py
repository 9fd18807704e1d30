"""CPU and memory limits of the trainer, from ``spec.training.resources``.

Both backends get the same thread and GPU settings through the trainer's environment (``TrainerLimits.env``):
thread counts (OMP/BLAS and the trainer's ``n_jobs``/``nthread``/torch threads) equal the CPU request, and
the trainer uses a GPU only when ``gpu > 0``. The Kubernetes pod gets its memory and CPU limits from the
pod spec (cgroups). The local process backend enforces them itself:

- memory: a watchdog reads the resident set size of the trainer's process tree every 0.2 s and kills it
  above ``resources.memory`` (what a cgroup memory limit or the kubelet would do), with a message naming
  the limit; ``RLIMIT_AS`` (virtual memory) is set to the limit plus ``VIRTUAL_HEADROOM`` as a backstop
  against one huge allocation between two reads. Virtual memory alone cannot be the limit: a trainer
  that uses 0.4-0.7 GiB resident reserves 1.8-2.7 GiB of address space (shared libraries, thread stacks,
  malloc arenas; measured with xgboost, scikit-learn and torch), so RLIMIT_AS at 2Gi kills healthy runs.
  A cgroup is not used locally: it needs a delegated cgroup v2 subtree, which a worker rarely has.
- CPU: the trainer is pinned (``sched_setaffinity``) to as many CPUs as its thread count, chosen from the
  CPUs the worker may use.

The limits are set by a tiny launcher (``python -I -S -c``) that execs the trainer, so they hold from the
trainer's first instruction and no ``preexec_fn`` runs in a possibly threaded worker.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform.spec.model import cpu_cores, memory_bytes

THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                    "NUMEXPR_NUM_THREADS")
VIRTUAL_HEADROOM = 4 * 2**30
POLL_SECONDS = 0.2
OOM_EXIT_CODE = 3  # the trainer's exit code for a MemoryError (include/trainer/train.py)

_LAUNCHER = """\
import os, resource, sys
virtual, cpus = int(sys.argv[1]), int(sys.argv[2])
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
if hard != resource.RLIM_INFINITY:
    virtual = min(virtual, hard)
resource.setrlimit(resource.RLIMIT_AS, (virtual, virtual))
try:
    allowed = sorted(os.sched_getaffinity(0))
    if cpus < len(allowed):
        first = os.getpid() % len(allowed)
        os.sched_setaffinity(0, [allowed[(first + i) % len(allowed)] for i in range(cpus)])
except (AttributeError, OSError):
    pass
os.execv(sys.argv[3], sys.argv[3:])
"""


def cpu_threads(cpu: Any) -> int:
    """Threads for a CPU request: whole cores, at least one (500m -> 1, 2 -> 2, 2.5 -> 2)."""
    return max(1, math.floor(cpu_cores(cpu)))


def format_bytes(n: float) -> str:
    for unit, size in (("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{int(n)}B"


@dataclass
class TrainerLimits:
    cpu: str
    threads: int
    gpus: int
    memory: str
    memory_bytes: int
    peak_rss: int = 0
    killed_for_memory: bool = field(default=False)

    @classmethod
    def of(cls, resources) -> TrainerLimits:
        return cls(cpu=str(resources.cpu), threads=cpu_threads(resources.cpu), gpus=int(resources.gpu),
                   memory=resources.memory, memory_bytes=memory_bytes(resources.memory))

    def env(self) -> dict[str, str]:
        """The trainer's thread, GPU and memory settings (both backends; the trainer reads the MLPLATFORM_ ones)."""
        threads = str(self.threads)
        return {**dict.fromkeys(THREAD_VARIABLES, threads), "MLPLATFORM_CPU_THREADS": threads,
                "MLPLATFORM_GPUS": str(self.gpus), "MLPLATFORM_MEMORY_LIMIT_BYTES": str(self.memory_bytes)}

    def command(self, cmd: list[str]) -> list[str]:
        """``cmd`` behind the launcher that sets RLIMIT_AS and the CPU affinity, then execs it."""
        return [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(self.memory_bytes + VIRTUAL_HEADROOM),
                str(self.threads), *cmd]

    def watch(self, proc) -> callable:
        """Start the memory watchdog on ``proc`` (a Popen); returns the function that stops it."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(POLL_SECONDS) and proc.poll() is None:
                rss = tree_rss(proc.pid)
                self.peak_rss = max(self.peak_rss, rss)
                if rss > self.memory_bytes:
                    self.killed_for_memory = True
                    try:
                        proc.send_signal(signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    return

        thread = threading.Thread(target=run, name="trainer-memory-watchdog", daemon=True)
        thread.start()

        def halt() -> None:
            stop.set()
            thread.join(timeout=5)

        return halt

    def explain(self, code: int, tail: list[str]) -> str | None:
        """A clear message when the trainer failed because of its limits, else None."""
        where = f"spec.training.resources.memory {self.memory}"
        if self.killed_for_memory:
            return (f"trainer stopped: it used {format_bytes(self.peak_rss)} of memory, above its limit "
                    f"{where}; ask for more memory (within the tenant's max_memory_per_task) or train on less data")
        if code == OOM_EXIT_CODE or any("MemoryError" in line for line in tail[-5:]):
            return (f"trainer ran out of memory: an allocation went above its limit {where} (virtual memory "
                    f"capped at {format_bytes(self.memory_bytes + VIRTUAL_HEADROOM)})")
        return None


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and its descendants (0 when it is gone)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total
