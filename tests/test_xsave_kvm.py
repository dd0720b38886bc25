"""XSAVE on real KVM: sizes, both directions of the avx512 guest's registers, trimming after a
narrower KVM_SET_CPUID2, guest XCR0 enforcement, refused buffers, and `vmm xsave`.

Each test is a guest story: what the guest does, then what the host checks at each SYNC."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmm._bindings import ffi, ioctl
from vmm.errors import KvmError
from vmm.guest import runtime
from vmm.guest.runner import Done, Fault, Sync
from vmm.kvm import is_pvm
from vmm.xsave import (HI16_ZMM, OPMASK, ZMM_HI256, XsaveArea, XsaveError, XsaveLayout, component_name,
                       kvm_xsave_size)

AVX512_BITS = 1 << OPMASK | 1 << ZMM_HI256 | 1 << HI16_ZMM  # 0xe0
X87_SSE_AVX = 0x7
DUMP = runtime.SCRATCH_BASE + 0x8000  # where the avx512 guest stores what it sees before SYNC 2
DATA = Path(__file__).parent / "data"


def kernel_version():
    return tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])


# -- the avx512 guest's patterns (guests/avx512.S) ------------------------------------------------

def zmm_pattern(n, tag=0xA5A5):
    """qword j of ZMMn = tag << 48 | n << 8 | j."""
    return sum((tag << 48 | n << 8 | j) << (64 * j) for j in range(8))


def k_pattern(n, tag=0x4B4B):
    return tag << 48 | n


def extended(v):
    """The x87 80-bit extended encoding of the positive integer v (what `fild` loads)."""
    e = v.bit_length() - 1
    return (16383 + e) << 64 | v << (63 - e)


def low(value, bits):
    return value & ((1 << bits) - 1)


def guest_zmm(m, n):
    return int.from_bytes(m.vm.read(DUMP + 64 * n, 64), "little")


def guest_k(m, n):
    return int.from_bytes(m.vm.read(DUMP + 0x800 + 8 * n, 8), "little")


def guest_st(m, i):
    """ST(i) from the guest's FXSAVE image (bytes 32 + 16 i, 80 bits)."""
    return int.from_bytes(m.vm.read(DUMP + 0x840 + 32 + 16 * i, 10), "little")


def guest_mxcsr(m):
    return int.from_bytes(m.vm.read(DUMP + 0x840 + 24, 4), "little")


@pytest.fixture(scope="module")
def layout(kvm):
    """The host's XSAVE layout: KVM's buffers use the host's offsets whatever the guest CPUID says."""
    return XsaveLayout.from_cpuid(kvm.get_supported_cpuid())


def at_sync(m, value):
    ev = m.run(timeout=10)
    assert isinstance(ev, Sync) and ev.value == value, ev
    return ev


def assert_avx512_patterns(area):
    """Every XMM/YMM/ZMM/K and x87 register of the avx512 guest, as the host decodes them."""
    for n in range(32):
        assert area.zmm(n) == zmm_pattern(n), f"zmm{n}"
    for n in range(16):
        assert area.xmm(n) == low(zmm_pattern(n), 128), f"xmm{n}"
        assert area.ymm(n) == low(zmm_pattern(n), 256), f"ymm{n}"
    for n in range(8):
        assert area.k(n) == k_pattern(n), f"k{n}"
        assert area.st(n) == extended(8 - n), f"st{n}"  # fild 1..8: ST0 = 8.0 ... ST7 = 1.0
    assert (area.fcw, area.fsw, area.ftw, area.mxcsr) == (0x37F, 0, 0xFF, 0x1F80)


# -- size -----------------------------------------------------------------------------------------

def test_xsave_size_is_cap_xsave2_cross_checked_with_leaf_d(kvm, machine, layout):
    """The buffer size comes from KVM_CAP_XSAVE2 on the VM fd and agrees with
    max(4096, CPUID.(0DH,0).ECX) of KVM_GET_SUPPORTED_CPUID; a narrower guest CPUID does not
    shrink it (KVM sizes it by what this process may use). Here: 4096, host standard size 2432."""
    supported = kvm.get_supported_cpuid()
    m = machine("avx512")
    size = m.vcpu.xsave_size()
    assert size == m.vm.check_extension("KVM_CAP_XSAVE2")
    assert size == max(4096, supported.entry(0xD, 0).ecx) == kvm_xsave_size(layout)
    assert len(m.vcpu.get_xsave2()) == len(m.vcpu.get_xsave()) == size

    narrow = machine("avx512", xcr0=X87_SSE_AVX)  # KVM_SET_CPUID2 with leaf 0xD limited to 0x7
    assert narrow.vcpu.xsave_size() == size

    if size == 4096:  # legacy KVM_GET_XSAVE carries the same 4096 bytes
        assert m.vcpu.get_xsave_legacy() == m.vcpu.get_xsave2()
    else:
        with pytest.raises(KvmError, match="use KVM_GET_XSAVE2") as ei:
            m.vcpu.get_xsave_legacy()
        assert ei.value.errno == errno.E2BIG


