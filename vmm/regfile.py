"""Every register of one vCPU's saved state (a VcpuState) by name: read, list, change. Pure, no KVM.

Classes and names (case-insensitive on input, canonical upper case on output):
  gpr      RAX..R15, RIP, RFLAGS                                   (struct kvm_regs)
  segment  CS DS ES FS GS SS TR LDTR, each .SELECTOR .BASE .LIMIT .ATTRIBUTES; the bare name is the
           selector. ATTRIBUTES packs the kvm_segment flags as the VMX access-rights field does
           (SDM vol. 3, 25.4.1): type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15, unusable 16
  dtable   GDTR.BASE GDTR.LIMIT IDTR.BASE IDTR.LIMIT                (struct kvm_sregs)
  control  CR0 CR2 CR3 CR4 CR8 EFER APIC_BASE                      (struct kvm_sregs)
  debug    DR0-DR3 DR6 DR7; DR4/DR5 are their aliases (CR4.DE=0)  (struct kvm_debugregs)
  xcr      XCR0 (and any other XCR the state holds)                (struct kvm_xcrs)
  msr      every MSR the state holds: MSR_<name> (vmm.regs names) or MSR 0x<index>; input also takes
           bare names (LSTAR, IA32_XSS) and indices (0xc0000080)
  xsave    the XSAVE registers of vmm.xsave (the single source of their names and places): FCW FSW
           FTW FOP FIP FDP MXCSR ST0-7 XMM0-15, YMM0H-15H, ZMM0H-15H, ZMM16-31, K0-7, PKRU,
           TILECFG.*, TMM0-7, BND*, raw components; XSTATE_BV and XCOMP_BV; and the composed
           registers YMM0-15, ZMM0-31 and TILECFG (64 bytes). Which exist follows the XSAVE layout.
  lapic    LAPIC.<register> (APIC ID, TPR, ... from the 1024-byte kvm_lapic_state, SDM vol. 3 11.4.1)
  vcpu     MP_STATE, TSC_KHZ, EVENTS (struct kvm_vcpu_events, raw)

A register the state does not hold (an MSR not saved, ZMM on a layout without AVX-512, the DRs of a
source without debug registers) raises RegFileError naming why.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from . import regs as regids
from .cstructs import GPR_NAMES, SEGMENTS
from .xsave import XFEATURE_NAMES, XsaveArea, XsaveError, XsaveLayout


class RegFileError(ValueError):
    """A register name this state does not have, or a value that does not fit it."""


@dataclass(frozen=True)
class Register:
    name: str   # canonical
    cls: str    # gpr, segment, dtable, control, debug, xcr, msr, xsave, lapic, vcpu
    size: int   # bytes
    as_bytes: bool = False  # value is bytes (tiles, raw components, events), not an int


SEG_NAMES = {s: ("LDTR" if s == "ldt" else s.upper()) for s in SEGMENTS}
SEG_FIELDS = ("SELECTOR", "BASE", "LIMIT", "ATTRIBUTES")
_SEG_SIZES = {"SELECTOR": 2, "BASE": 8, "LIMIT": 4, "ATTRIBUTES": 4}
CONTROL = ("CR0", "CR2", "CR3", "CR4", "CR8", "EFER", "APIC_BASE")
DEBUG = {"DR0": 0, "DR1": 1, "DR2": 2, "DR3": 3, "DR6": 4, "DR7": 5}  # qword index in kvm_debugregs
DEBUG_ALIASES = {"DR4": "DR6", "DR5": "DR7"}

# struct kvm_lapic_state: the xAPIC page, 16-byte aligned registers (SDM vol. 3, table 11-1)
LAPIC_REGS = {"ID": 0x20, "VERSION": 0x30, "TPR": 0x80, "APR": 0x90, "PPR": 0xA0, "LDR": 0xD0,
              "DFR": 0xE0, "SVR": 0xF0,
              **{f"ISR{i}": 0x100 + 0x10 * i for i in range(8)},
              **{f"TMR{i}": 0x180 + 0x10 * i for i in range(8)},
              **{f"IRR{i}": 0x200 + 0x10 * i for i in range(8)},
              "ESR": 0x280, "LVT_CMCI": 0x2F0, "ICR_LO": 0x300, "ICR_HI": 0x310, "LVT_TIMER": 0x320,
              "LVT_THERMAL": 0x330, "LVT_PMC": 0x340, "LVT_LINT0": 0x350, "LVT_LINT1": 0x360,
              "LVT_ERROR": 0x370, "TMICT": 0x380, "TMCCT": 0x390, "TDCR": 0x3E0}


def seg_attributes(seg) -> int:
    """The VMX access-rights encoding of a kvm_segment's flags (see the module docstring)."""
    return ((seg.type & 0xF) | (seg.s & 1) << 4 | (seg.dpl & 3) << 5 | (seg.present & 1) << 7
            | (seg.avl & 1) << 12 | (seg.l & 1) << 13 | (seg.db & 1) << 14 | (seg.g & 1) << 15
            | (seg.unusable & 1) << 16)


