"""CPUID tables: parsing, named features, and guest CPUID for a chosen XCR0.

Pure and offline: nothing here touches /dev/kvm. Entries mirror
``struct kvm_cpuid_entry2`` (function, index, flags, eax, ebx, ecx, edx) so the
bindings can marshal :meth:`CpuidTable.to_kvm_entries` directly.

Bit positions follow the Intel SDM vol. 2A, CPUID instruction, and the AMD APM
vol. 3 (leaf 0x80000001).
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

from .records import Record

__all__ = [
    "SIGNIFICANT_INDEX",
    "INDEXED_LEAVES",
    "CpuidError",
    "CpuidEntry",
    "Feature",
    "FEATURES",
    "CpuidTable",
]

# KVM uAPI KVM_CPUID_FLAG_SIGNIFCANT_INDEX (sic, <linux/kvm.h>): the entry is
# selected by (function, index) rather than by function alone.
SIGNIFICANT_INDEX = 1

# Leaves whose sub-leaf (ECX input) selects different data; KVM marks these
# entries with KVM_CPUID_FLAG_SIGNIFCANT_INDEX (not always: 0x80000020 comes
# without it). A dump line of such a leaf without "[SL n]" is read as sub-leaf 0
# unless it carries NOT_INDEXED.
INDEXED_LEAVES = frozenset({
    0x4, 0x7, 0xB, 0xD, 0xF, 0x10, 0x12, 0x14, 0x17, 0x18, 0x1D, 0x1E, 0x1F,
    0x20, 0x23, 0x24, 0x8000001D, 0x80000020, 0x80000026,
})

NOT_INDEXED = "[not indexed]"

REGISTERS = ("eax", "ebx", "ecx", "edx")
_U32 = 0xFFFFFFFF

# XSAVE state-component bits used by guest_for_xcr0 (SDM vol. 1, 13.1).
_X87, _SSE, _AVX = 1 << 0, 1 << 1, 1 << 2
_BNDREGS, _BNDCSR = 1 << 3, 1 << 4
_OPMASK, _ZMM_HI256, _HI16_ZMM = 1 << 5, 1 << 6, 1 << 7
_PKRU = 1 << 9
_XTILECFG, _XTILEDATA = 1 << 17, 1 << 18
_APX = 1 << 19


class CpuidError(ValueError):
    """A CPUID table could not be read, built or queried."""


@dataclass(init=False, repr=False, eq=False)  # cheap to build: vmm/records.py
class CpuidEntry(Record):
    """One ``struct kvm_cpuid_entry2``."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int

    def __init__(self, function, index, flags, eax, ebx, ecx, edx):
        self.function, self.index, self.flags = function, index, flags
        self.eax, self.ebx, self.ecx, self.edx = eax, ebx, ecx, edx

    @property
    def indexed(self) -> bool:
        return bool(self.flags & SIGNIFICANT_INDEX)

    def as_tuple(self) -> tuple[int, int, int, int, int, int, int]:
        return (self.function, self.index, self.flags,
                self.eax, self.ebx, self.ecx, self.edx)

    def reg(self, name: str) -> int:
        return getattr(self, name)


class Feature(NamedTuple):
    """Location of a feature flag: CPUID.(leaf, subleaf).register[bit]."""

    leaf: int
    subleaf: int
    register: str
    bit: int


def _f(leaf: int, subleaf: int, register: str, bit: int) -> Feature:
    return Feature(leaf, subleaf, register, bit)