# -- both directions ------------------------------------------------------------------------------

def test_avx512_patterns_reach_the_host_exactly(machine, layout):
    """Guest: fills x87, ZMM0-31 and K0-7 with patterns, SYNC 1; dumps what it sees, SYNC 2.
    Host: KVM_GET_XSAVE2 at SYNC 1 decodes to exactly those patterns; at SYNC 2 the guest's own
    dump agrees register by register."""
    m = machine("avx512")
    at_sync(m, 1)
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    assert area.xstate_bv & 0xFF == 0xE7  # x87 SSE AVX opmask ZMM_Hi256 Hi16_ZMM, no MPX
    assert area.xcomp_bv == 0
    assert_avx512_patterns(area)

    at_sync(m, 2)
    for n in range(32):
        assert guest_zmm(m, n) == area.zmm(n)
    for n in range(8):
        assert guest_k(m, n) == area.k(n)
    assert [guest_st(m, i) for i in range(8)] == [area.st(i) for i in range(8)]
    assert guest_mxcsr(m) == area.mxcsr
    assert isinstance(m.run(timeout=10), Done)


def test_set_xsave_changes_every_register_the_guest_sees(machine, layout):
    """Guest: as above. Host at SYNC 1: KVM_SET_XSAVE with new values in every ZMM, K and ST
    register and in MXCSR. KVM_GET_XSAVE2 returns them; the guest's dump at SYNC 2 shows them."""
    m = machine("avx512")
    at_sync(m, 1)
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    for n in range(32):
        area.set_zmm(n, zmm_pattern(n, tag=0x5A5A))
    for n in range(8):
        area.set_k(n, k_pattern(n, tag=0xB4B4))
        area.set(f"st{n}", extended(100 + n))
    area.set_mxcsr(0x3F80)  # round down (RC = 01)
    m.vcpu.set_xsave(area.encode())
    assert XsaveArea.parse(m.vcpu.get_xsave2(), layout).diff(area) == []

    at_sync(m, 2)
    for n in range(32):
        assert guest_zmm(m, n) == zmm_pattern(n, tag=0x5A5A), f"zmm{n}"
    for n in range(8):
        assert guest_k(m, n) == k_pattern(n, tag=0xB4B4), f"k{n}"
    assert [guest_st(m, i) for i in range(8)] == [extended(100 + i) for i in range(8)]
    assert guest_mxcsr(m) == 0x3F80
    assert isinstance(m.run(timeout=10), Done)


def test_xsave_readback_guest_syncs_what_the_host_set(machine, layout):
    """Guest xsave-readback: SYNC 1, then SYNCs one dword it reads from each component: XMM7,
    YMM7 high, ZMM7 high, ZMM23, K5 (two dwords). Host at SYNC 1 sets those registers through
    KVM_SET_XSAVE (the components start in their init state: the setters materialize them)."""
    m = machine("xsave-readback")
    at_sync(m, 1)
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    zmm7 = sum((0x70000000 + i) << (32 * i) for i in range(16))   # dword i of ZMM7 = 0x7000000i
    zmm23 = sum((0x23000000 + i) << (32 * i) for i in range(16))
    area.set_zmm(7, zmm7)
    area.set_zmm(23, zmm23)
    area.set_k(5, 0x5555AAAA_12345678)
    m.vcpu.set_xsave(area.encode())

    seen = []
    while isinstance(ev := m.run(timeout=10), Sync):
        seen.append(ev.value)
    assert isinstance(ev, Done), ev
    assert seen == [0x70000000, 0x70000004, 0x70000008, 0x2300000F, 0x12345678, 0x5555AAAA]


# -- trimming after a narrower KVM_SET_CPUID2 ------------------------------------------------------