def _set_seg_attributes(seg, v):
    if v & ~0x1F0FF:
        raise RegFileError(f"segment attributes 0x{v:x} set bits outside 0x1f0ff")
    seg.type, seg.s, seg.dpl, seg.present = v & 0xF, v >> 4 & 1, v >> 5 & 3, v >> 7 & 1
    seg.avl, seg.l, seg.db, seg.g, seg.unusable = v >> 12 & 1, v >> 13 & 1, v >> 14 & 1, v >> 15 & 1, v >> 16 & 1


def msr_name(index: int) -> str:
    """'MSR_EFER' or 'MSR 0x...' (vmm.regs names)."""
    return regids.name_of(regids.msr(index))


def canonical(name: str) -> str:
    """The canonical spelling of a register name (upper case, aliases resolved: DR4 -> DR6,
    CS -> CS.SELECTOR, LDT -> LDTR, GDT.BASE -> GDTR.BASE)."""
    if not isinstance(name, str) or not name.strip():
        raise RegFileError("empty register name")
    key = name.strip().upper()
    key = DEBUG_ALIASES.get(key, key)
    if key in SEG_NAMES.values() or key == "LDT":
        key = ("LDTR" if key == "LDT" else key) + ".SELECTOR"
    if key.startswith("LDT."):
        key = "LDTR." + key[4:]
    return {"GDT.BASE": "GDTR.BASE", "GDT.LIMIT": "GDTR.LIMIT", "IDT.BASE": "IDTR.BASE",
            "IDT.LIMIT": "IDTR.LIMIT"}.get(key, key)


_XSAVE_NAME = re.compile(r"FCW|FSW|FTW|FOP|FIP|FDP|MXCSR|ST[0-7]|XMM([0-9]|[12][0-9]|3[01])|YMM([0-9]|1[0-5])H?"
                         r"|ZMM([0-9]|[12][0-9]|3[01])H?|K[0-7]|PKRU|TILECFG(\.[A-Z0-9_]+)?|TMM[0-7]"
                         r"|BND[0-3]|BNDCFGU|BNDSTATUS|XSTATE_BV|XCOMP_BV|"
                         + "|".join(re.escape(n.upper()) for n in XFEATURE_NAMES.values()))


