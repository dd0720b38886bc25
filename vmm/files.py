"""Reading input files and writing output files safely: every read bounded, every error one line
naming the file, and no output ever replaces anything but a regular file.

Reading (`read_bytes`, `read_text`, `open_input`): the path must be a regular, non-empty file, not a
directory, device node, FIFO, socket or kernel pseudo-file (/proc, /sys: their st_size is 0 and
some never end), and no larger than a bound; text must be UTF-8. "-" reads standard input (bounded).

Writing (`output`): "-" is standard output. A symlink is resolved first, so the link stays a link
and its target is written. A regular file or a new path is written atomically: a temporary file in
the same directory, fsync, rename, fsync of the directory; on any error the temporary file is
removed and the old file is left as it was. An existing character device or FIFO is written
through (opened without O_CREAT/O_TRUNC, never renamed over); a FIFO without a reader, a socket, a
block device and a directory are refused. A failed write names the path and the errno.
"""

import contextlib
import errno as _errno
import io
import os
import stat
import sys

from .errors import VmmError

MiB = 1 << 20
TEXT_LIMIT = 64 * MiB  # CPUID dumps, JSON reports, guest CPUID files are a few KiB to a few MiB
PSEUDO_FS = ("/proc/", "/sys/")


class FileError(VmmError):
    """An input or output file that cannot be used; the message is one line naming the path.
    `errno` is the OS errno when one caused it, else None."""

    def __init__(self, msg, errno=None):
        super().__init__(msg)
        self.errno = errno


def kind_of(mode):
    """What a st_mode is, in words ("a directory", "a character device", ...)."""
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return what
    return "a special file"


def _os_error(path, e, verb="cannot read"):
    return FileError(f"{path}: {verb}: {e.strerror or e}", e.errno)


def _size_text(n):
    return f"{n / MiB:.0f} MiB" if n >= MiB else f"{n} bytes"


def check_input(path, what="file"):
    """os.stat_result of `path` after checking it is a regular, non-empty, non-pseudo file.
    Raises FileError (one line: "<path>: <what> ...")."""
    path = os.fspath(path)
    if path == "":
        raise FileError(f"empty path given for the {what}")
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == _errno.ENOENT:
            raise FileError(f"{path}: no such file (expected a {what})", e.errno) from None
        raise _os_error(path, e) from None
    if not stat.S_ISREG(st.st_mode):
        raise FileError(f"{path}: is {kind_of(st.st_mode)}, not a regular file (expected a {what})")
    real = os.path.realpath(path)
    if real.startswith(PSEUDO_FS):
        raise FileError(f"{path}: is a kernel pseudo-file ({real.split('/')[1]}), not a regular file "
                        f"(expected a {what}); copy it to a file first")
    if st.st_size == 0:
        raise FileError(f"{path}: is empty (expected a {what})")
    return st


def open_input(path, what="file", limit=None):
    """A binary file object open on `path`, checked like `check_input`, with `.size` in bytes
    (the caller reads at most that much). `limit` bounds the size (None: no bound, for files
    mapped rather than read). Raises FileError."""
    st = check_input(path, what)
    if limit is not None and st.st_size > limit:
        raise FileError(f"{path}: is {_size_text(st.st_size)}, more than the {_size_text(limit)} "
                        f"a {what} may be")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        raise _os_error(path, e) from None
    st2 = os.fstat(fd)
    if not stat.S_ISREG(st2.st_mode):  # replaced between stat and open
        os.close(fd)
        raise FileError(f"{path}: is {kind_of(st2.st_mode)}, not a regular file (expected a {what})")
    f = os.fdopen(fd, "rb")
    f.raw.name = path  # f.name is the path in messages, not the descriptor number
    f.size = st2.st_size
    return f


def read_bytes(path, what="file", limit=TEXT_LIMIT):
    """The whole content of `path` ("-": standard input), at most `limit` bytes. Raises FileError."""
    path = os.fspath(path)
    if path == "-":
        data = sys.stdin.buffer.read(limit + 1)
        where = "standard input"
    else:
        where = path
        with open_input(path, what, limit) as f:
            try:
                data = f.read(limit + 1)
            except OSError as e:
                raise _os_error(path, e) from None
    if len(data) > limit:
        raise FileError(f"{where}: more than the {_size_text(limit)} a {what} may be")
    if not data:
        raise FileError(f"{where}: is empty (expected a {what})")
    return data


