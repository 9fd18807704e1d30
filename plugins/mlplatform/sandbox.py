"""Least privilege for tenant-influenced stage work: run it in a child process that holds no platform secret.

The Airflow task process holds what the platform needs (the Execution API token and its socket to the
supervisor, connections such as the gateway's platform token, in compose also the broker URL) and its
ancestors hold more (the worker's or scheduler's metadata DB URL, Fernet key, JWT secret). The work of
validate, features, train, evaluate and the drift checks reads tenant data, column names and
hyperparameters, so it runs in a child started by ``run()``:

- **environment**: an explicit allowlist (``child_environ``): PATH, HOME, locale, proxies and CA bundles, the
  platform's ``MLPLATFORM_*`` / ``MLFLOW_*`` / ``FEAST_*`` settings except secret-looking ones (names with
  PASSWORD, SECRET, TOKEN, ...; values with ``user:password@`` or ``password=``, except the Feast online
  store's ``MLPLATFORM_REDIS_URL`` that the features stage writes to), and the tenant's own scoped
  credentials: ``MLPLATFORM_TENANT_<TENANT>__<NAME>`` becomes ``<NAME>`` in that tenant's stages only.
  Never ``AIRFLOW*`` (DB URL, Fernet key, JWT and API secrets, ``AIRFLOW_CONN_*``, ``AIRFLOW_VAR_*``),
  the platform's ``AWS_*``, the gateway token or another tenant's credentials.
- **namespaces** (``MLPLATFORM_SANDBOX=auto``, the default, when ``unshare`` works here; as root directly,
  otherwise in a user namespace): a new PID namespace (no other process is visible, so no parent's or
  grandparent's ``/proc/<pid>/environ``), a mount namespace in which the files holding platform secrets are
  covered (tmpfs over directories, ``/dev/null`` over files: ``AIRFLOW_HOME`` and ``AIRFLOW_CONFIG``, the
  tenancy folder, ``$HOME``, the repo's ``.env``, ``/run/secrets``, the gateway's folder in the platform home,
  other tenants' artifact, Feast and data folders, and ``MLPLATFORM_SANDBOX_HIDE``, os.pathsep-separated),
  then a second user namespace so the stage cannot unmount what covers them (the mounts are locked).
  Paths the stage needs (code, interpreter, data, artifacts) are carved out of a covered folder.
- without namespaces (``unshare`` refused, e.g. under Docker's default seccomp profile) ``auto`` falls back to
  the scrubbed environment and logs a warning; ``MLPLATFORM_SANDBOX=namespaces`` refuses to run instead,
  ``scrub`` never tries, ``off`` runs in the task process (development only).

The request (an importable ``module:function`` and picklable arguments, e.g. a ``RunContext``) goes to the
child as a pickle on stdin; nothing comes back as a pickle (the child is not trusted): the child's log records
and its result or error are JSON lines on its stdout, its raw output goes to stderr; both reach the task log.
A ``StageFailed`` comes back as one with its message; other errors as the same builtin type (else
``SandboxError``) with the child's traceback logged. The child dies with the task process.

Importing this module is cheap and Airflow-free (the child imports it first).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from functools import lru_cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MODE_ENV = "MLPLATFORM_SANDBOX"  # auto (default) | namespaces | scrub | off
HIDE_ENV = "MLPLATFORM_SANDBOX_HIDE"
PASS_ENV = "MLPLATFORM_SANDBOX_PASS_ENV"  # extra variable names passed on unchanged (comma-separated)
TENANT_ENV_PREFIX = "MLPLATFORM_TENANT_"
MODES = ("auto", "namespaces", "scrub", "off")

BASE_ENV = (
    "PATH", "HOME", "TMPDIR", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "LC_NUMERIC", "TZ", "USER", "LOGNAME", "VIRTUAL_ENV",
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "NO_PROXY", "no_proxy", "HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy",
    "DO_NOT_TRACK", "GIT_PYTHON_REFRESH", "PYTHONHASHSEED", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_MAX_THREADS", "VECLIB_MAXIMUM_THREADS",
    "CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES",
)
PLATFORM_PREFIXES = ("MLPLATFORM_", "MLFLOW_", "FEAST_")
SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY|AUTH|_PW\b|_PWD\b",
                         re.I)
SECRET_VALUE = re.compile(r"://[^/\s@:]*:[^/\s@]+@|password=", re.I)
# Platform settings a stage needs although they carry a credential: the Feast online store the features stage
# writes to (compose gives it a Redis of its own, not the Celery broker's).
STAGE_CREDENTIALS = frozenset({"MLPLATFORM_REDIS_URL"})
# Platform settings that are never a stage's business (the prediction log's DB is read by the task process).
PLATFORM_ONLY = frozenset({"MLPLATFORM_PREDICTION_LOG_URL", "MLPLATFORM_TENANCY_DIR", MODE_ENV, HIDE_ENV, PASS_ENV})

_PROTO_PATH = {"__mlplatform_path__"}
_SAFE_ERRORS = {c.__name__: c for c in (ValueError, TypeError, KeyError, IndexError, LookupError, RuntimeError,
                                        FileNotFoundError, FileExistsError, PermissionError, OSError, MemoryError,
                                        TimeoutError, NotImplementedError, ZeroDivisionError, AssertionError,
                                        ArithmeticError, ImportError, ModuleNotFoundError)}


class SandboxError(RuntimeError):
    """The stage's child failed with an error type the task process does not rebuild, or died."""


