"""XSAVE on real KVM: sizes, both directions of the guest's registers, trimming after a narrower
KVM_SET_CPUID2, guest XCR0 enforcement, refused buffers, and `vmm xsave`.

Each test is a guest story: what the guest does, then what the host checks at each SYNC. The
checkpoint guest fills every XSAVE component this host's vCPUs have (its SYNC value says which), so
these tests check that, on any host; the avx512 guest's tests need AVX-512 and skip without it."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import xstate_guest as xg
from conftest import needs_xcr0
from vmm._bindings import ffi, ioctl
from vmm.errors import KvmError
from vmm.guest import runtime
from vmm.guest.runner import Done, Fail, Fault, Sync
from vmm.kvm import is_pvm
from vmm.probe.core import has_set_xsave_fix, kernel_version
from vmm.xsave import (AVX, HI16_ZMM, OPMASK, ZMM_HI256, XsaveArea, XsaveError, XsaveLayout, component_name,
                       kvm_xsave_size, mask_names)

AVX512_BITS = 1 << OPMASK | 1 << ZMM_HI256 | 1 << HI16_ZMM  # 0xe0
X87_SSE = 0x3
DUMP = runtime.SCRATCH_BASE + 0x8000  # where the avx512 guest stores what it sees before SYNC 2
DATA = Path(__file__).parent / "data"


# -- the avx512 guest's patterns (guests/avx512.S): the checkpoint guest's for vCPU 0 -------------

zmm_pattern = xg.vec
k_pattern = xg.k
extended = xg.extended


def low(value, bits):
    return value & ((1 << bits) - 1)


def guest_zmm(m, n):
    return int.from_bytes(m.vm.read(DUMP + 64 * n, 64), "little")


def guest_k(m, n):
    return int.from_bytes(m.vm.read(DUMP + 0x800 + 8 * n, 8), "little")


def guest_st(m, i):
    """ST(i) from the guest's FXSAVE image (bytes 32 + 16 i, 80 bits)."""
    return int.from_bytes(m.vm.read(DUMP + 0x840 + 32 + 16 * i, 10), "little")


@pytest.fixture(scope="module")
def layout(kvm):
    """The host's XSAVE layout: KVM's buffers use the host's offsets whatever the guest CPUID says."""
    return XsaveLayout.from_cpuid(kvm.get_supported_cpuid())


@pytest.fixture
def avx512(kvm):
    needs_xcr0(kvm, "AVX512F", AVX512_BITS)


def at_sync(m, value=None):
    ev = m.run(timeout=10)
    assert isinstance(ev, Sync) and (value is None or ev.value == value), ev
    return ev


def checkpoint(machine, **kw):
    """The checkpoint guest at its SYNC: (machine, mask of the XSAVE components it filled)."""
    m = machine("checkpoint", **kw)
    ev = at_sync(m)
    xg.check_mask(ev.value, m.xcr0)
    return m, ev.value


def assert_avx512_patterns(area):
    """Every XMM/YMM/ZMM/K and x87 register of the avx512 guest, as the host decodes them."""
    xg.assert_filled(area, 0xE7)
    assert (area.fcw, area.fsw, area.ftw, area.mxcsr) == (0x37F, 0, 0xFF, 0x1F80)


# -- size -----------------------------------------------------------------------------------------

def test_xsave_size_is_cap_xsave2_cross_checked_with_leaf_d(kvm, machine, layout):
    """The buffer size comes from KVM_CAP_XSAVE2 on the VM fd and agrees with
    max(4096, CPUID.(0DH,0).ECX) of KVM_GET_SUPPORTED_CPUID; a narrower guest CPUID does not
    shrink it (KVM sizes it by what this process may use)."""
    supported = kvm.get_supported_cpuid()
    m = machine("checkpoint")
    size = m.vcpu.xsave_size()
    assert size == m.vm.check_extension("KVM_CAP_XSAVE2")
    assert size == max(4096, supported.entry(0xD, 0).ecx) == kvm_xsave_size(layout)
    assert len(m.vcpu.get_xsave2()) == len(m.vcpu.get_xsave()) == size

    narrow = machine("checkpoint", xcr0=X87_SSE)  # KVM_SET_CPUID2 with leaf 0xD limited to x87|SSE
    assert narrow.vcpu.xsave_size() == size

    if size == 4096:  # legacy KVM_GET_XSAVE carries the same 4096 bytes
        assert m.vcpu.get_xsave_legacy() == m.vcpu.get_xsave2()
    else:
        with pytest.raises(KvmError, match="use KVM_GET_XSAVE2") as ei:
            m.vcpu.get_xsave_legacy()
        assert ei.value.errno == errno.E2BIG


