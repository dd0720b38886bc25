"""Cloud Hypervisor snapshots as a source for `vmm reg`, `vmm inspect`, `vmm diff` and `vmm compat`.

The state.json files here are built from Cloud Hypervisor's published structure (vm-migration's
Snapshot tree, hypervisor::CpuState::Kvm(VcpuKvmState), kvm-bindings structs serialised as byte
lists): packed by hand with struct from the uAPI layouts, not by vmm's reader. No Cloud Hypervisor
binary and no KVM are needed, except for `--host here`."""

import json
import os
import struct
import subprocess
import sys

import pytest

from vmm import chsnap
from vmm.cpuid import CpuidTable

DATA = os.path.join(os.path.dirname(__file__), "data")
SPR = os.path.join(DATA, "intel-sapphire-rapids-w7-2475x.txt")  # XCR0 0x602e7, tiles at 2752/2816
GENOA = os.path.join(DATA, "amd-genoa-epyc-9124.txt")

TILE0 = bytes(range(256)) * 4             # TMM0: 16 rows of 64 bytes
XMM0 = 0x00112233445566778899AABBCCDDEEFF
RIP, RSP = 0x100042, 0x2FFFF0


def vmm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


# --- uAPI structs packed by hand ---------------------------------------------------------------------
def kvm_regs(rax=0, rip=RIP, rsp=RSP, rflags=0x202):
    gprs = [rax, 0, 0, 0, 0, 0, rsp, 0] + [0] * 8  # rax rbx rcx rdx rsi rdi rsp rbp r8-r15
    return struct.pack("<18Q", *gprs, rip, rflags)


def kvm_segment(selector, code, dpl=3):
    # base, limit, selector, type, present, dpl, db, s, l, g, avl, unusable, padding
    return struct.pack("<QIH10B", 0, 0xFFFFFFFF, selector, 0xB if code else 0x3, 1, dpl,
                       0 if code else 1, 1, 1 if code else 0, 1, 0, 0, 0)


def kvm_sregs(cr4=0x40620):
    segs = [kvm_segment(0x23, True)] + [kvm_segment(0x1B, False)] * 5  # cs ds es fs gs ss
    tr = struct.pack("<QIH10B", 0x3000, 0x2068, 0x28, 0xB, 1, 0, 0, 0, 0, 0, 0, 0, 0)
    ldt = struct.pack("<QIH10B", 0, 0, 0, 0x2, 0, 0, 0, 0, 0, 0, 0, 1, 0)
    dt = struct.pack("<QH6x", 0x1000, 0x37) + struct.pack("<QH6x", 0x2000, 0xFFF)
    crs = struct.pack("<7Q", 0x80010033, 0, 0x20000, cr4, 0, 0x501, 0xFEE00900)
    return b"".join(segs) + tr + ldt + dt + crs + bytes(32)


def kvm_xcrs(xcr0):
    xcrs = struct.pack("<IIQ", 0, 0, xcr0) + bytes(16 * 15)
    return struct.pack("<II", 1, 0) + xcrs + bytes(128)


def xsave_amx(tile0=TILE0):
    """An 11008-byte KVM_GET_XSAVE2 image in the Sapphire Rapids layout: XMM0, TILECFG, TMM0."""
    buf = bytearray(11008)
    struct.pack_into("<H", buf, 0, 0x37F)       # FCW
    struct.pack_into("<I", buf, 24, 0x1F80)     # MXCSR
    buf[160:176] = XMM0.to_bytes(16, "little")
    struct.pack_into("<Q", buf, 512, 0x60003)   # XSTATE_BV: x87 SSE XTILECFG XTILEDATA
    buf[2752] = 1                               # palette 1
    struct.pack_into("<H", buf, 2752 + 16, 64)  # colsb[0]
    buf[2752 + 48] = 16                         # rows[0]
    buf[2816:2816 + 1024] = tile0
    return bytes(buf)


def lapic_regs(apic_id=0):
    page = bytearray(1024)
    struct.pack_into("<I", page, 0x20, apic_id << 24)
    struct.pack_into("<I", page, 0xF0, 0x1FF)  # SVR: APIC enabled, vector 0xff
    return [b - 256 if b > 127 else b for b in page]  # c_char: signed


