"""Which MSRs a guest has, by its CPUID: one table for save, restore, compat and `vmm reg list`.

KVM_GET_MSR_INDEX_LIST lists what the *host's* KVM can save, not what a given guest was given: a
Skylake host lists IA32_BNDCFGS whatever the guest CPUID says, and restoring that MSR on a host
without MPX fails with EINVAL. So an MSR of GATED is part of a vCPU's state only when the guest CPUID
has one of its features (Intel SDM vol. 4, "architectural MSRs", the CPUID bit each MSR needs; Linux
arch/x86/kvm/x86.c kvm_get/set_msr_common and vmx/svm checks of guest_cpu_cap_has()). An MSR of
EVERY_GUEST is given to every guest KVM runs (architectural, or emulated by KVM whatever the CPUID).
An MSR in neither is unknown to this table: it is saved as KVM lists it, and the test that compares
this table with the host's MSR index list names it.

Most MSRs hang on one CPUID bit (vmm.cpuid.FEATURES). Some hang on a number or a signature instead:
those are the CONDITIONS below (the architectural PMU's counters, CPUID leaf 0AH; the Hyper-V MSRs,
which KVM emulates for a guest whose CPUID carries the Hyper-V interface signature, as QEMU saves them
only with hv-* enlightenments). Their names are used like feature names.
"""

from .cpuid import CpuidTable
from .regs import MSRS

__all__ = ["GATED", "EVERY_GUEST", "CONDITIONS", "msr_name", "features_of", "has", "given", "gated_for",
           "withheld"]

# IA32_PMC0-7 (0xC1), IA32_PERFEVTSEL0-7 (0x186), IA32_A_PMC0-7 (0x4C1): KVM gives at most 8
# (KVM_MAX_NR_INTEL_GP_COUNTERS), and a ninth would reach PLATFORM_INFO/UMWAIT_CONTROL/MISC_ENABLE
_MAX_PMCS = 8
_MAX_FIXED = 4  # IA32_FIXED_CTR0-3 (0x309..0x30C; KVM_MAX_NR_FIXED_COUNTERS on the 6.x kernels)


def _leaf_0a(cpuid: CpuidTable):
    """(version, general-purpose counters, fixed counters) of the architectural PMU, CPUID.0AH
    (SDM vol. 3B, 20.2 "Architectural performance monitoring"): fixed counters count from version 2,
    as KVM's intel_pmu_refresh() reads them."""
    e = cpuid.entry(0xA, 0)
    if e is None or not e.eax & 0xFF:
        return 0, 0, 0
    version = e.eax & 0xFF
    return version, e.eax >> 8 & 0xFF, (e.edx & 0x1F) if version > 1 else 0


def _hyperv(cpuid: CpuidTable) -> bool:
    # CPUID.40000001H:EAX = "Hv#1": the Hyper-V interface KVM's kvm_hv_set_cpuid() looks for
    e = cpuid.entry(0x40000001, 0)
    return e is not None and e.eax == 0x31237648


# name -> (what it means, predicate on the guest CPUID)
CONDITIONS: dict[str, tuple[str, object]] = {
    "ARCH_PERFMON_V2": ("CPUID.0AH:EAX[7:0] >= 2 (global PMU controls)", lambda c: _leaf_0a(c)[0] >= 2),
    **{f"PMC{i}": (f"CPUID.0AH:EAX[15:8] > {i} (general-purpose counter {i})",
                   lambda c, i=i: _leaf_0a(c)[1] > i) for i in range(_MAX_PMCS)},
    **{f"FIXED_CTR{i}": (f"CPUID.0AH:EDX[4:0] > {i} (fixed counter {i}, PMU version >= 2)",
                         lambda c, i=i: _leaf_0a(c)[2] > i) for i in range(_MAX_FIXED)},
    "HYPERV": ("CPUID.40000001H:EAX = 'Hv#1' (Hyper-V interface)", _hyperv),
}

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
    0xC0000104: ("TSCRATEMSR",),  # TSC_RATIO (svm.c: tsc_scaling && guest TSCRATEMSR)
    # IA32_FEATURE_CONTROL: VMX/SMX enables and the SGX launch-control lock (vmx.c
    # vmx_feature_control_msr_valid(); LMCE_ENABLED also needs MCG_CAP.LMCE_P, which vmm does not set)
    0x3A: ("VMX", "SMX", "SGX_LC"),
    # Intel architectural PMU (SDM vol. 4, table 2-2; KVM's msrs_to_save_pmu)
    **{0xC1 + i: (f"PMC{i}",) for i in range(_MAX_PMCS)},  # IA32_PMC0..
    **{0x186 + i: (f"PMC{i}",) for i in range(_MAX_PMCS)},  # IA32_PERFEVTSEL0..
    **{0x4C1 + i: (f"PMC{i}",) for i in range(_MAX_PMCS)},  # IA32_A_PMC0.. (full-width writes)
    **{0x309 + i: (f"FIXED_CTR{i}",) for i in range(_MAX_FIXED)},  # IA32_FIXED_CTR0..
    0x38D: ("ARCH_PERFMON_V2",), 0x38E: ("ARCH_PERFMON_V2",),  # FIXED_CTR_CTRL, PERF_GLOBAL_STATUS
    0x38F: ("ARCH_PERFMON_V2",), 0x390: ("ARCH_PERFMON_V2",),  # PERF_GLOBAL_CTRL, PERF_GLOBAL_OVF_CTRL
    0x3F1: ("DS",), 0x3F2: ("DS",), 0x600: ("DS",),  # IA32_PEBS_ENABLE, PEBS_DATA_CFG, IA32_DS_AREA
    # Intel PT (SDM vol. 3C, 33.2.8): RTIT_OUTPUT_BASE/MASK, RTIT_CTL/STATUS/CR3_MATCH, ADDR0-3_A/B
    **{i: ("INTEL_PT",) for i in (0x560, 0x561, 0x570, 0x571, 0x572, *range(0x580, 0x588))},
    # the VMX capability MSRs KVM emulates for nested guests (SDM vol. 3D, appendix A)
    **{i: ("VMX",) for i in range(0x480, 0x492)},
    # Hyper-V synthetic MSRs (TLFS; arch/x86/kvm/hyperv.c): the time reference counter alone makes a
    # guest without Hyper-V differ between two saves
    **{i: ("HYPERV",) for i in range(0x40000000, 0x40000200)},
}