# Named feature flags. Names follow the SDM (with '.'/'-' spelled '_').
FEATURES: dict[str, Feature] = {
    # CPUID.01H:EDX
    "FPU": _f(1, 0, "edx", 0),
    "TSC": _f(1, 0, "edx", 4),
    "MSR": _f(1, 0, "edx", 5),
    "PAE": _f(1, 0, "edx", 6),
    "CX8": _f(1, 0, "edx", 8),
    "APIC": _f(1, 0, "edx", 9),
    "SEP": _f(1, 0, "edx", 11),
    "PGE": _f(1, 0, "edx", 13),
    "CMOV": _f(1, 0, "edx", 15),
    "PAT": _f(1, 0, "edx", 16),
    "CLFSH": _f(1, 0, "edx", 19),
    "DS": _f(1, 0, "edx", 21),  # debug store (IA32_DS_AREA, PEBS)
    "MMX": _f(1, 0, "edx", 23),
    "FXSR": _f(1, 0, "edx", 24),
    "SSE": _f(1, 0, "edx", 25),
    "SSE2": _f(1, 0, "edx", 26),
    "HTT": _f(1, 0, "edx", 28),
    # CPUID.01H:ECX
    "SSE3": _f(1, 0, "ecx", 0),
    "PCLMULQDQ": _f(1, 0, "ecx", 1),
    "MONITOR": _f(1, 0, "ecx", 3),
    "VMX": _f(1, 0, "ecx", 5),
    "SMX": _f(1, 0, "ecx", 6),
    "SSSE3": _f(1, 0, "ecx", 9),
    "FMA": _f(1, 0, "ecx", 12),
    "CX16": _f(1, 0, "ecx", 13),
    "PDCM": _f(1, 0, "ecx", 15),
    "PCID": _f(1, 0, "ecx", 17),
    "SSE4_1": _f(1, 0, "ecx", 19),
    "SSE4_2": _f(1, 0, "ecx", 20),
    "X2APIC": _f(1, 0, "ecx", 21),
    "MOVBE": _f(1, 0, "ecx", 22),
    "POPCNT": _f(1, 0, "ecx", 23),
    "TSC_DEADLINE": _f(1, 0, "ecx", 24),
    "AES": _f(1, 0, "ecx", 25),
    "XSAVE": _f(1, 0, "ecx", 26),
    "OSXSAVE": _f(1, 0, "ecx", 27),
    "AVX": _f(1, 0, "ecx", 28),
    "F16C": _f(1, 0, "ecx", 29),
    "RDRAND": _f(1, 0, "ecx", 30),
    "HYPERVISOR": _f(1, 0, "ecx", 31),
    # CPUID.(07H,0):EBX
    "FSGSBASE": _f(7, 0, "ebx", 0),
    "TSC_ADJUST": _f(7, 0, "ebx", 1),
    "BMI1": _f(7, 0, "ebx", 3),
    "HLE": _f(7, 0, "ebx", 4),
    "AVX2": _f(7, 0, "ebx", 5),
    "SMEP": _f(7, 0, "ebx", 7),
    "BMI2": _f(7, 0, "ebx", 8),
    "ERMS": _f(7, 0, "ebx", 9),
    "INVPCID": _f(7, 0, "ebx", 10),
    "RTM": _f(7, 0, "ebx", 11),
    "INTEL_PT": _f(7, 0, "ebx", 25),
    "MPX": _f(7, 0, "ebx", 14),
    "AVX512F": _f(7, 0, "ebx", 16),
    "AVX512DQ": _f(7, 0, "ebx", 17),
    "RDSEED": _f(7, 0, "ebx", 18),
    "ADX": _f(7, 0, "ebx", 19),
    "SMAP": _f(7, 0, "ebx", 20),
    "AVX512_IFMA": _f(7, 0, "ebx", 21),
    "CLFLUSHOPT": _f(7, 0, "ebx", 23),
    "CLWB": _f(7, 0, "ebx", 24),
    "AVX512PF": _f(7, 0, "ebx", 26),
    "AVX512ER": _f(7, 0, "ebx", 27),
    "AVX512CD": _f(7, 0, "ebx", 28),
    "SHA": _f(7, 0, "ebx", 29),
    "AVX512BW": _f(7, 0, "ebx", 30),
    "AVX512VL": _f(7, 0, "ebx", 31),
    # CPUID.(07H,0):ECX
    "AVX512_VBMI": _f(7, 0, "ecx", 1),
    "UMIP": _f(7, 0, "ecx", 2),
    "PKU": _f(7, 0, "ecx", 3),
    "OSPKE": _f(7, 0, "ecx", 4),
    "WAITPKG": _f(7, 0, "ecx", 5),
    "AVX512_VBMI2": _f(7, 0, "ecx", 6),
    "SHSTK": _f(7, 0, "ecx", 7),  # CET_SS
    "GFNI": _f(7, 0, "ecx", 8),
    "VAES": _f(7, 0, "ecx", 9),
    "VPCLMULQDQ": _f(7, 0, "ecx", 10),
    "AVX512_VNNI": _f(7, 0, "ecx", 11),
    "AVX512_BITALG": _f(7, 0, "ecx", 12),
    "AVX512_VPOPCNTDQ": _f(7, 0, "ecx", 14),
    "LA57": _f(7, 0, "ecx", 16),
    "RDPID": _f(7, 0, "ecx", 22),
    "CLDEMOTE": _f(7, 0, "ecx", 25),
    "MOVDIRI": _f(7, 0, "ecx", 27),
    "MOVDIR64B": _f(7, 0, "ecx", 28),
    "ENQCMD": _f(7, 0, "ecx", 29),
    "SGX_LC": _f(7, 0, "ecx", 30),
    "PKS": _f(7, 0, "ecx", 31),
    # CPUID.(07H,0):EDX
    "AVX512_4VNNIW": _f(7, 0, "edx", 2),
    "AVX512_4FMAPS": _f(7, 0, "edx", 3),
    "FSRM": _f(7, 0, "edx", 4),
    "UINTR": _f(7, 0, "edx", 5),
    "AVX512_VP2INTERSECT": _f(7, 0, "edx", 8),
    "MD_CLEAR": _f(7, 0, "edx", 10),
    "SERIALIZE": _f(7, 0, "edx", 14),
    "HYBRID": _f(7, 0, "edx", 15),
    "TSXLDTRK": _f(7, 0, "edx", 16),
    "PCONFIG": _f(7, 0, "edx", 18),
    "ARCH_LBR": _f(7, 0, "edx", 19),
    "IBT": _f(7, 0, "edx", 20),  # CET_IBT
    "AMX_BF16": _f(7, 0, "edx", 22),
    "AVX512_FP16": _f(7, 0, "edx", 23),
    "AMX_TILE": _f(7, 0, "edx", 24),
    "AMX_INT8": _f(7, 0, "edx", 25),
    "IBRS_IBPB": _f(7, 0, "edx", 26),
    "STIBP": _f(7, 0, "edx", 27),
    "L1D_FLUSH": _f(7, 0, "edx", 28),
    "ARCH_CAPABILITIES": _f(7, 0, "edx", 29),
    "CORE_CAPABILITIES": _f(7, 0, "edx", 30),
    "SSBD": _f(7, 0, "edx", 31),
    # CPUID.(07H,1):EAX
    "SHA512": _f(7, 1, "eax", 0),
    "SM3": _f(7, 1, "eax", 1),
    "SM4": _f(7, 1, "eax", 2),
    "AVX_VNNI": _f(7, 1, "eax", 4),
    "AVX512_BF16": _f(7, 1, "eax", 5),
    "LASS": _f(7, 1, "eax", 6),
    "CMPCCXADD": _f(7, 1, "eax", 7),
    "FZLRM": _f(7, 1, "eax", 10),
    "FSRS": _f(7, 1, "eax", 11),
    "FSRCS": _f(7, 1, "eax", 12),
    "FRED": _f(7, 1, "eax", 17),
    "LKGS": _f(7, 1, "eax", 18),
    "WRMSRNS": _f(7, 1, "eax", 19),
    "AMX_FP16": _f(7, 1, "eax", 21),
    "HRESET": _f(7, 1, "eax", 22),
    "AVX_IFMA": _f(7, 1, "eax", 23),
    "LAM": _f(7, 1, "eax", 26),
    "MSRLIST": _f(7, 1, "eax", 27),
    # CPUID.(07H,1):EDX
    "AVX_VNNI_INT8": _f(7, 1, "edx", 4),
    "AVX_NE_CONVERT": _f(7, 1, "edx", 5),
    "AMX_COMPLEX": _f(7, 1, "edx", 8),
    "AVX_VNNI_INT16": _f(7, 1, "edx", 10),
    "PREFETCHI": _f(7, 1, "edx", 14),
    "CET_SSS": _f(7, 1, "edx", 18),
    "AVX10": _f(7, 1, "edx", 19),
    "APX_F": _f(7, 1, "edx", 21),
    # CPUID.(07H,2):EDX (SDM vol. 2A, table 3-8)
    "PSFD": _f(7, 2, "edx", 0),
    "IPRED_CTRL": _f(7, 2, "edx", 1),
    "RRSBA_CTRL": _f(7, 2, "edx", 2),
    "DDPD_U": _f(7, 2, "edx", 3),
    "BHI_CTRL": _f(7, 2, "edx", 4),
    "MCDT_NO": _f(7, 2, "edx", 5),
    # CPUID.(0DH,1):EAX
    "XSAVEOPT": _f(0xD, 1, "eax", 0),
    "XSAVEC": _f(0xD, 1, "eax", 1),
    "XGETBV1": _f(0xD, 1, "eax", 2),
    "XSAVES": _f(0xD, 1, "eax", 3),
    "XFD": _f(0xD, 1, "eax", 4),
    # CPUID.80000001H:ECX (AMD APM names where Intel has none)
    "LAHF_LM": _f(0x80000001, 0, "ecx", 0),
    "SVM": _f(0x80000001, 0, "ecx", 2),
    "LZCNT": _f(0x80000001, 0, "ecx", 5),  # AMD: ABM
    "SSE4A": _f(0x80000001, 0, "ecx", 6),
    "PREFETCHW": _f(0x80000001, 0, "ecx", 8),
    "XOP": _f(0x80000001, 0, "ecx", 11),
    "FMA4": _f(0x80000001, 0, "ecx", 16),
    "TBM": _f(0x80000001, 0, "ecx", 21),
    "PERFCTR_CORE": _f(0x80000001, 0, "ecx", 23),
    "TOPOEXT": _f(0x80000001, 0, "ecx", 22),
    # CPUID.80000001H:EDX
    "SYSCALL": _f(0x80000001, 0, "edx", 11),
    "NX": _f(0x80000001, 0, "edx", 20),
    "PDPE1GB": _f(0x80000001, 0, "edx", 26),
    "RDTSCP": _f(0x80000001, 0, "edx", 27),
    "LM": _f(0x80000001, 0, "edx", 29),
    # CPUID.80000007H:EDX
    "INVARIANT_TSC": _f(0x80000007, 0, "edx", 8),
    # CPUID.80000008H:EBX (AMD APM vol. 3, E.4.7; Linux cpufeatures.h names)
    "CLZERO": _f(0x80000008, 0, "ebx", 0),
    "IRPERF": _f(0x80000008, 0, "ebx", 1),
    "XSAVEERPTR": _f(0x80000008, 0, "ebx", 2),
    "RDPRU": _f(0x80000008, 0, "ebx", 4),
    "MCOMMIT": _f(0x80000008, 0, "ebx", 8),
    "WBNOINVD": _f(0x80000008, 0, "ebx", 9),
    "AMD_IBPB": _f(0x80000008, 0, "ebx", 12),
    "AMD_IBRS": _f(0x80000008, 0, "ebx", 14),
    "AMD_STIBP": _f(0x80000008, 0, "ebx", 15),
    "AMD_STIBP_ALWAYS_ON": _f(0x80000008, 0, "ebx", 17),
    "AMD_PPIN": _f(0x80000008, 0, "ebx", 23),
    "AMD_SSBD": _f(0x80000008, 0, "ebx", 24),
    "VIRT_SSBD": _f(0x80000008, 0, "ebx", 25),
    "AMD_SSB_NO": _f(0x80000008, 0, "ebx", 26),
    "AMD_PSFD": _f(0x80000008, 0, "ebx", 28),
    "BTC_NO": _f(0x80000008, 0, "ebx", 29),
    "AMD_IBPB_RET": _f(0x80000008, 0, "ebx", 30),
    # CPUID.8000000AH:EDX (AMD APM vol. 3, E.4.9: SVM features)
    "TSCRATEMSR": _f(0x8000000A, 0, "edx", 4),
    # CPUID.80000022H:EAX
    "PERFMON_V2": _f(0x80000022, 0, "eax", 0),
    # CPUID.80000021H:EAX/ECX (AMD APM vol. 3; Linux cpufeatures.h names)
    "NO_NESTED_DATA_BP": _f(0x80000021, 0, "eax", 0),
    "WRMSR_XX_BASE_NS": _f(0x80000021, 0, "eax", 1),
    "LFENCE_RDTSC": _f(0x80000021, 0, "eax", 2),
    "VERW_CLEAR": _f(0x80000021, 0, "eax", 5),
    "NULL_SEL_CLR_BASE": _f(0x80000021, 0, "eax", 6),
    "AUTOIBRS": _f(0x80000021, 0, "eax", 8),
    "NO_SMM_CTL_MSR": _f(0x80000021, 0, "eax", 9),
    "SBPB": _f(0x80000021, 0, "eax", 27),
    "IBPB_BRTYPE": _f(0x80000021, 0, "eax", 28),
    "SRSO_NO": _f(0x80000021, 0, "eax", 29),
    "TSA_SQ_NO": _f(0x80000021, 0, "ecx", 1),
    "TSA_L1_NO": _f(0x80000021, 0, "ecx", 2),
}

