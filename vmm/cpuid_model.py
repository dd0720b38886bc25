"""The CPUID field model: every bit of every leaf, sub-leaf and register has a kind, named or not.

Kinds (what "the guest's CPUID fits a destination" means for the field):
  * FLAGS: feature flags; the guest's set bits must be set there (subset). Named bits take their
    names from vmm.cpuid.FEATURES; unnamed bits of a flags register are still flags.
  * FLAGS_INVERTED: "not available" bitmaps (leaf 0xA EBX): the destination's set bits must be
    set in the guest.
  * MAX: numbers that bound what the guest may use (max basic/extended leaf, max sub-leaf, address
    widths, XSAVE sizes, counter counts and versions): guest value <= destination value.
  * EXACT: numbers that shape state and must be equal (AMX palette geometry, CLFLUSH line size),
    unless the guest's is 0 (it lacks the leaf).
  * SKIP: set by KVM or the VMM per vCPU or per host, or identity carried with the guest's CPUID as
    given (APIC IDs, topology, cache/TLB descriptors, brand string, frequency, hypervisor leaves,
    family/model): not compared; a difference is reported with the reason.
  * XSAVE: CPUID.(0DH, i >= 2), the component layout: judged component by component (compat).
  * UNKNOWN: a bit no rule covers: a difference is a warning naming leaf/sub-leaf/register/bit,
    never silently ignored, never a refusal.
Vendor-derived bits are resolved as KVM computes them (kvm_derived): on AMD, KVM_GET_SUPPORTED_CPUID
has leaf 7 EDX SPEC_CTRL/STIBP/SSBD from 0x80000008 EBX AMD_IBPB+AMD_IBRS/AMD_STIBP/AMD_SSBD, and the
AMD bits from the Intel ones on Intel (Linux arch/x86/kvm/cpuid.c, kvm_set_cpu_caps()); VIRT_SSBD is
emulated on AMD hosts with SSBD (arch/x86/kvm/svm/svm.c, svm_set_cpu_caps()).

`compare_tables` judges a guest table against what a destination provides; `merge_tables` builds
the table every one of several destinations provides (vmm baseline) by the same rules.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .cpuid import FEATURES, REGISTERS, CpuidTable

__all__ = ["FLAGS", "FLAGS_INVERTED", "MAX", "EXACT", "SKIP", "XSAVE", "UNKNOWN", "RULES", "DERIVED", "Field",
           "FieldDiff", "fields_of", "bit_name", "where", "describe_bits", "kvm_derived", "normalized",
           "compare_tables", "problems_of", "warnings_of", "merge_tables"]

FLAGS, FLAGS_INVERTED, MAX, EXACT = "flags", "flags (inverted)", "number (at most)", "number (equal)"
SKIP, XSAVE, UNKNOWN = "skipped", "XSAVE layout", "unknown"
_ALL = (0, 31)


@dataclass(frozen=True)
class Field:
    """Bits lo..hi of CPUID.(leaf, subleaf).register (0 <= lo <= hi <= 31), of one kind."""

    leaf: int
    subleaf: int
    register: str
    lo: int
    hi: int
    kind: str
    name: str
    why: str = ""

    @property
    def mask(self) -> int:
        return ((1 << (self.hi - self.lo + 1)) - 1) << self.lo

    def value(self, reg: int) -> int:
        return (reg & self.mask) >> self.lo


# --- the rules -------------------------------------------------------------------------------------
# whole leaves (any sub-leaf, every register) that do not move with the guest
_SKIP_LEAVES = [
    ((0x2, 0x2), "cache and TLB descriptors of the host CPU"),
    ((0x3, 0x3), "processor serial number"),
    ((0x4, 0x4), "cache parameters and cores per package (topology the VMM sets)"),
    ((0x5, 0x5), "MONITOR/MWAIT sizes and C-states of the host"),
    ((0x9, 0x9), "direct cache access of the host"),
    ((0xB, 0xB), "x2APIC topology (per vCPU, set by the VMM)"),
    ((0xF, 0x10), "cache/memory-bandwidth monitoring and allocation resources of the host"),
    ((0x15, 0x16), "TSC/crystal and core frequencies of the host"),
    ((0x17, 0x18), "SoC vendor identity and TLB parameters of the host"),
    ((0x1A, 0x1A), "hybrid core type (per CPU)"),
    ((0x1F, 0x1F), "V2 extended topology (per vCPU, set by the VMM)"),
    ((0x40000000, 0x4FFFFFFF), "hypervisor leaves (KVM sets them)"),
    ((0x80000002, 0x80000004), "brand string (identity the guest was given)"),
    ((0x80000005, 0x80000006), "cache and TLB parameters of the host"),
    ((0x80000019, 0x80000019), "1 GiB TLB parameters of the host"),
    ((0x8000001D, 0x8000001E), "cache topology and core/node IDs (per vCPU)"),
    ((0x80000020, 0x80000020), "platform QoS resources of the host"),
    ((0x80000026, 0x80000026), "extended CPU topology (per vCPU)"),
]

_IDENTITY = "identity the guest was given (family/model/stepping, brand): it travels with the guest's CPUID"
_VENDOR = "the vendor string, compared as the vendor"


def _rules():
    r = []

    def flags(leaf, sub, reg, name=None):
        r.append(Field(leaf, sub, reg, 0, 31, FLAGS, name or f"CPUID.({leaf:#x},{sub}).{reg.upper()} flags"))

    def num(leaf, sub, reg, lo, hi, name, kind=MAX):
        r.append(Field(leaf, sub, reg, lo, hi, kind, name))

    def skip(leaf, sub, reg, lo, hi, name, why):
        r.append(Field(leaf, sub, reg, lo, hi, SKIP, name, why))

    num(0x0, 0, "eax", *_ALL, "max basic leaf")
    for reg in ("ebx", "ecx", "edx"):
        skip(0x0, 0, reg, *_ALL, "vendor", _VENDOR)
    skip(0x1, 0, "eax", *_ALL, "version (family/model/stepping)", _IDENTITY)
    skip(0x1, 0, "ebx", 0, 7, "brand index", _IDENTITY)
    num(0x1, 0, "ebx", 8, 15, "CLFLUSH line size (8-byte units)", EXACT)
    skip(0x1, 0, "ebx", 16, 23, "max logical processor IDs", "topology the VMM sets")
    skip(0x1, 0, "ebx", 24, 31, "initial APIC ID", "per vCPU")
    flags(0x1, 0, "ecx")
    flags(0x1, 0, "edx")
    skip(0x1, 0, "ecx", 27, 27, "OSXSAVE", "the guest OS sets it (CR4.OSXSAVE)")
    skip(0x1, 0, "ecx", 31, 31, "HYPERVISOR", "KVM sets it for every guest")
    flags(0x6, 0, "eax")
    skip(0x6, 0, "ebx", *_ALL, "thermal interrupt thresholds", "thermal sensors of the host")
    flags(0x6, 0, "ecx")
    skip(0x6, 0, "edx", *_ALL, "hardware feedback", "per-host power management")
    num(0x7, 0, "eax", *_ALL, "max leaf 7 sub-leaf")
    for reg in ("ebx", "ecx", "edx"):
        flags(0x7, 0, reg)
    skip(0x7, 0, "ecx", 4, 4, "OSPKE", "the guest OS sets it (CR4.PKE)")
    for reg in REGISTERS:
        flags(0x7, 1, reg)
        flags(0x7, 2, reg)
    num(0xA, 0, "eax", 0, 7, "architectural PMU version")
    num(0xA, 0, "eax", 8, 15, "general-purpose counters")
    num(0xA, 0, "eax", 16, 23, "general-purpose counter width")
    num(0xA, 0, "eax", 24, 31, "EBX event vector length")
    r.append(Field(0xA, 0, "ebx", 0, 31, FLAGS_INVERTED, "architectural events not available"))
    flags(0xA, 0, "ecx", "fixed counters supported")
    num(0xA, 0, "edx", 0, 4, "fixed counters")
    num(0xA, 0, "edx", 5, 12, "fixed counter width")
    flags(0xD, 0, "eax", "XCR0 bits 31:0 supported")
    skip(0xD, 0, "ebx", *_ALL, "XSAVE size for the current XCR0", "KVM recomputes it from the guest's XCR0")
    num(0xD, 0, "ecx", *_ALL, "XSAVE size for every supported XCR0 bit")
    flags(0xD, 0, "edx", "XCR0 bits 63:32 supported")
    flags(0xD, 1, "eax")
    skip(0xD, 1, "ebx", *_ALL, "XSAVES size for the current XCR0|XSS", "KVM recomputes it at run time")
    flags(0xD, 1, "ecx", "IA32_XSS bits 31:0 supported")
    flags(0xD, 1, "edx", "IA32_XSS bits 63:32 supported")
    num(0x12, 0, "eax", *_ALL, "SGX leaf functions", FLAGS)
    num(0x12, 0, "ebx", *_ALL, "SGX MISCSELECT", FLAGS)
    num(0x12, 0, "edx", 0, 7, "SGX max enclave size (non-64-bit, log2)")
    num(0x12, 0, "edx", 8, 15, "SGX max enclave size (64-bit, log2)")
    for reg in REGISTERS:
        flags(0x12, 1, reg, f"SGX ATTRIBUTES ({reg.upper()})")
    num(0x14, 0, "eax", *_ALL, "max Intel PT sub-leaf")
    flags(0x14, 0, "ebx")
    flags(0x14, 0, "ecx")
    for reg in REGISTERS:
        flags(0x19, 0, reg)
    flags(0x1C, 0, "eax", "architectural LBR depths")
    flags(0x1C, 0, "ebx")
    flags(0x1C, 0, "ecx")
    num(0x1D, 0, "eax", *_ALL, "max AMX palette")
    num(0x1D, 1, "eax", 0, 15, "AMX palette 1 total tile bytes", EXACT)
    num(0x1D, 1, "eax", 16, 31, "AMX palette 1 bytes per tile", EXACT)
    num(0x1D, 1, "ebx", 0, 15, "AMX palette 1 bytes per row", EXACT)
    num(0x1D, 1, "ebx", 16, 31, "AMX palette 1 tile names", EXACT)
    num(0x1D, 1, "ecx", 0, 15, "AMX palette 1 max rows", EXACT)
    num(0x1E, 0, "ebx", 0, 7, "TMUL max K (rows or columns)", EXACT)
    num(0x1E, 0, "ebx", 8, 23, "TMUL max N (column bytes)", EXACT)
    flags(0x1E, 1, "eax", "TMUL features")
    num(0x20, 0, "eax", *_ALL, "max HRESET sub-leaf")
    flags(0x20, 0, "ebx", "HRESET enables")
    flags(0x24, 0, "ebx")  # vector lengths (bits 16-18): flags; the version (7:0) overrides
    num(0x24, 0, "ebx", 0, 7, "AVX10 version")
    num(0x80000000, 0, "eax", *_ALL, "max extended leaf")
    for reg in ("ebx", "ecx", "edx"):
        skip(0x80000000, 0, reg, *_ALL, "vendor", _VENDOR)
    skip(0x80000001, 0, "eax", *_ALL, "extended version", _IDENTITY)
    skip(0x80000001, 0, "ebx", *_ALL, "brand ID and package type", _IDENTITY)
    flags(0x80000001, 0, "ecx")
    flags(0x80000001, 0, "edx")
    skip(0x80000007, 0, "eax", *_ALL, "processor feedback", "per-host power management")
    flags(0x80000007, 0, "ebx", "RAS capabilities")
    skip(0x80000007, 0, "ecx", *_ALL, "power sample time ratio", "per-host power management")
    flags(0x80000007, 0, "edx")
    num(0x80000008, 0, "eax", 0, 7, "physical address bits")
    num(0x80000008, 0, "eax", 8, 15, "linear address bits")
    num(0x80000008, 0, "eax", 16, 23, "guest physical address bits")
    flags(0x80000008, 0, "ebx")
    skip(0x80000008, 0, "ecx", *_ALL, "core count, APIC ID size, TSC counter size", "topology the VMM sets")
    num(0x80000008, 0, "edx", 0, 15, "INVLPGB max page count")
    num(0x80000008, 0, "edx", 16, 31, "RDPRU max ECX")
    num(0x8000000A, 0, "eax", 0, 7, "SVM revision")
    skip(0x8000000A, 0, "ebx", *_ALL, "number of ASIDs", "a host resource")
    flags(0x8000000A, 0, "edx", "SVM features")
    flags(0x8000001A, 0, "eax", "performance optimization identifiers")
    flags(0x8000001B, 0, "eax", "IBS features")
    flags(0x8000001F, 0, "eax", "memory encryption features")
    skip(0x8000001F, 0, "ebx", *_ALL, "C-bit position and address reduction", "a host resource")
    skip(0x8000001F, 0, "ecx", *_ALL, "encrypted guests supported", "a host resource")
    skip(0x8000001F, 0, "edx", *_ALL, "minimum SEV ASID", "a host resource")
    flags(0x80000021, 0, "eax")
    flags(0x80000021, 0, "ecx")  # TSA_SQ_NO, TSA_L1_NO: "not affected" bits a guest relies on
    num(0x80000021, 0, "ebx", 0, 11, "microcode patch size (16-byte units)")
    flags(0x80000022, 0, "eax", "AMD performance monitoring v2 features")
    num(0x80000022, 0, "ebx", 0, 3, "core performance counters")
    num(0x80000022, 0, "ebx", 4, 9, "LBR stack size")
    num(0x80000022, 0, "ebx", 10, 15, "northbridge performance counters")
    num(0x80000022, 0, "ebx", 16, 21, "UMC performance counters")
    flags(0x80000022, 0, "ecx", "active UMC bitmask")
    flags(0x80000023, 0, "eax", "multi-key memory encryption features")
    skip(0x80000023, 0, "ebx", *_ALL, "memory encryption key IDs", "a host resource")
    return r


RULES = _rules()
_BY_KEY: dict = {}
for _r in RULES:
    _BY_KEY.setdefault((_r.leaf, _r.subleaf, _r.register), []).append(_r)

_NAMES = {(f.leaf, f.subleaf, f.register, f.bit): n for n, f in FEATURES.items()}


def _skip_leaf(leaf):
    for (lo, hi), why in _SKIP_LEAVES:
        if lo <= leaf <= hi:
            return why
    return None


def fields_of(leaf: int, subleaf: int, register: str) -> list[Field]:
    """The fields covering CPUID.(leaf, subleaf).register, bit-disjoint and lowest bit first; bits
    no rule covers come as UNKNOWN fields of one bit each. A narrower rule wins over a wider one
    (OSXSAVE inside the leaf 1 ECX flags)."""
    why = _skip_leaf(leaf)
    if why:
        return [Field(leaf, subleaf, register, 0, 31, SKIP, "leaf", why)]
    if leaf == 0x12 and subleaf >= 2:
        return [Field(leaf, subleaf, register, 0, 31, SKIP, "SGX EPC section", "EPC memory of the host")]
    if leaf == 0xD and subleaf >= 2:
        return [Field(leaf, subleaf, register, 0, 31, XSAVE, f"XSAVE component {subleaf}",
                      "judged with the XSAVE components")]
    rules = _BY_KEY.get((leaf, subleaf, register), [])
    owner = [None] * 32
    for rule in sorted(rules, key=lambda f: f.lo - f.hi):  # widest first; narrower ones overwrite
        for b in range(rule.lo, rule.hi + 1):
            owner[b] = rule
    out, b = [], 0
    while b < 32:
        rule = owner[b]
        if rule is None:
            out.append(Field(leaf, subleaf, register, b, b, UNKNOWN, "unknown bit"))
            b += 1
            continue
        end = b
        while end + 1 < 32 and owner[end + 1] is rule:
            end += 1
        # a wider rule cut by a narrower one (OSXSAVE inside leaf 1 ECX) owns only its segments
        out.append(rule if (b, end) == (rule.lo, rule.hi) else dataclasses.replace(rule, lo=b, hi=end))
        b = end + 1
    return out


def bit_name(leaf, subleaf, register, bit):
    """'AVX512F' for a named feature bit, else None."""
    return _NAMES.get((leaf, subleaf, register, bit))


def where(leaf, subleaf, register, lo, hi=None):
    """'CPUID.(0x7,2).EDX[4]' / 'CPUID.(0x80000008,0).EAX[7:0]'."""
    bits = f"{lo}" if hi is None or hi == lo else f"{hi}:{lo}"
    return f"CPUID.({leaf:#x},{subleaf}).{register.upper()}[{bits}]"


def describe_bits(leaf, subleaf, register, mask):
    """Names (or locations) of the set bits of `mask` in that register, lowest first."""
    out = []
    for b in range(32):
        if mask >> b & 1:
            out.append(bit_name(leaf, subleaf, register, b) or where(leaf, subleaf, register, b))
    return out


# --- what KVM derives ------------------------------------------------------------------------------
# (leaf 7 EDX bit, the 0x80000008 EBX bits it comes from, all needed): KVM sets the Intel bit when
# the host has the AMD ones, and each AMD bit when the host has the Intel one.
_SPEC_CTRL, _STIBP, _SSBD = 26, 27, 31
_AMD_IBPB, _AMD_IBRS, _AMD_STIBP, _AMD_SSBD, _VIRT_SSBD = 12, 14, 15, 24, 25
_DERIVED_7 = ((_SPEC_CTRL, (_AMD_IBPB, _AMD_IBRS)), (_STIBP, (_AMD_STIBP,)), (_SSBD, (_AMD_SSBD,)))
_DERIVED_AMD = ((_AMD_IBPB, _SPEC_CTRL), (_AMD_IBRS, _SPEC_CTRL), (_AMD_STIBP, _STIBP), (_AMD_SSBD, _SSBD))
DERIVED = {(0x7, 0, "edx", b): f"KVM derives it from {' and '.join(describe_bits(0x80000008, 0, 'ebx', sum(1 << a for a in amd)))}"
           for b, amd in _DERIVED_7}
DERIVED.update({(0x80000008, 0, "ebx", a): f"KVM derives it from {describe_bits(0x7, 0, 'edx', 1 << b)[0]}"
                for a, b in _DERIVED_AMD})
DERIVED[(0x80000008, 0, "ebx", _VIRT_SSBD)] = "KVM emulates it on AMD hosts with AMD_SSBD"


def kvm_derived(table: CpuidTable) -> CpuidTable:
    """A copy of a CPU's own CPUID with the bits KVM_GET_SUPPORTED_CPUID derives from the other
    vendor's spelling of the same speculation controls (Linux arch/x86/kvm/cpuid.c,
    kvm_set_cpu_caps(): SPEC_CTRL needs IBPB and IBRS; STIBP, SSBD; AMD_IBPB/AMD_IBRS/AMD_STIBP/
    AMD_SSBD from SPEC_CTRL/STIBP/SSBD). Entries that do not exist are not created."""
    t = table.copy()
    e7, e8 = t.entry(0x7, 0), t.entry(0x80000008, 0)
    if e7 is None or e8 is None:
        return t
    edx7, ebx8 = e7.edx, e8.ebx
    for bit, amd in _DERIVED_7:
        if all(ebx8 >> a & 1 for a in amd):
            e7.edx |= 1 << bit
    for a, bit in _DERIVED_AMD:
        if edx7 >> bit & 1:
            e8.ebx |= 1 << a
    if t.vendor in ("AuthenticAMD", "HygonGenuine") and ebx8 >> _AMD_SSBD & 1:
        e8.ebx |= 1 << _VIRT_SSBD  # emulated on AMD hosts with SSBD (svm.c, svm_set_cpu_caps())
    return t


# --- judging ---------------------------------------------------------------------------------------
@dataclass
class FieldDiff:
    """A field whose guest and destination values differ, and what that means."""

    field: Field
    guest: int  # the field's value (bits lo..hi shifted down)
    there: int
    verdict: str  # "problem", "warning", "skipped", "ok" (a difference that is allowed)
    text: str  # e.g. "PSFD missing there" / "physical address bits 52 in the guest, 48 there"
    bits: tuple = ()  # for flags: the names/locations of the bits that decide

    def to_json(self):
        f = self.field
        return {"leaf": f"{f.leaf:#x}", "subleaf": f.subleaf, "register": f.register,
                "bits": f"{f.hi}:{f.lo}" if f.hi != f.lo else str(f.lo), "name": f.name, "kind": f.kind,
                "guest": f"{self.guest:#x}", "there": f"{self.there:#x}", "verdict": self.verdict,
                "text": self.text, **({"why": f.why} if f.why else {})}


def _reg(table, leaf, sub, reg):
    e = table.entry(leaf, sub)
    return e.reg(reg) if e is not None else 0


def _keys(*tables):
    keys = {}
    for t in tables:
        for e in t:
            keys[(e.function, e.index if e.indexed else 0)] = None
    return sorted(keys)


def normalized(table: CpuidTable) -> CpuidTable:
    """A copy with encodings that mean the same spelled the same: 0x80000008 EAX[23:16] = 0 means
    "the guest physical address width is EAX[7:0]" (AMD APM vol. 3, E.4.7)."""
    t = table.copy()
    e = t.entry(0x80000008, 0)
    if e is not None and not (e.eax >> 16 & 0xFF):
        e.eax |= (e.eax & 0xFF) << 16
    return t


def compare_tables(guest: CpuidTable, there: CpuidTable, guest_word="in the guest", there_word="there"):
    """Every field where `guest` and `there` differ, judged by its kind. `there` is what the
    destination gives a guest (KVM_GET_SUPPORTED_CPUID, or a CPU's CPUID through kvm_derived).
    A leaf one side lacks reads as zeros. Returns a list of FieldDiff, in leaf order."""
    guest, there = normalized(guest), normalized(there)
    out = []
    for leaf, sub in _keys(guest, there):
        for reg in REGISTERS:
            g, t = _reg(guest, leaf, sub, reg), _reg(there, leaf, sub, reg)
            if g == t:
                continue
            for f in fields_of(leaf, sub, reg):
                gv, tv = f.value(g), f.value(t)
                if gv == tv:
                    continue
                out.append(_judge(f, gv, tv, guest_word, there_word))
    return out


def _judge(f, gv, tv, guest_word, there_word):
    loc = where(f.leaf, f.subleaf, f.register, f.lo, f.hi)
    if f.kind in (FLAGS, FLAGS_INVERTED):
        lacking = gv & ~tv if f.kind == FLAGS else tv & ~gv
        names = describe_bits(f.leaf, f.subleaf, f.register, lacking << f.lo)
        derived = [DERIVED[(f.leaf, f.subleaf, f.register, b)] for b in range(32)
                   if lacking << f.lo >> b & 1 and (f.leaf, f.subleaf, f.register, b) in DERIVED]
        if lacking:
            what = "missing there" if f.kind == FLAGS else f"not available {guest_word}, available {there_word}"
            return FieldDiff(f, gv, tv, "problem", f"{', '.join(names)} {what}"
                             + (f" ({'; '.join(derived)} there)" if derived else ""), tuple(names))
        extra = describe_bits(f.leaf, f.subleaf, f.register, (gv ^ tv) << f.lo)
        return FieldDiff(f, gv, tv, "ok", f"{', '.join(extra)} only {there_word if f.kind == FLAGS else guest_word}",
                         tuple(extra))
    if f.kind == MAX:
        if gv > tv:
            return FieldDiff(f, gv, tv, "problem", f"{f.name} ({loc}) is {gv} {guest_word}, {tv} {there_word}")
        return FieldDiff(f, gv, tv, "ok", f"{f.name} ({loc}) is {gv} {guest_word}, {tv} {there_word}")
    if f.kind == EXACT:  # 0: the guest does not use it (a leaf it lacks)
        return FieldDiff(f, gv, tv, "problem" if gv else "ok", f"{f.name} ({loc}) is {gv} {guest_word}, "
                         f"{tv} {there_word}")
    if f.kind in (SKIP, XSAVE):
        return FieldDiff(f, gv, tv, "skipped", f"{f.name} ({loc}): {f.why}")
    return FieldDiff(f, gv, tv, "warning", f"unknown {loc} is {gv} {guest_word}, {tv} {there_word}")


def problems_of(diffs, there_noun="the destination"):
    """One line per kind of refusal (flags together, by name; each number alone)."""
    flags = [n for d in diffs if d.verdict == "problem" and d.field.kind == FLAGS for n in d.bits]
    out = [f"CPUID features {there_noun} lacks: " + ", ".join(sorted(flags, key=_flag_order))] if flags else []
    out += [f"CPUID: {d.text}" for d in diffs if d.verdict == "problem" and d.field.kind != FLAGS]
    return out


def _flag_order(name):
    return (name.startswith("CPUID."), name)


def warnings_of(diffs):
    return [f"CPUID: {d.text} (a bit vmm has no rule for: check it)" for d in diffs if d.verdict == "warning"]


# --- the table every destination provides -------------------------------------------------------------
def merge_tables(base: CpuidTable, others: list) -> tuple:
    """(table, warnings): `base` with every field made to fit each table of `others` by its kind:
    flags ANDed (inverted flags ORed), MAX numbers the smallest, SKIP and XSAVE fields as `base`
    has them (leaf 0xD is then redone by CpuidTable.guest_for_xcr0), EXACT numbers kept when all
    agree (else left, and the final check refuses), unknown bits that differ cleared, with a warning
    each. Leaves beyond the smallest max basic/extended leaf are dropped."""
    t = base.copy()
    warnings = []
    for e in list(t):
        leaf, sub = e.function, (e.index if e.indexed else 0)
        for reg in REGISTERS:
            value = e.reg(reg)
            for f in fields_of(leaf, sub, reg):
                mine = f.value(value)
                vals = [f.value(_reg(o, leaf, sub, reg)) for o in others]
                if f.kind == FLAGS:
                    new = mine
                    for v in vals:
                        new &= v
                elif f.kind == FLAGS_INVERTED:
                    new = mine
                    for v in vals:
                        new |= v
                elif f.kind == MAX:
                    new = min([mine, *vals])
                elif f.kind == UNKNOWN and any(v != mine for v in vals):
                    new = 0
                    warnings.append(f"unknown {where(leaf, sub, reg, f.lo, f.hi)} differs between the hosts: "
                                    "cleared in the baseline")
                else:
                    new = mine
                value = (value & ~f.mask) | (new << f.lo & f.mask)
            setattr(e, reg, value)
    max_basic, max_ext = t.max_leaf, t.max_extended_leaf
    for e in list(t):
        fn = e.function
        if (fn < 0x40000000 and max_basic is not None and fn > max_basic) or \
                (fn >= 0x80000000 and max_ext is not None and fn > max_ext):
            t.remove(fn)
    return t, warnings
