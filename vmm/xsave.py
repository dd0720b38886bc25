"""XSAVE layout (CPUID leaf 0xD) and register-level views of XSAVE buffers.

Pure and offline. The buffers are in the standard (non-compacted) format, the
one KVM_GET_XSAVE/KVM_GET_XSAVE2 return and KVM_SET_XSAVE accepts (SDM vol. 1,
chapter 13):

  0..511    legacy region (FXSAVE image): FCW, FSW, FTW, FOP, FIP, FDP, MXCSR,
            MXCSR_MASK, ST0-7, XMM0-15
  512..575  XSAVE header: XSTATE_BV, XCOMP_BV, 48 reserved bytes (must be 0)
  576..     components i >= 2 at CPUID.(0DH,i).EBX, size CPUID.(0DH,i).EAX

A component whose XSTATE_BV bit is clear is in its initial configuration: its
bytes in the buffer are stale and are never read (MXCSR is live when either
SSE or AVX is set, as XSAVE/XRSTOR treat it).
"""

from __future__ import annotations

from dataclasses import dataclass

from .xsave_layout import (  # noqa: F401  (re-exported: vmm.xsave is the whole XSAVE API)
    APX, ARCH_SIZES, AVX, BNDCSR, BNDREGS, CET_S, CET_U, HDC, HEADER_OFFSET, HEADER_SIZE, HI16_ZMM, HWP,
    KVM_XSAVE_SIZE, LBR, LEGACY_SIZE, OPMASK, PASID, PKRU, PT, SSE, SSE_COMPONENT, UINTR, X87, X87_COMPONENT,
    XFEATURE_NAMES, XSAVE_MIN_SIZE, XTILECFG, XTILEDATA, XsaveComponent, XsaveError, XsaveLayout, ZMM_HI256, bits_of,
    check_xcr0_rules, component_name, describe, kvm_xsave_size, mask_names, parse_mask, xcr0_violations)

__all__ = [
    "XsaveError",
    "XFEATURE_NAMES",
    "component_name",
    "XsaveComponent",
    "XsaveLayout",
    "TileConfig",
    "XsaveArea",
    "kvm_xsave_size",
    "validate_for_set",
    "mask_names",
    "parse_mask",
    "xcr0_violations",
    "check_xcr0_rules",
]

XSTATE_BV_OFFSET = 512
XCOMP_BV_OFFSET = 520
RESERVED_HEADER = (528, 576)
XCOMP_BV_COMPACTED = 1 << 63

FCW_INIT = 0x037F
MXCSR_INIT = 0x1F80
MXCSR_PRESENT = (1 << SSE) | (1 << AVX)  # XSAVE writes MXCSR if RFBM[1] or RFBM[2]


@dataclass(frozen=True)
class TileConfig:
    """The 64-byte XTILECFG component (what LDTILECFG loads)."""

    palette: int = 0
    start_row: int = 0
    colsb: tuple[int, ...] = (0,) * 16  # bytes per row of each tile
    rows: tuple[int, ...] = (0,) * 16

    def __post_init__(self):
        if len(self.colsb) != 16 or len(self.rows) != 16:
            raise XsaveError("TileConfig needs 16 colsb and 16 rows entries")

    @classmethod
    def from_bytes(cls, b: bytes) -> "TileConfig":
        if len(b) != 64:
            raise XsaveError(f"XTILECFG is 64 bytes, got {len(b)}")
        colsb = tuple(int.from_bytes(b[16 + 2 * i:18 + 2 * i], "little") for i in range(16))
        return cls(b[0], b[1], colsb, tuple(b[48:64]))

    def to_bytes(self) -> bytes:
        out = bytearray(64)  # bytes 2..15 are reserved and written as zero
        out[0], out[1] = self.palette, self.start_row
        for i, c in enumerate(self.colsb):
            out[16 + 2 * i:18 + 2 * i] = c.to_bytes(2, "little")
        out[48:64] = bytes(self.rows)
        return bytes(out)