def decode_text(data, where, what="file"):
    """`data` decoded as UTF-8, or a FileError naming `where` and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FileError(f"{where}: not a text file (byte 0x{data[e.start]:02x} at offset {e.start} "
                        f"is not UTF-8; expected a {what})") from None


def parse_json(text):
    """`text` (str or UTF-8 bytes) parsed as JSON. Every JSON input of vmm is parsed here. Raises
    json.JSONDecodeError (a ValueError) for bad syntax and also for nesting deeper than the parser
    can follow, which json.loads reports as RecursionError."""
    import json
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects nested too deeply", "", 0) from None


def read_text(path, what="file", limit=TEXT_LIMIT):
    """The content of `path` as UTF-8 text, bounded like `read_bytes`. Raises FileError."""
    return decode_text(read_bytes(path, what, limit), "standard input" if path == "-" else path, what)


# --- output --------------------------------------------------------------------------------------
def output_target(path):
    """Where `output(path)` writes: ("stdout", None) | ("through", real path of a character device
    or FIFO) | ("atomic", real path of a regular file or a new path). Touches nothing.
    Raises FileError for a directory, socket, block device or a missing parent directory."""
    path = os.fspath(path)
    if path == "-":
        return "stdout", None
    if path == "":
        raise FileError("empty output path")
    real = os.path.realpath(path)  # the link stays a link: its target is what gets written
    try:
        st = os.stat(real)
    except FileNotFoundError:
        parent = os.path.dirname(real)
        if not os.path.isdir(parent):
            raise FileError(f"{path}: cannot write: directory {parent} does not exist",
                            _errno.ENOENT) from None
        return "atomic", real
    except OSError as e:
        raise _os_error(path, e, "cannot write") from None
    if stat.S_ISREG(st.st_mode):
        return "atomic", real
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return "through", real
    raise FileError(f"{path}: is {kind_of(st.st_mode)}; vmm writes only to regular files, new paths, "
                    "character devices, FIFOs and '-' (standard output)")


@contextlib.contextmanager
def output(path, binary=False):
    """Context manager yielding a file object that ends up at `path` (see the module docstring).
    `f.seekable()` is False for standard output, FIFOs and most character devices: a writer that
    seeks must pad instead. Text mode writes UTF-8. Raises FileError for any failure, naming `path`;
    on error an atomic write leaves no temporary file and the old file unchanged."""
    how, real = output_target(path)
    if how == "stdout":
        sys.stdout.flush()
        raw = os.fdopen(os.dup(sys.stdout.fileno()), "wb")  # closing it leaves sys.stdout open
        f = raw if binary else io.TextIOWrapper(raw, encoding="utf-8")
        try:
            yield f
            f.flush()
        finally:
            with contextlib.suppress(BrokenPipeError):
                f.close()
        return
    if how == "through":
        try:
            fd = os.open(real, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as e:
            if e.errno == _errno.ENXIO:
                raise FileError(f"{path}: is a FIFO with no reader; start the reader first", e.errno) from None
            raise _os_error(path, e, "cannot write") from None
        st = os.fstat(fd)
        if not (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):  # changed under us
            os.close(fd)
            raise FileError(f"{path}: changed while opening it; not written")
        os.set_blocking(fd, True)
        f = os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"}))
        try:
            with f:
                yield f
        except OSError as e:
            if isinstance(e, VmmError):  # a KVM error raised by the writer's caller
                raise
            raise _os_error(path, e, "cannot write") from None
        return

    directory = os.path.dirname(real)
    try:
        old = os.stat(real)
        mode = stat.S_IMODE(old.st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    import tempfile  # lazily: `vmm run` reads files but writes none
    try:
        import tempfile  # not at import time: it pulls in shutil and random (cold start)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(real)}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise _os_error(path, e, "cannot write") from None
    try:
        os.fchmod(fd, mode)  # an ordinary file (or the old file's mode), not mkstemp's 0600
        f = os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8"}))
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, real)
        tmp = None
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError as e:
        if isinstance(e, VmmError):  # a KVM error raised by the writer's caller
            raise
        raise _os_error(path, e, "cannot write") from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def write_bytes(path, data):
    """Write `data` to `path` through `output` (atomic for regular files)."""
    with output(path, binary=True) as f:
        f.write(data)


def write_text(path, text):
    """Write `text` (UTF-8) to `path` through `output` (atomic for regular files)."""
    with output(path) as f:
        f.write(text)

