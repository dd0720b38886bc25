"""AMX: per-process XSAVE permissions (arch_prctl), tile enumeration, and the enablement flow.

AMX tile data (XSAVE component 18, XTILEDATA, 8 KiB) is a dynamically enabled feature: a process
must ask for it with arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) before its first vCPU exists (the
first vCPU locks the guest permissions; later requests get EBUSY). Until then KVM leaves bits 17/18
out of the supported CPUID leaf 0xD and out of KVM_CAP_XSAVE2, and KVM_SET_CPUID2 with bit 18 in
CPUID.(0DH,0).EAX fails with EPERM. So the order is: request, then read the supported CPUID and
KVM_CAP_XSAVE2, then build the guest CPUID, then create vCPUs (enable()).

Tile enumeration: CPUID leaf 0x1D (palettes) and 0x1E (TMUL), SDM vol. 2A, CPUID; vol. 1, 13.14 (XFD).
The pure functions here work offline on recorded CPUID dumps.
"""

from __future__ import annotations

import errno
import struct
from dataclasses import dataclass

from ._bindings import ffi, lib
from .cpuid import CpuidTable
from .errors import KvmError, VmmError, hint_for
from .xsave import TileConfig, XsaveLayout, kvm_xsave_size

__all__ = [
    "ARCH_GET_XCOMP_SUPP", "ARCH_GET_XCOMP_PERM", "ARCH_REQ_XCOMP_PERM",
    "ARCH_GET_XCOMP_GUEST_PERM", "ARCH_REQ_XCOMP_GUEST_PERM",
    "XFEATURE_XTILECFG", "XFEATURE_XTILEDATA", "XFEATURE_MASK_XTILECFG", "XFEATURE_MASK_XTILEDATA",
    "XFEATURE_MASK_XTILE", "MSR_IA32_XFD", "MSR_IA32_XFD_ERR", "AMX_FEATURES", "AmxError",
    "get_xcomp_supp", "get_xcomp_perm", "get_xcomp_guest_perm", "req_xcomp_perm", "req_xcomp_guest_perm",
    "prctl_error", "Palette", "Tmul", "palettes", "tmul", "xfd_msrs", "kvm_filtered_xcr0",
    "xsave2_size_for", "host_problems", "guest_cpuid", "AmxSetup", "enable",
    "GUEST_TILECFG", "GUEST_TILE_DATA", "GUEST_FAILS",
]

# <asm/prctl.h>
ARCH_GET_XCOMP_SUPP = 0x1021
ARCH_GET_XCOMP_PERM = 0x1022
ARCH_REQ_XCOMP_PERM = 0x1023
ARCH_GET_XCOMP_GUEST_PERM = 0x1024
ARCH_REQ_XCOMP_GUEST_PERM = 0x1025

_PRCTL_NAMES = {ARCH_GET_XCOMP_SUPP: "ARCH_GET_XCOMP_SUPP", ARCH_GET_XCOMP_PERM: "ARCH_GET_XCOMP_PERM",
                ARCH_REQ_XCOMP_PERM: "ARCH_REQ_XCOMP_PERM",
                ARCH_GET_XCOMP_GUEST_PERM: "ARCH_GET_XCOMP_GUEST_PERM",
                ARCH_REQ_XCOMP_GUEST_PERM: "ARCH_REQ_XCOMP_GUEST_PERM"}

XFEATURE_XTILECFG, XFEATURE_XTILEDATA = 17, 18
XFEATURE_MASK_XTILECFG = 1 << XFEATURE_XTILECFG
XFEATURE_MASK_XTILEDATA = 1 << XFEATURE_XTILEDATA
XFEATURE_MASK_XTILE = XFEATURE_MASK_XTILECFG | XFEATURE_MASK_XTILEDATA

MSR_IA32_XFD = 0x1C4
MSR_IA32_XFD_ERR = 0x1C5

AMX_FEATURES = ("AMX_TILE", "AMX_INT8", "AMX_BF16")  # CPUID.(07H,0):EDX[24,25,22]


class AmxError(VmmError):
    """AMX cannot be offered to a guest here; the message lists each missing piece."""
    kind = "host"  # the CLI's exit status 4: a limit of this host, not bad input