# --------------------------------------------------------------------------------------------- environment
def tenant_env_key(tenant: str) -> str:
    return TENANT_ENV_PREFIX + re.sub(r"[^A-Za-z0-9]", "_", tenant).upper() + "__"


def child_environ(tenant: str | None, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a tenant's stage work gets: the allowlist of the module docstring."""
    environ = dict(os.environ if environ is None else environ)
    extra = {n.strip() for n in environ.get(PASS_ENV, "").split(",") if n.strip()}
    out: dict[str, str] = {}
    for name, value in environ.items():
        if name in extra or name in BASE_ENV:
            out[name] = value
        elif name.startswith(TENANT_ENV_PREFIX) or name in PLATFORM_ONLY:
            continue
        elif name.startswith(PLATFORM_PREFIXES):
            if name in STAGE_CREDENTIALS or not (SECRET_NAME.search(name) or SECRET_VALUE.search(value)):
                out[name] = value
    if tenant:
        prefix = tenant_env_key(tenant)
        for name, value in environ.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                out[name[len(prefix):]] = value
    out.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    out.setdefault("DO_NOT_TRACK", "true")
    return out


# ------------------------------------------------------------------------------------------------- mode
def mode() -> str:
    value = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{MODE_ENV}={value!r}: use one of {', '.join(MODES)}")
    return value


def _outer_flags() -> list[str]:
    flags = ["--pid", "--fork", "--kill-child", "--mount-proc", "--mount"]
    return flags if os.geteuid() == 0 else ["--user", "--map-root-user", *flags]


@lru_cache(maxsize=1)
def namespaces_available() -> tuple[bool, str]:
    """(works, why not): a PID + mount namespace with a tmpfs mount and a locking user namespace inside."""
    unshare, sh = shutil.which("unshare"), shutil.which("sh")
    if not unshare or not sh or not shutil.which("mount"):
        return False, "unshare/mount not found"
    with tempfile.TemporaryDirectory(prefix="mlplatform-sandbox-check-") as tmp:
        script = f'mount -t tmpfs -o size=4k tmpfs "$1" && exec {unshare} --user --map-root-user --mount -- true'
        try:
            proc = subprocess.run([unshare, *_outer_flags(), "--", sh, "-c", script, "sh", tmp],
                                  capture_output=True, text=True, timeout=20, env={"PATH": os.environ.get("PATH", "")})
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, str(exc)
    if proc.returncode != 0:
        return False, (proc.stderr or proc.stdout).strip()[:300] or f"exit {proc.returncode}"
    return True, ""


# ------------------------------------------------------------------------------------------ hidden paths
def _resolved(paths) -> list[Path]:
    out = []
    for p in paths:
        if not p:
            continue
        try:
            path = Path(p).expanduser()
            if path.is_absolute():
                out.append(path.resolve())
        except (OSError, RuntimeError):
            continue
    return list(dict.fromkeys(out))


def default_hidden(ctx: Any = None, environ: dict[str, str] | None = None) -> list[Path]:
    """Paths that hold platform secrets or other tenants' files (before carving out what the stage needs)."""
    from mlplatform.config import REPO_ROOT

    env = os.environ if environ is None else environ
    home = Path(env.get("HOME") or os.path.expanduser("~"))
    candidates: list[Any] = [
        env.get("AIRFLOW_HOME") or home / "airflow", env.get("AIRFLOW_CONFIG"), env.get("MLPLATFORM_TENANCY_DIR"),
        home, REPO_ROOT / ".env", "/run/secrets", "/var/run/secrets",
        *[p for p in env.get(HIDE_ENV, "").split(os.pathsep) if p.strip()],
    ]
    if ctx is not None:
        config, tenant = ctx.config, ctx.tenant
        candidates.append(config.home / "gateway")  # tokens file, every tenant's prediction log
        for root in (Path(config.artifact_root), config.feast_root):
            if "://" not in str(root) and root.is_dir():
                candidates += [p for p in root.iterdir() if p.name != tenant.name]
        allowed = {p.strip("/").split("/")[0] for p in tenant.spec.data.allowed_prefixes if not p.startswith("s3://")}
        if config.data_root.is_dir():
            candidates += [p for p in config.data_root.iterdir() if p.name not in allowed]
    return [p for p in _resolved(candidates) if p.exists() and p != Path("/")]


def needed_paths(ctx: Any = None, extra: list[Any] = ()) -> list[Path]:
    """What the stage reads or writes: code, interpreter, platform folders, the run's data and artifacts."""
    import site

    import mlplatform
    from mlplatform.config import REPO_ROOT

    paths: list[Any] = [Path(mlplatform.__file__).parents[1], REPO_ROOT / "include", sys.prefix, sys.base_prefix,
                        sys.exec_prefix, Path(sys.executable).parent, *site.getsitepackages(), *extra]
    user_site = site.getusersitepackages()
    if user_site in sys.path:
        paths.append(user_site)
    if ctx is not None:
        config = ctx.config
        paths += [config.specs_dir, config.tenants_dir, config.templates_dir, config.feast_root / ctx.tenant.name,
                  config.home / "mlflow.db", config.home / "mlartifacts"]
        paths += [config.data_root / p.strip("/") for p in ctx.tenant.spec.data.allowed_prefixes
                  if not p.startswith("s3://")]
        if "://" not in config.artifact_root:
            paths.append(Path(config.artifact_root) / ctx.tenant.name)
        uri = config.tracking_uri
        if uri.startswith("sqlite:///"):
            paths.append(Path(uri[len("sqlite:///"):]).parent)
    return [p for p in _resolved(paths)]


def plan_hidden(hidden: list[Path], needed: list[Path], limit: int = 400) -> list[Path]:
    """The mount points that cover ``hidden`` but none of ``needed``: a hidden folder holding a needed path
    is covered child by child around it; a hidden path inside a needed folder is covered."""
    needed = set(needed)
    out: list[Path] = []
    seen: set[Path] = set()

    def inside(a: Path, b: Path) -> bool:
        return a == b or b in a.parents

    def cover(path: Path) -> None:
        if path.is_symlink():  # a mount lands on the link's target: cover the target, or nothing
            try:
                path = path.resolve(strict=True)
            except (OSError, RuntimeError):
                return
        if path in seen or path == Path("/"):
            return
        seen.add(path)
        if path in needed:  # a hidden path inside a needed folder is still covered (e.g. <home>/gateway)
            return
        if not any(inside(n, path) for n in needed):
            out.append(path)
            return
        if path.is_dir():
            for child in sorted(path.iterdir()):
                cover(child)

    for h in hidden:
        cover(h)
        if len(out) > limit:
            raise SandboxError(f"hiding {h} needs more than {limit} mounts around the paths the stage needs; "
                               f"set {HIDE_ENV} to narrower paths")
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------ parent
def run(target: str, *args: Any, ctx: Any = None, tenant: str | None = None, hide: list[Any] = (),
        needed: list[Any] = (), **kwargs: Any) -> Any:
    """Call ``target`` (``"module:function"``) with ``ctx`` (first, when given), ``args`` and ``kwargs`` in
    the sandbox of ``ctx``'s tenant; returns its JSON-able result (``Path`` values survive)."""
    call_args = ((ctx,) if ctx is not None else ()) + args
    tenant = tenant or (ctx.tenant.name if ctx is not None else None)
    chosen = mode()
    if chosen == "off":
        log.warning("%s=off: %s runs in the task process, with every secret it holds", MODE_ENV, target)
        return _call(target, call_args, kwargs)
    use_ns = False
    if chosen in ("auto", "namespaces"):
        use_ns, why = namespaces_available()
        if not use_ns and chosen == "namespaces":
            raise SandboxError(f"{MODE_ENV}=namespaces but namespaces cannot be created here: {why}")
        if not use_ns:
            _warn_once(f"no PID/mount namespaces here ({why}): tenant stage work runs with a scrubbed "
                       "environment only and can read its parent's /proc/<pid>/environ and files")
    started = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="mlplatform-sandbox-"))
    try:
        env = child_environ(tenant)
        env.update({"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TMPDIR": str(scratch),
                    "HOME": str(scratch), "PYTHONNOUSERSITE": env.get("PYTHONNOUSERSITE", "")})
        if not env["PYTHONNOUSERSITE"]:
            env.pop("PYTHONNOUSERSITE")
        cwd = scratch
        python = [sys.executable, "-P", "-m", "mlplatform.sandbox", "--child"]
        if use_ns:
            covered = plan_hidden(default_hidden(ctx) + _resolved(hide), needed_paths(ctx, [scratch, *needed]))
            cmd = _namespace_command(python, covered)
        else:
            cmd = python
        request = pickle.dumps({"target": target, "args": call_args, "kwargs": kwargs})
        return _supervise(cmd, env, cwd, request, target, started, use_ns)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