_AVX512_FEATURES = tuple(n for n in FEATURES if n.startswith("AVX512")) + ("AVX10",)
_AMX_FEATURES = tuple(n for n in FEATURES if n.startswith("AMX_"))
# Everything that executes on YMM state (VEX/EVEX/XOP encodings) needs XCR0.AVX.
_AVX_FEATURES = ("AVX", "FMA", "F16C", "AVX2", "VAES", "VPCLMULQDQ", "AVX_VNNI",
                 "AVX_IFMA", "AVX_VNNI_INT8", "AVX_NE_CONVERT", "AVX_VNNI_INT16",
                 "XOP", "FMA4") + _AVX512_FEATURES

# (XCR0 components that must all be enabled, features cleared and leaves
# dropped when they are not). Used by guest_for_xcr0.
_XSTATE_DEPENDENTS: tuple[tuple[int, tuple[str, ...], tuple[int, ...]], ...] = (
    (_AVX, _AVX_FEATURES, ()),
    (_OPMASK | _ZMM_HI256 | _HI16_ZMM, _AVX512_FEATURES, ()),
    (_PKRU, ("PKU", "OSPKE"), ()),
    (_XTILECFG | _XTILEDATA, _AMX_FEATURES, (0x1D, 0x1E)),  # 0x1D/0x1E: tile palettes, TMUL
    (_BNDREGS | _BNDCSR, ("MPX",), ()),
    (_APX, ("APX_F",), ()),
)


