"""Defects a reviewer found using vmm as a hostile new user, each run again: the right behaviour now."""

import json

import pytest

from hostile import one_line_error, vmm

pytestmark = pytest.mark.kvm


# -- a command whose guest ends (DONE) before the SYNC it needs could not do its job: not exit 0 -----------
@pytest.mark.parametrize("args", [
    ("snapshot", "sync", "--at-sync", "4", "-o", "{tmp}/x.snap"),
    ("xsave", "hello"),
    ("reg", "set", "hello", "RAX=1"),
    ("reg", "list", "hello"),
    ("reg", "get", "sync", "RIP", "--at-sync", "4"),
    ("diff", "sync", "hello"),
])
def test_a_guest_ending_done_before_the_sync_a_command_needs_is_a_guest_failure(tmp_path, args):
    args = [a.format(tmp=tmp_path) for a in args]
    err = one_line_error(vmm(*args), 1)
    assert "ended with 'done' before reaching SYNC" in err
    assert not (tmp_path / "x.snap").exists()
    d = json.loads(vmm(*args, "--json").stdout)
    assert d["exit_status"] == 1 and d["kind"] == "guest"


# -- JSON nested deeper than the parser follows: one line, exit 2 (vmm.files.parse_json) ---------------------
@pytest.mark.parametrize("args", [
    ("cpuid", "--file", "{f}"), ("xsave", "--layout", "--file", "{f}"), ("compat", "{f}"),
    ("compat", "here", "--host", "{f}"), ("baseline", "{f}", "-o", "{tmp}/b.json"), ("amx", "--file", "{f}"),
    ("run", "hello", "--cpu", "{f}"),
])
def test_deeply_nested_json_is_an_input_error(tmp_path, args):
    f = tmp_path / "deep.json"
    f.write_text("[" * 100000 + "]" * 100000)
    err = one_line_error(vmm(*[a.format(f=f, tmp=tmp_path) for a in args]))
    assert "nested too deeply" in err and not (tmp_path / "b.json").exists()


# -- malformed vCPU state in a snapshot whose checksums are valid: refused at load, naming the field -------
class _AsSaved:
    """A state whose JSON is `d` (snapshot.save writes what to_json returns, checksummed)."""

    def __init__(self, d):
        self.d = d

    def to_json(self):
        return self.d


@pytest.fixture(scope="module")
def sync_state(tmp_path_factory):
    """The sync guest's vCPU state at its first SYNC as JSON, and a writer of snapshots with it edited."""
    from conftest import _require_kvm
    from vmm import snapshot, state
    from vmm.guest.machine import Machine
    from vmm.kvm import Kvm
    _require_kvm()
    d = tmp_path_factory.mktemp("state")
    k = Kvm()
    m = Machine("sync", kvm=k)
    assert m.run(timeout=10).kind == "sync"
    saved = state.save_state(m.vcpus[0]).to_json()

    def write(edit, name="bad.snap"):
        j = json.loads(json.dumps(saved))
        edit(j)
        path = d / name
        snapshot.save(str(path), k, m.vm, m.vcpus, [_AsSaved(j)], guest={"name": "sync"})
        return path
    yield saved, write
    m.close()
    k.close()


def _set(*keys_value):
    *keys, value = keys_value

    def edit(j):
        for k in keys[:-1]:
            j = j[k]
        j[keys[-1]] = value(j[keys[-1]]) if callable(value) else value
    return edit


BAD_STATES = [
    ("xsave 50 bytes", _set("xsave", "00" * 50), "xsave: 50 bytes"),
    ("xsave with state beyond its area", _set("xsave", lambda x: x + "01" * 1000), "xsave: 5096 bytes with state"),
    ("lapic 1 byte", _set("lapic", "00"), "lapic: 1 bytes"),
    ("events short", _set("events", "00" * 8), "events: 8 bytes"),
    ("rip beyond 64 bits", _set("regs", "rip", "0x1ffffffffffffffff"), "regs.rip: 0x1ffffffffffffffff does not fit"),
    ("rip not hex", _set("regs", "rip", "abc"), "regs.rip: 'abc' is not a hex number"),
    ("a register missing", lambda j: j["regs"].pop("rax"), "regs: fields differ"),
    ("segment selector beyond 16 bits", _set("sregs", "cs", "selector", "0x10000"), "sregs.cs.selector"),
    ("XCR0 0", _set("xcrs", "0x0", "0x0"), "xcrs XCR0 0x0 (none) is not a valid XCR0"),
    ("mp_state 99", _set("mp_state", 99), "mp_state: 99"),
    ("CR0 0 in long mode", _set("sregs", "cr0", "0x0"), "sregs.cr0"),
    ("tsc_khz 0", _set("tsc_khz", 0), "tsc_khz: 0"),
    ("msr value beyond 64 bits", _set("msrs", lambda m: {**m, "0x10": "0x" + "f" * 17}), "msrs[0x10]"),
]