# -- arch_prctl -------------------------------------------------------------------------------

def prctl_error(code: int, arg, err: int, supported: int | None = None) -> KvmError:
    """The KvmError for a failed arch_prctl(code, arg): names the call, the errno and what to do."""
    name = _PRCTL_NAMES.get(code, f"{code:#x}")
    request = code in (ARCH_REQ_XCOMP_PERM, ARCH_REQ_XCOMP_GUEST_PERM)
    if err == errno.EOPNOTSUPP and request and arg != XFEATURE_XTILEDATA:
        hint = f"feature {arg} is not dynamically enabled: only XTILEDATA (18) needs a request"
    elif err == errno.EOPNOTSUPP and request:
        hint = ("the host CPU or kernel has no AMX/XFD" + (f" (ARCH_GET_XCOMP_SUPP = {supported:#x})"
                                                           if supported is not None else ""))
    elif err == errno.EBUSY and code == ARCH_REQ_XCOMP_GUEST_PERM:
        hint = ("this process already created a vCPU, which locks its guest XSAVE permissions: "
                "request AMX before the first vCPU (vmm ... --amx, Machine(amx=True) or amx.enable())")
    elif err == errno.ENOSPC:
        hint = ("the alternate signal stack (sigaltstack) is too small for the AMX signal frame: "
                "enlarge it to at least getauxval(AT_MINSIGSTKSZ), or ask only for guest permission "
                "(ARCH_REQ_XCOMP_GUEST_PERM), which KVM needs and which has no such check")
    elif err == errno.EINVAL:
        hint = ("the feature number is beyond the last XSAVE component, or this kernel does not know "
                "the arch_prctl code (kernels before 5.16 have no XCOMP permissions; guest permission "
                "needs 5.17)")
    else:
        hint = hint_for("arch_prctl", err)
    return KvmError("arch_prctl", err, hint=hint, detail=f"{name}, {arg}" if request else name)


def _get(code: int) -> int:
    out = ffi.new("unsigned long long *")
    r = lib.vmm_arch_prctl(code, int(ffi.cast("uintptr_t", out)))
    if r < 0:
        raise prctl_error(code, None, -r)
    return out[0]


def _request(code: int, feature: int) -> None:
    r = lib.vmm_arch_prctl(code, feature)
    if r < 0:
        try:
            supported = get_xcomp_supp()
        except KvmError:
            supported = None
        raise prctl_error(code, feature, -r, supported)


def get_xcomp_supp() -> int:
    """XSAVE features the kernel supports for user space (ARCH_GET_XCOMP_SUPP)."""
    return _get(ARCH_GET_XCOMP_SUPP)


def get_xcomp_perm() -> int:
    """XSAVE features this process may use itself (ARCH_GET_XCOMP_PERM)."""
    return _get(ARCH_GET_XCOMP_PERM)


def get_xcomp_guest_perm() -> int:
    """XSAVE features this process's guests may use (ARCH_GET_XCOMP_GUEST_PERM)."""
    return _get(ARCH_GET_XCOMP_GUEST_PERM)


def req_xcomp_perm(feature: int = XFEATURE_XTILEDATA) -> None:
    """ARCH_REQ_XCOMP_PERM: permission for this process itself (checks the sigaltstack size)."""
    _request(ARCH_REQ_XCOMP_PERM, feature)


def req_xcomp_guest_perm(feature: int = XFEATURE_XTILEDATA) -> None:
    """ARCH_REQ_XCOMP_GUEST_PERM: permission for this process's guests; before the first vCPU."""
    _request(ARCH_REQ_XCOMP_GUEST_PERM, feature)


# -- enumeration (pure) -----------------------------------------------------------------------

@dataclass(frozen=True)
class Palette:
    """CPUID.(1DH, palette): tile geometry."""

    palette: int
    total_tile_bytes: int
    bytes_per_tile: int
    bytes_per_row: int
    max_names: int
    max_rows: int


@dataclass(frozen=True)
class Tmul:
    """CPUID.(1EH, 0).EBX: the TMUL unit's limits."""

    maxk: int  # rows or columns
    maxn: int  # column bytes