def test_get_xsave2_after_a_narrower_set_cpuid2(kvm, machine, layout):
    """A vCPU holds AVX-512 state (set with KVM_SET_XSAVE from the avx512 guest's SYNC 1), then
    gets a guest CPUID limited to XCR0 = x87|SSE|AVX (KVM_SET_CPUID2 before it runs).

    Kernel rule (>= 6.6, "KVM: x86: Constrain guest-supported xfeatures only at KVM_GET_XSAVE{2}"):
    KVM_GET_XSAVE2 reports only XSTATE_BV bits in the vCPU's guest-supported XCR0 (from the leaf
    0xD KVM holds) plus x87/SSE; KVM_SET_XSAVE checks XSTATE_BV against KVM's supported XCR0
    only, so an AVX-512 buffer is accepted after the narrower CPUID (before 6.6: EINVAL).
    What this checks per host: on standard KVM the held leaf 0xD is 0x7, so the AVX-512 bits are
    trimmed. On kvm_pvm (this host) KVM_GET_CPUID2 shows leaf 0xD rewritten to the host's XCR0
    (0xe7) whatever KVM_SET_CPUID2 was given, so nothing is trimmed: XSTATE_BV keeps 0xe0."""
    supported = kvm.get_supported_cpuid()
    source = machine("avx512")
    at_sync(source, 1)
    full = source.vcpu.get_xsave2()
    full_bv = XsaveArea.parse(full, layout).xstate_bv
    assert full_bv & AVX512_BITS == AVX512_BITS

    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(supported.guest_for_xcr0(supported.xcr0_supported()))
        vcpu.set_xsave(full)  # the vCPU now holds AVX-512 state
        narrow = supported.guest_for_xcr0(X87_SSE_AVX)
        vcpu.set_cpuid2(narrow)
        held = vcpu.get_cpuid2().xcr0_supported()
        got = XsaveArea.parse(vcpu.get_xsave2(), layout)
        assert got.xstate_bv == full_bv & (held | 0x3)  # the rule, on any host

        if is_pvm():
            assert held == supported.xcr0_supported() != narrow.xcr0_supported()
            assert got.xstate_bv & AVX512_BITS == AVX512_BITS
            assert_avx512_patterns(got)  # untrimmed: every register still there
        else:
            assert held == X87_SSE_AVX
            assert got.xstate_bv & AVX512_BITS == 0
            assert got.ymm(5) == low(zmm_pattern(5), 256)  # AVX is within the narrower CPUID

        # KVM_SET_XSAVE of the AVX-512 buffer after the narrower KVM_SET_CPUID2
        if kernel_version() >= (6, 6):
            vcpu.set_xsave(full)
            assert XsaveArea.parse(vcpu.get_xsave2(), layout).xstate_bv == full_bv & (held | 0x3)
        else:
            with pytest.raises(KvmError) as ei:
                vcpu.set_xsave(full)
            assert ei.value.errno == errno.EINVAL


# -- guest XCR0 enforcement -----------------------------------------------------------------------

def test_cpl3_avx512_runs_with_a_guest_xcr0_that_lacks_it(machine, layout):
    """Guest avx512 with guest CPUID and XCR0 limited to x87|SSE|AVX (0x7).
    Bare-metal KVM loads the guest's XCR0, so the first EVEX instruction raises #UD. On kvm_pvm
    (this host) guest CPL3 code runs under the host's XCR0: the guest executes AVX-512, KVM_GET_XSAVE2
    shows opmask/ZMM_Hi256/Hi16_ZMM beyond XCR0, and host changes to ZMM20 and K3 (beyond XCR0)
    made with KVM_SET_XSAVE at SYNC 1 are what the guest reads before SYNC 2."""
    m = machine("avx512", xcr0=X87_SSE_AVX)
    assert m.vcpu.get_xcrs()[0] == X87_SSE_AVX  # KVM holds the narrow XCR0
    ev = m.run(timeout=10)
    if not is_pvm():
        assert isinstance(ev, Fault) and ev.name == "#UD", ev
        return

    assert isinstance(ev, Sync) and ev.value == 1, ev
    assert m.vcpu.get_xcrs()[0] == X87_SSE_AVX
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    assert [c.name for c in area.components_outside(X87_SSE_AVX)] == ["opmask", "ZMM_Hi256", "Hi16_ZMM"]
    assert_avx512_patterns(area)

    area.set_zmm(20, zmm_pattern(20, tag=0x2020))
    area.set_k(3, k_pattern(3, tag=0x3333))
    m.vcpu.set_xsave(area.encode())
    at_sync(m, 2)
    assert guest_zmm(m, 20) == zmm_pattern(20, tag=0x2020)
    assert guest_k(m, 3) == k_pattern(3, tag=0x3333)
    assert guest_zmm(m, 31) == zmm_pattern(31)


# -- refused buffers: clear errors, nothing sent --------------------------------------------------