# -- both directions ------------------------------------------------------------------------------

def test_filled_state_reaches_the_host_exactly(machine, layout):
    """Guest checkpoint: fills every component it has, SYNC(mask). Host: KVM_GET_XSAVE2 decodes to
    exactly those patterns; after the SYNC the guest's own store of what it sees agrees register by
    register, and its checks pass (DONE)."""
    m, mask = checkpoint(machine)
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    assert area.xcomp_bv == 0
    xg.assert_filled(area, mask)
    assert (area.fcw, area.fsw, area.ftw, area.mxcsr) == (0x37F, 0, 0xFF, 0x1F80)

    assert isinstance(m.run(timeout=10), Done)
    count, bits = xg.vector_shape(mask)
    for n in range(count):
        assert xg.seen_vec(m, n, bits) == xg.vector(area, n, bits), n
    if mask >> OPMASK & 1:
        assert [xg.seen_k(m, n) for n in range(8)] == [area.k(n) for n in range(8)]
    assert [xg.seen_st(m, i) for i in range(8)] == [area.st(i) for i in range(8)]
    assert xg.seen_mxcsr(m) == area.mxcsr


def test_avx512_patterns_reach_the_host_exactly(avx512, machine, layout):
    """Guest avx512: fills x87, ZMM0-31 and K0-7 with patterns, SYNC 1; dumps what it sees, SYNC 2.
    Host: KVM_GET_XSAVE2 at SYNC 1 decodes to exactly those patterns; at SYNC 2 the guest's own
    dump agrees register by register."""
    m = machine("avx512")
    at_sync(m, 1)
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    assert area.xcomp_bv == 0
    assert_avx512_patterns(area)

    at_sync(m, 2)
    for n in range(32):
        assert guest_zmm(m, n) == area.zmm(n)
    for n in range(8):
        assert guest_k(m, n) == area.k(n)
    assert [guest_st(m, i) for i in range(8)] == [area.st(i) for i in range(8)]
    assert isinstance(m.run(timeout=10), Done)


def test_set_xsave_changes_every_register_the_guest_sees(machine, layout):
    """Guest checkpoint at its SYNC. Host: KVM_SET_XSAVE with new values in every register the guest
    filled and in MXCSR. KVM_GET_XSAVE2 returns them; the guest's store of what it sees shows them,
    and its own check fails at the first register it filled (the host changed it)."""
    m, mask = checkpoint(machine)
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    count, bits = xg.vector_shape(mask)
    setter = {512: area.set_zmm, 256: area.set_ymm, 128: area.set_xmm}.get(bits)
    for n in range(count):
        setter(n, xg.vec(n, tag=0x5A5A, bits=bits))
    if mask >> OPMASK & 1:
        for n in range(8):
            area.set_k(n, xg.k(n, tag=0xB4B4))
    for n in range(8):
        area.set(f"st{n}", extended(100 + n))
    area.set_mxcsr(0x3F80)  # round down (RC = 01)
    m.vcpu.set_xsave(area.encode())
    assert XsaveArea.parse(m.vcpu.get_xsave2(), layout).diff(area) == []

    ev = m.run(timeout=10)
    assert isinstance(ev, Fail) and ev.code == (0x200 if count else 0x400), ev
    for n in range(count):
        assert xg.seen_vec(m, n, bits) == xg.vec(n, tag=0x5A5A, bits=bits), f"vector {n}"
    if mask >> OPMASK & 1:
        assert [xg.seen_k(m, n) for n in range(8)] == [xg.k(n, tag=0xB4B4) for n in range(8)]
    assert [xg.seen_st(m, i) for i in range(8)] == [extended(100 + i) for i in range(8)]
    assert xg.seen_mxcsr(m) == 0x3F80