def palettes(cpuid: CpuidTable) -> list[Palette]:
    """Palettes 1..CPUID.(1DH,0).EAX; [] without leaf 0x1D."""
    e0 = cpuid.entry(0x1D, 0)
    out = []
    for p in range(1, (e0.eax if e0 else 0) + 1):
        e = cpuid.entry(0x1D, p)
        if e is not None:
            out.append(Palette(p, e.eax & 0xFFFF, e.eax >> 16, e.ebx & 0xFFFF, e.ebx >> 16,
                               e.ecx & 0xFFFF))
    return out


def tmul(cpuid: CpuidTable) -> Tmul | None:
    e = cpuid.entry(0x1E, 0)
    return Tmul(e.ebx & 0xFF, (e.ebx >> 8) & 0xFFFF) if e is not None else None


def xfd_msrs(cpuid: CpuidTable) -> list[int]:
    """[MSR_IA32_XFD, MSR_IA32_XFD_ERR] when the guest CPUID has XFD (CPUID.(0DH,1).EAX[4]), else [].

    These belong to the saved vCPU state exactly then: KVM lists them in KVM_GET_MSR_INDEX_LIST
    only on XFD hosts, and a guest without XFD cannot have a non-zero XFD.
    """
    return [MSR_IA32_XFD, MSR_IA32_XFD_ERR] if cpuid.has("XFD") else []


def kvm_filtered_xcr0(supported_xcr0: int, permitted_xfeatures: int) -> int:
    """The XCR0 bits KVM offers this process (kvm_get_filtered_xcr0).

    With a dynamic feature (XTILEDATA) supported, KVM masks with the process's guest permission,
    and drops XTILECFG when XTILEDATA is not permitted: XTILECFG alone in XCR0 is illegal.
    """
    xcr0 = supported_xcr0
    if xcr0 & XFEATURE_MASK_XTILEDATA:
        xcr0 &= permitted_xfeatures
        if not xcr0 & XFEATURE_MASK_XTILEDATA:
            xcr0 &= ~XFEATURE_MASK_XTILECFG
    return xcr0


def xsave2_size_for(cpuid: CpuidTable, permitted_xfeatures: int) -> int:
    """KVM_CAP_XSAVE2 for a host with this CPUID and a process with this guest permission:
    max(4096, standard-format size of the filtered XCR0). Sapphire Rapids: 4096 without the
    XTILEDATA permission, 11008 with it."""
    xcr0 = kvm_filtered_xcr0(cpuid.xcr0_supported(), permitted_xfeatures)
    return kvm_xsave_size(XsaveLayout.from_cpuid(cpuid), xcr0)


def host_problems(supported: CpuidTable, xcomp_supp: int | None = None,
                  source: str = "KVM_GET_SUPPORTED_CPUID") -> list[str]:
    """What keeps AMX from a guest, given KVM's supported CPUID read after the permission request
    (and ARCH_GET_XCOMP_SUPP when known); [] when AMX can be exposed. `source` names the table
    in the messages (e.g. a dump file)."""
    problems = []
    lacking = [f"{n} ({b})" for n, b in (("XTILECFG", 17), ("XTILEDATA", 18))
               if xcomp_supp is not None and not xcomp_supp >> b & 1]
    if lacking:
        problems.append(f"ARCH_GET_XCOMP_SUPP {xcomp_supp:#x} lacks {' and '.join(lacking)}: "
                        "the host CPU or kernel has no AMX")
    missing = [n for n in AMX_FEATURES if not supported.has(n)]
    if missing:
        problems.append(f"{source} 7.0 EDX lacks {', '.join(missing)}")
    if not supported.has("XFD"):
        problems.append(f"{source} 0xD.1 EAX lacks XFD (bit 4)")
    xcr0 = supported.xcr0_supported()
    if xcr0 & XFEATURE_MASK_XTILE != XFEATURE_MASK_XTILE:
        why = (": no AMX in KVM, or no XTILEDATA guest permission in this process yet"
               if source == "KVM_GET_SUPPORTED_CPUID" else "")
        problems.append(f"{source} 0xD.0 EAX {xcr0:#x} lacks XTILECFG/XTILEDATA (bits 17/18){why}")
    if not palettes(supported) or tmul(supported) is None:
        problems.append(f"{source} lacks leaf 0x1D (tile palettes) or 0x1E (TMUL)")
    return problems