def _unsupported_component(kvm):
    supported = kvm.get_supported_cpuid().xcr0_supported()
    return next(i for i in (9, 18, 19, 62) if not supported >> i & 1)


def _bad_buffers(kvm, layout, good):
    """(name, buffer, what the error must say). Each also changes ZMM20, so a buffer that reached
    KVM would show in the vCPU's state."""
    bit = _unsupported_component(kvm)
    zmm20 = layout.components[HI16_ZMM].offset + 4 * 64

    def edit(offset=None, data=b""):
        b = bytearray(good)
        b[zmm20:zmm20 + 8] = b"\x77" * 8  # ZMM20 bits 63:0
        if offset is not None:
            b[offset:offset + len(data)] = data
        return bytes(b)

    bv = int.from_bytes(good[512:520], "little")
    return [
        ("short", edit()[:len(good) - 1],
         f"buffer is {len(good) - 1} bytes; KVM_SET_XSAVE expects {len(good)}"),
        ("long", edit() + bytes(4096), f"expects {len(good)}"),
        ("xcomp_bv", edit(520, (1 << 63 | bv).to_bytes(8, "little")), f"XCOMP_BV is {1 << 63 | bv:#x}"),
        ("reserved", edit(540, b"\x01"), "reserved XSAVE header bytes 528..575 must be zero; nonzero at 540"),
        ("unsupported", edit(512, (bv | 1 << bit).to_bytes(8, "little")),
         f"components outside supported XCR0 {layout.xcr0_supported:#x}: {component_name(bit)} ({bit})"),
        ("mxcsr", edit(24, (0x1F80 | 1 << 31).to_bytes(4, "little")), "MXCSR 0x80001f80 sets reserved bits"),
    ]


def test_refused_set_xsave_sends_nothing(kvm, machine, layout):
    """Guest avx512 at SYNC 1. Host: set_xsave of each bad buffer raises XsaveError (vmm's check,
    not KvmError from the ioctl) naming the problem; the vCPU's XSAVE state is byte-for-byte
    unchanged, and at SYNC 2 the guest still sees its own ZMM20."""
    m = machine("avx512")
    at_sync(m, 1)
    before = m.vcpu.get_xsave2()
    for name, buf, message in _bad_buffers(kvm, layout, before):
        with pytest.raises(XsaveError) as ei:
            m.vcpu.set_xsave(buf)
        assert not isinstance(ei.value, KvmError)
        assert "KVM_SET_XSAVE not attempted" in str(ei.value), name
        assert message in str(ei.value), name
        assert m.vcpu.get_xsave2() == before, name
    at_sync(m, 2)
    assert guest_zmm(m, 20) == zmm_pattern(20)


def test_mxcsr_bits_follow_the_host_mxcsr_mask(machine, layout):
    """Guest avx512 at SYNC 1. The MXCSR_MASK in KVM's FXSAVE image is the host's (here 0x2ffff:
    Zen's MM bit 17 on top of 0xffff). Host: MXCSR with the mask's top bit is accepted and the guest
    reads it back at SYNC 2; the next bit up is refused by vmm, and by KVM itself (raw ioctl)."""
    m = machine("avx512")
    at_sync(m, 1)
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    mask = area.mxcsr_mask or 0xFFBF
    top = 1 << (mask.bit_length() - 1)
    bad = area.copy()
    bad.set_mxcsr(0x1F80 | top << 1)
    with pytest.raises(XsaveError, match=f"MXCSR {0x1F80 | top << 1:#x} sets reserved bits {top << 1:#x}"):
        m.vcpu.set_xsave(bad.encode())
    with pytest.raises(KvmError) as ei:
        ioctl(m.vcpu.fd, "KVM_SET_XSAVE", ffi.new("char[]", bad.encode()))
    assert ei.value.errno == errno.EINVAL

    area.set_mxcsr(0x1F80 | top)
    m.vcpu.set_xsave(area.encode())
    at_sync(m, 2)
    assert guest_mxcsr(m) == 0x1F80 | top


def test_kvm_itself_refuses_what_set_xsave_refuses(kvm, machine, layout):
    """The same bad headers and MXCSR sent with a raw KVM_SET_XSAVE (bypassing vmm's checks):
    KVM answers EINVAL for each, so the checks mirror KVM's rather than invent rules."""
    m = machine("avx512")
    at_sync(m, 1)
    before = m.vcpu.get_xsave2()
    for name, buf, _ in _bad_buffers(kvm, layout, before):
        if name in ("short", "long"):
            continue  # KVM reads exactly KVM_CAP_XSAVE2 bytes: a wrong size cannot be sent safely
        with pytest.raises(KvmError) as ei:
            ioctl(m.vcpu.fd, "KVM_SET_XSAVE", ffi.new("char[]", buf))
        assert ei.value.errno == errno.EINVAL, name
        assert m.vcpu.get_xsave2() == before, name


