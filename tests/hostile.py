"""Hostile paths for CLI tests, all inside one temporary directory: device nodes made with mknod
(null 1:3, zero 1:5, full 1:7: never the real /dev entries), a FIFO, a socket, a directory,
symlinks, an empty file, binary and text garbage, a sparse 1 GiB file, a missing path."""

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

EXIT_SCHEME = {0, 1, 2, 3, 4}  # 130 and 141 need a signal or a closed pipe, which these runs do not send


def vmm(*args, cwd=None, timeout=60, **kw):
    """`vmm ARGS` as a user runs it: a real process."""
    return subprocess.run([sys.executable, "-m", "vmm.cli", *map(str, args)], capture_output=True, text=True,
                          errors="replace", timeout=timeout, cwd=cwd, **kw)  # replace: `-o -` is binary


def one_line_error(r, code=2):
    """The CLI's error contract: exit status `code`, one line "vmm: ..." on stderr, no traceback;
    returns that line."""
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("vmm: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


def make_paths(d: Path):
    """{name: path} of every kind of path the tests throw at the CLI, created in `d`."""
    p = {}
    for name, (major, minor) in {"null": (1, 3), "zero": (1, 5), "full": (1, 7)}.items():
        p[name] = d / f"dev-{name}"
        try:
            os.mknod(p[name], 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        except PermissionError:
            pytest.skip("mknod needs CAP_MKNOD (these tests run as root)")
    p["fifo"] = d / "fifo"
    os.mkfifo(p["fifo"])
    p["sock"] = d / "sock"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(p["sock"]))
    p["_socket"] = sock  # keep it bound
    p["dir"] = d / "adir"
    p["dir"].mkdir()
    p["missing"] = d / "missing" / "file"
    p["empty"] = d / "empty.txt"
    p["empty"].write_bytes(b"")
    p["garbage"] = d / "garbage.bin"
    p["garbage"].write_bytes(bytes(range(256)) * 16)
    p["text"] = d / "notes.txt"
    p["text"].write_text("CPUID leaf? no.\n{ not json\n")
    p["huge"] = d / "huge.bin"
    with open(p["huge"], "wb") as f:
        f.truncate(1 << 30)  # sparse: reads of it must be bounded
    p["regular"] = d / "out.json"
    p["regular"].write_text("the old content\n")
    p["link"] = d / "link.json"
    os.symlink(p["regular"].name, p["link"])
    p["devlink"] = d / "link-to-null"
    os.symlink(p["null"].name, p["devlink"])
    p["proc"] = Path("/proc/cpuinfo")
    return p


def kinds(paths):
    """The file type of every path we made (lstat: a symlink is a link), to check nothing was replaced."""
    out = {}
    for name, path in paths.items():
        if isinstance(path, Path) and os.path.lexists(path) and not str(path).startswith("/proc"):
            out[name] = stat.S_IFMT(os.lstat(path).st_mode)
    return out


def leftovers(d: Path):
    """Temporary files an atomic write left behind in `d` (there must be none)."""
    return sorted(p.name for p in d.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))