def test_xsave_readback_guest_syncs_what_the_host_set(machine, layout):
    """Guest xsave-readback: SYNC(mask), then SYNCs one dword it reads from each component the mask
    holds: XMM7, YMM7 high, ZMM7 high, ZMM23, K5 (two dwords), PKRU. Host at the first SYNC sets those
    registers through KVM_SET_XSAVE (the components start in their init state: the setters
    materialize them)."""
    m = machine("xsave-readback")
    mask = at_sync(m).value
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    zmm7 = sum((0x70000000 + i) << (32 * i) for i in range(16))   # dword i of ZMM7 = 0x7000000i
    zmm23 = sum((0x23000000 + i) << (32 * i) for i in range(16))
    expected = []
    if mask >> 1 & 1:
        area.set_xmm(7, low(zmm7, 128))
        expected.append(0x70000000)
    if mask >> AVX & 1:
        area.set_ymm(7, low(zmm7, 256))
        expected.append(0x70000004)
    if mask >> ZMM_HI256 & 1:
        area.set_zmm(7, zmm7)
        expected.append(0x70000008)
    if mask >> HI16_ZMM & 1:
        area.set_zmm(23, zmm23)
        expected.append(0x2300000F)
    if mask >> OPMASK & 1:
        area.set_k(5, 0x5555AAAA_12345678)
        expected += [0x12345678, 0x5555AAAA]
    if mask >> 9 & 1:
        area.set_pkru(0x55550000)
        expected.append(0x55550000)
    m.vcpu.set_xsave(area.encode())

    seen = []
    while isinstance(ev := m.run(timeout=10), Sync):
        seen.append(ev.value)
    assert isinstance(ev, Done), ev
    assert seen == expected


# -- trimming after a narrower KVM_SET_CPUID2 ------------------------------------------------------

def test_get_xsave2_after_a_narrower_set_cpuid2(kvm, machine, layout):
    """A vCPU holds the checkpoint guest's state beyond x87/SSE (set with KVM_SET_XSAVE), then gets a
    guest CPUID limited to XCR0 = x87|SSE (KVM_SET_CPUID2 before it runs).

    Kernel rule (>= 6.6, "KVM: x86: Constrain guest-supported xfeatures only at KVM_GET_XSAVE{2}"):
    KVM_GET_XSAVE2 reports only XSTATE_BV bits in the vCPU's guest-supported XCR0 (from the leaf
    0xD KVM holds) plus x87/SSE; KVM_SET_XSAVE checks XSTATE_BV against KVM's supported XCR0
    only, so the wider buffer is accepted after the narrower CPUID (before 6.6: EINVAL).
    What this checks per host: on standard KVM the held leaf 0xD is x87|SSE, so everything else is
    trimmed. On kvm_pvm KVM_GET_CPUID2 shows leaf 0xD rewritten to the host's XCR0 whatever
    KVM_SET_CPUID2 was given, so nothing is trimmed."""
    supported = kvm.get_supported_cpuid()
    source, mask = checkpoint(machine)
    beyond = mask & ~X87_SSE
    if not beyond:
        pytest.skip(f"the guest filled only x87/SSE here (XCR0 {mask:#x}): nothing to trim")
    full = source.vcpu.get_xsave2()
    full_bv = XsaveArea.parse(full, layout).xstate_bv
    assert full_bv & beyond == beyond

    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(supported.guest_for_xcr0(supported.xcr0_supported()))
        vcpu.set_xsave(full)  # the vCPU now holds the wider state
        vcpu.set_cpuid2(supported.guest_for_xcr0(X87_SSE))
        held = vcpu.get_cpuid2().xcr0_supported()
        got = XsaveArea.parse(vcpu.get_xsave2(), layout)
        assert got.xstate_bv == full_bv & (held | X87_SSE)  # the rule, on any host

        if is_pvm():
            assert held == supported.xcr0_supported() != X87_SSE
            xg.assert_filled(got, mask)  # untrimmed: every register still there
        else:
            assert held == X87_SSE
            assert got.xstate_bv & beyond == 0
            assert got.xmm(5) == low(xg.vec(5), 128)  # SSE is within the narrower CPUID

        # KVM_SET_XSAVE of the wider buffer after the narrower KVM_SET_CPUID2
        if has_set_xsave_fix(kernel_version()):  # 6.6, and 6.1.60 on the 6.1 series
            vcpu.set_xsave(full)
            assert XsaveArea.parse(vcpu.get_xsave2(), layout).xstate_bv == full_bv & (held | X87_SSE)
        else:
            with pytest.raises(KvmError) as ei:
                vcpu.set_xsave(full)
            assert ei.value.errno == errno.EINVAL