def vcpu_state(cpuid, xsave, xcr0, rax=0, rip=RIP, msrs=((0xC0000082, 0xFFFFFFFF81000000),)):
    region = list(struct.unpack("<1024I", xsave[:4096]))
    extra = list(struct.unpack(f"<{(len(xsave) - 4096) // 4}I", xsave[4096:]))
    st = {
        "cpuid": [{"function": e.function, "index": e.index, "flags": e.flags, "eax": e.eax, "ebx": e.ebx,
                   "ecx": e.ecx, "edx": e.edx} for e in cpuid],
        "msrs": [{"index": i, "data": d} for i, d in msrs],
        "vcpu_events": [0] * 64,
        "regs": list(kvm_regs(rax=rax, rip=rip)),
        "sregs": list(kvm_sregs()),
        "fpu": {"fpr": [[0] * 16] * 8, "fcw": 0x37F, "fsw": 0, "ftwx": 0, "last_opcode": 0, "last_ip": 0,
                "last_dp": 0, "xmm": [[0] * 16] * 16, "mxcsr": 0x1F80},
        "lapic_state": {"regs": lapic_regs()},
        "xsave": {"region": region, **({"extra": extra} if extra else {})},
        "xcrs": list(kvm_xcrs(xcr0)),
        "mp_state": [0, 0, 0, 0],
        "tsc_khz": 2000000,
        "nested_state": None,
        "hyperv_synic": False,
    }
    return {"Kvm": st}


