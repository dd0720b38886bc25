"""Each problem a new user met (issue "Hardening the CLI"), run again: the right behaviour now.
Device nodes and FIFOs are made in a temporary directory (tests/hostile.py), never the real /dev ones."""

import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from hostile import kinds, leftovers, make_paths, one_line_error, vmm
from vmm import snapshot

pytestmark = pytest.mark.kvm


@pytest.fixture
def paths(tmp_path):
    p = make_paths(tmp_path)
    yield p
    p["_socket"].close()


# -- "-o /dev/full replaced the device node with a 4 MB regular file" ---------------------------------
@pytest.mark.parametrize("command", [
    ("snapshot", "sync", "-o"),
    ("probe", "--check", "cap_xsave2_dev_kvm", "-o"),
    ("baseline", "here", "-o"),
])
def test_outputs_write_through_devices_and_never_replace_them(paths, tmp_path, command):
    before = kinds(paths)
    err = one_line_error(vmm(*command, paths["full"]))
    assert f"{paths['full']}: cannot write: No space left on device" in err
    assert vmm(*command, paths["null"]).returncode in (0, 1)  # probe: 1 when a check differs
    assert vmm(*command, paths["devlink"]).returncode in (0, 1)
    assert kinds(paths) == before and leftovers(tmp_path) == []


def test_a_fifo_output_reaches_its_reader_and_stays_a_fifo(paths, tmp_path):
    got = []
    reader = threading.Thread(target=lambda: got.append(open(paths["fifo"], "rb").read()))
    reader.start()
    time.sleep(0.2)  # the reader's open() first: without a reader the write is refused, not blocked
    r = vmm("snapshot", "sync", "-o", paths["fifo"])
    reader.join(30)
    assert r.returncode == 0, r.stderr
    copy = tmp_path / "from-fifo.snap"
    copy.write_bytes(got[0])
    snap = snapshot.load(str(copy))  # what went through the FIFO is a whole, valid snapshot
    assert snap.meta["guest"]["name"] == "sync"
    assert stat.S_ISFIFO(os.lstat(paths["fifo"]).st_mode)
    err = one_line_error(vmm("snapshot", "sync", "-o", paths["fifo"]))  # no reader now
    assert "FIFO with no reader" in err


def test_a_symlink_output_stays_a_link_and_dash_is_stdout(paths, tmp_path):
    r = vmm("baseline", "here", "-o", paths["link"])
    assert r.returncode == 0, r.stderr
    assert os.path.islink(paths["link"]) and json.loads(paths["regular"].read_text())["cpuid"]
    r = vmm("baseline", "here", "-o", "-", "--json")
    assert r.returncode == 0 and r.stdout.count('"cpuid"') >= 1
    for bad in ("sock", "dir"):
        assert "vmm writes only to regular files" in one_line_error(vmm("baseline", "here", "-o", paths[bad])) \
            or "is a directory" in r.stderr