# -- the CLI --------------------------------------------------------------------------------------

def vmm(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.kvm
def test_cli_xsave_decodes_the_avx512_guest():
    r = vmm("xsave", "avx512", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert (d["ioctl"], d["size"], d["xstate_bv"], d["xcomp_bv"]) == ("KVM_GET_XSAVE2", d["xsave2_cap"],
                                                                     "0xe7", "0x0")
    assert d["components"] == ["x87", "SSE", "AVX", "opmask", "ZMM_Hi256", "Hi16_ZMM"]
    assert d["beyond_xcr0"] == [] and d["xcr0"] == "0xe7"
    regs = d["registers"]
    assert int(regs["zmm20"], 16) == zmm_pattern(20)
    assert int(regs["zmm3h"], 16) == zmm_pattern(3) >> 256
    assert int(regs["ymm9h"], 16) == low(zmm_pattern(9) >> 128, 128)
    assert int(regs["xmm15"], 16) == low(zmm_pattern(15), 128)
    assert int(regs["k7"], 16) == k_pattern(7)

    text = vmm("xsave", "avx512").stdout
    assert "XSTATE_BV        0xe7  x87 SSE AVX opmask ZMM_Hi256 Hi16_ZMM" in text
    assert "    zmm20  a5a5000000001407 a5a5000000001406 " in text
    assert "    k3  0x4b4b000000000003" in text


@pytest.mark.kvm
def test_cli_xsave_marks_state_beyond_the_guest_xcr0():
    r = vmm("xsave", "avx512", "--xcr0", "x87|SSE|AVX")
    if not is_pvm():  # XCR0 enforced: the guest faults before its SYNC
        assert r.returncode == 2 and "#UD" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert "guest XCR0       0x7  x87 SSE AVX" in r.stdout
    assert ("beyond XCR0      opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7) live in XSTATE_BV although the "
            "guest's XCR0 0x7 does not enable them: this host (kvm_pvm)") in r.stdout
    assert "   7 Hi16_ZMM   offset  1408 size  1024  beyond XCR0" in r.stdout
    assert "vmm set 0x7 and KVM changed it" in r.stdout


@pytest.mark.kvm
def test_cli_xsave_raw_and_layout(kvm, layout):
    r = vmm("xsave", "avx512", "--raw")
    assert r.returncode == 0, r.stderr
    assert "\n00000200  e7 00 00 00 00 00 00 00  00 00 00 00 00 00 00 00  |................|\n" in r.stdout
    d = json.loads(vmm("xsave", "--layout", "--json").stdout)
    assert d["kvm_xsave_size"] == kvm_xsave_size(layout)
    assert XsaveLayout.from_json(d) == layout


def test_cli_xsave_layout_of_a_dump_needs_no_kvm():
    r = vmm("xsave", "--layout", "--file", str(DATA / "intel-sapphire-rapids-w7-2475x.txt"),
            "--device", "/nonexistent/kvm")
    assert r.returncode == 0, r.stderr
    assert " 18  XTILEDATA  user         2816   8192  11008      3584  align64 xfd" in r.stdout
    assert "KVM_GET_XSAVE2 buffer for XCR0 0x602e7: max(4096, 11008) = 11008 bytes" in r.stdout


@pytest.mark.parametrize("args, message", [
    (("xsave", "avx512", "--xcr0", "x87|avx513"), "unknown XSAVE component 'avx513'"),
    (("xsave",), "give GUEST (e.g. avx512) or --layout"),
    (("xsave", "avx512", "--layout"), "--layout takes no GUEST"),
    (("xsave", "--layout", "--file", "/nonexistent/dump.txt"),
     "/nonexistent/dump.txt: no such file (expected a CPUID dump)"),
])
def test_cli_xsave_bad_input_fails_before_kvm(args, message):
    """Each refused before /dev/kvm is opened: the device given does not exist."""
    r = vmm(*args, "--device", "/nonexistent/kvm")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.kvm
def test_cli_xsave_refuses_an_xcr0_kvm_does_not_support():
    r = vmm("xsave", "avx512", "--xcr0", hex(0xE7 | 1 << 62))
    assert r.returncode == 2
    assert "--xcr0 0x40000000000000e7 has components KVM does not support here" in r.stderr
    assert "component62" in r.stderr
