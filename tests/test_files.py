"""vmm.files: bounded reads with one-line errors, and outputs that never replace a non-regular file.
Device nodes and FIFOs are made in a temporary directory (mknod/mkfifo), never the real /dev ones."""

import os
import socket
import stat
import threading

import pytest

from vmm import files
from vmm.files import FileError


def _chr(tmp_path, name, major, minor):
    p = tmp_path / name
    try:
        os.mknod(p, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    return p


@pytest.fixture
def nodes(tmp_path):
    """null (1,3), zero (1,5), full (1,7) character devices, a FIFO and a socket, all in tmp_path."""
    n = {"null": _chr(tmp_path, "null", 1, 3), "zero": _chr(tmp_path, "zero", 1, 5),
         "full": _chr(tmp_path, "full", 1, 7), "fifo": tmp_path / "fifo", "sock": tmp_path / "sock"}
    os.mkfifo(n["fifo"])
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(n["sock"]))
    yield n
    s.close()


def _file(path, data):
    path.write_bytes(data)
    return path


def _only(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


# --- reading ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda d, n: d / "missing", "no such file"),
    (lambda d, n: d, "is a directory"),
    (lambda d, n: n["zero"], "is a character device"),
    (lambda d, n: n["null"], "is a character device"),
    (lambda d, n: n["fifo"], "is a FIFO"),
    (lambda d, n: n["sock"], "is a socket"),
    (lambda d, n: _file(d / "empty", b""), "is empty"),
    (lambda d, n: _file(d / "bin", b"CPUID\xfe\xff"), "byte 0xfe at offset 5 is not UTF-8"),
    (lambda d, n: "/proc/cpuinfo", "kernel pseudo-file"),
    (lambda d, n: "/sys/kernel/mm/transparent_hugepage/enabled", "kernel pseudo-file"),
])
def test_bad_inputs_are_one_line_naming_the_file(tmp_path, nodes, make, message):
    path = make(tmp_path, nodes)
    if not os.path.exists(path) and "missing" not in str(path):
        pytest.skip(f"{path} absent on this host")
    with pytest.raises(FileError) as e:
        files.read_text(path, "CPUID dump")
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_reads_are_bounded(tmp_path):
    big = tmp_path / "big"
    big.write_bytes(b"x" * 5000)
    assert files.read_text(big, limit=5000) == "x" * 5000
    with pytest.raises(FileError, match="more than the 4999 bytes a CPUID dump may be"):
        files.read_text(big, "CPUID dump", limit=4999)


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    (tmp_path / "a").write_text("hello")
    os.symlink("a", tmp_path / "l")
    assert files.read_text(tmp_path / "l") == "hello"


# --- writing ---------------------------------------------------------------------------------------
def test_regular_file_is_replaced_atomically_keeping_its_mode(tmp_path):
    p = tmp_path / "out.json"
    p.write_text("old")
    os.chmod(p, 0o640)
    ino = os.stat(p).st_ino
    files.write_text(p, "new")
    assert p.read_text() == "new" and os.stat(p).st_ino != ino  # renamed over, not rewritten in place
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o640
    assert _only(tmp_path) == ["out.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    p = tmp_path / "out"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with files.output(p) as f:
            f.write("partial")
            raise RuntimeError("the writer failed half way")
    assert p.read_text() == "old" and _only(tmp_path) == ["out"]
    with pytest.raises(RuntimeError):
        with files.output(tmp_path / "new") as f:
            raise RuntimeError("nothing written")
    assert _only(tmp_path) == ["out"]


def test_a_symlink_stays_a_link_and_its_target_is_written(tmp_path):
    target = tmp_path / "real"
    target.write_text("old")
    os.symlink("real", tmp_path / "link")
    files.write_text(tmp_path / "link", "new")
    assert os.path.islink(tmp_path / "link") and target.read_text() == "new"
    os.symlink("absent", tmp_path / "dangling")  # like a shell's `>`: the link's target is created
    files.write_text(tmp_path / "dangling", "x")
    assert os.path.islink(tmp_path / "dangling") and (tmp_path / "absent").read_text() == "x"


def test_character_devices_are_written_through_never_replaced(nodes):
    files.write_bytes(nodes["null"], b"x" * (4 << 20))
    with pytest.raises(FileError) as e:
        files.write_bytes(nodes["full"], b"x" * 4096)
    assert str(nodes["full"]) in str(e.value) and "No space left on device" in str(e.value)
    for name in ("null", "full"):
        assert stat.S_ISCHR(os.stat(nodes[name]).st_mode)


def test_a_fifo_is_written_through_to_its_reader(nodes):
    got = []
    t = threading.Thread(target=lambda: got.append(open(nodes["fifo"], "rb").read()))
    t.start()
    for _ in range(200):  # the reader's open() must come first, or the write is refused
        try:
            files.write_bytes(nodes["fifo"], b"report\n")
            break
        except FileError as e:
            assert "no reader" in str(e)
            threading.Event().wait(0.01)
    t.join(5)
    assert got == [b"report\n"] and stat.S_ISFIFO(os.stat(nodes["fifo"]).st_mode)


def test_a_fifo_without_reader_a_socket_and_a_directory_are_refused(tmp_path, nodes):
    for path, message in ((nodes["fifo"], "FIFO with no reader"), (nodes["sock"], "is a socket"),
                          (tmp_path, "is a directory"), (tmp_path / "no" / "f", "does not exist")):
        with pytest.raises(FileError, match=message):
            files.write_text(path, "x")
    assert stat.S_ISFIFO(os.stat(nodes["fifo"]).st_mode) and stat.S_ISSOCK(os.stat(nodes["sock"]).st_mode)


def test_dash_is_standard_output(capfd):
    files.write_text("-", "to stdout\n")
    assert capfd.readouterr().out == "to stdout\n"