def test_a_snapshot_to_stdout_is_whole_and_its_summary_goes_to_stderr(tmp_path):
    out = tmp_path / "piped.snap"
    with open(out, "wb") as f:
        r = subprocess.run([sys.executable, "-m", "vmm.cli", "snapshot", "sync", "-o", "-"], stdout=f,
                           stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0 and "-> -:" in r.stderr, r.stderr
    assert snapshot.load(str(out)).meta["guest"]["name"] == "sync"
    r = vmm("restore", out)
    assert (r.returncode, r.stdout) == (0, "sync 0x22\nsync 0x33\ndone\n"), r.stderr


# -- "--memory 99999999999999999999 is an OverflowError traceback; 100000000 says only ENOMEM" --------
@pytest.mark.parametrize("memory", ["99999999999999999999", "100000000", "0", "-4"])
def test_memory_is_bounded_with_a_clear_error(memory):
    err = one_line_error(vmm("run", "--memory", memory))
    assert "--memory" in err and "is not in the range 4<=x<=16384" in err


@pytest.mark.parametrize("args, message", [
    (("run", "--timeout", "nan"), "'nan' is not a number of seconds"),
    (("run", "--timeout", "inf"), "is not in the range 0<x<=86400"),
    (("snapshot", "sync", "-o", "x", "--vcpus", "33"), "is not in the range 1<=x<=32"),
    (("reg", "get", "sync", "RIP", "--at-sync", "99999999999"), "is not in the range 1<=x<=2147483648"),
    (("run", "--arg", "-1"), "does not fit in an unsigned 64-bit argument"),
])
def test_every_number_is_bounded(args, message):
    assert message in one_line_error(vmm(*args))


# -- "--cpu /dev/zero grew to 5 GB; compat --host /dev/zero never ends" ----------------------------------
@pytest.mark.parametrize("args", [("run", "--cpu", "{zero}"), ("compat", "here", "--host", "{zero}"),
                                  ("compat", "{zero}"), ("cpuid", "--file", "{zero}"), ("inspect", "{zero}"),
                                  ("run", "--cpu", "{huge}"), ("cpuid", "--file", "{huge}")])
def test_device_and_huge_inputs_end_quickly_with_the_file_named(paths, args):
    args = [a.format(zero=paths["zero"], huge=paths["huge"]) for a in args]
    t = time.monotonic()
    err = one_line_error(vmm(*args, timeout=30))
    assert time.monotonic() - t < 20
    assert args[-1] in err


# -- garbage, missing, directory, empty, /dev/null and /proc inputs ------------------------------------
@pytest.mark.parametrize("which, message", [
    ("garbage", "binary data"), ("missing", "no such file"), ("dir", "is a directory"),
    ("empty", "is empty"), ("null", "is a character device"), ("proc", "kernel pseudo-file"),
])
def test_bad_cpuid_dumps_are_one_line_naming_the_file(paths, which, message):
    err = one_line_error(vmm("cpuid", "--file", paths[which]))
    assert str(paths[which]) in err and message in err


@pytest.mark.parametrize("which, message", [
    ("proc", "kernel pseudo-file"), ("empty", "is empty"), ("dir", "a directory that is not a Cloud Hypervisor"),
    ("garbage", "not a vmm snapshot"), ("missing", "no such file"),
])
def test_bad_snapshot_files_are_one_line_naming_the_file(paths, which, message):
    err = one_line_error(vmm("inspect", paths[which]))
    assert str(paths[which]) in err and message in err


# -- guest arguments: a file in the current directory, ./file, ./dir, an ELF ------------------------------
def test_guest_arguments_are_names_or_existing_paths(paths, tmp_path):
    for arg in ("empty.txt", "./empty.txt"):
        assert "is empty" in one_line_error(vmm("run", arg, cwd=tmp_path))
    assert "is a directory" in one_line_error(vmm("run", "./adir", cwd=tmp_path))
    assert "unknown guest 'nope': not a built-in guest" in one_line_error(vmm("run", "nope", cwd=tmp_path))
    from vmm.guest import catalog
    elf = catalog.REPO_DIR / "build" / "hello.elf"
    if not elf.exists():
        pytest.skip("no guests/build (an installed package)")
    (tmp_path / "hello.elf").write_bytes(elf.read_bytes())
    r = vmm("run", "hello.elf", cwd=tmp_path)  # an ELF is loaded as one, not as a flat binary
    assert (r.returncode, r.stdout) == (0, "Hello from a vmm guest!\ndone\n"), r.stderr


# -- "--xcr0 pkru and 'x87|AVX' reach KVM and come back as EINVAL" -------------------------------------
@pytest.mark.parametrize("mask, rule", [
    ("pkru", "x87 (bit 0) must always be set"),
    ("x87|AVX", "AVX (bit 2) needs SSE (bit 1)"),
    ("x87|SSE|AVX|opmask", "opmask, ZMM_Hi256 and Hi16_ZMM (bits 5-7) go together"),
    ("x87|SSE|opmask|ZMM_Hi256|Hi16_ZMM", "need AVX (bit 2)"),
    ("x87|SSE|XTILEDATA", "XTILECFG (bit 17) and XTILEDATA (bit 18) go together"),
])
def test_xcr0_rules_are_checked_before_any_ioctl(mask, rule):
    for command in (("xsave", "sync"), ("cpuid", "--vcpu", "sync")):
        # a missing KVM device shows the check comes first: no open(), no ioctl
        err = one_line_error(vmm(*command, "--xcr0", mask, "--device", "/nonexistent/kvm"))
        assert rule in err and "is not a valid XCR0" in err


# -- exit status, SIGPIPE, SIGINT, usage errors, --json errors -------------------------------------------
def test_a_closed_stdout_ends_quietly():
    p = subprocess.Popen(f"{sys.executable} -m vmm.cli run sync | head -1", shell=True, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, executable="/bin/bash")
    out, err = p.communicate(timeout=60)
    assert out == "sync 0x11\n" and err == ""


def _wait_in_kvm_run(pid, limit=60):
    """Until a thread of process `pid` sits in ioctl(vcpu fd, KVM_RUN) (/proc/PID/task/*/syscall:
    number 16, then the arguments), so a signal reaches the running guest whatever the machine's speed.
    On ordinary (nested) KVM a vCPU thread in guest mode is on a CPU, and that file then says "running"
    rather than the call; there the process's guest time (/proc/PID/stat field 43, time spent running
    a vCPU) shows that KVM_RUN has entered the guest."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        try:
            fds = {hex(int(f)) for f in os.listdir(f"/proc/{pid}/fd")
                   if "kvm-vcpu" in os.readlink(f"/proc/{pid}/fd/{f}")}
            calls = [open(f"/proc/{pid}/task/{t}/syscall").read().split() for t in os.listdir(f"/proc/{pid}/task")]
            stat = open(f"/proc/{pid}/stat").read()
            guest_ticks = int(stat[stat.rindex(")") + 2:].split()[40])  # field 43: guest_time
        except (FileNotFoundError, ProcessLookupError):
            fds, calls, guest_ticks = set(), [], 0
        if any(c[:1] == ["16"] and c[1:2] and c[1] in fds and c[2:3] == [hex(0xAE80)] for c in calls):
            return  # KVM_RUN = _IO(KVMIO, 0x80)
        if fds and guest_ticks > 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"vmm run spin did not reach KVM_RUN within {limit} s")


def test_sigint_stops_the_guest_and_says_where():
    p = subprocess.Popen([sys.executable, "-m", "vmm.cli", "run", "spin", "--timeout", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_in_kvm_run(p.pid)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 130 and out == ""
    assert err.startswith("vmm: interrupted: vcpu 0 stopped at rip 0x10000") and err.count("\n") == 1


def test_timeouts_guest_failures_and_usage_errors_have_their_own_status():
    assert vmm("run", "spin", "--timeout", "0.3").returncode == 3
    assert vmm("run", "ud2").returncode == 1
    assert vmm("run").returncode == 0
    for args in (("run", "--bogus"), ("nosuchcommand",), ("run", "--timeout", "x"), ("snapshot", "sync")):
        err = one_line_error(vmm(*args))
        assert "--help" in err


def test_json_errors_are_a_json_object_on_stdout():
    for args, kind in ((("run", "nope", "--json"), "input"), (("run", "--memory", "x", "--json"), "usage"),
                       (("caps", "--device", "/nonexistent/kvm", "--json"), "kvm"),
                       (("run", "spin", "--timeout", "0.2", "--json"), None)):
        r = vmm(*args)
        d = json.loads(r.stdout)
        if kind is None:  # a guest that times out is a result, with exit status 3
            assert r.returncode == 3 and d["exit"]["event"] == "timeout"
            continue
        assert d["kind"] == kind and d["exit_status"] == r.returncode and d["error"] in r.stderr
        assert d["errno"] == ("ENOENT" if kind == "kvm" else None)


# -- help and output ---------------------------------------------------------------------------------
def test_help_texts_are_whole():
    top = vmm("--help").stdout
    commands = top[top.index("Commands:"):]
    assert "..." not in commands and "Exit status: 0 success" in top
    assert "Number of vCPUs" in vmm("snapshot", "--help").stdout
    probe_help = vmm("probe", "--help").stdout
    assert "python -m" not in probe_help and "--list" in probe_help
    assert vmm("probe", "--list").returncode == 0


def test_amx_without_amx_is_explained():
    err = vmm("run", "amx").stderr
    assert "--amx" in err and "fail 0x" not in err


def test_cpuid_feature_json_is_the_features_only():
    d = json.loads(vmm("cpuid", "--feature", "XSAVE", "--json").stdout)
    assert [f["name"] for f in d["features"]] == ["XSAVE"] and "entries" not in d


def test_xsave_never_prints_an_empty_heading():
    out = vmm("xsave", "sync").stdout.splitlines()
    i = out.index(next(ln for ln in out if ln.startswith("non-zero registers:")))
    assert out[i] == "non-zero registers: none" or (i + 1 < len(out) and out[i + 1].startswith("  "))


def test_a_device_that_is_not_kvm_is_named(paths):
    err = one_line_error(vmm("caps", "--device", paths["null"]), code=4)
    assert f"{paths['null']} is not a KVM device" in err
    err = one_line_error(vmm("caps", "--device", paths["empty"]), code=4)
    assert "not the KVM character device" in err


def test_version_and_completion():
    r = vmm("--version")
    assert r.returncode == 0 and r.stdout.startswith("vmm ")
    env = dict(os.environ, _VMM_COMPLETE="bash_source")
    script = subprocess.run([sys.executable, "-c", "from vmm.cli import entry; entry()"], env=env,
                            capture_output=True, text=True, timeout=30).stdout
    assert "complete " in script and "_VMM_COMPLETE" in script


def test_readme_lists_install_prerequisites_completion_and_exit_status():
    from pathlib import Path
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for needed in ("python3-venv", "python3-dev", "make", "binutils", "PyPI", "`kvm` group",
                   "_VMM_COMPLETE=bash_source", "vmm --version", "| 130 |", "| 141 |"):
        assert needed in readme, needed


# -- libraries ---------------------------------------------------------------------------------------
def test_the_snapshot_progress_bar_is_the_librarys_and_only_on_a_tty(monkeypatch):
    import click
    from vmm.commands.common import progress_bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress_bar("saving") is None
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    make = progress_bar("saving")
    assert isinstance(make(128 << 20), click._termui_impl.ProgressBar)
    assert not isinstance(make(1 << 20), click._termui_impl.ProgressBar)  # short writes: no bar


def test_snapshot_save_reports_every_byte_of_memory_it_writes(tmp_path, kvm):
    from vmm import state
    from vmm.guest.machine import Machine
    counted = []

    class Bar:
        def __init__(self, total):
            counted.append(["total", total])

        def update(self, n):
            counted.append(n)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False
    with Machine("checkpoint", kvm=kvm) as m:
        m.run(timeout=10)
        snapshot.save(str(tmp_path / "s.snap"), kvm, m.vm, m.vcpus, [state.save_state(m.vcpu)], progress=Bar)
    total = counted[0][1]
    assert total > 0 and sum(counted[1:]) == total
    stored = sum(n for mm in snapshot.load(str(tmp_path / "s.snap")).memory for _, n, _ in mm["extents"])
    assert stored == total
