"""XSAVE layout: where each state component lives, discovered from CPUID leaf 0xD, and the sizes
that follow (standard format, compacted format, the KVM_GET/SET_XSAVE buffer).

Pure and offline, and small: what building a guest CPUID needs (vmm.cpuid.guest_for_xcr0), without
the register-level views of XSAVE buffers (vmm.xsave, which re-exports everything here). SDM vol. 1,
chapter 13; CPUID leaf 0xD in SDM vol. 2A.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterator

from .records import FrozenRecord, Record

if TYPE_CHECKING:
    from .cpuid import CpuidTable

# State-component indices (SDM vol. 1, 13.1; Linux enum xfeature).
X87, SSE, AVX, BNDREGS, BNDCSR, OPMASK, ZMM_HI256, HI16_ZMM, PT, PKRU = range(10)
PASID, CET_U, CET_S, HDC, UINTR, LBR, HWP, XTILECFG, XTILEDATA, APX = range(10, 20)

XFEATURE_NAMES: dict[int, str] = {
    X87: "x87", SSE: "SSE", AVX: "AVX", BNDREGS: "BNDREGS", BNDCSR: "BNDCSR",
    OPMASK: "opmask", ZMM_HI256: "ZMM_Hi256", HI16_ZMM: "Hi16_ZMM", PT: "PT",
    PKRU: "PKRU", PASID: "PASID", CET_U: "CET_U", CET_S: "CET_S", HDC: "HDC",
    UINTR: "UINTR", LBR: "LBR", HWP: "HWP", XTILECFG: "XTILECFG",
    XTILEDATA: "XTILEDATA", APX: "APX",
}

LEGACY_SIZE = 512
HEADER_OFFSET = 512
HEADER_SIZE = 64
XSAVE_MIN_SIZE = LEGACY_SIZE + HEADER_SIZE  # 576: smallest standard-format area
KVM_XSAVE_SIZE = 4096  # sizeof(struct kvm_xsave); KVM_CAP_XSAVE2 may ask for more



class XsaveError(ValueError):
    """An XSAVE layout or buffer is unusable; ``problems`` lists each reason."""

    def __init__(self, message: str, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


def component_name(index: int) -> str:
    return XFEATURE_NAMES.get(index, f"component{index}")


def mask_names(mask: int) -> str:
    """'x87 SSE AVX' for 0x7: the component names of an XCR0/XSTATE_BV value, lowest bit first."""
    return " ".join(component_name(i) for i in bits_of(mask)) or "none"


def parse_mask(text: str) -> int:
    """An XCR0-style mask from a number ('0x7', '7') or component names ('x87|SSE|AVX',
    'x87,sse,avx'; the names of XFEATURE_NAMES, any case)."""
    text = text.strip()
    try:
        value = int(text, 0)
    except ValueError:
        pass
    else:
        if not 0 <= value < 1 << 64:
            raise XsaveError(f"XSAVE feature mask {text!r} does not fit in 64 bits")
        return value
    by_name = {n.lower(): i for i, n in XFEATURE_NAMES.items()}
    value = 0
    for word in text.replace("|", ",").replace("+", ",").split(","):
        word = word.strip()
        if word.lower() not in by_name:
            raise XsaveError(f"unknown XSAVE component {word!r} in {text!r}: give a number such as "
                             f"0x7 or names from {', '.join(XFEATURE_NAMES.values())}")
        value |= 1 << by_name[word.lower()]
    return value


# Components managed by IA32_XSS (supervisor state): never valid in XCR0 (SDM vol. 1, 13.2-13.3).
SUPERVISOR_COMPONENTS = (PT, PASID, CET_U, CET_S, HDC, UINTR, LBR, HWP)


def xcr0_violations(mask: int) -> list[str]:
    """The architectural rules an XCR0 value breaks, one sentence each (empty: none).

    The rules XSETBV enforces with #GP and KVM with EINVAL at KVM_SET_XCRS (SDM vol. 1, 13.3
    "Enabling the XSAVE feature set and XSAVE-enabled features"; SDM vol. 2B XSETBV; Linux
    arch/x86/kvm/x86.c __kvm_set_xcr): x87 is always set; AVX needs SSE; BNDREGS and BNDCSR
    together; opmask, ZMM_Hi256 and Hi16_ZMM together and with AVX; XTILECFG with XTILEDATA;
    supervisor components (IA32_XSS) and bit 63 are never in XCR0. Pure: no CPU or KVM involved."""
    def has(*bits):
        return [b for b in bits if mask >> b & 1]
    out = []
    if not has(X87):
        out.append("x87 (bit 0) must always be set")
    if has(AVX) and not has(SSE):
        out.append("AVX (bit 2) needs SSE (bit 1)")
    if len(has(BNDREGS, BNDCSR)) == 1:
        out.append("BNDREGS (bit 3) and BNDCSR (bit 4) go together")
    avx512 = has(OPMASK, ZMM_HI256, HI16_ZMM)
    if avx512 and len(avx512) != 3:
        out.append("opmask, ZMM_Hi256 and Hi16_ZMM (bits 5-7) go together; "
                   f"{mask_names(sum(1 << b for b in avx512))} alone is invalid")
    if avx512 and not has(AVX):
        out.append("opmask/ZMM_Hi256/Hi16_ZMM (bits 5-7) need AVX (bit 2)")
    if len(has(XTILECFG, XTILEDATA)) == 1:
        out.append("XTILECFG (bit 17) and XTILEDATA (bit 18) go together")
    sup = has(*SUPERVISOR_COMPONENTS)
    if sup:
        out.append(f"{mask_names(sum(1 << b for b in sup))}: supervisor state (IA32_XSS), never in XCR0")
    if mask >> 63 & 1:
        out.append("bit 63 is reserved")
    return out


def check_xcr0_rules(mask: int, what: str = "XCR0", supported: int = 0) -> None:
    """Raise XsaveError naming every rule `mask` breaks (see xcr0_violations) and, with `supported`
    (the guest CPUID's leaf 0xD XCR0 bits), every component outside it, which KVM_SET_XCRS also
    refuses (arch/x86/kvm/x86.c __kvm_set_xcr: guest_supported_xcr0)."""
    problems = xcr0_violations(mask)
    if supported and mask & ~supported:
        problems.append(f"{mask_names(mask & ~supported)} not in the guest CPUID's XCR0 {supported:#x}")
    if problems:
        raise XsaveError(f"{what} {mask:#x} ({mask_names(mask)}) is not a valid XCR0: " + "; ".join(problems),
                         problems)


def describe(index: int) -> str:
    return f"{component_name(index)} ({index})"


def bits_of(mask: int) -> Iterator[int]:
    """The set bit positions of a feature mask, lowest first."""
    i = 0
    while mask:
        if mask & 1:
            yield i
        mask >>= 1
        i += 1


@dataclass(frozen=True, init=False, repr=False, eq=False)  # cheap to build: vmm/records.py
class XsaveComponent(FrozenRecord):
    """One XSAVE state component as CPUID.(0DH,index) describes it.

    offset is the standard-format offset (0 for supervisor components, which
    have none). x87 and SSE are given fixed spans inside the legacy region:
    x87 = 0..159 (FCW..FDP and ST0-7; bytes 24..31 hold MXCSR, which belongs to
    SSE), SSE = 160..415 (XMM0-15) plus MXCSR/MXCSR_MASK at 24.
    """

    index: int
    name: str
    size: int
    offset: int
    supervisor: bool = False
    align64: bool = False  # ECX[1]: 64-byte aligned in the compacted format
    xfd: bool = False  # ECX[2]: XFD can make this component fault

    def __init__(self, index, name, size, offset, supervisor=False, align64=False, xfd=False):
        for k, v in (("index", index), ("name", name), ("size", size), ("offset", offset),
                     ("supervisor", supervisor), ("align64", align64), ("xfd", xfd)):
            object.__setattr__(self, k, v)  # frozen

    @property
    def mask(self) -> int:
        return 1 << self.index

    @property
    def end(self) -> int:
        return self.offset + self.size


X87_COMPONENT = XsaveComponent(X87, "x87", 160, 0)
SSE_COMPONENT = XsaveComponent(SSE, "SSE", 256, 160)


# Architectural sizes of the user components (SDM vol. 1, 13.2-13.5): what a dump that reads a
# sub-leaf's EAX as zero but keeps its offset lets us infer. Offsets are vendor-specific (AMD puts
# opmask at 832, Intel at 1088) and are never guessed, except AVX, whose 576 is architectural.
ARCH_SIZES = {AVX: 256, BNDREGS: 64, BNDCSR: 16, OPMASK: 64, ZMM_HI256: 512, HI16_ZMM: 1024,
              PKRU: 8, XTILECFG: 64, XTILEDATA: 8192, APX: 128}


@dataclass(init=False, repr=False, eq=False)
class XsaveLayout(Record):
    """Where each XSAVE component lives; built from CPUID leaf 0xD.

    ``unknown`` maps a supported component whose sub-leaf is missing or zero (imperfect dumps) to
    why; ``warnings`` says what was inferred or left unknown. The layout of everything else is
    still known; a size or offset that needs an unknown user component raises XsaveError naming it.
    """

    components: dict[int, XsaveComponent]
    xcr0_supported: int
    xss_supported: int = 0
    unknown: dict = field(default_factory=dict, compare=False)
    warnings: list = field(default_factory=list, compare=False)

    def __init__(self, components, xcr0_supported, xss_supported=0, unknown=None, warnings=None):
        """`unknown` and `warnings` left None are fresh empty ones."""
        self.components, self.xcr0_supported, self.xss_supported = components, xcr0_supported, xss_supported
        self.unknown = {} if unknown is None else unknown
        self.warnings = [] if warnings is None else warnings

    @classmethod
    def from_cpuid(cls, table: CpuidTable) -> "XsaveLayout":
        """The layout CPUID leaf 0xD enumerates. Raises XsaveError only without leaf 0xD; missing or
        zero sub-leaves become warnings (supervisor ones never matter to the standard format)."""
        xcr0, xss = table.xcr0_supported(), table.xss_supported()
        if not xcr0:
            raise XsaveError("CPUID leaf 0xD is missing: XSAVE is not enumerated")
        comps = {X87: X87_COMPONENT, SSE: SSE_COMPONENT}
        unknown, warnings = {}, []
        for i in bits_of((xcr0 | xss) & ~0b11):
            e = table.entry(0xD, i)
            sup = not xcr0 >> i & 1
            leaf = f"CPUID.(0DH,{i:#x})"
            kind = "supervisor" if sup else "user"
            if e is not None and e.eax:
                comps[i] = XsaveComponent(i, component_name(i), e.eax, e.ebx,
                                          supervisor=bool(e.ecx & 1), align64=bool(e.ecx & 2),
                                          xfd=bool(e.ecx & 4))
                continue
            what = "missing" if e is None else "zero"
            if not sup and i == AVX:
                comps[i] = XsaveComponent(i, component_name(i), 256, 576)
                warnings.append(f"{leaf} for {kind} component {describe(i)} is {what}: "
                                "inferred 256@576 (architectural)")
            elif not sup and e is not None and e.ebx >= XSAVE_MIN_SIZE and i in ARCH_SIZES:
                comps[i] = XsaveComponent(i, component_name(i), ARCH_SIZES[i], e.ebx,
                                          align64=bool(e.ecx & 2), xfd=bool(e.ecx & 4))
                warnings.append(f"{leaf} for {kind} component {describe(i)} has size 0: inferred "
                                f"the architectural {ARCH_SIZES[i]} bytes at the given offset {e.ebx}")
            else:
                unknown[i] = f"{leaf} is {what}"
                tail = ("; the standard format never holds supervisor state" if sup else
                        ": its offset and size are unknown")
                warnings.append(f"{leaf} for {kind} component {describe(i)} is {what}{tail}")
        return cls(comps, xcr0, xss, unknown, warnings)

    def overlaps(self, mask: int | None = None) -> list[tuple[int, int]]:
        """Pairs (i, j), i < j, of user components in `mask` (default: all) that share bytes in the
        standard format, or a component i >= 2 that reaches into the legacy region or header
        (j = -1). No two components may overlap (SDM vol. 1, 13.4.1); since APX (component 19 at
        960, the old MPX area) offsets do not grow with i, so enumerations can contradict."""
        mask = (self.xcr0_supported if mask is None else mask)
        user = sorted((i, c) for i, c in self.components.items()
                      if i >= 2 and not c.supervisor and mask >> i & 1)
        out = []
        for n, (i, a) in enumerate(user):
            if a.offset < XSAVE_MIN_SIZE:
                out.append((i, -1))
            for j, b in user[n + 1:]:
                if a.offset < b.end and b.offset < a.end:
                    out.append((i, j))
        return out

    def overlap_problems(self, mask: int | None = None) -> list[str]:
        """overlaps() in words: 'APX (19) 128@960 overlaps BNDREGS (3) 64@960'."""
        def span(i):
            c = self.components[i]
            return f"{describe(i)} {c.size}@{c.offset}"
        return [f"{span(i)} overlaps the legacy region and XSAVE header (0..575)" if j < 0 else
                f"{span(j)} overlaps {span(i)}" for i, j in self.overlaps(mask)]

    @property
    def user_mask(self) -> int:
        return sum(c.mask for c in self.components.values() if not c.supervisor)

    @property
    def supervisor_mask(self) -> int:
        return sum(c.mask for c in self.components.values() if c.supervisor)

    def _known(self, mask: int, what: str) -> None:
        unknown = [i for i in bits_of(mask) if i not in self.components]
        guessed = [i for i in unknown if i in self.unknown]
        if guessed:
            raise XsaveError(f"{what} {mask:#x} needs " + ", ".join(
                f"{describe(i)}, whose offset and size are unknown ({self.unknown[i]})" for i in guessed))
        if unknown:
            raise XsaveError(f"{what} {mask:#x} names components this layout does not have: "
                             + ", ".join(describe(i) for i in unknown))

    def standard_size(self, mask: int | None = None) -> int:
        """Standard-format size holding the user components in mask.

        max(576, max over user components i >= 2 in mask of offset + size), the
        rule behind CPUID.(0DH,0).EBX/ECX. Supervisor bits are ignored: they
        have no place in the standard format. mask defaults to xcr0_supported.
        """
        mask = self.xcr0_supported if mask is None else mask
        self._known(mask, "mask")
        ends = [c.end for i, c in self.components.items()
                if i >= 2 and mask >> i & 1 and not c.supervisor]
        return max([XSAVE_MIN_SIZE, *ends])

    def compacted_offsets(self, mask: int | None = None) -> dict[int, int]:
        """Offsets of the components i >= 2 in mask in the compacted format (XSAVEC/XSAVES)."""
        mask = (self.xcr0_supported | self.xss_supported) if mask is None else mask
        self._known(mask, "mask")
        offsets, pos = {}, XSAVE_MIN_SIZE
        for i in bits_of(mask & ~0b11):
            c = self.components[i]
            if c.align64:
                pos = (pos + 63) & ~63
            offsets[i] = pos
            pos += c.size
        return offsets

    def compacted_size(self, mask: int | None = None) -> int:
        """576 + the components i >= 2 in mask, in index order, 64-byte aligned where ECX[1].

        The rule behind CPUID.(0DH,1).EBX, which reports it for the XCR0 | IA32_XSS
        currently enabled. mask defaults to xcr0_supported | xss_supported.
        """
        mask = (self.xcr0_supported | self.xss_supported) if mask is None else mask
        offsets = self.compacted_offsets(mask)
        if not offsets:
            return XSAVE_MIN_SIZE
        last = max(offsets)
        return offsets[last] + self.components[last].size

    def _size_or_none(self, fn):
        try:
            return fn()
        except XsaveError:
            return None

    def to_json(self) -> dict:
        """Sizes are null when they need a component whose sub-leaf is unknown."""
        return {
            "xcr0_supported": f"{self.xcr0_supported:#x}",
            "xss_supported": f"{self.xss_supported:#x}",
            "standard_size": self._size_or_none(self.standard_size),
            "compacted_size": self._size_or_none(self.compacted_size),
            "components": [asdict(c) for _, c in sorted(self.components.items())],
            "unknown": [{"index": i, "name": component_name(i), "why": w} for i, w in sorted(self.unknown.items())],
            "overlaps": self.overlap_problems(),
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: dict) -> "XsaveLayout":
        try:
            comps = {}
            for c in data["components"]:
                comp = XsaveComponent(int(c["index"]), str(c["name"]), int(c["size"]),
                                      int(c["offset"]), bool(c["supervisor"]),
                                      bool(c["align64"]), bool(c["xfd"]))
                comps[comp.index] = comp
            unknown = {int(u["index"]): str(u["why"]) for u in data.get("unknown", [])}
            return cls(comps, int(data["xcr0_supported"], 16), int(data["xss_supported"], 16),
                       unknown, [str(w) for w in data.get("warnings", [])])
        except (KeyError, TypeError, ValueError) as exc:
            raise XsaveError(f"XSAVE layout JSON: bad or missing field: {exc!r}") from None

    def format_table(self) -> str:
        """A human-readable table of the components (standard and compacted offsets)."""
        try:
            compacted = self.compacted_offsets()
        except XsaveError:  # a component's size is unknown: no compacted offsets to give
            compacted = {}
        rows = [f"{'idx':>3}  {'name':<10} {'kind':<10} {'offset':>6} {'size':>6} {'end':>6}"
                f" {'compacted':>9}  flags"]
        for i, c in sorted(self.components.items()):
            kind = "supervisor" if c.supervisor else "user"
            std = "-" if c.supervisor else str(c.offset)
            end = "-" if c.supervisor else str(c.end)
            flags = " ".join(f for f, on in (("align64", c.align64), ("xfd", c.xfd)) if on)
            rows.append(f"{i:>3}  {c.name:<10} {kind:<10} {std:>6} {c.size:>6} {end:>6}"
                        f" {compacted.get(i, '-')!s:>9}  {flags}".rstrip())
        for i, why in sorted(self.unknown.items()):
            rows.append(f"{i:>3}  {component_name(i):<10} {'unknown':<10} {'?':>6} {'?':>6} {'?':>6}"
                        f" {'?':>9}  ({why})")
        std, comp = self._size_or_none(self.standard_size), self._size_or_none(self.compacted_size)
        rows.append(f"standard size {'unknown' if std is None else std} (XCR0 {self.xcr0_supported:#x}), "
                    f"compacted size {'unknown' if comp is None else comp} "
                    f"(XCR0|XSS {self.xcr0_supported | self.xss_supported:#x})")
        for p in self.overlap_problems():
            rows.append(f"OVERLAP: {p}")
        for w in self.warnings:
            rows.append(f"warning: {w}")
        return "\n".join(rows)

    def diff(self, other: "XsaveLayout") -> list[tuple[int, str, XsaveComponent | None,
                                                       XsaveComponent | None]]:
        """Components whose offset or size differ, or that only one side has.

        The migration question: AMD puts opmask at 832, Intel at 1088.
        """
        out = []
        for i in sorted(set(self.components) | set(other.components)):
            a, b = self.components.get(i), other.components.get(i)
            if a is None or b is None or (a.offset, a.size) != (b.offset, b.size):
                out.append((i, component_name(i), a, b))
        return out


def kvm_xsave_size(layout: XsaveLayout, xcr0: int | None = None) -> int:
    """Size of the KVM_GET/SET_XSAVE buffer: max(4096, standard size), the KVM_CAP_XSAVE2 rule."""
    mask = layout.xcr0_supported if xcr0 is None else xcr0
    # supervisor state has no place in the standard format; an unknown user component raises
    return max(KVM_XSAVE_SIZE, layout.standard_size(mask & ~(layout.supervisor_mask | layout.xss_supported)))