@dataclass(frozen=True)
class _Reg:
    """One register inside the buffer."""

    name: str
    component: int
    offset: int  # absolute for x87/SSE (legacy region), else relative to the component
    size: int
    as_bytes: bool = False
    init: int = 0
    present: int = 0  # XSTATE_BV bits that make it live; defaults to the component's bit

    @property
    def live_mask(self) -> int:
        return self.present or (1 << self.component)


def _registers_of(comp: XsaveComponent) -> list[_Reg]:
    i = comp.index
    if i == X87:
        return ([_Reg("fcw", i, 0, 2, init=FCW_INIT), _Reg("fsw", i, 2, 2),
                 _Reg("ftw", i, 4, 1), _Reg("fop", i, 6, 2), _Reg("fip", i, 8, 8),
                 _Reg("fdp", i, 16, 8)]
                + [_Reg(f"st{n}", i, 32 + 16 * n, 10) for n in range(8)])
    if i == SSE:
        return ([_Reg("mxcsr", i, 24, 4, init=MXCSR_INIT, present=MXCSR_PRESENT)]
                + [_Reg(f"xmm{n}", i, 160 + 16 * n, 16) for n in range(16)])
    fixed = {
        AVX: lambda: [_Reg(f"ymm{n}h", i, 16 * n, 16) for n in range(16)],
        BNDREGS: lambda: [_Reg(f"bnd{n}", i, 16 * n, 16) for n in range(4)],
        BNDCSR: lambda: [_Reg("bndcfgu", i, 0, 8), _Reg("bndstatus", i, 8, 8)],
        OPMASK: lambda: [_Reg(f"k{n}", i, 8 * n, 8) for n in range(8)],
        ZMM_HI256: lambda: [_Reg(f"zmm{n}h", i, 32 * n, 32) for n in range(16)],
        HI16_ZMM: lambda: [_Reg(f"zmm{16 + n}", i, 64 * n, 64) for n in range(16)],
        PKRU: lambda: [_Reg("pkru", i, 0, 4)],
        XTILECFG: lambda: ([_Reg("tilecfg.palette", i, 0, 1), _Reg("tilecfg.start_row", i, 1, 1)]
                           + [_Reg(f"tilecfg.colsb{n}", i, 16 + 2 * n, 2) for n in range(16)]
                           + [_Reg(f"tilecfg.rows{n}", i, 48 + n, 1) for n in range(16)]),
        XTILEDATA: lambda: [_Reg(f"tmm{n}", i, 1024 * n, 1024, as_bytes=True) for n in range(8)],
    }
    regs = fixed[i]() if i in fixed else []
    if not regs or max(r.offset + r.size for r in regs) > comp.size:
        # Unknown component, or a size that does not match the SDM's: raw bytes.
        return [_Reg(comp.name, i, 0, comp.size, as_bytes=True)]
    return regs