# -- guest XCR0 enforcement -----------------------------------------------------------------------

def test_cpl3_code_beyond_the_guest_xcr0(kvm, machine, layout):
    """Guest checkpoint told to fill every component KVM supports here (%rdx bit 63), with guest
    CPUID and XCR0 limited to x87|SSE. Bare-metal KVM loads the guest's XCR0, so the first
    instruction beyond it (AVX at least) raises #UD. On kvm_pvm guest CPL3 code runs under the
    host's XCR0: the guest fills it all, KVM_GET_XSAVE2 shows the components beyond XCR0, and a host
    change to one of them made with KVM_SET_XSAVE is what the guest reads."""
    supported = needs_xcr0(kvm, "AVX", 1 << AVX)
    narrow = kvm.get_supported_cpuid().guest_for_xcr0(X87_SSE).with_xsave_enabled()  # XCR0 is settable
    m = machine("checkpoint", cpuid=narrow, xcr0=X87_SSE)
    assert m.vcpu.get_xcrs()[0] == X87_SSE  # KVM holds the narrow XCR0
    regs = m.vcpu.get_regs()
    regs.rdx = xg.FORCE | supported
    m.vcpu.set_regs(regs)
    ev = m.run(timeout=10)
    if not is_pvm():
        assert isinstance(ev, Fault) and ev.name == "#UD", ev
        return

    assert isinstance(ev, Sync), ev
    mask = ev.value
    assert mask == supported & xg.USER
    assert m.vcpu.get_xcrs()[0] == X87_SSE
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    assert [c.index for c in area.components_outside(X87_SSE)] == \
        [i for i in range(64) if (mask & ~X87_SSE) >> i & 1]
    xg.assert_filled(area, mask)

    count, bits = xg.vector_shape(mask)
    setter = {512: area.set_zmm, 256: area.set_ymm}[bits]
    setter(count - 1, xg.vec(count - 1, tag=0x2020, bits=bits))  # a register beyond XCR0
    m.vcpu.set_xsave(area.encode())
    ev = m.run(timeout=10)
    assert isinstance(ev, Fail) and ev.code == 0x200 + count - 1, ev
    assert xg.seen_vec(m, count - 1, bits) == xg.vec(count - 1, tag=0x2020, bits=bits)


