"""Safe YAML for specs: plain data only, with the line of every value kept for error messages.

Specs are untrusted input. This loader accepts one document of maps, lists and plain scalars, and refuses
tags (``!!python/...`` and friends), anchors and aliases (billion-laughs bombs), duplicate keys,
non-string keys, deep nesting and large files, each with the file and line to fix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from mlplatform.spec.errors import Problem, SpecError

MAX_BYTES = 64 * 1024  # the largest spec the caps allow (500 features, 50 expectations, 500 drift columns...) is ~58 KiB
MAX_DEPTH = 20
MAX_NODES = 20_000

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
    "tag:yaml.org,2002:map",
    "tag:yaml.org,2002:seq",
}

Path_ = tuple[Any, ...]


class Located:
    """A loaded document plus the (line, col) of every key path in it, 1-based."""

    def __init__(self, file: str, data: Any, marks: dict[Path_, tuple[int, int]]):
        self.file = file
        self.data = data
        self.marks = marks
        self.sha256: str | None = None  # of the file's bytes, set by load_file

    def where(self, path: Path_) -> tuple[int, int]:
        """Position of ``path``, or of its nearest existing parent when the key is missing."""
        path = tuple(path)
        while path:
            if path in self.marks:
                return self.marks[path]
            path = path[:-1]
        return self.marks.get((), (1, 1))

    def problem(self, path: Path_, message: str, field: str | None = None) -> Problem:
        line, col = self.where(path)
        return Problem(self.file, line, col, field if field is not None else dotted(path), message)


def dotted(path: Path_) -> str:
    """``("spec", "gates", 0, "name")`` -> ``spec.gates[0].name``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def load_text(text: str, file: str) -> Located:
    """Parse ``text`` (the contents of ``file``) into plain data with positions."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise SpecError([Problem(file, 1, 1, "", f"file is larger than {MAX_BYTES // 1024} KiB; "
                                 "a pipeline spec is a few dozen lines: move data out of the spec")])
    try:
        root = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        msg = " ".join(str(x) for x in (exc.context, exc.problem) if x)
        raise SpecError([Problem(file, line, col, "", f"invalid YAML: {msg}")]) from None
    except yaml.YAMLError as exc:
        raise SpecError([Problem(file, 1, 1, "", f"invalid YAML: {exc}")]) from None
    if root is None:
        raise SpecError([Problem(file, 1, 1, "", "file is empty")])
    builder = _Builder(file)
    data = builder.build(root, (), 0)
    return Located(file, data, builder.marks)


def load_file(path: Path, display: str | None = None, *, allow_symlinks: bool = True) -> Located:
    """Read and parse a spec or tenant file; ``display`` is the name used in messages.

    ``allow_symlinks=False`` (tenant specs): a symbolic link is refused without following it. The result's
    ``sha256`` is the digest of the bytes read (one read, so it describes what was parsed)."""
    name = display or str(path)
    raw = read_regular_file(path, name, allow_symlinks=allow_symlinks)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError([Problem(name, 1, 1, "", f"file is not UTF-8 text (byte {exc.start})")]) from None
    located = load_text(text, name)
    located.sha256 = hashlib.sha256(raw).hexdigest()
    return located


def read_regular_file(path: Path, name: str, *, allow_symlinks: bool = True) -> bytes:
    """The bytes of the regular file ``path`` (at most MAX_BYTES), else a SpecError naming ``name``.

    ``lstat`` first: a symbolic link (unless allowed; then its folder may not be one either), FIFO, socket,
    device or directory is refused without opening it, and the error names the entry itself, never what a
    link points to; the file is then opened
    with ``O_NOFOLLOW`` and checked again with ``fstat``, so swapping in a link between the two fails too."""
    def refuse(message: str) -> SpecError:
        return SpecError([Problem(name, 1, 1, "", message)])

    link_msg = ("spec file is a symbolic link: refused without reading it; commit the spec file itself "
                "(a link could point at another tenant's spec or a platform secret)")
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise refuse(f"cannot read file: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        if not allow_symlinks:
            raise refuse(link_msg)
    elif not allow_symlinks and os.path.islink(os.path.dirname(os.path.abspath(path))):
        raise refuse("the spec's folder is a symbolic link: refused without reading it; a tenant's specs live in "
                     "a real folder dags/specs/<tenant>/")
    elif not stat.S_ISREG(st.st_mode):
        raise refuse(f"not a regular file ({_kind(st.st_mode)}): refused; a spec is a plain YAML file")
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if allow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refuse(link_msg) from None
        raise refuse(f"cannot read file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(f"not a regular file ({_kind(st.st_mode)}): refused; a spec is a plain YAML file")
        if st.st_size > MAX_BYTES:
            raise refuse(f"file is {st.st_size // 1024} KiB, larger than {MAX_BYTES // 1024} KiB; "
                         "a pipeline spec is a few dozen lines")
        chunks, size = [], 0
        while size <= MAX_BYTES:
            chunk = os.read(fd, min(1 << 16, MAX_BYTES + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise refuse(f"cannot read file: {exc.strerror}") from None
    finally:
        os.close(fd)
    if size > MAX_BYTES:  # grew after fstat
        raise refuse(f"file is larger than {MAX_BYTES // 1024} KiB; a pipeline spec is a few dozen lines")
    return b"".join(chunks)


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return word
    return "not a plain file"


class _Builder:
    """Turns a composed node tree into dicts, lists and scalars, refusing what specs may not hold."""

    def __init__(self, file: str):
        self.file = file
        self.marks: dict[Path_, tuple[int, int]] = {}
        self.seen: set[int] = set()
        self.count = 0
        self.scalars = yaml.constructor.SafeConstructor()

    def fail(self, node: yaml.Node, message: str, path: Path_ = ()) -> SpecError:
        m = node.start_mark
        return SpecError([Problem(self.file, m.line + 1, m.column + 1, dotted(path), message)])

    def build(self, node: yaml.Node, path: Path_, depth: int) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.fail(node, f"document has more than {MAX_NODES} values", path)
        if depth > MAX_DEPTH:
            raise self.fail(node, f"nesting deeper than {MAX_DEPTH} levels", path)
        if id(node) in self.seen:
            raise self.fail(node, "YAML anchors and aliases are not allowed in specs: write the value out", path)
        self.seen.add(id(node))
        if node.tag not in _PLAIN_TAGS:
            raise self.fail(node, f"YAML tag {node.tag!r} is not allowed: specs hold plain data only", path)
        self.marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise self.fail(key_node, "YAML merge keys (<<) are not allowed in specs", path)
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != "tag:yaml.org,2002:str":
                    raise self.fail(key_node, "mapping keys must be plain strings", path)
                key = key_node.value
                if key in out:
                    raise self.fail(key_node, f"duplicate key {key!r}", path + (key,))
                self.marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
                out[key] = self.build(value_node, path + (key,), depth + 1)
                # Keep the key's own position: errors about a value point at its key's line.
                self.marks[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,), depth + 1) for i, item in enumerate(node.value)]
        if node.tag in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:timestamp"):
            return node.value
        # The resolver already picked the tag; call its constructor directly (no bookkeeping per value).
        return self.scalars.yaml_constructors[node.tag](self.scalars, node)