class XsaveArea:
    """A standard-format XSAVE buffer with register-level accessors.

    Holds the raw bytes; encode() returns them unchanged, so
    ``XsaveArea.parse(b, layout).encode() == b`` for every buffer parse accepts.
    Readers honour XSTATE_BV (a clear bit reads as the init value); setters
    first write the component's init value if its bit was clear, then set the bit.
    """

    def __init__(self, raw: bytearray, layout: XsaveLayout):
        self.raw = raw
        self.layout = layout
        self._regs: dict[str, _Reg] = {}
        for _, comp in sorted(layout.components.items()):
            if not comp.supervisor:
                for r in _registers_of(comp):
                    self._regs[r.name] = r

    # -- construction -----------------------------------------------------

    @classmethod
    def parse(cls, buf: bytes | bytearray | memoryview, layout: XsaveLayout) -> "XsaveArea":
        raw = bytearray(buf)
        if len(raw) < XSAVE_MIN_SIZE:
            raise XsaveError(f"XSAVE buffer is {len(raw)} bytes; the standard format needs at "
                             f"least {XSAVE_MIN_SIZE} (512 legacy + 64 header)")
        area = cls(raw, layout)
        if area.xcomp_bv & XCOMP_BV_COMPACTED:
            raise XsaveError(f"XCOMP_BV {area.xcomp_bv:#x} has bit 63 set: this is the compacted "
                             "format (XSAVEC/XSAVES); KVM_GET_XSAVE returns the standard format")
        bv = area.xstate_bv
        bad = [i for i in bits_of(bv)
               if i not in layout.components or layout.components[i].supervisor]
        if bad:
            raise XsaveError(f"XSTATE_BV {bv:#x} sets components with no standard-format location "
                             f"in this layout: {', '.join(describe(i) for i in bad)}")
        need = layout.standard_size(bv)
        if len(raw) < need:
            last = max((c for i, c in layout.components.items() if i >= 2 and bv >> i & 1),
                       key=lambda c: c.end)
            raise XsaveError(f"XSAVE buffer is {len(raw)} bytes but XSTATE_BV {bv:#x} includes "
                             f"{describe(last.index)} at {last.offset}+{last.size}: "
                             f"needs {need} bytes")
        return area

    @classmethod
    def blank(cls, layout: XsaveLayout, size: int | None = None) -> "XsaveArea":
        """An all-init buffer (XSTATE_BV = 0) of ``size`` bytes (default: kvm_xsave_size)."""
        size = kvm_xsave_size(layout) if size is None else size
        if size < XSAVE_MIN_SIZE:
            raise XsaveError(f"an XSAVE buffer needs at least {XSAVE_MIN_SIZE} bytes, not {size}")
        area = cls(bytearray(size), layout)
        # What XSAVE writes for init x87/SSE state, so the bytes look familiar.
        area._write(0, 2, FCW_INIT)
        area._write(24, 4, MXCSR_INIT)
        return area

    def encode(self) -> bytes:
        return bytes(self.raw)

    def copy(self) -> "XsaveArea":
        return XsaveArea(bytearray(self.raw), self.layout)

    # -- raw access ---------------------------------------------------------

    def _read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.raw[offset:offset + size], "little")

    def _write(self, offset: int, size: int, value: int) -> None:
        if offset + size > len(self.raw):
            raise XsaveError(f"XSAVE buffer is {len(self.raw)} bytes; writing {size} bytes at "
                             f"{offset} needs {offset + size}")
        self.raw[offset:offset + size] = value.to_bytes(size, "little")

    def _abs(self, r: _Reg) -> int:
        if r.component <= SSE:
            return r.offset
        return self.layout.components[r.component].offset + r.offset

    @property
    def xstate_bv(self) -> int:
        return self._read(XSTATE_BV_OFFSET, 8)

    @xstate_bv.setter
    def xstate_bv(self, value: int) -> None:
        self._write(XSTATE_BV_OFFSET, 8, value)

    @property
    def xcomp_bv(self) -> int:
        return self._read(XCOMP_BV_OFFSET, 8)

    def components_present(self) -> list[XsaveComponent]:
        """Components whose XSTATE_BV bit is set (the others are in their init state)."""
        bv = self.xstate_bv
        return [c for i, c in sorted(self.layout.components.items()) if bv >> i & 1]

    def components_outside(self, xcr0: int) -> list[XsaveComponent]:
        """Live components that XCR0 does not enable.

        Should be empty; it is not on hosts that fail to enforce the guest's
        XCR0 (see notes/this-host.md), which is worth reporting. Parse such a
        buffer with the host's layout, not the guest's.
        """
        return [c for c in self.components_present() if not xcr0 >> c.index & 1]

    # -- registers by name ----------------------------------------------------

    def _reg(self, name: str) -> _Reg:
        try:
            return self._regs[name]
        except KeyError:
            raise XsaveError(f"register {name!r} is not in this XSAVE layout "
                             f"(XCR0 {self.layout.xcr0_supported:#x})") from None

    def register_names(self) -> list[str]:
        return list(self._regs)

    def register_component(self, name: str) -> int:
        """The state-component index holding register ``name``."""
        return self._reg(name).component

    def register_size(self, name: str) -> int:
        """Bytes of register ``name``."""
        return self._reg(name).size

    def get(self, name: str) -> int | bytes:
        """A register's architectural value: the init value when its component is not in XSTATE_BV."""
        r = self._reg(name)
        if not self.xstate_bv & r.live_mask:
            return bytes(r.size) if r.as_bytes else r.init
        off = self._abs(r)
        return bytes(self.raw[off:off + r.size]) if r.as_bytes else self._read(off, r.size)

    def set(self, name: str, value: int | bytes) -> None:
        """Write a register and set its component's XSTATE_BV bit."""
        r = self._reg(name)
        if r.as_bytes:
            value = bytes(value)
            if len(value) != r.size:
                raise XsaveError(f"{name} is {r.size} bytes, got {len(value)}")
            value = int.from_bytes(value, "little")
        elif not 0 <= value < 1 << (8 * r.size):
            raise XsaveError(f"{name} is {8 * r.size} bits; {value:#x} does not fit")
        self._materialize(r.component)
        self._write(self._abs(r), r.size, value)

    def _materialize(self, index: int) -> None:
        """Make component ``index`` live: write its init value first if its bit was clear."""
        bv = self.xstate_bv
        if bv >> index & 1:
            return
        comp = self.layout.components[index]
        if index <= SSE:
            # Only the registers: the legacy region's other bytes are not part of the state.
            for r in self._regs.values():
                if r.component == index and r.name != "mxcsr":
                    self._write(self._abs(r), r.size, r.init)
        else:
            self._write(comp.offset, comp.size, 0)  # every init state here is all zeros
        if index in (SSE, AVX) and not bv & MXCSR_PRESENT:
            self._write(24, 4, MXCSR_INIT)
        self.xstate_bv = bv | comp.mask

    def registers(self, include_zero: bool = False) -> dict[str, int | bytes]:
        """Register-level view: name -> int (little-endian) or bytes (tiles, raw components).

        By default only live components, and only registers that are not zero.
        include_zero=True lists every register of the layout's user components,
        with init values for components not in XSTATE_BV. MXCSR_MASK is left
        out: it describes the CPU, it is not state.
        """
        bv = self.xstate_bv
        out: dict[str, int | bytes] = {}
        for name, r in self._regs.items():
            if not include_zero and not bv & r.live_mask:
                continue
            v = self.get(name)
            nonzero = any(v) if isinstance(v, bytes) else v != 0
            if include_zero or nonzero:
                out[name] = v
        return out

    def diff(self, other: "XsaveArea") -> list[tuple[str, int | bytes | None, int | bytes | None]]:
        """(name, self value, other value) for XSTATE_BV/XCOMP_BV and each differing register.

        Compares architectural values, so buffers from different layouts (AMD
        vs Intel offsets) compare by register; None marks a register only one
        layout has.
        """
        out: list[tuple[str, int | bytes | None, int | bytes | None]] = []
        for name in ("xstate_bv", "xcomp_bv"):
            a, b = getattr(self, name), getattr(other, name)
            if a != b:
                out.append((name, a, b))
        ra, rb = self.registers(include_zero=True), other.registers(include_zero=True)
        for name in list(ra) + [n for n in rb if n not in ra]:
            a, b = ra.get(name), rb.get(name)
            if a == b:
                continue
            # A register one layout lacks matches the other side's init value:
            # e.g. AMX tiles in init state on Intel versus no AMX on AMD.
            if a is None and b == other._init_value(name):
                continue
            if b is None and a == self._init_value(name):
                continue
            out.append((name, a, b))
        return out

    def _init_value(self, name: str) -> int | bytes:
        r = self._regs[name]
        return bytes(r.size) if r.as_bytes else r.init

    def to_json(self) -> dict:
        """Hex strings: "0x..." for integers, plain hex in memory order for byte registers."""
        return {
            "size": len(self.raw),
            "xstate_bv": f"{self.xstate_bv:#x}",
            "xcomp_bv": f"{self.xcomp_bv:#x}",
            "components": [c.name for c in self.components_present()],
            "registers": {n: v.hex() if isinstance(v, bytes) else f"{v:#x}"
                          for n, v in self.registers().items()},
        }

    # -- named accessors --------------------------------------------------------

    fcw = property(lambda self: self.get("fcw"))
    fsw = property(lambda self: self.get("fsw"))
    ftw = property(lambda self: self.get("ftw"), doc="Abridged tag word: bit n set = ST(n) valid.")
    fop = property(lambda self: self.get("fop"))
    fip = property(lambda self: self.get("fip"))
    fdp = property(lambda self: self.get("fdp"))
    mxcsr = property(lambda self: self.get("mxcsr"))
    pkru = property(lambda self: self.get("pkru"))

    @property
    def mxcsr_mask(self) -> int:
        """MXCSR_MASK as stored (0 means the default 0xFFBF); not state, so never init-masked."""
        return self._read(28, 4)

    def st(self, i: int) -> int:
        """ST(i)/MMi as an 80-bit integer (the low 10 bytes of its 16-byte slot)."""
        return self.get(f"st{_check(i, 8, 'st')}")

    def xmm(self, i: int) -> int:
        return self.get(f"xmm{_check(i, 16, 'xmm')}")

    def ymm(self, i: int) -> int:
        """XMMi | YMM_Hi128[i] << 128."""
        _check(i, 16, "ymm")
        return self.get(f"xmm{i}") | self.get(f"ymm{i}h") << 128

    def zmm(self, i: int) -> int:
        """ZMM0-15: YMMi | ZMM_Hi256[i] << 256; ZMM16-31 from Hi16_ZMM."""
        _check(i, 32, "zmm")
        if i >= 16:
            return self.get(f"zmm{i}")
        return self.ymm(i) | self.get(f"zmm{i}h") << 256

    def k(self, i: int) -> int:
        return self.get(f"k{_check(i, 8, 'k')}")

    @property
    def tilecfg(self) -> TileConfig:
        return TileConfig.from_bytes(self._component_bytes(XTILECFG, 64))

    def tmm(self, i: int) -> bytes:
        """TMMi: 16 rows of 64 bytes."""
        return self.get(f"tmm{_check(i, 8, 'tmm')}")

    def _component_bytes(self, index: int, size: int) -> bytes:
        comp = self.layout.components.get(index)
        if comp is None:
            raise XsaveError(f"{describe(index)} is not in this XSAVE layout")
        if not self.xstate_bv >> index & 1:
            return bytes(size)
        return bytes(self.raw[comp.offset:comp.offset + size])

    def set_mxcsr(self, value: int) -> None:
        self.set("mxcsr", value)

    def set_xmm(self, i: int, value: int) -> None:
        self.set(f"xmm{_check(i, 16, 'xmm')}", value)

    def set_ymm(self, i: int, value: int) -> None:
        _check(i, 16, "ymm")
        _fits(value, 256, f"ymm{i}")
        self.set(f"xmm{i}", value & (1 << 128) - 1)
        self.set(f"ymm{i}h", value >> 128)

    def set_zmm(self, i: int, value: int) -> None:
        _check(i, 32, "zmm")
        _fits(value, 512, f"zmm{i}")
        if i >= 16:
            self.set(f"zmm{i}", value)
        else:
            self.set_ymm(i, value & (1 << 256) - 1)
            self.set(f"zmm{i}h", value >> 256)

    def set_k(self, i: int, value: int) -> None:
        self.set(f"k{_check(i, 8, 'k')}", value)

    def set_pkru(self, value: int) -> None:
        self.set("pkru", value)

    def set_tilecfg(self, cfg: TileConfig) -> None:
        comp = self.layout.components.get(XTILECFG)
        if comp is None:
            raise XsaveError(f"{describe(XTILECFG)} is not in this XSAVE layout")
        self._materialize(XTILECFG)
        self._write(comp.offset, 64, int.from_bytes(cfg.to_bytes(), "little"))

    def set_tmm(self, i: int, data: bytes) -> None:
        self.set(f"tmm{_check(i, 8, 'tmm')}", data)


