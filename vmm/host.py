"""The host description: what a host is (vendor, CPUID, XSAVE layout, MSR list, kernel, capabilities)
and what it can give a guest. Probe reports record it (`fingerprint`), snapshots carry it, and compat,
baseline and restore's host check judge a destination by it (`Host`).

A Host is built from a probe report, from a CPU's own CPUID (a dump: read as what KVM would give a
guest on that CPU, with what KVM emulates or derives added), or from this process's /dev/kvm.
"""

import os
from dataclasses import dataclass, field

from .cpuid import CpuidError, CpuidTable
from .cpuid_model import kvm_derived
from .errors import VmmError
from .xsave import XsaveError, XsaveLayout, kvm_xsave_size

__all__ = ["HostError", "Host", "fingerprint", "KVM_EMULATED", "XTILE"]

# What KVM gives every guest whatever the CPU has (seen in KVM_GET_SUPPORTED_CPUID on AMD hosts,
# which have neither TSC deadline nor IA32_ARCH_CAPABILITIES natively; TSC_ADJUST is emulated,
# Linux arch/x86/kvm/cpuid.c kvm_set_cpu_caps()): added to a CPUID dump standing for a host.
KVM_EMULATED = ("X2APIC", "TSC_DEADLINE", "TSC_ADJUST", "ARCH_CAPABILITIES", "HYPERVISOR")
XTILE = (1 << 17) | (1 << 18)


class HostError(VmmError):
    """A host description that cannot be used (a dump without leaf 0xD, a broken report)."""


def fingerprint(kvm):
    """What a destination needs to know about the host a guest was saved on (recorded in snapshots
    and in probe reports): kernel, vendor, PVM, KVM capabilities, KVM_GET_SUPPORTED_CPUID, the
    XSAVE layout it enumerates and KVM_GET_MSR_INDEX_LIST (hex strings)."""
    from .kvm import is_pvm
    supported = kvm.get_supported_cpuid()
    return {
        "kernel": os.uname().release,
        "vendor": supported.vendor,
        "pvm": is_pvm(),
        "capabilities": kvm.caps(),
        "tsc_khz": _tsc_khz(kvm),
        "supported_cpuid": supported.to_json(),
        "xsave_layout": XsaveLayout.from_cpuid(supported).to_json(),
        "msr_index_list": [f"{i:#x}" for i in kvm.msr_index_list()],
    }


def _tsc_khz(kvm):
    """The host's TSC rate (kHz) as KVM gives it to a new VM."""
    with kvm.create_vm() as vm:
        return vm.get_tsc_khz()