_GATING_NAMES = frozenset(f for feats in GATED.values() for f in feats)

_KVM_EMULATES = "KVM emulates it for every guest"
EVERY_GUEST: dict[int, str] = {
    **{i: "architectural (x86-64)" for i in (0x10, 0x174, 0x175, 0x176, 0x1B, 0x277, 0x2FF, 0x1A0,
                                               0xC0000080, 0xC0000081, 0xC0000082, 0xC0000083,
                                               0xC0000084, 0xC0000100, 0xC0000101, 0xC0000102)},
    0x1D9: "debug control (architectural)",
    **{i: "last-branch record of the legacy LBR (architectural)" for i in (0x1DB, 0x1DC, 0x1DD, 0x1DE)},
    **{i: "machine-check state (MCG_CAP.CTL_P)" for i in (0x179, 0x17A, 0x17B)},
    **{i: _KVM_EMULATES for i in (0x34, 0x8B, 0xCE, 0x140, 0x1FC, 0xC0010015)},
    0x9E: "SMBASE: SMM state KVM keeps for every guest (userspace access only)",
    # the AMD legacy counters: amd_pmu_refresh() gives every guest of an AMD host these four, with or
    # without PERFCTR_CORE (which adds the six of 0xC0010200)
    **{i: "AMD legacy performance counters (KVM's AMD PMU gives them to every guest)"
       for i in range(0xC0010000, 0xC0010008)},
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
              0xC0000301: "PERF_CNTR_GLOBAL_CTL", 0xC0000302: "PERF_CNTR_GLOBAL_STATUS_CLR",
              0x9E: "SMBASE", 0xC0000104: "TSC_RATIO", 0x38D: "FIXED_CTR_CTRL", 0x38E: "PERF_GLOBAL_STATUS",
              0x38F: "PERF_GLOBAL_CTRL", 0x390: "PERF_GLOBAL_OVF_CTRL", 0x3F1: "PEBS_ENABLE",
              0x3F2: "PEBS_DATA_CFG", 0x600: "DS_AREA", 0x570: "RTIT_CTL", 0x571: "RTIT_STATUS",
              0x480: "VMX_BASIC", 0x40000020: "HV_TIME_REF_COUNT", 0x40000000: "HV_GUEST_OS_ID",
              0x40000001: "HV_HYPERCALL"})
_NAME.update({0xC1 + i: f"PMC{i}" for i in range(_MAX_PMCS)})
_NAME.update({0x186 + i: f"PERFEVTSEL{i}" for i in range(_MAX_PMCS)})
_NAME.update({0x4C1 + i: f"A_PMC{i}" for i in range(_MAX_PMCS)})
_NAME.update({0x309 + i: f"FIXED_CTR{i}" for i in range(_MAX_FIXED)})
_NAME.update({0xC0010000 + i: f"K7_EVNTSEL{i}" for i in range(4)})
_NAME.update({0xC0010004 + i: f"K7_PERFCTR{i}" for i in range(4)})


def msr_name(index: int) -> str:
    """'0xd90 (BNDCFGS)', or just the number when the MSR has no name here."""
    n = _NAME.get(index)
    return f"{index:#x} ({n})" if n else f"{index:#x}"


def features_of(index: int) -> tuple[str, ...]:
    """The CPUID features that give MSR `index` to a guest; () when every guest has it or it is
    not in the table."""
    return GATED.get(index, ())


def has(cpuid: CpuidTable, name: str) -> bool:
    """Whether `cpuid` has feature `name`: a vmm.cpuid.FEATURES bit or one of CONDITIONS.
    Raises vmm.cpuid.CpuidError for a name that is neither."""
    cond = CONDITIONS.get(name)
    return cond[1](cpuid) if cond else cpuid.has(name)


def given(index: int, cpuid: CpuidTable) -> bool:
    """Whether a guest with this CPUID has MSR `index` (True for MSRs not gated by CPUID)."""
    feats = GATED.get(index)
    return not feats or any(has(cpuid, f) for f in feats)


def gated_for(cpuid: CpuidTable) -> list[int]:
    """The gated MSRs this guest CPUID gives the guest, ascending."""
    present = {f for f in _GATING_NAMES if has(cpuid, f)}  # each name judged once, not per MSR
    return sorted(i for i, feats in GATED.items() if not present.isdisjoint(feats))


def withheld(indices, cpuid: CpuidTable) -> list[int]:
    """The MSRs of `indices` this guest CPUID does not give the guest, ascending."""
    return sorted(i for i in indices if not given(i, cpuid))
