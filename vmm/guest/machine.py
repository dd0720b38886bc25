"""Machine: a VM with the guest runtime installed and vCPUs ready at the payload's entry."""

import errno

from .. import kvm as kvm_mod
from ..errors import KvmError
from .._bindings import lib
from ..xsave_layout import XTILECFG, XTILEDATA, check_xcr0_rules
from . import catalog, runtime
from .runner import Runner

XCR0_X87_SSE = 0x3
XCR0_XTILE = 1 << XTILECFG | 1 << XTILEDATA  # AMX: only with amx=True (vmm/amx.py)
# The guests' xstate.inc: the XSAVE components a CPL3 payload can fill (x87 SSE AVX opmask
# ZMM_Hi256 Hi16_ZMM PKRU XTILECFG XTILEDATA), and %rdx bit 63 at entry: "fill exactly these"
USER_XSTATE = 0x602E7
XSTATE_FORCED = 1 << 63


def default_guest_cpuid(kvm, xcr0=None):
    """The guest CPUID a VM gets unless the caller supplies one: KVM's supported CPUID limited to
    `xcr0` (default: everything leaf 0xD lists). KVM requires CPUID.1:ECX.XSAVE for CR4.OSXSAVE,
    and some hosts (PVM) list XSAVE components in leaf 0xD but not the XSAVE bit; we set it then."""
    supported = kvm.supported_cpuid()  # cached per Kvm: _check_requirements read it already
    if xcr0 is None:
        return supported.guest_for_xcr0(supported.xcr0_supported() & ~XCR0_XTILE)
    # an XCR0 asked for, even x87|SSE alone, is one the guest gets: it needs CPUID.1:ECX.XSAVE
    return supported.guest_for_xcr0(xcr0 & ~XCR0_XTILE).with_xsave_enabled()


def _check_args(args):
    """Host arguments (`vmm run --arg`): unsigned 64-bit values, validated before any VM exists."""
    args = tuple(args)
    for a in args:
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < 1 << 64:
            raise ValueError(f"guest argument {a!r} is not an unsigned 64-bit integer")
    return args