def _normalize_name(name: str) -> str:
    return name.strip().upper().replace("-", "_").replace(".", "_")


# compiled on first use (functools.cache): `vmm run` reads no dump (cold start)
_DUMP_LINE = r"""^CPUID\s+(?P<leaf>[0-9A-Fa-f]{1,8})\s*:\s*
        (?P<eax>[0-9A-Fa-f]{1,8})-(?P<ebx>[0-9A-Fa-f]{1,8})-
        (?P<ecx>[0-9A-Fa-f]{1,8})-(?P<edx>[0-9A-Fa-f]{1,8})
        (?:\s+\[SL\s+(?P<sub>[0-9A-Fa-f]{1,8})\])?
        (?:\s+(?P<comment>\[.*))?\s*$"""


@functools.cache
def _dump_line():
    return re.compile(_DUMP_LINE, re.VERBOSE)


def _key(function: int, index: int, flags: int) -> tuple[int, int]:
    return (function, index if flags & SIGNIFICANT_INDEX else 0)


def _parse_u32(value: object, where: str) -> int:
    """Accept an int or a hex string ("0x..."), as written by to_json."""
    if isinstance(value, bool):
        raise CpuidError(f"{where}: expected a 32-bit value, got {value!r}")
    if isinstance(value, int):
        n = value
    elif isinstance(value, str):
        try:
            n = int(value, 16)
        except ValueError:
            raise CpuidError(f"{where}: expected a hex string like '0x1f', got {value!r}") from None
    else:
        raise CpuidError(f"{where}: expected a hex string or int, got {type(value).__name__}")
    if not 0 <= n <= _U32:
        raise CpuidError(f"{where}: {value!r} does not fit in 32 bits")
    return n