@dataclass
class Host:
    """What a destination can give a guest."""

    label: str
    kind: str  # "report", "dump", "here", "process" (this process's /dev/kvm, for restore)
    supported: CpuidTable  # KVM_GET_SUPPORTED_CPUID (report/here/process) or the CPU's CPUID (dump)
    amx_supported: CpuidTable = None  # the supported CPUID after an AMX permission was granted
    xsave2: int = None  # KVM_CAP_XSAVE2 without the AMX permission (None: unknown)
    xsave2_amx: int = None  # with it (None: cannot be granted there, or unknown)
    amx: str = "unknown"  # what an AMX guest permission request does there
    amx_problems: list = field(default_factory=list)
    msr_index_list: set = None  # KVM_GET_MSR_INDEX_LIST (None: unknown, e.g. a CPUID dump)
    msrs_readable: set = None
    kernel: str = None
    pvm: bool = None
    set_xsave_beyond_cpuid: bool = None  # KVM_SET_XSAVE takes components the guest CPUID lacks (6.6+)
    tsc_khz: int = None  # the TSC rate KVM gives a new VM, kHz (None: unknown)
    tsc_control: int = None  # KVM_CAP_TSC_CONTROL: KVM can scale a guest's TSC (None: unknown)

    @property
    def vendor(self):
        return self.supported.vendor

    @property
    def table(self):
        """The widest table: the supported CPUID with AMX when the permission can be granted."""
        return self.amx_supported or self.supported

    @property
    def layout(self):
        return XsaveLayout.from_cpuid(self.table)

    def guest_cpuid(self, xcr0=None):
        """The guest CPUID this host gives for `xcr0` (default: everything it can, AMX included
        when grantable); for a CPU's own CPUID, with what KVM emulates or derives added."""
        t = self.table
        if xcr0 is None:  # everything it can: a component whose sub-leaf is unknown cannot be laid out
            unknown = sum(1 << i for i in XsaveLayout.from_cpuid(t).unknown) if t.xcr0_supported() else 0
            mask = t.xcr0_supported() & ~unknown
        else:
            mask = xcr0
        try:
            g = t.guest_for_xcr0(mask)
        except (CpuidError, XsaveError) as e:
            raise HostError(f"{self.label}: {e}") from None
        if self.kind == "dump":
            g = kvm_derived(g)
            for name in KVM_EMULATED:
                f = CpuidTable.feature(name)
                if g.entry(f.leaf, f.subleaf) is not None:
                    g.set_feature(name, True)
            # Intel CPUs report SYSCALL (0x80000001 EDX[11]) only to 64-bit code, and dumps are often
            # taken by 32-bit tools: a long-mode CPU has SYSCALL for a 64-bit guest.
            if g.has("LM"):
                g.set_feature("SYSCALL", True)
        return g

    @property
    def capability(self):
        return self.guest_cpuid()

    def default_guest_cpuid(self):
        """What `vmm run` would give a guest there: no AMX (it needs the permission)."""
        return self.guest_cpuid(self.supported.xcr0_supported() & ~XTILE)

    def describe(self):
        return {"label": self.label, "kind": self.kind, "vendor": self.vendor, "kernel": self.kernel,
                "pvm": self.pvm}

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_report(cls, data, label):
        """From a validated probe report (its "host" and "checks")."""
        h = data["host"]
        try:
            supported = CpuidTable.from_json(h["supported_cpuid"])
            amx = h.get("amx")
            after = None
            if amx and amx.get("granted") and amx.get("supported_cpuid_after"):
                after = CpuidTable.from_json(amx["supported_cpuid_after"])
        except CpuidError as e:
            raise HostError(f"{label}: {e}") from None
        checks = {c["name"]: c for c in data.get("checks", [])}
        narrow = checks.get("set_xsave_after_narrow_cpuid")
        beyond = None
        if narrow and narrow["status"] in ("as-upstream", "differs"):
            beyond = bool(narrow["observed"]["ok"])
        granted = bool(amx and amx.get("granted"))
        return cls(
            label=label, kind="report", supported=supported, amx_supported=after,
            xsave2=h["xsave2"]["vm_fd"] or 4096,
            xsave2_amx=(amx["xsave2_after"].get("vm_fd") if granted else None),
            amx=("granted" if granted else amx["request"] if amx else "not probed"),
            amx_problems=([] if granted else [f"ARCH_REQ_XCOMP_GUEST_PERM(18) answered {amx['request']}"
                                              if amx else "the report has no AMX permission probe"]),
            msr_index_list={int(x, 16) for x in h["msr_index_list"]},
            msrs_readable=None if h.get("msrs_readable") is None else {int(x, 16) for x in h["msrs_readable"]},
            kernel=h["kernel"], pvm=h["pvm"], set_xsave_beyond_cpuid=beyond,
            tsc_khz=h.get("tsc_khz"), tsc_control=h.get("capabilities", {}).get("KVM_CAP_TSC_CONTROL"))

    @classmethod
    def from_dump(cls, table, label):
        """From a CPU's own CPUID: what KVM would list there (no AMX before the permission)."""
        from .amx import host_problems as amx_problems
        if not table.xcr0_supported():
            raise HostError(f"{label}: the CPUID has no leaf 0xD: XSAVE is not enumerated")
        layout = XsaveLayout.from_cpuid(table)
        xcr0 = table.xcr0_supported()
        try:
            xsave2 = kvm_xsave_size(layout, xcr0 & ~XTILE)
        except XsaveError:  # a user component's sub-leaf is missing: what needs it says so
            xsave2 = None
        no_amx = table
        if xcr0 & XTILE:  # what KVM lists before the permission: no tiles, a smaller area
            no_amx = table.copy()
            d0 = no_amx.entry(0xD, 0)
            d0.eax &= ~XTILE
            d0.ebx = d0.ecx = layout.standard_size(xcr0 & ~XTILE & layout.user_mask)
            for i in (17, 18):
                no_amx.remove(0xD, i)
        problems = amx_problems(table, source="CPUID") if xcr0 & XTILE else ["the CPU has no AMX"]
        xsave2_amx = None
        if not problems:
            try:
                xsave2_amx = kvm_xsave_size(layout, xcr0)
            except XsaveError as e:
                problems = [str(e)]
        return cls(label=label, kind="dump", supported=no_amx, amx_supported=None if problems else table,
                   xsave2=xsave2, xsave2_amx=xsave2_amx,
                   amx="possible (the CPU has AMX)" if not problems else "not possible", amx_problems=problems)

    @classmethod
    def from_kvm(cls, kvm, label="this host"):
        """This process's /dev/kvm as it is now (restore's host check): KVM_GET_SUPPORTED_CPUID and
        KVM_CAP_XSAVE2 follow the AMX guest permission this process holds, so what it can take is
        exactly what they say; the MSR list is KVM_GET_MSR_INDEX_LIST."""
        from .kvm import is_pvm
        supported = kvm.supported_cpuid()  # cached; only read here
        xsave2 = kvm.check_extension("KVM_CAP_XSAVE2") or 4096
        has_tiles = bool(supported.xcr0_supported() & XTILE == XTILE)
        return cls(label=label, kind="process", supported=supported, xsave2=xsave2,
                   amx="granted" if has_tiles else "not granted to this process",
                   amx_problems=[] if has_tiles else ["this process holds no AMX guest permission"],
                   msr_index_list=set(kvm.msr_index_list()), kernel=os.uname().release, pvm=is_pvm(),
                   tsc_khz=_tsc_khz(kvm), tsc_control=kvm.check_extension("KVM_CAP_TSC_CONTROL"))
