"""The host side of the checkpoint guest's contract (guests/checkpoint.S, guests/xstate.inc):
which XSAVE components it filled (its SYNC value) and the patterns it put there, so a test checks
exactly what the guest filled on this host, never what one CPU has."""

from vmm.guest import runtime
from vmm.xsave import AVX, HI16_ZMM, OPMASK, PKRU, SSE, XTILECFG, XTILEDATA

BLOCKS = runtime.SCRATCH_BASE + 0xC0000
MEMORY = runtime.SCRATCH_BASE + 0x10000
FORCE = 1 << 63  # %rdx bit 63 at entry: fill exactly the given components (xstate.inc)
USER = 0x602E7   # the components the guest knows how to fill


def check_mask(filled, xcr0):
    """The guest filled every component of `xcr0` it can write at CPL3, but PKRU where CR4.PKE is not
    what CPL3 code runs with (WRPKRU would #UD: the guest asks CPUID.7.ECX.OSPKE first)."""
    want = xcr0 & USER
    assert filled & ~want == 0 and want & ~filled & ~(1 << PKRU) == 0, f"filled {filled:#x}, XCR0 {xcr0:#x}"


def block(v):
    return BLOCKS + v * 0x2000


def has(mask, component):
    return bool(mask >> component & 1)


def vector_shape(mask):
    """(registers, bits) the guest filled: ZMM0-31, YMM0-15, XMM0-15 or none."""
    if has(mask, HI16_ZMM):
        return 32, 512
    if has(mask, AVX):
        return 16, 256
    if has(mask, SSE):
        return 16, 128
    return 0, 0


def vector(area, n, bits):
    """Vector register n of an XsaveArea, `bits` wide (512: ZMM, 256: YMM, 128: XMM)."""
    return {512: area.zmm, 256: area.ymm, 128: area.xmm}[bits](n)


def vec(n, v=0, tag=0xA5A5, bits=512):
    """Vector register n: qword j = tag << 48 | v << 32 | n << 8 | j."""
    return sum((tag << 48 | v << 32 | n << 8 | j) << (64 * j) for j in range(bits // 64))


def k(n, v=0, tag=0x4B4B):
    return tag << 48 | v << 32 | n


def extended(value):
    """The x87 80-bit extended encoding of the positive integer `value` (what `fild` loads)."""
    e = value.bit_length() - 1
    return (16383 + e) << 64 | value << (63 - e)


def st(i, v=0):
    return extended(8 - i + 16 * v)


def pkru(v=0):
    return 0x5A5A0000 | v << 4


def tmm(n, v=0):
    return b"".join((0x7A7A << 48 | v << 32 | n << 16 | q).to_bytes(8, "little") for q in range(128))


def expected_registers(mask, v=0):
    """{register name as vmm.xsave.XsaveArea names it: value} for everything the guest filled."""
    regs = {f"st{i}": st(i, v) for i in range(8)}
    count, bits = vector_shape(mask)
    for n in range(count):
        value = vec(n, v, bits=bits)
        if n >= 16:
            regs[f"zmm{n}"] = value
            continue
        regs[f"xmm{n}"] = value & (1 << 128) - 1
        if bits >= 256:
            regs[f"ymm{n}h"] = value >> 128 & (1 << 128) - 1
        if bits == 512:
            regs[f"zmm{n}h"] = value >> 256
    if has(mask, OPMASK):
        regs.update({f"k{n}": k(n, v) for n in range(8)})
    if has(mask, PKRU):
        regs["pkru"] = pkru(v)
    if has(mask, XTILECFG) and has(mask, XTILEDATA):
        regs["tilecfg.palette"] = 1
        for n in range(8):
            regs[f"tilecfg.colsb{n}"], regs[f"tilecfg.rows{n}"] = 64, 16
            regs[f"tmm{n}"] = tmm(n, v)
    return regs


def assert_filled(area, mask, v=0):
    """Every register the guest filled decodes, from the XSAVE area, to its pattern."""
    assert area.xstate_bv & mask == mask, f"XSTATE_BV {area.xstate_bv:#x} lacks filled {mask:#x}"
    for name, value in expected_registers(mask, v).items():
        assert area.get(name) == value, name


# -- what the guest stored after its SYNC (before its own checks) --------------------------------

def seen_vec(m, n, bits, v=0):
    return int.from_bytes(m.vm.read(block(v) + 0x800 + 64 * n, bits // 8), "little")


def seen_k(m, n, v=0):
    return int.from_bytes(m.vm.read(block(v) + 0x40 + 8 * n, 8), "little")


def seen_pkru(m, v=0):
    return int.from_bytes(m.vm.read(block(v) + 8, 4), "little")


def seen_st(m, i, v=0):
    """ST(i) from the guest's FXSAVE image (bytes 32 + 16 i, 80 bits)."""
    return int.from_bytes(m.vm.read(block(v) + 0x100 + 32 + 16 * i, 10), "little")


def seen_mxcsr(m, v=0):
    return int.from_bytes(m.vm.read(block(v) + 0x100 + 24, 4), "little")