class CpuidTable:
    """An ordered set of CPUID entries, as passed to KVM_SET_CPUID2."""

    def __init__(self, entries: Iterable[CpuidEntry] = ()):
        self._entries: list[CpuidEntry] = []
        self._by_key: dict[tuple[int, int], CpuidEntry] = {}
        self._indexed: dict[int, bool] = {}
        for e in entries:
            self.put(e)

    # -- construction -----------------------------------------------------

    def put(self, entry: CpuidEntry, *, replace: bool = True) -> None:
        """Add an entry, or replace the one with the same (function, index).

        With replace=False an existing entry is an error (used by the readers).
        """
        for name in ("function", "index", "flags") + REGISTERS:
            v = getattr(entry, name)
            if not isinstance(v, int) or not 0 <= v <= _U32:
                raise CpuidError(f"CPUID entry {entry}: {name} must be a 32-bit integer")
        seen = self._indexed.get(entry.function)
        if seen is not None and seen != entry.indexed:
            raise CpuidError(
                f"leaf {entry.function:#x}: mixes entries with and without "
                "KVM_CPUID_FLAG_SIGNIFCANT_INDEX")
        self._indexed[entry.function] = entry.indexed
        key = _key(entry.function, entry.index, entry.flags)
        old = self._by_key.get(key)
        if old is not None and not replace:
            raise CpuidError(f"duplicate leaf {entry.function:#x} sub-leaf {entry.index:#x}")
        if old is not None:
            self._entries[self._entries.index(old)] = entry
        else:
            self._entries.append(entry)
        self._by_key[key] = entry

    def remove(self, function: int, index: int | None = None) -> None:
        """Drop leaf ``function`` (all sub-leaves when index is None)."""
        keep = [e for e in self._entries
                if not (e.function == function and (index is None or e.index == index))]
        self._rebuild(keep)

    def _rebuild(self, entries: list[CpuidEntry]) -> None:
        self._entries, self._by_key, self._indexed = [], {}, {}
        for e in entries:
            self.put(e)

    def copy(self) -> "CpuidTable":
        return CpuidTable(CpuidEntry(*e.as_tuple()) for e in self._entries)  # not dataclasses.replace: 10x slower

    def with_apic_id(self, apic_id: int) -> "CpuidTable":
        """A copy for the vCPU with this APIC ID: CPUID.1:EBX[31:24] and the x2APIC ID in EDX of
        the topology leaves 0xB/0x1F. KVM_GET_SUPPORTED_CPUID leaves there the ID of whichever host
        CPU answered the ioctl."""
        t = self.copy()
        e = t.entry(1)
        if e is not None:
            e.ebx = (e.ebx & 0x00FFFFFF) | ((apic_id & 0xFF) << 24)
        for e in t:
            if e.function in (0xB, 0x1F):
                e.edx = apic_id
        return t

    @classmethod
    def from_kvm_entries(cls, entries: Iterable[tuple]) -> "CpuidTable":
        """From (function, index, flags, eax, ebx, ecx, edx) tuples; duplicates are an error."""
        table = cls()
        for n, t in enumerate(entries):
            if len(t) != 7:
                raise CpuidError(f"kvm entry #{n}: expected 7 fields, got {len(t)}")
            try:
                table.put(CpuidEntry(*(int(x) for x in t)), replace=False)
            except CpuidError as exc:
                raise CpuidError(f"kvm entry #{n}: {exc}") from None
        return table

    def to_kvm_entries(self) -> list[tuple[int, int, int, int, int, int, int]]:
        return [e.as_tuple() for e in self._entries]

    @classmethod
    def from_dump(cls, path_or_text: str | os.PathLike) -> "CpuidTable":
        """Parse the ``CPUID <leaf>: <eax>-<ebx>-<ecx>-<edx> [SL <sub>] [comment]`` format.

        A str naming an existing file (and holding no newline) is read as a path,
        otherwise it is the dump text itself.
        """
        if isinstance(path_or_text, os.PathLike) or (
                isinstance(path_or_text, str) and "\n" not in path_or_text
                and os.path.isfile(path_or_text)):
            source = str(path_or_text)
            text = Path(path_or_text).read_text()
        else:
            source, text = "<text>", str(path_or_text)
            if "\n" not in text and text.strip() and not text.lstrip().startswith(("CPUID", "#")):
                raise CpuidError(f"{text}: no such CPUID dump file")
        table = cls()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = _dump_line().match(line)
            if m is None or (m["comment"] or "").startswith("[SL"):  # malformed sub-leaf marker
                raise CpuidError(f"{source}:{lineno}: not a CPUID dump line: {raw!r}")
            function = int(m["leaf"], 16)
            sub = m["sub"]
            index = int(sub, 16) if sub is not None else 0
            not_indexed = (m["comment"] or "").startswith(NOT_INDEXED)
            indexed = sub is not None or (function in INDEXED_LEAVES and not not_indexed)
            flags = SIGNIFICANT_INDEX if indexed else 0
            try:
                table.put(CpuidEntry(function, index, flags,
                                     *(int(m[r], 16) for r in REGISTERS)), replace=False)
            except CpuidError as exc:
                raise CpuidError(f"{source}:{lineno}: {exc}: {raw!r}") from None
        return table

    def to_dump(self, comment: str | None = None) -> str:
        """Write the dump format read by from_dump (one line per entry).

        An entry of a leaf from_dump would take as indexed (INDEXED_LEAVES) that does not carry
        the flag, as KVM reports leaf 0x80000020, is marked ``[not indexed]`` so it reads back
        unchanged."""
        lines = [f"# {c}" for c in comment.splitlines()] if comment else []
        for e in self._entries:
            line = f"CPUID {e.function:08X}: {e.eax:08X}-{e.ebx:08X}-{e.ecx:08X}-{e.edx:08X}"
            if e.indexed:
                line += f" [SL {e.index:02X}]"
            elif e.function in INDEXED_LEAVES:
                line += f" {NOT_INDEXED}"
            lines.append(line)
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict:
        return {
            "vendor": self.vendor,
            "entries": [
                {"function": f"{e.function:#x}", "index": f"{e.index:#x}", "flags": f"{e.flags:#x}",
                 **{r: f"{e.reg(r):#010x}" for r in REGISTERS}}
                for e in self._entries
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> "CpuidTable":
        if not isinstance(data, dict) or not isinstance(data.get("entries"), list):
            raise CpuidError("CPUID JSON: expected an object with an 'entries' list")
        fields = ("function", "index", "flags") + REGISTERS
        table = cls()
        for n, item in enumerate(data["entries"]):
            where = f"CPUID JSON entries[{n}]"
            if not isinstance(item, dict):
                raise CpuidError(f"{where}: expected an object, got {type(item).__name__}")
            missing = [f for f in fields if f not in item]
            extra = sorted(set(item) - set(fields))
            if missing or extra:
                raise CpuidError(f"{where}: missing {missing}, unknown {extra}")
            e = CpuidEntry(*(_parse_u32(item[f], f"{where}.{f}") for f in fields))
            try:
                table.put(e, replace=False)
            except CpuidError as exc:
                raise CpuidError(f"{where}: {exc}") from None
        vendor = data.get("vendor")
        if vendor is not None and vendor != table.vendor:
            raise CpuidError(f"CPUID JSON: vendor {vendor!r} does not match leaf 0 ({table.vendor!r})")
        return table

    # -- queries ----------------------------------------------------------

    def entry(self, function: int, index: int = 0) -> CpuidEntry | None:
        """The entry for (function, index); index is ignored for non-indexed leaves."""
        indexed = self._indexed.get(function)
        if indexed is None:
            return None
        return self._by_key.get((function, index if indexed else 0))

    def __iter__(self) -> Iterator[CpuidEntry]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __eq__(self, other: object) -> bool:
        # Order does not matter to KVM_SET_CPUID2, so it does not matter here.
        if not isinstance(other, CpuidTable):
            return NotImplemented
        return sorted(self.to_kvm_entries()) == sorted(other.to_kvm_entries())

    __hash__ = None  # mutable

    def __repr__(self) -> str:
        return f"<CpuidTable {self.vendor or '?'} {len(self)} entries>"

    @property
    def vendor(self) -> str | None:
        """Vendor string from leaf 0 (EBX, EDX, ECX), e.g. 'GenuineIntel'."""
        e = self.entry(0)
        if e is None:
            return None
        raw = b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))
        return raw.decode("latin-1").rstrip("\0")

    @property
    def max_leaf(self) -> int | None:
        e = self.entry(0)
        return e.eax if e else None

    @property
    def max_extended_leaf(self) -> int | None:
        e = self.entry(0x80000000)
        return e.eax if e else None

    # -- named features ---------------------------------------------------

    @staticmethod
    def feature(name: str) -> Feature:
        """Look up a feature name; unknown names raise CpuidError with suggestions."""
        key = _normalize_name(name)
        if key in FEATURES:
            return FEATURES[key]
        import difflib
        close = difflib.get_close_matches(key, FEATURES, n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CpuidError(f"unknown CPUID feature {name!r}{hint}")

    def has(self, name: str) -> bool:
        f = self.feature(name)
        e = self.entry(f.leaf, f.subleaf)
        return bool(e is not None and e.reg(f.register) >> f.bit & 1)

    def features(self) -> set[str]:
        return {n for n in FEATURES if self.has(n)}

    def set_feature(self, name: str, value: bool = True) -> None:
        """Set or clear a named feature bit in place (the leaf must exist)."""
        f = self.feature(name)
        e = self.entry(f.leaf, f.subleaf)
        if e is None:
            if not value:
                return
            raise CpuidError(f"cannot set {name}: leaf {f.leaf:#x}.{f.subleaf} is not in the table")
        old = e.reg(f.register)
        setattr(e, f.register, old | (1 << f.bit) if value else old & ~(1 << f.bit))

    def diff(self, other: "CpuidTable") -> list[tuple[str, bool, bool]]:
        """Named features that differ: (name, self has, other has)."""
        return [(n, self.has(n), other.has(n)) for n in FEATURES if self.has(n) != other.has(n)]

    # -- XSAVE enumeration (leaf 0xD) ---------------------------------------

    def xcr0_supported(self) -> int:
        """XCR0 bits the CPU supports: CPUID.(0DH,0):EDX:EAX (0 without leaf 0xD)."""
        e = self.entry(0xD, 0)
        return (e.edx << 32 | e.eax) if e else 0

    def xss_supported(self) -> int:
        """IA32_XSS bits the CPU supports: CPUID.(0DH,1):EDX:ECX."""
        e = self.entry(0xD, 1)
        return (e.edx << 32 | e.ecx) if e else 0

    def with_xsave_enabled(self) -> "CpuidTable":
        """A copy with CPUID.01H:ECX.XSAVE[26] set.

        Some hosts (PVM here) report leaf 0xD from KVM_GET_SUPPORTED_CPUID but
        not the XSAVE bit; a guest kernel will not touch XCR0 without it.
        """
        t = self.copy()
        t.set_feature("XSAVE", True)
        return t

    def guest_for_xcr0(self, xcr0: int, *, ensure_xsave: bool = True) -> "CpuidTable":
        """A new table for a guest whose XCR0 is limited to ``xcr0 & xcr0_supported()``.

        x87 and SSE (bits 0, 1) are always kept. What changes:
          * 0xD.0 EAX/EDX: the guest mask.
          * 0xD.0 EBX and ECX: both set to the standard-format size of the guest
            mask, as KVM_GET_SUPPORTED_CPUID does. KVM rewrites EBX at run time
            from the guest's current XCR0 (kvm_update_cpuid_runtime); ECX stays.
          * 0xD.1 EBX: compacted size of guest mask | IA32_XSS, with XSS = 0
            (a fresh guest); 0 when neither XSAVEC nor XSAVES is enumerated.
            0xD.1 ECX/EDX (supported XSS) are left alone.
          * 0xD sub-leaves >= 2 of user components that are no longer enabled
            are dropped; supervisor sub-leaves stay.
          * Feature bits that need a removed component are cleared (AVX family
            without bit 2; all AVX512* unless 5, 6 and 7 are all on; PKU/OSPKE
            without 9; AMX_* and leaves 0x1D/0x1E without both 17 and 18; MPX
            without 3+4; APX_F without 19).
          * With ensure_xsave, CPUID.01H:ECX.XSAVE is set if the mask has more
            than x87|SSE. OSXSAVE/OSPKE are left as they are: KVM recomputes
            them from the guest's CR4.

        Partial groups (e.g. opmask without Hi16_ZMM) are kept in the mask so an
        experiment can provoke the #GP that XSETBV raises for them; only the
        dependent feature bits are cleared.
        """
        from .xsave_layout import XsaveLayout

        supported = self.xcr0_supported()
        if not supported:
            raise CpuidError("the table has no CPUID leaf 0xD: XSAVE is not enumerated")
        layout = XsaveLayout.from_cpuid(self)
        guest = (xcr0 & supported) | _X87 | _SSE
        xss = self.xss_supported()
        t = self.copy()

        d0 = t.entry(0xD, 0)
        d0.eax, d0.edx = guest & _U32, guest >> 32
        d0.ebx = d0.ecx = layout.standard_size(guest)
        d1 = t.entry(0xD, 1)
        if d1 is not None:
            compacted = d1.eax & 0b1010  # XSAVEC (bit 1) or XSAVES (bit 3)
            d1.ebx = layout.compacted_size(guest) if compacted else 0
        for e in list(t):
            if e.function == 0xD and e.index >= 2 and not ((guest | xss) >> e.index & 1):
                t.remove(0xD, e.index)

        for needed, names, leaves in _XSTATE_DEPENDENTS:
            if guest & needed != needed:
                for n in names:
                    t.set_feature(n, False)
                for leaf in leaves:
                    t.remove(leaf)

        if ensure_xsave and guest & ~(_X87 | _SSE):
            t.set_feature("XSAVE", True)
        return t