def guest_cpuid(supported: CpuidTable, xcr0: int | None = None) -> CpuidTable:
    """Guest CPUID with AMX: the supported CPUID limited to xcr0 (default: all it lists) plus
    XTILECFG|XTILEDATA, keeping 7.0 EDX AMX bits, 0xD.1 XFD, 0xD.17/18 and leaves 0x1D/0x1E;
    0xD.0 EBX/ECX become the size with the tile data (11008 on Sapphire Rapids)."""
    problems = host_problems(supported)
    if problems:
        raise AmxError("cannot build an AMX guest CPUID: " + "; ".join(problems))
    mask = supported.xcr0_supported() if xcr0 is None else xcr0
    return supported.guest_for_xcr0(mask | XFEATURE_MASK_XTILE)


# -- the enablement flow ----------------------------------------------------------------------

@dataclass
class AmxSetup:
    """What enable() saw and built."""

    xcomp_supp: int
    guest_perm_before: int
    guest_perm: int
    supported: CpuidTable  # KVM_GET_SUPPORTED_CPUID read after the permission request
    xsave2_size: int  # KVM_CAP_XSAVE2 on /dev/kvm, after the request
    guest_cpuid: CpuidTable


def enable(kvm, xcr0: int | None = None) -> AmxSetup:
    """Request AMX guest permission, then read what KVM offers and build the guest CPUID.

    Call before this process creates its first vCPU. Raises KvmError for arch_prctl failures
    (EOPNOTSUPP: no AMX here; EBUSY: too late) and AmxError when KVM does not offer AMX.
    """
    supp = get_xcomp_supp()
    before = get_xcomp_guest_perm()
    req_xcomp_guest_perm(XFEATURE_XTILEDATA)
    perm = get_xcomp_guest_perm()
    supported = kvm.get_supported_cpuid()
    problems = host_problems(supported, supp)
    if problems:
        raise AmxError("AMX is not available to guests: " + "; ".join(problems))
    return AmxSetup(supp, before, perm, supported, kvm.check_extension("KVM_CAP_XSAVE2"),
                    guest_cpuid(supported, xcr0))


# -- the amx guest (guests/amx.S) -------------------------------------------------------------

# What the guest loads into TMM0, and with which configuration.
GUEST_TILE_DATA = b"".join(struct.pack("<I", 0x414D5800 | k) for k in range(256))
GUEST_TILECFG = TileConfig(palette=1, colsb=(64,) * 8 + (0,) * 8, rows=(16,) * 8 + (0,) * 8)

GUEST_FAILS = {
    0xA1: "CPUID.01H:ECX.OSXSAVE is clear",
    0xA2: "CPUID.(0DH,17).EAX (XTILECFG size) is not 64",
    0xA3: "CPUID.(0DH,18).EAX (XTILEDATA size) is not 8192",
    0xA4: "CPUID.(0DH,18).EBX (XTILEDATA offset) is not 2816",
    0xA5: "CPUID.(1DH,0).EAX: no tile palette",
    0xA6: "CPUID.(1DH,1).EAX[31:16] bytes_per_tile is not 1024",
    0xA7: "CPUID.(1DH,1).EAX[15:0] total_tile_bytes is not 8192",
    0xA8: "CPUID.(1DH,1).EBX[31:16] max_names is not 8",
    0xA9: "CPUID.(1DH,1).EBX[15:0] bytes_per_row is not 64",
    0xAA: "CPUID.(1DH,1).ECX[15:0] max_rows is not 16",
    0xAB: "XCR0 lacks XTILECFG or XTILEDATA",
    0xAC: "CPUID.(0DH,0).EBX (size for the current XCR0) is below 11008",
    0xAD: "IA32_XFD is not 0 after the guest wrote 0",
    0xAE: "IA32_XFD is not 0x40000 after the guest armed it",
    0xAF: "IA32_XFD is not 0 after the #NM (the host should have cleared it)",
    0xB0: "IA32_XFD_ERR is not 0 after the #NM (the host should have cleared it)",
}