def write_ch(path, vcpus, kind="Kvm", memory=()):
    """A Cloud Hypervisor snapshot directory: state.json (the Snapshot tree), config.json, and
    memory-ranges holding `memory` [(gpa, bytes)] back to back in the order listed."""
    def node(children=None, data=None):
        return {"snapshots": children or {},
                "snapshot_data": None if data is None else {"state": json.dumps(data)}}
    if kind != "Kvm":
        vcpus = [{kind: v["Kvm"]} for v in vcpus]
    cpu_manager = node({str(i): node(data=v) for i, v in enumerate(vcpus)})
    ranges = {"data": [{"gpa": g, "length": len(b)} for g, b in memory]}
    root = node({"cpu-manager": cpu_manager, "memory-manager": node(data={"memory_ranges": ranges})},
                data={"clock": {"tsc": 0, "clock": 0, "flags": 0}, "common_cpuid": vcpus[0][kind]["cpuid"]})
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "state.json"), "w") as f:
        json.dump(root, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({"cpus": {"boot_vcpus": len(vcpus)}}, f)
    if memory:
        with open(os.path.join(path, "memory-ranges"), "wb") as f:
            for _, b in memory:
                f.write(b)
    return str(path)


@pytest.fixture(scope="module")
def spr():
    return CpuidTable.from_dump(SPR)


@pytest.fixture
def amx_snap(tmp_path, spr):
    return write_ch(tmp_path / "ch-snap", [vcpu_state(spr, xsave_amx(), 0x602E7)])


# --- the story ---------------------------------------------------------------------------------------
def test_the_reader_sees_what_was_written(amx_snap):
    snap = chsnap.load(amx_snap)
    (s,) = snap.vcpus
    assert len(s.xsave) == 11008 and s.xsave[2816:2816 + 1024] == TILE0
    assert s.regs.rip == RIP and s.regs.rsp == RSP and s.sregs.cs.selector == 0x23 and s.sregs.cpl == 3
    assert s.sregs.tr.base == 0x3000 and s.sregs.ldt.unusable == 1 and s.sregs.efer == 0x501
    assert s.xcrs == {0: 0x602E7} and s.msrs == {0xC0000082: 0xFFFFFFFF81000000}
    assert s.lapic[0xF0:0xF4] == struct.pack("<I", 0x1FF) and s.tsc_khz == 2000000
    assert s.cpuid.has("AMX_TILE") and s.debugregs == b""


def test_reg_get_reads_tiles_and_registers_without_kvm(amx_snap):
    r = vmm("reg", "get", amx_snap + "/", "TMM0", "RIP", "XMM0", "XCR0", "TILECFG.PALETTE", "TMM1",
            "LAPIC.SVR", "LSTAR", "CS.ATTRIBUTES", "--json")
    assert r.returncode == 0, r.stderr
    got = {x["name"]: x["value"] for x in json.loads(r.stdout)["registers"]}
    assert got["TMM0"] == TILE0.hex() and got["TMM1"] == bytes(1024).hex()
    assert int(got["RIP"], 16) == RIP and int(got["XMM0"], 16) == XMM0
    assert int(got["XCR0"], 16) == 0x602E7 and int(got["TILECFG.PALETTE"], 16) == 1
    assert int(got["LAPIC.SVR"], 16) == 0x1FF and int(got["MSR_LSTAR"], 16) == 0xFFFFFFFF81000000
    assert int(got["CS.ATTRIBUTES"], 16) == 0xA0FB  # type B, S, DPL 3, P, L, G
    r = vmm("reg", "get", amx_snap, "DR7")
    assert r.returncode == 2 and "no debug registers" in r.stderr
    r = vmm("reg", "get", amx_snap, "RIP", "--vcpu", "1")
    assert r.returncode == 2 and "there is no vCPU 1" in r.stderr


def test_compat_says_no_for_amx_state_on_a_host_without_amx(amx_snap):
    r = vmm("compat", amx_snap, "--host", GENOA)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "XTILEDATA" in r.stdout


@pytest.mark.kvm
def test_compat_here_names_xtiledata_when_this_host_has_no_amx(amx_snap, kvm):
    if kvm.get_supported_cpuid().xcr0_supported() >> 18 & 1:
        pytest.skip("this host has AMX: the state may move here")
    r = vmm("compat", amx_snap, "--host", "here")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "XTILEDATA" in r.stdout
    d = json.loads(vmm("compat", amx_snap, "--host", "here", "--json").stdout)
    assert d["compatible"] is False


def test_diff_of_two_ch_snapshots_lists_what_differs(tmp_path, spr):
    tile = bytearray(TILE0)
    tile[5] ^= 0xFF
    low, high = bytes(0xA0000), bytearray(0x100000)
    high[0x5000] = 1  # differs in the page at 0x105000
    a = write_ch(tmp_path / "a", [vcpu_state(spr, xsave_amx(), 0x602E7)],
                 memory=[(0, low), (0x100000, bytes(0x100000))])
    b = write_ch(tmp_path / "b", [vcpu_state(spr, xsave_amx(bytes(tile)), 0x602E7, rax=7)],
                 memory=[(0, low), (0x100000, bytes(high))])
    r = vmm("diff", a, b, "--json")
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert [x["name"] for x in d["vcpus"][0]["differences"]] == ["RAX", "TMM0"]
    assert d["memory"] == [{"gpa": "0x105000", "length": 4096}]
    r = vmm("diff", a, a)
    assert r.returncode == 0 and "registers equal" in r.stdout and "memory: equal" in r.stdout
    os.truncate(os.path.join(b, "memory-ranges"), 0x1000)
    r = vmm("diff", a, b)
    assert r.returncode == 2 and "truncated" in r.stderr


def test_inspect_decodes_each_vcpu(amx_snap):
    r = vmm("inspect", amx_snap)
    assert r.returncode == 0, r.stderr
    assert "Cloud Hypervisor snapshot" in r.stdout and "XSAVE 11008 bytes" in r.stdout
    assert "XTILEDATA" in r.stdout and "tmm0" in r.stdout and "MSR_LSTAR" in r.stdout
    d = json.loads(vmm("inspect", amx_snap, "--json", "--vcpu", "0").stdout)
    dec = d["vcpus"][0]["decoded"]
    assert dec["registers"]["gpr"]["RIP"] == hex(RIP)
    assert dec["xsave"]["registers"]["tmm0"] == TILE0.hex()


def test_a_4096_byte_xsave_without_extra_reads(tmp_path):
    table = CpuidTable.from_dump(GENOA)
    buf = bytearray(4096)
    struct.pack_into("<Q", buf, 512, 0x2)
    buf[160:176] = XMM0.to_bytes(16, "little")
    p = write_ch(tmp_path / "small", [vcpu_state(table, bytes(buf), 0x7)])
    d = json.loads(vmm("reg", "get", p, "XMM0", "--json").stdout)
    assert int(d["registers"][0]["value"], 16) == XMM0


@pytest.mark.parametrize("kind, edit_state, edit_tree, message", [
    ("Mshv", None, None, "Mshv state; vmm reads the x86_64 KVM state only"),
    ("Kvm", None, lambda t: t.pop("cpu-manager"), "cpu-manager"),
    ("Kvm", lambda st: st["xsave"].update(region=[0] * 10), None, "10 words, struct kvm_xsave has 1024"),
    ("Kvm", lambda st: st.pop("regs"), None, "lacks regs"),
    ("Kvm", lambda st: st["msrs"].append({"index": -1, "data": 0}), None, "msrs[1]"),
    ("Kvm", lambda st: st.update(regs=[300] * 144), None, "300 is not a byte value"),
])
def test_bad_states_are_refused_by_name(tmp_path, spr, kind, edit_state, edit_tree, message):
    st = vcpu_state(spr, xsave_amx(), 0x602E7)
    if edit_state:
        edit_state(st["Kvm"])
    p = write_ch(tmp_path / "bad", [st], kind=kind)
    if edit_tree:
        f = os.path.join(p, "state.json")
        with open(f) as fh:
            root = json.load(fh)
        edit_tree(root["snapshots"])
        with open(f, "w") as fh:
            json.dump(root, fh)
    r = vmm("reg", "get", p, "RIP")
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