def test_cpl3_avx512_runs_with_a_guest_xcr0_that_lacks_it(avx512, machine, layout):
    """Guest avx512 with guest CPUID and XCR0 limited to x87|SSE|AVX (0x7): as above, with EVEX
    instructions that do not ask the CPU first."""
    m = machine("avx512", xcr0=0x7)
    assert m.vcpu.get_xcrs()[0] == 0x7
    ev = m.run(timeout=10)
    if not is_pvm():
        assert isinstance(ev, Fault) and ev.name == "#UD", ev
        return
    assert isinstance(ev, Sync) and ev.value == 1, ev
    area = XsaveArea.parse(m.vcpu.get_xsave2(), layout)
    assert [c.name for c in area.components_outside(0x7)] == ["opmask", "ZMM_Hi256", "Hi16_ZMM"]
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
    """(name, buffer, what the error must say). Each also changes XMM7, so a buffer that reached
    KVM would show in the vCPU's state (and fail the checkpoint guest's check)."""
    bit = _unsupported_component(kvm)
    xmm7 = 160 + 16 * 7

    def edit(offset=None, data=b""):
        b = bytearray(good)
        b[xmm7:xmm7 + 8] = b"\x77" * 8  # XMM7 bits 63:0
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
    """Guest checkpoint at its SYNC. Host: set_xsave of each bad buffer raises XsaveError (vmm's
    check, not KvmError from the ioctl) naming the problem; the vCPU's XSAVE state is byte-for-byte
    unchanged, and the guest finds every register intact (DONE)."""
    m, _ = checkpoint(machine)
    before = m.vcpu.get_xsave2()
    for name, buf, message in _bad_buffers(kvm, layout, before):
        with pytest.raises(XsaveError) as ei:
            m.vcpu.set_xsave(buf)
        assert not isinstance(ei.value, KvmError)
        assert "KVM_SET_XSAVE not attempted" in str(ei.value), name
        assert message in str(ei.value), name
        assert m.vcpu.get_xsave2() == before, name
    assert isinstance(m.run(timeout=10), Done)


def test_mxcsr_bits_follow_the_host_mxcsr_mask(machine, layout):
    """Guest checkpoint at its SYNC. The MXCSR_MASK in KVM's FXSAVE image is the host's (0xffff,
    or more where the CPU has more MXCSR bits, e.g. Zen's MM bit 17). Host: MXCSR with the mask's top
    bit is accepted and the guest reads it back; the next bit up is refused by vmm, and by KVM
    itself (raw ioctl)."""
    m, _ = checkpoint(machine)
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
    assert isinstance(m.run(timeout=10), Done)  # the guest does not check MXCSR; it stores it
    assert xg.seen_mxcsr(m) == 0x1F80 | top


def test_kvm_itself_refuses_what_set_xsave_refuses(kvm, machine, layout):
    """The same bad headers and MXCSR sent with a raw KVM_SET_XSAVE (bypassing vmm's checks):
    KVM answers EINVAL for each, so the checks mirror KVM's rather than invent rules."""
    m, _ = checkpoint(machine)
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