def _check(i: int, n: int, what: str) -> int:
    if not 0 <= i < n:
        raise XsaveError(f"{what}{i}: index out of range 0..{n - 1}")
    return i


def _fits(value: int, bits: int, name: str) -> None:
    if not 0 <= value < 1 << bits:
        raise XsaveError(f"{name} is {bits} bits; {value:#x} does not fit")


def validate_for_set(buf: bytes | bytearray | memoryview, layout: XsaveLayout,
                     supported_xcr0: int, *, expected_size: int | None = None,
                     mxcsr_feature_mask: int = 0xFFFF) -> None:
    """The checks to make before KVM_SET_XSAVE; raises XsaveError listing every problem.

    Mirrors the kernel's validate_user_xstate_header()/copy_uabi_to_xstate():
    the size of the ioctl buffer (default kvm_xsave_size(layout, supported_xcr0),
    pass KVM_CAP_XSAVE2's value when known), XCOMP_BV = 0 (standard format only),
    reserved header bytes 528..575 zero, XSTATE_BV within supported_xcr0, and no
    reserved MXCSR bits. Kernels differ on when MXCSR is checked (x87/SSE/AVX in
    XSTATE_BV, or SSE/AVX merely permitted for the guest), so it is always checked.
    """
    buf = bytes(buf)
    expected = kvm_xsave_size(layout, supported_xcr0) if expected_size is None else expected_size
    problems = []
    if len(buf) != expected:
        problems.append(f"buffer is {len(buf)} bytes; KVM_SET_XSAVE expects {expected}")
    if len(buf) >= XSAVE_MIN_SIZE:
        xstate_bv = int.from_bytes(buf[512:520], "little")
        xcomp_bv = int.from_bytes(buf[520:528], "little")
        if xcomp_bv:
            problems.append(f"XCOMP_BV is {xcomp_bv:#x}; KVM_SET_XSAVE takes the standard "
                            "format only, XCOMP_BV must be 0")
        lo, hi = RESERVED_HEADER
        nonzero = [o for o in range(lo, hi) if buf[o]]
        if nonzero:
            shown = ", ".join(str(o) for o in nonzero[:8]) + (" ..." if len(nonzero) > 8 else "")
            problems.append(f"reserved XSAVE header bytes {lo}..{hi - 1} must be zero; "
                            f"nonzero at {shown}")
        extra = xstate_bv & ~supported_xcr0
        if extra:
            problems.append(f"XSTATE_BV {xstate_bv:#x} has components outside supported XCR0 "
                            f"{supported_xcr0:#x}: {', '.join(describe(i) for i in bits_of(extra))}")
        mxcsr = int.from_bytes(buf[24:28], "little")
        if mxcsr & ~mxcsr_feature_mask:
            problems.append(f"MXCSR {mxcsr:#x} sets reserved bits {mxcsr & ~mxcsr_feature_mask:#x} "
                            f"(feature mask {mxcsr_feature_mask:#x})")
    if problems:
        raise XsaveError("XSAVE buffer rejected for KVM_SET_XSAVE:\n"
                         + "\n".join(f"  - {p}" for p in problems), problems)