@pytest.mark.parametrize("edit, message", [b[1:] for b in BAD_STATES], ids=[b[0] for b in BAD_STATES])
def test_malformed_vcpu_state_is_refused_at_load_naming_the_field(sync_state, edit, message):
    from vmm import snapshot
    _, write = sync_state
    path = write(edit)
    with pytest.raises(snapshot.SnapshotError) as e:
        snapshot.load(str(path))
    assert message in str(e.value) and f"{path}: vCPU 0: malformed vCPU state" in str(e.value)


@pytest.mark.parametrize("case", ["xsave 50 bytes", "lapic 1 byte", "rip beyond 64 bits", "XCR0 0"])
def test_every_command_refuses_a_malformed_state_before_any_vm(sync_state, case):
    _, write = sync_state
    edit, message = next(b[1:] for b in BAD_STATES if b[0] == case)
    path = write(edit)
    for args in (("compat", path), ("inspect", path), ("diff", path, "sync"), ("restore", path)):
        err = one_line_error(vmm(*args))
        assert message in err, (args, err)


def test_the_unedited_state_still_loads_and_restores(sync_state):
    path = sync_state[1](lambda j: None, "good.snap")
    r = vmm("restore", path)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("done"), r.stdout + r.stderr


# -- vmm run --cpu FILE: the compat judge against this host before any VM ----------------------------------
DATA = __import__("os").path.join(__import__("os").path.dirname(__file__), "data")


@pytest.fixture(scope="module")
def cpu_files(tmp_path_factory):
    """A Milan baseline, an Intel Sapphire Rapids guest CPUID and this host's own baseline (vmm JSON)."""
    d = tmp_path_factory.mktemp("cpu")
    out = {}
    for name, args in (("milan", ("baseline", f"{DATA}/amd-milan-cpuid-r.txt")),
                       ("spr", ("baseline", f"{DATA}/intel-sapphire-rapids-w7-2475x.txt")),
                       ("here", ("baseline", "here"))):
        out[name] = d / f"{name}.json"
        r = vmm(*args, "-o", out[name])
        assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("name", ["milan", "spr", "here"])
def test_run_cpu_is_judged_like_compat_host_here_before_any_vm(cpu_files, name):
    f = cpu_files[name]
    verdict = json.loads(vmm("compat", f, "--host", "here", "--json").stdout)
    r = vmm("run", "hello", "--cpu", f)
    if verdict["compatible"]:
        assert r.returncode == 0, r.stderr
        return
    assert name != "here"  # this host's own baseline runs here
    refused = [p for p in verdict["problems"] if not p.startswith("CPUID")]  # not the field verdicts
    if not refused:
        assert r.returncode == 0, r.stderr
        return
    err = one_line_error(r)
    assert f"{f}: this host cannot run a guest with this CPUID" in err
    for p in refused:
        assert " ".join(p.replace("there", "here").replace("the destination", "this host").split()) in err
    assert "KVM_SET" not in err and "--amx" not in err
    if not verdict["vendor"]["same"]:
        assert "vendor: the guest's CPUID says" in err


# -- reg set: XCR0 by the architectural rules (the --xcr0 ones) before any ioctl; KVM's refusal of a value ---
def test_reg_set_xcr0_is_checked_by_the_xcr0_rules_before_kvm():
    err = one_line_error(vmm("reg", "set", "sync", "XCR0=0x0"))
    assert "XCR0 0x0 (none) is not a valid XCR0: x87 (bit 0) must always be set" in err
    assert "KVM_SET_XCRS" not in err
    err = one_line_error(vmm("reg", "set", "sync", "XCR0=0x5"))  # AVX without SSE
    assert "AVX (bit 2) needs SSE (bit 1)" in err


def test_a_value_kvm_refuses_is_not_called_an_inaccessible_register():
    r = vmm("reg", "set", "sync", "EFER=0xffffffffffffffff")
    err = one_line_error(r, 4)
    assert "KVM refused the value 0xffffffffffffffff for MSR_EFER, which this vCPU can access" in err
    assert "does not let this vCPU access" not in err


# -- a guest's pieces: flat binaries and ELF segments checked alike (Image.check_fits) ------------------------
def test_a_flat_binary_over_the_user_stacks_is_refused_like_an_elf_segment(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"\xf4" * (2 << 20))  # 0x100000..0x300000: the stacks' place
    err = one_line_error(vmm("run", tmp_path / "big.bin"))
    assert "flat binary 0x100000..0x300000 overlaps the vCPU user stacks at 0x2f0000..0x300000" in err
    (tmp_path / "mid.bin").write_bytes(b"\xf4" * 0x1e8000)  # clear of one stack, not of two
    err = one_line_error(vmm("snapshot", tmp_path / "mid.bin", "--vcpus", "2", "-o", tmp_path / "s.snap"))
    assert "overlaps the vCPU user stacks at 0x2e0000..0x300000 (2 vCPUs)" in err