def test_cli_xsave_decodes_the_checkpoint_guest(kvm):
    """`vmm xsave checkpoint`: whatever this host has, the guest's patterns decode exactly."""
    r = vmm("xsave", "checkpoint", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    xcr0 = int(d["xcr0"], 16)
    assert xcr0 == kvm.get_supported_cpuid().xcr0_supported() & ~0x60000  # AMX only with --amx
    mask = int(d["sync_value"], 16)  # what the guest filled
    xg.check_mask(mask, xcr0)
    assert (d["ioctl"], d["size"], d["xcomp_bv"]) == ("KVM_GET_XSAVE2", d["xsave2_cap"], "0x0")
    assert int(d["xstate_bv"], 16) & mask == mask
    assert d["beyond_xcr0"] == []
    regs = d["registers"]
    for name, value in xg.expected_registers(mask).items():
        if name.startswith("st"):
            continue  # printed as sign/exponent and significand
        assert int(regs[name], 16) == value, name

    text = vmm("xsave", "checkpoint").stdout
    assert f"XSTATE_BV        {int(d['xstate_bv'], 16):#x}  {mask_names(int(d['xstate_bv'], 16))}" in text
    assert "    xmm3   a5a5000000000301 a5a5000000000300" in text


@pytest.mark.kvm
def test_cli_xsave_decodes_the_avx512_guest(avx512):
    r = vmm("xsave", "avx512", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert int(d["xstate_bv"], 16) & 0xE7 == 0xE7
    regs = d["registers"]
    assert int(regs["zmm20"], 16) == zmm_pattern(20)
    assert int(regs["zmm3h"], 16) == zmm_pattern(3) >> 256
    assert int(regs["ymm9h"], 16) == low(zmm_pattern(9) >> 128, 128)
    assert int(regs["xmm15"], 16) == low(zmm_pattern(15), 128)
    assert int(regs["k7"], 16) == k_pattern(7)
    text = vmm("xsave", "avx512").stdout
    assert "    zmm20  a5a5000000001407 a5a5000000001406 " in text
    assert "    k3  0x4b4b000000000003" in text


@pytest.mark.kvm
def test_cli_xsave_marks_state_beyond_the_guest_xcr0(avx512, layout):
    r = vmm("xsave", "avx512", "--xcr0", "x87|SSE|AVX")
    if not is_pvm():  # XCR0 enforced: the guest faults before its SYNC, a guest ending (status 1)
        assert r.returncode == 1, r.stderr
        assert "ended with 'fault #UD" in r.stderr and "before reaching SYNC 1" in r.stderr
        return
    assert r.returncode == 0, r.stderr
    assert "guest XCR0       0x7  x87 SSE AVX" in r.stdout
    assert ("beyond XCR0      opmask (5), ZMM_Hi256 (6), Hi16_ZMM (7) live in XSTATE_BV although the "
            "guest's XCR0 0x7 does not enable them: this host (kvm_pvm)") in r.stdout
    hi16 = layout.components[HI16_ZMM]
    assert f"   7 Hi16_ZMM   offset {hi16.offset:5d} size {hi16.size:5d}  beyond XCR0" in r.stdout
    assert "vmm set 0x7 and KVM changed it" in r.stdout


def test_cli_run_refuses_a_guest_this_host_cannot_give_what_it_needs(kvm):
    """A guest's requirements are checked before its VM exists: one line naming the feature and the
    host's supported XCR0, exit 2; never a #UD."""
    supported = kvm.get_supported_cpuid().xcr0_supported()
    r = vmm("run", "avx512")
    if supported & AVX512_BITS == AVX512_BITS:
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2 and "#UD" not in r.stdout + r.stderr
    line, = r.stderr.splitlines()
    assert "guest 'avx512' needs AVX512F" in line and f"supports XCR0 {supported:#x}" in line


@pytest.mark.kvm
def test_cli_xsave_raw_and_layout(kvm, layout):
    r = vmm("xsave", "checkpoint", "--raw", "--json")
    assert r.returncode == 0, r.stderr
    bv = int(json.loads(r.stdout)["xstate_bv"], 16)
    r = vmm("xsave", "checkpoint", "--raw")
    assert r.returncode == 0, r.stderr
    header = bv.to_bytes(8, "little").hex(" ")
    assert f"\n00000200  {header}  00 00 00 00 00 00 00 00  |" in r.stdout
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
    (("xsave", "checkpoint", "--xcr0", "x87|avx513"), "unknown XSAVE component 'avx513'"),
    (("xsave",), "give GUEST (e.g. avx512) or --layout"),
    (("xsave", "checkpoint", "--layout"), "--layout takes no GUEST"),
    (("xsave", "--layout", "--file", "/nonexistent/dump.txt"),
     "/nonexistent/dump.txt: no such file (expected a CPUID dump)"),
])
def test_cli_xsave_bad_input_fails_before_kvm(args, message):
    """Each refused before /dev/kvm is opened: the device given does not exist."""
    r = vmm(*args, "--device", "/nonexistent/kvm")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.kvm
def test_cli_xsave_refuses_an_xcr0_kvm_does_not_support(kvm):
    supported = kvm.get_supported_cpuid().xcr0_supported()
    r = vmm("xsave", "checkpoint", "--xcr0", hex(supported | 1 << 62))
    assert r.returncode == 2
    assert f"--xcr0 {supported | 1 << 62:#x} has components KVM does not support here" in r.stderr
    assert "component62" in r.stderr