def check_name(name: str) -> str:
    """Refuse, before any VM exists, a name no vCPU state can hold (MSR and KVM register names are
    vmm.regs's to judge). Returns the canonical name."""
    key = canonical(name)
    fixed = ({n.upper() for n in GPR_NAMES} | {"RIP", "RFLAGS"} | set(CONTROL) | set(DEBUG)
             | {f"{SEG_NAMES[g]}.{f}" for g in SEGMENTS for f in SEG_FIELDS}
             | {f"{t}.{f}" for t in ("GDTR", "IDTR") for f in ("BASE", "LIMIT")}
             | {f"LAPIC.{n}" for n in LAPIC_REGS} | {"MP_STATE", "TSC_KHZ", "EVENTS"})
    if key in fixed or re.fullmatch(r"XCR\d+", key) or _XSAVE_NAME.fullmatch(key):
        return key
    try:
        regids.parse_reg(name)
    except regids.RegError:
        import difflib
        close = difflib.get_close_matches(key, sorted(fixed), n=3, cutoff=0.6)
        raise RegFileError(f"unknown register {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                          else "")) from None
    return key


class RegisterFile:
    """The registers of one VcpuState. `layout` is the XSAVE layout of the buffer (the host's that
    saved it; default: from the state's guest CPUID, which KVM fills with the host's offsets)."""

    def __init__(self, state, layout: XsaveLayout | None = None):
        self.state = state
        self.layout = layout
        self.area = None
        self.xsave_problem = None
        if state.xsave:
            try:
                self.layout = layout or XsaveLayout.from_cpuid(state.cpuid)
                self.area = XsaveArea.parse(state.xsave, self.layout)
            except XsaveError as e:
                self.xsave_problem = str(e)
        else:
            self.xsave_problem = "the state has no XSAVE area"
        self._index = {r.name: r for r in self.registers(composites=True)}

    # -- the register list ----------------------------------------------------------------------
    def registers(self, composites=False) -> list[Register]:
        """Every register this state holds, in a fixed order. `composites` adds YMM/ZMM/TILECFG,
        which are made of the xsave registers (so a diff leaves them out)."""
        s = self.state
        out = [Register(n.upper(), "gpr", 8) for n in GPR_NAMES] + [Register("RIP", "gpr", 8),
                                                                     Register("RFLAGS", "gpr", 8)]
        for seg in SEGMENTS:
            out += [Register(f"{SEG_NAMES[seg]}.{f}", "segment", _SEG_SIZES[f]) for f in SEG_FIELDS]
        out += [Register(f"{t}.{f}", "dtable", 8 if f == "BASE" else 2)
                for t in ("GDTR", "IDTR") for f in ("BASE", "LIMIT")]
        out += [Register(n, "control", 8) for n in CONTROL]
        if s.debugregs:
            out += [Register(n, "debug", 8) for n in DEBUG]
        out += [Register(f"XCR{i}", "xcr", 8) for i in sorted(s.xcrs)]
        out += [Register(msr_name(i), "msr", 8) for i in s.msrs]
        if self.area is not None:
            out += [Register("XSTATE_BV", "xsave", 8), Register("XCOMP_BV", "xsave", 8)]
            for n in self.area.register_names():
                size = self.area.register_size(n)
                out.append(Register(n.upper(), "xsave", size, as_bytes=size > 64))
            if composites:
                out += self._composites()
        if s.lapic:
            out += [Register(f"LAPIC.{n}", "lapic", 4) for n in LAPIC_REGS]
        out += [Register("MP_STATE", "vcpu", 4), Register("TSC_KHZ", "vcpu", 4)]
        if s.events:
            out.append(Register("EVENTS", "vcpu", len(s.events), as_bytes=True))
        return out

    def _composites(self):
        names = set(self.area.register_names())
        out = []
        if "ymm0h" in names:
            out += [Register(f"YMM{i}", "xsave", 32) for i in range(16)]
        if "zmm0h" in names:
            out += [Register(f"ZMM{i}", "xsave", 64) for i in range(16)]
        if "tilecfg.palette" in names:
            out.append(Register("TILECFG", "xsave", 64, as_bytes=True))
        return out

    # -- lookup -----------------------------------------------------------------------------------
    def lookup(self, name: str) -> Register:
        """The register called `name` (any case, aliases, MSR names or indices)."""
        key = canonical(name)
        if key in self._index:
            return self._index[key]
        why = self._missing(key, name)
        if why:
            raise RegFileError(why)
        # an MSR by any name or index vmm.regs knows
        try:
            rid = regids.parse_reg(name)
        except regids.RegError as e:
            import difflib
            close = difflib.get_close_matches(key, list(self._index), n=3, cutoff=0.6)
            raise RegFileError(f"unknown register {name!r}" + (f"; did you mean {', '.join(close)}?" if close
                                                              else f" ({e})")) from None
        d = regids.decode(rid)
        if d.kind != "msr":
            raise RegFileError(f"{regids.name_of(rid)} is a KVM register; a saved state does not hold it "
                               "(read it from a running guest)")
        canon = msr_name(d.index)
        if canon in self._index:
            return self._index[canon]
        raise RegFileError(f"{canon} is not among the {len(self.state.msrs)} MSRs this state holds")

    def _missing(self, key, name):
        """Why a known register name is absent here (None for names this module does not know)."""
        if key in DEBUG:
            return f"{name}: this state has no debug registers (the source does not save them)"
        if key.startswith("LAPIC."):
            return (f"{name}: this state has no LAPIC registers" if not self.state.lapic
                    else f"{name}: unknown LAPIC register; known: {', '.join(LAPIC_REGS)}")
        if key.startswith("XCR") and key[3:].isdigit():
            return f"{name}: this state holds no XCR{key[3:]}"
        xs = ("ST", "XMM", "YMM", "ZMM", "K", "TMM", "TILECFG", "PKRU", "MXCSR", "FCW", "FSW", "FTW",
              "BND", "XSTATE_BV", "XCOMP_BV")
        if any(key.startswith(p) and (key[len(p):].rstrip("H").isdigit() or key[len(p):] in ("", ".")
                                       or key.startswith("TILECFG")) for p in xs):
            if self.area is None:
                return f"{name}: {self.xsave_problem}"
            return (f"{name} is not in this vCPU's XSAVE layout (components "
                    f"{', '.join(c.name for _, c in sorted(self.layout.components.items()))})")
        return None

    # -- values -------------------------------------------------------------------------------------
    def get(self, name: str):
        """The value of `name`: an int, or bytes for registers wider than 64 bytes (tiles, events)."""
        r = self.lookup(name)
        s = self.state
        n = r.name
        if r.cls == "gpr":
            return getattr(s.regs, n.lower())
        if r.cls == "segment":
            seg_name, field = n.split(".")
            seg = getattr(s.sregs, "ldt" if seg_name == "LDTR" else seg_name.lower())
            return seg_attributes(seg) if field == "ATTRIBUTES" else getattr(seg, field.lower())
        if r.cls == "dtable":
            t, field = n.split(".")
            return getattr(getattr(s.sregs, t[:3].lower()), field.lower())
        if r.cls == "control":
            return getattr(s.sregs, n.lower())
        if r.cls == "debug":
            return struct.unpack_from("<Q", s.debugregs, 8 * DEBUG[n])[0]
        if r.cls == "xcr":
            return s.xcrs[int(n[3:])]
        if r.cls == "msr":
            return s.msrs[regids.decode(regids.parse_reg(n)).index]
        if r.cls == "xsave":
            return self._get_xsave(n)
        if r.cls == "lapic":
            return struct.unpack_from("<I", s.lapic, LAPIC_REGS[n[6:]])[0]
        if n == "MP_STATE":
            return s.mp_state
        if n == "TSC_KHZ":
            return s.tsc_khz
        return bytes(s.events)

    def _get_xsave(self, n):
        a = self.area
        if n == "XSTATE_BV":
            return a.xstate_bv
        if n == "XCOMP_BV":
            return a.xcomp_bv
        if n == "TILECFG":
            return a.tilecfg.to_bytes()
        if n.startswith("YMM") and not n.endswith("H"):
            return a.ymm(int(n[3:]))
        if n.startswith("ZMM") and not n.endswith("H") and int(n[3:]) < 16:
            return a.zmm(int(n[3:]))
        return a.get(n.lower())

    def values(self, composites=False) -> dict:
        return {r.name: self.get(r.name) for r in self.registers(composites)}

    def set(self, name: str, value) -> str:
        """Change `name` in the state; returns the piece changed ('regs', 'sregs', 'debugregs',
        'xcrs', 'msrs', 'xsave', 'lapic') so a caller can write just that piece to a vCPU."""
        r = self.lookup(name)
        n = r.name
        s = self.state
        if isinstance(value, int) and not r.as_bytes:
            if not 0 <= value < 1 << (8 * r.size):
                raise RegFileError(f"{n} is {8 * r.size} bits; 0x{value:x} does not fit")
        if r.cls == "gpr":
            setattr(s.regs, n.lower(), value)
            return "regs"
        if r.cls == "segment":
            seg_name, field = n.split(".")
            seg = getattr(s.sregs, "ldt" if seg_name == "LDTR" else seg_name.lower())
            if field == "ATTRIBUTES":
                _set_seg_attributes(seg, value)
            else:
                setattr(seg, field.lower(), value)
            return "sregs"
        if r.cls == "dtable":
            t, field = n.split(".")
            setattr(getattr(s.sregs, t[:3].lower()), field.lower(), value)
            return "sregs"
        if r.cls == "control":
            setattr(s.sregs, n.lower(), value)
            return "sregs"
        if r.cls == "debug":
            buf = bytearray(s.debugregs)
            struct.pack_into("<Q", buf, 8 * DEBUG[n], value)
            s.debugregs = bytes(buf)
            return "debugregs"
        if r.cls == "xcr":
            if n == "XCR0":  # the architectural rules (as --xcr0) before KVM_SET_XCRS says EINVAL
                from .xsave_layout import check_xcr0_rules
                try:
                    check_xcr0_rules(value, "XCR0", s.cpuid.xcr0_supported() if s.cpuid is not None else 0)
                except XsaveError as e:
                    raise RegFileError(str(e)) from None
            s.xcrs[int(n[3:])] = value
            return "xcrs"
        if r.cls == "msr":
            s.msrs[regids.decode(regids.parse_reg(n)).index] = value
            return "msrs"
        if r.cls == "xsave":
            self._set_xsave(n, value)
            s.xsave = self.area.encode()
            return "xsave"
        if r.cls == "lapic":
            buf = bytearray(s.lapic)
            struct.pack_into("<I", buf, LAPIC_REGS[n[6:]], value)
            s.lapic = bytes(buf)
            return "lapic"
        raise RegFileError(f"{n} cannot be set by name")

    def _set_xsave(self, n, value):
        a = self.area
        try:
            if n in ("XSTATE_BV", "XCOMP_BV"):
                raise RegFileError(f"{n} follows the registers set; it is not set by name")
            if n == "TILECFG":
                from .xsave import TileConfig
                a.set_tilecfg(TileConfig.from_bytes(_as_bytes(value, 64)))
            elif n.startswith("YMM") and not n.endswith("H"):
                a.set_ymm(int(n[3:]), value)
            elif n.startswith("ZMM") and not n.endswith("H") and int(n[3:]) < 16:
                a.set_zmm(int(n[3:]), value)
            else:
                size = a.register_size(n.lower())
                a.set(n.lower(), _as_bytes(value, size) if size > 64 else value)
        except XsaveError as e:
            raise RegFileError(str(e)) from None


def _as_bytes(value, size):
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not 0 <= value < 1 << (8 * size):
        raise RegFileError(f"0x{value:x} does not fit in {size} bytes")
    return value.to_bytes(size, "little")


def format_value(value, size) -> str:
    """Up to 8 bytes as 0x...; wider values (bytes are little-endian integers) as zero-padded
    qwords, most significant first. `vmm xsave`, `vmm reg`, `vmm inspect` and `vmm diff` print so."""
    if isinstance(value, (bytes, bytearray)):
        value = int.from_bytes(value, "little")
    if size <= 8:
        return f"0x{value:x}"
    digits = f"{value:0{2 * size}x}"
    head = len(digits) % 16
    chunks = ([digits[:head]] if head else []) + [digits[i:i + 16] for i in range(head, len(digits), 16)]
    return " ".join(chunks)


def json_value(value) -> str:
    """'0x...' for integers, plain hex in memory order for bytes (as vmm.xsave's to_json)."""
    return bytes(value).hex() if isinstance(value, (bytes, bytearray)) else f"0x{value:x}"
