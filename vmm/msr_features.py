"""Which MSRs a guest has, by its CPUID: one table for save, restore, compat and `vmm reg list`.

KVM_GET_MSR_INDEX_LIST lists what the *host's* KVM can save, not what a given guest was given: a
Skylake host lists IA32_BNDCFGS whatever the guest CPUID says, and restoring that MSR on a host
without MPX fails with EINVAL. So an MSR of GATED is part of a vCPU's state only when the guest CPUID
has one of its features (Intel SDM vol. 4, "architectural MSRs", the CPUID bit each MSR needs; Linux
arch/x86/kvm/x86.c kvm_get/set_msr_common and vmx/svm checks of guest_cpu_cap_has()). An MSR of
EVERY_GUEST is given to every guest KVM runs (architectural, or emulated by KVM whatever the CPUID).
An MSR in neither is unknown to this table: it is saved as KVM lists it, and the test that compares
this table with the host's MSR index list names it.
"""

from .cpuid import CpuidTable
from .regs import MSRS

__all__ = ["GATED", "EVERY_GUEST", "msr_name", "features_of", "given", "gated_for", "withheld"]

# MSR -> the CPUID features (any one suffices) that give it to a guest.
GATED: dict[int, tuple[str, ...]] = {
    0x3B: ("TSC_ADJUST",),  # IA32_TSC_ADJUST
    0x48: ("IBRS_IBPB", "SSBD", "STIBP", "AMD_IBRS", "AMD_STIBP", "AMD_SSBD"),  # IA32_SPEC_CTRL
    0x8C: ("SGX_LC",), 0x8D: ("SGX_LC",), 0x8E: ("SGX_LC",), 0x8F: ("SGX_LC",),  # SGXLEPUBKEYHASH0-3
    0xE1: ("WAITPKG",),  # IA32_UMWAIT_CONTROL
    0x10A: ("ARCH_CAPABILITIES",),  # IA32_ARCH_CAPABILITIES
    0x1C4: ("XFD",), 0x1C5: ("XFD",),  # IA32_XFD, IA32_XFD_ERR (CPUID.(0DH,1):EAX[4])
    0x345: ("PDCM",),  # IA32_PERF_CAPABILITIES
    0x6A0: ("SHSTK", "IBT"), 0x6A2: ("SHSTK", "IBT"),  # IA32_U_CET, IA32_S_CET
    0x6A4: ("SHSTK",), 0x6A5: ("SHSTK",), 0x6A6: ("SHSTK",), 0x6A7: ("SHSTK",),  # IA32_PL0-3_SSP
    0x6A8: ("SHSTK",),  # IA32_INTERRUPT_SSP_TABLE_ADDR
    0x6E0: ("TSC_DEADLINE",),  # IA32_TSC_DEADLINE
    0x6E1: ("PKS",),  # IA32_PKRS
    0xD90: ("MPX",),  # IA32_BNDCFGS
    0xDA0: ("XSAVES",),  # IA32_XSS
    0x14CE: ("ARCH_LBR",), 0x14CF: ("ARCH_LBR",),  # IA32_LBR_CTL, IA32_LBR_DEPTH
    0xC0000103: ("RDTSCP", "RDPID"),  # IA32_TSC_AUX
    # AMD only
    0xC0010114: ("SVM",), 0xC0010117: ("SVM",),  # VM_CR, VM_HSAVE_PA
    0xC001011F: ("VIRT_SSBD",),  # VIRT_SPEC_CTRL
    **{0xC0010200 + i: ("PERFCTR_CORE",) for i in range(12)},  # PERF_CTL0-5 / PERF_CTR0-5
    0xC0000300: ("PERFMON_V2",), 0xC0000301: ("PERFMON_V2",), 0xC0000302: ("PERFMON_V2",),
}

_KVM_EMULATES = "KVM emulates it for every guest"
EVERY_GUEST: dict[int, str] = {
    **{i: "architectural (x86-64)" for i in (0x10, 0x174, 0x175, 0x176, 0x1B, 0x277, 0x2FF, 0x1A0,
                                               0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083,
                                               0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102)},
    0x1D9: "debug control (architectural)",
    **{i: "last-branch record of the legacy LBR (architectural)" for i in (0x1DB, 0x1DC, 0x1DD, 0x1DE)},
    **{i: "machine-check state (MCG_CAP.CTL_P)" for i in (0x179, 0x17A, 0x17B)},
    **{i: _KVM_EMULATES for i in (0x34, 0x8B, 0xCE, 0x140, 0x1FC, 0xC0010015)},
    # KVM's paravirtual MSRs: gated by CPUID 0x40000001, which KVM itself fills for every guest
    **{i: "KVM paravirtual MSR (KVM sets its CPUID leaf 0x40000001)"
       for i in (0x11, 0x12, *range(0x4B564D00, 0x4B564D09))},
}

_NAME = {i: n for n, i in MSRS.items()}
_NAME.update({0xD90: "BNDCFGS", 0xE1: "UMWAIT_CONTROL", 0x6E1: "PKRS", 0x345: "PERF_CAPABILITIES",
              0x14CE: "LBR_CTL", 0x14CF: "LBR_DEPTH", 0xC0010114: "VM_CR", 0xC0010117: "VM_HSAVE_PA",
              0xC001011F: "VIRT_SPEC_CTRL", 0x8B: "UCODE_REV", 0xCE: "PLATFORM_INFO", 0x34: "SMI_COUNT",
              0x140: "MISC_FEATURES_ENABLES", 0x1FC: "POWER_CTL", 0xC0010015: "HWCR",
              0x1DB: "LASTBRANCHFROMIP", 0x1DC: "LASTBRANCHTOIP", 0x1DD: "LASTINTFROMIP",
              0x1DE: "LASTINTTOIP", 0xC0000300: "PERF_CNTR_GLOBAL_STATUS",
              0xC0000301: "PERF_CNTR_GLOBAL_CTL", 0xC0000302: "PERF_CNTR_GLOBAL_STATUS_CLR"})


def msr_name(index: int) -> str:
    """'0xd90 (BNDCFGS)', or just the number when the MSR has no name here."""
    n = _NAME.get(index)
    return f"{index:#x} ({n})" if n else f"{index:#x}"


def features_of(index: int) -> tuple[str, ...]:
    """The CPUID features that give MSR `index` to a guest; () when every guest has it or it is
    not in the table."""
    return GATED.get(index, ())


def given(index: int, cpuid: CpuidTable) -> bool:
    """Whether a guest with this CPUID has MSR `index` (True for MSRs not gated by CPUID)."""
    feats = GATED.get(index)
    return not feats or any(cpuid.has(f) for f in feats)


def gated_for(cpuid: CpuidTable) -> list[int]:
    """The gated MSRs this guest CPUID gives the guest, ascending."""
    return sorted(i for i, feats in GATED.items() if any(cpuid.has(f) for f in feats))


def withheld(indices, cpuid: CpuidTable) -> list[int]:
    """The MSRs of `indices` this guest CPUID does not give the guest, ascending."""
    return sorted(i for i in indices if not given(i, cpuid))