_HIDE_SCRIPT = (
    'set -e; u="$1"; shift; '
    'while [ "$1" != "--" ]; do '
    'if [ -d "$1" ]; then mount -t tmpfs -o ro,size=4k,mode=0555 mlplatform-hidden "$1"; '
    'else mount --bind /dev/null "$1"; fi; shift; done; shift; '
    'exec "$u" --user --map-root-user --mount -- "$@"'
)


def _namespace_command(python: list[str], covered: list[Path]) -> list[str]:
    unshare, sh = shutil.which("unshare"), shutil.which("sh")
    return [unshare, *_outer_flags(), "--", sh, "-c", _HIDE_SCRIPT, "sh", unshare, *map(str, covered), "--",
            *python]


def _set_pdeathsig() -> None:  # runs in the forked child before exec: it dies with the task process
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except Exception:  # noqa: BLE001 - best effort
        pass


def _supervise(cmd: list[str], env: dict[str, str], cwd: Path, request: bytes, target: str, started: float,
               use_ns: bool) -> Any:
    child_log = logging.getLogger("mlplatform.sandbox.child")
    outcome: dict[str, Any] = {}
    tail: list[str] = []
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=cwd, close_fds=True, preexec_fn=_set_pdeathsig)

    def raw_output() -> None:
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            del tail[:-30]
            child_log.info("%s", line)

    reader = threading.Thread(target=raw_output, name="sandbox-stderr", daemon=True)
    reader.start()
    try:
        try:
            proc.stdin.write(request)
            proc.stdin.close()
        except BrokenPipeError:
            pass
        for raw in proc.stdout:
            try:
                message = json.loads(raw)
            except ValueError:
                child_log.info("%s", raw.decode("utf-8", "replace").rstrip())
                continue
            if not isinstance(message, dict):
                continue
            if "log" in message:
                record = message["log"] if isinstance(message["log"], dict) else {}
                level = record.get("level") if isinstance(record.get("level"), int) else logging.INFO
                logging.getLogger(str(record.get("name") or "mlplatform.sandbox.child")).log(
                    level, "%s", str(record.get("msg", "")))
            elif "ready" in message:
                log.info("%s: stage process started in %.2fs (%s)", target, time.monotonic() - started,
                         "PID+mount namespaces, scrubbed environment" if use_ns else "scrubbed environment")
            elif "result" in message or "error" in message:
                outcome = message
        code = proc.wait()
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if "result" in outcome:
        return _decode(outcome["result"])
    if "error" in outcome and isinstance(outcome["error"], dict):
        _raise(outcome["error"], target)
    how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
    if code == 137 or code == -9:
        how += " (SIGKILL: out of memory?)"
    raise SandboxError(f"the stage process for {target} {how} without a result; last output:\n" + "\n".join(tail))