def test_a_segment_beyond_any_guest_memory_is_said_not_to_fit():
    from types import SimpleNamespace
    from vmm.errors import GuestError
    from vmm.guest.catalog import Image
    far = Image("far", b"", elf_segments=[SimpleNamespace(addr=1 << 42, memsz=1, data=b"\0")])
    with pytest.raises(GuestError) as e:
        far.check_fits(4 << 20)
    assert "it cannot fit: guest memory is at most 16384 MiB" in str(e.value) and "--memory" not in str(e.value)
    near = Image("near", b"", elf_segments=[SimpleNamespace(addr=0x600000, memsz=0x2004, data=b"")])
    with pytest.raises(GuestError, match="give --memory 7 or more"):
        near.check_fits(4 << 20)


# -- `-o -`: the file is standard output, the summary goes to standard error -------------------------------
@pytest.mark.parametrize("args", [("baseline", "here"), ("probe", "--check", "cap_xsave2_dev_kvm"),
                                  ("baseline", "here", "--json")])
def test_output_to_stdout_is_only_the_file(args):
    r = vmm(*args, "-o", "-")
    assert r.returncode in (0, 1), r.stderr
    d = json.loads(r.stdout)  # one JSON document, nothing else
    assert isinstance(d, dict) and r.stderr.strip()


# -- a corrupt memory extent names the snapshot file, not a descriptor number ------------------------------
def test_a_flipped_memory_byte_names_the_snapshot_file(tmp_path):
    from vmm import snapshot
    path = tmp_path / "mem.snap"
    assert vmm("snapshot", "sync", "-o", path).returncode == 0
    snap = snapshot.load(str(path))
    off, n, _ = snap.memory[0]["extents"][0]
    data = bytearray(path.read_bytes())
    data[snap.sections["mem.0"].offset + off] ^= 0xFF
    path.write_bytes(bytes(data))
    for cmd in ("inspect", "restore", "compat"):
        err = one_line_error(vmm(cmd, path))
        assert err.startswith(f"vmm: error: {path}: guest memory at 0x") and "fails its checksum" in err, err


# -- the CPL0 emulation hint follows the instruction bytes ---------------------------------------------------
def test_the_cpl0_emulation_hint_names_vector_instructions_only_for_them():
    from vmm.guest.runner import vector_insn_kind
    assert vector_insn_kind("cc") is None and vector_insn_kind("0f 01 f8") is None
    assert vector_insn_kind("0f ae 38") is None  # CLFLUSH
    assert vector_insn_kind("66 0f 6f c1") == "SSE" and vector_insn_kind("0f 28 c1") == "SSE"
    assert vector_insn_kind("0f ae 18") == "SSE"  # STMXCSR
    assert vector_insn_kind("c5 fd 6f c1") == "AVX" and vector_insn_kind("62 f1 7d 48 6f c1") == "AVX"
    assert vector_insn_kind("48 0f ae 20") == "XSAVE" and vector_insn_kind("0f 01 d0") == "XSAVE"
    assert vector_insn_kind("0f c7 20") == "XSAVE" and vector_insn_kind("") is None


def test_an_int3_at_cpl0_is_not_blamed_on_sse():
    from vmm.kvm import is_pvm
    r = vmm("run", "msr-report", "--cpl", "0", "--timeout", "20")
    out = r.stdout + r.stderr
    if is_pvm() and "internal error" in out:
        assert "SSE/AVX/XSAVE" not in out and "SSE instructions" not in out
        assert "could not emulate the instruction at 0x" in out


# -- a CPUID dump that is not UTF-8 names its first bad byte ---------------------------------------------------
def test_a_non_utf8_dump_names_its_first_bad_byte(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xff\xfe\nCPUID 00000000: 0000000D-68747541-444D4163-69746E65\n")
    err = one_line_error(vmm("cpuid", "--file", f))
    assert "byte 0xff at offset 0 is not UTF-8" in err


# -- compat's feature counts agree: present + missing named = named ---------------------------------------------
def test_compat_feature_counts_agree():
    import re
    r = vmm("compat", f"{DATA}/intel-sapphire-rapids-w7-2475x.txt", "--host", "here")
    line = next(x for x in r.stdout.splitlines() if x.startswith("CPUID features"))
    m = re.search(r"(\d+) of (\d+) named present there(?:; missing: (\d+) named)?", line)
    assert m, line
    present, named, missing = int(m[1]), int(m[2]), int(m[3] or 0)
    assert present + missing == named, line


# -- a timeout's seconds are the run's, not those of the last KVM_RUN loop call ----------------------------------
def test_a_timeout_reports_the_whole_runs_seconds(kvm):
    import time
    from vmm.commands.common import run_to_end
    from vmm.guest.machine import Machine
    from vmm.guest.runner import Timeout
    with Machine("xcr0", kvm=kvm) as m:  # SYNCs without end when no host drives it
        t0 = time.monotonic()
        ev, syncs = run_to_end(m, timeout=1.0, as_json=True)
        elapsed = time.monotonic() - t0
    assert isinstance(ev, Timeout) and len(syncs) > 1
    assert 1.0 <= ev.seconds <= elapsed, (ev.seconds, elapsed)
    assert str(ev).startswith(f"timeout after {ev.seconds:.2f} s")