class Machine:
    """Builds a VM for a guest image. Use as a context manager; `kvm` may be shared. With
    `cpuid_source` (a file name) the given `cpuid` is a user's and is judged against this host first
    (vmm.compat.check_runs_here: CompatError before any VM)."""

    def __init__(self, guest="hello", cpl=3, memory=runtime.DEFAULT_MEMORY, vcpus=1, kvm=None,
                 cpuid=None, xcr0=None, device=kvm_mod.DEFAULT_DEVICE, on_console=None, irqchip=True,
                 amx=False, pit=False, args=(), cpuid_source=None):
        if not 1 <= vcpus <= runtime.MAX_VCPUS:
            raise ValueError(f"the guest runtime lays out 1 to {runtime.MAX_VCPUS} vCPUs, not {vcpus}")
        if memory < runtime.MIN_MEMORY:
            raise ValueError(f"guest memory must be at least {runtime.MIN_MEMORY >> 20} MiB")
        self.args = _check_args(args)
        if xcr0 is not None:  # the architectural rules before any ioctl (KVM_SET_XCRS would say EINVAL)
            check_xcr0_rules(xcr0)
        self.image = guest if isinstance(guest, catalog.Image) else catalog.load(guest)
        self.image.check_fits(memory, vcpus)  # before any ioctl
        rt = self.runtime_image = catalog.load("runtime")
        self.cpl = cpl
        self._own_kvm = kvm is None
        self.kvm = kvm or kvm_mod.Kvm(device)
        self.amx = None
        self.notes = []  # what the host did not allow and vmm worked around, for the reports
        try:
            if amx:  # AMX guest permission must precede the first vCPU (vmm/amx.py)
                from ..amx import enable as enable_amx
                self.amx = enable_amx(self.kvm, xcr0)
                cpuid = self.amx.guest_cpuid if cpuid is None else cpuid
            if cpuid_source is not None and cpuid is not None:  # a user's CPUID: the compat judge first
                from ..compat import check_runs_here
                check_runs_here(cpuid, self.kvm, cpuid_source)
            self._check_requirements()
            self.vm = self.kvm.create_vm()
            if irqchip:
                self.vm.create_irqchip()
            if pit:  # the i8254 needs the in-kernel irqchip
                self.vm.create_pit2()
            self.memory = self.vm.add_memory(memory)
            runtime.install(self.vm, rt, self.image.segments, memory)
            self.cpuid = cpuid if cpuid is not None else default_guest_cpuid(self.kvm, xcr0)
            self.xcr0 = self.cpuid.xcr0_supported() if xcr0 is None else xcr0
            self.vcpus = []
            self.runners = []
            for i in range(vcpus):
                v = self.vm.create_vcpu()
                self.setup_vcpu(v, i)
                self.vcpus.append(v)
                self.runners.append(Runner(self.vm, v, on_console, self.args))
        except BaseException:
            self.close()
            raise

    def _check_requirements(self):
        """Refuse, before any VM exists, a guest whose instructions need XSAVE components this
        host's KVM cannot give (KVM_GET_SUPPORTED_CPUID leaf 0xD; AMX only with --amx)."""
        supported = (self.amx.guest_cpuid if self.amx else self.kvm.supported_cpuid()).xcr0_supported()
        if not self.amx:
            supported &= ~XCR0_XTILE
        missing = self.image.missing(supported)
        if missing:
            from ..errors import GuestError
            from ..xsave_layout import mask_names
            r = missing[0]
            raise GuestError(f"guest {self.image.name!r} needs {r.feature} (XSAVE components "
                             f"{mask_names(r.xcr0)}); this host's KVM supports XCR0 {supported:#x} "
                             f"({mask_names(supported)}){': ' + r.hint if r.hint else ''}")

    def setup_vcpu(self, vcpu, index):
        # Guest CPUID first: KVM validates CR4 and XCR0 against it. Each vCPU has its own APIC ID.
        vcpu.set_cpuid2(self.cpuid.with_apic_id(index))
        xsave = self.cpuid.has("XSAVE")
        st = runtime.entry_state(self.cpl, xsave=xsave, base_sregs=vcpu.get_sregs(),
                                 stack_top=runtime.USER_STACK_TOP - index * catalog.STACK_BYTES,
                                 entry=self.image.entry, pke=self.cpuid.has("PKU"))
        st.regs.rsi = index  # the payload learns its vCPU index from %rsi
        # ... and the XCR0 it was given from %rdx: where guest CPL3 code runs under the host's XCR0
        # (kvm_pvm), XGETBV cannot tell it (guests/xstate.inc)
        st.regs.rdx = self.xcr0 if xsave else XCR0_X87_SSE
        try:
            vcpu.set_sregs(st.sregs)
        except KvmError as e:
            if not st.sregs.cr4 & runtime.CR4_PKE or e.errno != errno.EINVAL:
                raise
            # KVM refused CR4.PKE although the guest CPUID lists PKU: run without it, and say so
            st.sregs.cr4 &= ~runtime.CR4_PKE
            vcpu.set_sregs(st.sregs)
            self.notes.append("KVM_SET_SREGS refused CR4.PKE (guest CPUID has PKU): the guest runs "
                              "without it, so it cannot use PKRU")
        vcpu.set_regs(st.regs)
        if xsave:  # KVM's reset XCR0 is x87 alone (1): the guest gets what was asked, SSE too
            vcpu.set_xcrs({0: self.xcr0})
        if index:
            # with an in-kernel LAPIC, APs wait for INIT/SIPI; ours start at the entry like the BSP
            vcpu.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)

    @classmethod
    def from_snapshot(cls, snap, kvm=None, device=kvm_mod.DEFAULT_DEVICE, on_console=None):
        """A Machine around a VM restored from a validated snapshot (vmm.snapshot.load)."""
        from .. import snapshot
        m = cls.__new__(cls)
        m._own_kvm = kvm is None
        m.kvm = kvm or kvm_mod.Kvm(device)
        m.vm = None
        try:
            m.vm, m.vcpus = snapshot.restore(snap, m.kvm)
        except BaseException:
            m.close()
            raise
        g = snap.meta.get("guest", {})
        m.image = catalog.Image(g.get("name", "snapshot"), b"")
        m.cpl = g.get("cpl", 3)
        m.cpuid = snap.guest_cpuid()
        m.xcr0 = snap.vcpus[0].xcrs.get(0, 0)
        m.memory = m.vm.memory[0]
        m.runners = [Runner(m.vm, v, on_console) for v in m.vcpus]
        return m

    @property
    def vcpu(self):
        return self.vcpus[0]

    @property
    def runner(self):
        return self.runners[0]

    def run(self, timeout=None, vcpu=0):
        return self.runners[vcpu].run_until_event(timeout)

    @property
    def console(self):
        return b"".join(bytes(r.console) for r in self.runners).decode("utf-8", "replace")

    def close(self):
        vm = getattr(self, "vm", None)
        if vm is not None:
            vm.close()
            self.vm = None
        if self._own_kvm and getattr(self, "kvm", None) is not None:
            self.kvm.close()
            self.kvm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