def _raise(error: dict, target: str) -> None:
    from mlplatform.stages.context import StageFailed

    message = str(error.get("message", ""))
    if error.get("stage_failed"):
        raise StageFailed(message)
    kind = str(error.get("type", "Exception"))
    log.error("%s failed in its stage process:\n%s", target, str(error.get("traceback", "")).rstrip())
    cls = _SAFE_ERRORS.get(kind.rsplit(".", 1)[-1]) if kind.startswith("builtins.") else None
    if cls is not None:
        raise cls(message)
    raise SandboxError(f"{kind}: {message}")


def _warn_once(message: str, _seen: set[str] = set()) -> None:  # noqa: B006 - deliberate process-wide memo
    if message not in _seen:
        _seen.add(message)
        log.warning("%s", message)


# ----------------------------------------------------------------------------------------- JSON results
def _encode(value: Any) -> Any:
    if isinstance(value, Path):
        return {"__mlplatform_path__": str(value)}
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_encode(v) for v in value]
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item) and type(value).__module__ == "numpy":
        return _encode(item())
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"a stage result must be JSON-able; got {type(value).__module__}.{type(value).__qualname__}")


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == _PROTO_PATH and isinstance(value["__mlplatform_path__"], str):
            return Path(value["__mlplatform_path__"])
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _call(target: str, args: tuple, kwargs: dict) -> Any:
    import importlib

    module, _, name = target.partition(":")
    if not module.startswith("mlplatform.") or not name:
        raise ValueError(f"sandbox target {target!r}: use 'mlplatform.<module>:<function>'")
    return getattr(importlib.import_module(module), name)(*args, **kwargs)


# ------------------------------------------------------------------------------------------------- child
class _Protocol:
    """The child's JSON-lines channel to the task process (one line per message, writes serialised)."""

    def __init__(self, stream):
        self.stream, self.lock = stream, threading.Lock()

    def send(self, message: dict) -> None:
        line = json.dumps(message, allow_nan=True)
        with self.lock:
            self.stream.write(line + "\n")
            self.stream.flush()


class _ProtocolHandler(logging.Handler):
    def __init__(self, proto: _Protocol):
        super().__init__(logging.INFO)
        self.proto = proto

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.exc_info:
                msg += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
            self.proto.send({"log": {"name": record.name, "level": record.levelno, "msg": msg}})
        except Exception:  # noqa: BLE001 - logging must never fail the stage
            pass


def _child_main() -> int:
    proto = _Protocol(os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8"))
    os.dup2(2, 1)  # print() and libraries' stdout go to the raw stream, never into the protocol
    sys.stdout = os.fdopen(1, "w", buffering=1, encoding="utf-8", errors="replace")
    root = logging.getLogger()
    root.handlers[:] = [_ProtocolHandler(proto)]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    send = proto.send

    send({"ready": True})
    try:
        request = pickle.load(sys.stdin.buffer)
        result = _call(request["target"], tuple(request["args"]), dict(request["kwargs"]))
        send({"result": _encode(result)})
    except BaseException as exc:  # noqa: BLE001 - every failure goes back to the task process as data
        from mlplatform.stages.context import StageFailed

        kind = type(exc)
        send({"error": {"stage_failed": isinstance(exc, StageFailed), "type": f"{kind.__module__}.{kind.__qualname__}",
                        "message": str(exc), "traceback": traceback.format_exc()}})
    finally:
        logging.shutdown()
    return 0


# ------------------------------------------------------------------------------------------------ probe
def probe(*_: Any, paths: list[str] = (), escape: bool = False) -> dict[str, Any]:
    """What this process can see: its environment, every visible process's environ and command line, and the
    content of ``paths`` (for ``python -m mlplatform.sandbox check`` and the least-privilege test). Positional
    arguments (a stage's context and inputs) are ignored. ``escape``: also try to unmount what covers each
    path and ``/proc`` (a stage that could would see the platform's files and processes again)."""
    unmounted: dict[str, str] = {}
    if escape and os.getpid() != 1:
        # Only inside the sandbox's own PID + mount namespaces (we are its PID 1): elsewhere an unmount that
        # works would detach the host's /proc.
        unmounted = {str(t): "skipped: not in the sandbox's namespaces" for t in [*paths, "/proc"]}
    elif escape:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for target in [*paths, "/proc"]:
            rc = libc.umount2(str(target).encode(), 2)  # MNT_DETACH
            unmounted[str(target)] = "unmounted" if rc == 0 else os.strerror(ctypes.get_errno())
    procs: dict[str, Any] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            item = {}
            for part in ("environ", "cmdline"):
                try:
                    item[part] = (entry / part).read_bytes().decode("utf-8", "replace")
                except OSError as exc:
                    item[part] = f"<unreadable: {type(exc).__name__}>"
            procs[entry.name] = item
    files: dict[str, str] = {}
    for path in paths:
        p = Path(path)
        targets = [p] if not p.is_dir() else [f for f in p.rglob("*") if f.is_file()][:200]
        if p.is_dir() and not targets:
            files[str(p)] = "<empty directory>"
        for f in targets:
            try:
                files[str(f)] = f.read_text(errors="replace")[:10000]
            except OSError as exc:
                files[str(f)] = f"<unreadable: {type(exc).__name__}>"
        if not p.exists():
            files[str(p)] = "<missing>"
    fds = {}
    for fd in sorted(os.listdir("/proc/self/fd"), key=int):
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return {"pid": os.getpid(), "ppid": os.getppid(), "environ": dict(os.environ), "procs": procs, "files": files,
            "unmount": unmounted, "fds": fds}


def _check(argv: list[str]) -> int:
    """``python -m mlplatform.sandbox check [TENANT] [PATH...]``: run ``probe`` in the sandbox and print what it
    saw (platform admins: check a worker's isolation)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tenant = argv[0] if argv else None
    report = run("mlplatform.sandbox:probe", tenant=tenant, paths=list(argv[1:]), escape=True)
    visible = sorted(report["procs"], key=int)
    print(json.dumps({"mode": mode(), "namespaces": namespaces_available()[0], "pid": report["pid"],
                      "visible_pids": visible, "environment": sorted(report["environ"]),
                      "files": {k: (v if v.startswith("<") else f"<readable: {len(v)} chars>")
                                for k, v in report["files"].items()},
                      "unmount_attempts": report["unmount"]}, indent=1))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(_child_main())
    if sys.argv[1:2] == ["check"]:
        sys.exit(_check(sys.argv[2:]))
    print(__doc__)
    sys.exit(2)
