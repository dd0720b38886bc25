"""VcpuState: everything KVM holds for one vCPU, saved and restored in one documented order.

Restore order, and why (each step names the constraint it satisfies):
  1. KVM_SET_CPUID2       first: KVM checks CR4, XCR0, XSAVE contents and MSR writes against the guest
                          CPUID, and AMX state needs the CPUID that exposes it (older kernels also
                          rejected KVM_SET_XSAVE after a narrower CPUID).
  2. KVM_SET_TSC_KHZ      before anything derived from the TSC rate (only when it differs).
  3. KVM_SET_SREGS        control registers, EFER and the APIC base before the state that depends on them.
  4. KVM_SET_LAPIC        (in-kernel irqchip only) before the MSRs: KVM drops a write of
                          MSR_IA32_TSC_DEADLINE unless the LAPIC timer is already in TSC-deadline mode.
  5. KVM_SET_MSRS         the MSR set saved, in one call with the TSC deadline as the last entry
                          (KVM writes the entries in order).
  6. KVM_SET_XCRS         XCR0 before the XSAVE image that it governs.
  7. KVM_SET_XSAVE        the extended state (sized by discovery, never 4096 by assumption).
  8. KVM_SET_VCPU_EVENTS, KVM_SET_MP_STATE, KVM_SET_DEBUGREGS
  9. KVM_SET_REGS         last: RIP/RFLAGS/GPRs exactly as saved.

Save first completes pending I/O (KVM_RUN with immediate_exit), so an `in` the guest is waiting on
is finished and RIP is past it; the saved state then needs no exit to be replayed.

save_state() and restore_state() issue their ioctls through the C code of the fast path
(vmm/fastpath.py, cdefs/fastpath.c), one call each: save takes regs/sregs/events from the KVM_RUN
above (KVM_CAP_SYNC_REGS) and the VcpuState decodes each piece from the saved buffers on first
access; restore checks everything before its first ioctl, sets CPUID and TSC kHz from Python when
they differ, and lets the C code set the rest in the order above, except that buffers saved on this
same vCPU may carry regs/sregs/events through kvm_run where cdefs/fastpath.c finds that safe (loaded
before restore_state returns). The fast path itself (fast_path(), save_state_fast(),
restore_state_fast() below) keeps preallocated buffers and leaves deferred pieces for the next KVM_RUN.
"""

import errno
from dataclasses import dataclass

from . import msr_features
from ._bindings import ffi, lib
from .cpuid import CpuidTable
from .cstructs import Regs, Sregs, Segment, DTable
from .errors import KvmError, StateError
from .fastpath import fill, restore_raw, save_raw

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
MSR_IA32_XSS = 0xDA0
MSR_IA32_XFD = 0x1C4
MSR_IA32_XFD_ERR = 0x1C5
MSR_TSC_AUX = 0xC0000103
MSR_IA32_U_CET, MSR_IA32_S_CET = 0x6A0, 0x6A2
CET_SSP_MSRS = (0x6A4, 0x6A5, 0x6A6, 0x6A7, 0x6A8)  # PL0-3_SSP, INT_SSP_TAB

# MSRs that exist for a guest only when its CPUID gives it the feature: saved and restored only
# then, so no state is generated for a feature the guest was not given (one table: vmm.msr_features).
FEATURE_GATED_MSRS = msr_features.GATED


_FEATURE_GATED = frozenset(FEATURE_GATED_MSRS)
_gated_cache = {}


def gated_msrs(cpuid):
    """The feature-gated MSRs this guest CPUID has (any of the listed features suffices)."""
    hit = _gated_cache.get(id(cpuid))
    if hit is not None and hit[0] is cpuid:  # the same table object as last time
        return hit[1]
    gated = msr_features.gated_for(cpuid)
    if len(_gated_cache) > 64:
        _gated_cache.clear()
    _gated_cache[id(cpuid)] = (cpuid, gated)
    return gated


@dataclass
class VcpuState:
    cpuid: CpuidTable
    mp_state: int
    regs: Regs
    sregs: Sregs
    xsave: bytes
    xcrs: dict
    msrs: dict
    events: bytes
    debugregs: bytes
    lapic: bytes = None
    tsc_khz: int = 0
    # KVM_GET_CPUID2 when it differs from the CPUID userspace set (seen on PVM hosts, which add
    # host features): a diagnostic; restore sets `cpuid`, the table the guest was given.
    cpuid_kvm: CpuidTable = None

    # --- lazy views: save_state() keeps the C buffers and decodes a piece when it is first read
    @classmethod
    def _from_raw(cls, raw, cpuid, tsc_khz, cpuid_kvm):
        """A state whose `_LAZY` pieces are decoded from `raw` (vmm.fastpath.FastState, owned by
        this state alone) on first access; the others are given."""
        s = cls.__new__(cls)
        d = s.__dict__
        d["_raw"] = raw
        d["cpuid"], d["tsc_khz"], d["cpuid_kvm"] = cpuid, tsc_khz, cpuid_kvm
        # lapic has a class default (None), so it cannot be lazy: read now, and remembered to tell
        # whether it was replaced since
        d["lapic"] = d["_raw_lapic"] = raw.buffer("lapic")[:] if raw.c.has_lapic else None
        return s

    def __getattr__(self, name):
        # only reached for an attribute the instance lacks: a piece not decoded yet
        raw = self.__dict__.get("_raw")
        if raw is None or name not in _DECODE:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        value = self.__dict__[name] = _DECODE[name](raw)
        return value

    def _undecoded_raw(self):
        """The C buffers when no piece has been decoded (so none can have been changed), else None."""
        d = self.__dict__
        raw = d.get("_raw")
        if raw is None or not _DECODE.keys().isdisjoint(d) or d["lapic"] is not d["_raw_lapic"]:
            return None
        return raw

    # --- JSON (hex strings for values, as the rest of the project) ------------------------------
    def to_json(self):
        return {
            "cpuid": self.cpuid.to_json(),
            "mp_state": self.mp_state,
            "regs": self.regs.to_json(),
            "sregs": _sregs_to_json(self.sregs),
            "xsave": self.xsave.hex(),
            "xcrs": {hex(k): hex(v) for k, v in sorted(self.xcrs.items())},
            "msrs": {hex(k): hex(v) for k, v in self.msrs.items()},
            "events": self.events.hex(),
            "debugregs": self.debugregs.hex(),
            "lapic": self.lapic.hex() if self.lapic is not None else None,
            "tsc_khz": self.tsc_khz,
            "cpuid_kvm": self.cpuid_kvm.to_json() if self.cpuid_kvm is not None else None,
        }

    @classmethod
    def from_json(cls, d):
        """The state `to_json` wrote, every field checked for shape and range before anything uses
        it (see _Check): StateError naming the first bad field ("regs.rip: ..."), never a value
        cut, wrapped or guessed."""
        c = _Check()
        try:
            if not isinstance(d, dict):
                raise StateError("not a JSON object")
            cpuid = c.table(d, "cpuid")
            xcrs = c.u_map(d, "xcrs", 32, 64)
            state = cls(
                cpuid=cpuid,
                mp_state=c.mp_state(d),
                regs=Regs(**c.struct(d, "regs", "struct kvm_regs")),
                sregs=_sregs_from_json(c, d),
                xsave=c.xsave(d, cpuid),
                xcrs=c.xcrs(xcrs, cpuid),
                msrs=c.u_map(d, "msrs", 32, 64),
                events=c.blob(d, "events", "struct kvm_vcpu_events"),
                debugregs=c.blob(d, "debugregs", "struct kvm_debugregs"),
                lapic=c.blob(d, "lapic", "struct kvm_lapic_state") if d.get("lapic") is not None else None,
                tsc_khz=c.tsc_khz(d),
                cpuid_kvm=c.table(d, "cpuid_kvm") if d.get("cpuid_kvm") else None,
            )
        except StateError as e:
            raise StateError(f"malformed vCPU state: {e}") from None
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise StateError(f"malformed vCPU state: {type(e).__name__}: {e}") from None
        return state


# KVM_MP_STATE_* values x86 KVM takes (include/uapi/linux/kvm.h; 5-8 are s390's)
MP_STATES = {0: "RUNNABLE", 1: "UNINITIALIZED", 2: "INIT_RECEIVED", 3: "HALTED", 4: "SIPI_RECEIVED",
             9: "AP_RESET_HOLD", 10: "SUSPENDED"}
X86_CR0_PE, X86_CR0_NW, X86_CR0_CD, X86_CR0_PG = 1, 1 << 29, 1 << 30, 1 << 31
X86_CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


class _Check:
    """Shape and range checks of a saved vCPU state's JSON: each value the hex string to_json
    writes ("0x..."), no wider than its uAPI field (widths and byte sizes from the structs of
    <linux/kvm.h> through cffi), mp_state a KVM_MP_STATE_* x86 takes, XCR0 by the architectural
    rules (vmm.xsave_layout.xcr0_violations) and within the guest CPUID, sregs as KVM's
    kvm_is_valid_sregs (arch/x86/kvm/x86.c) takes them, the XSAVE image at least struct kvm_xsave
    with nothing beyond the area the guest CPUID's components occupy."""

    @staticmethod
    def u(v, bits, name):
        if not isinstance(v, str) or not v.startswith("0x") or not v[2:] \
                or v[2:].strip("0123456789abcdefABCDEF"):
            raise StateError(f"{name}: {v!r} is not a hex number (0x...)")
        n = int(v, 16)
        if n >> bits:
            raise StateError(f"{name}: {v} does not fit in {bits} bits")
        return n

    @staticmethod
    def get(d, key, name, kind):
        if key not in d:
            raise StateError(f"{name}: missing")
        v = d[key]
        if not isinstance(v, kind):
            raise StateError(f"{name}: expected a JSON {'object' if kind is dict else kind.__name__}, "
                             f"not {type(v).__name__}")
        return v

    def struct(self, d, key, ctype, name=None):
        """{field: int} of a JSON object with exactly the fields of `ctype`, each within its width."""
        name = name or key
        obj = self.get(d, key, name, dict)
        want = dict(ffi.typeof(ctype).fields)
        want = {k: f for k, f in want.items() if not k.startswith("pad")}
        if set(obj) != set(want):
            diff = sorted(set(obj) ^ set(want))
            raise StateError(f"{name}: fields differ from {ctype}: {', '.join(diff)}")
        return {k: self.u(v, 8 * ffi.sizeof(want[k].type), f"{name}.{k}") for k, v in obj.items()}

    def u_map(self, d, key, kbits, vbits):
        obj = self.get(d, key, key, dict)
        return {self.u(k, kbits, f"{key} index {k}"): self.u(v, vbits, f"{key}[{k}]") for k, v in obj.items()}

    def blob(self, d, key, ctype):
        v = self.get(d, key, key, str)
        try:
            b = bytes.fromhex(v)
        except ValueError:
            raise StateError(f"{key}: not hex bytes") from None
        if len(b) != ffi.sizeof(ctype):
            raise StateError(f"{key}: {len(b)} bytes, {ctype} is {ffi.sizeof(ctype)}")
        return b

    def table(self, d, key):
        from .cpuid import CpuidError
        try:
            return CpuidTable.from_json(d[key])
        except KeyError:
            raise StateError(f"{key}: missing") from None
        except (CpuidError, TypeError, ValueError, AttributeError) as e:
            raise StateError(f"{key}: {e}") from None

    def mp_state(self, d):
        v = d.get("mp_state")
        if type(v) is not int or v not in MP_STATES:
            raise StateError(f"mp_state: {v!r} is not a KVM_MP_STATE x86 takes "
                             f"({', '.join(f'{k} {n}' for k, n in MP_STATES.items())})")
        return v

    def tsc_khz(self, d):
        if "tsc_khz" not in d:
            return 0  # not recorded: restore keeps the rate the new vCPU has
        v = d["tsc_khz"]
        if type(v) is not int or not 0 < v < 1 << 32:
            raise StateError(f"tsc_khz: {v!r} is not a TSC rate in kHz (1 to 2^32-1, KVM_SET_TSC_KHZ)")
        return v

    def xcrs(self, xcrs, cpuid):
        from .xsave_layout import XsaveError, check_xcr0_rules
        for k in xcrs:
            if k != 0:
                raise StateError(f"xcrs: XCR{k} does not exist (XCR0 is the only one, SDM vol. 1 13.3)")
        if 0 in xcrs:
            try:
                check_xcr0_rules(xcrs[0], "xcrs XCR0", cpuid.xcr0_supported())
            except XsaveError as e:
                raise StateError(str(e)) from None
        return xcrs

    def xsave(self, d, cpuid):
        from .xsave_layout import KVM_XSAVE_SIZE, XsaveError, XsaveLayout, kvm_xsave_size
        v = self.get(d, "xsave", "xsave", str)
        try:
            b = bytes.fromhex(v)
        except ValueError:
            raise StateError("xsave: not hex bytes") from None
        if len(b) < KVM_XSAVE_SIZE:
            raise StateError(f"xsave: {len(b)} bytes, struct kvm_xsave is at least {KVM_XSAVE_SIZE}")
        try:
            size = kvm_xsave_size(XsaveLayout.from_cpuid(cpuid))
        except XsaveError:
            size = KVM_XSAVE_SIZE  # no layout known: the legacy area is all that can hold state
        if len(b) > size and any(b[size:]):
            first = size + next(i for i, x in enumerate(b[size:]) if x)
            raise StateError(f"xsave: {len(b)} bytes with state at byte {first}, beyond the {size} bytes "
                             "the guest CPUID's XSAVE components occupy (leaf 0xD)")
        return b


def _xcrs_of(raw):
    x = raw.c.xcrs
    return {x.xcrs[i].xcr: x.xcrs[i].value for i in range(x.nr_xcrs)}


def _msrs_of(raw):
    e = raw._msrs.entries
    return {e[i].index: e[i].data for i in range(len(raw.msr_indices))}


_DECODE = {  # piece -> decoder from vmm.fastpath.FastState (the same values save_state read by ioctl)
    "mp_state": lambda raw: raw.c.mp_state.mp_state,
    "regs": lambda raw: Regs.from_c(raw.c.regs),
    "sregs": lambda raw: Sregs.from_c(raw.c.sregs),
    "xsave": lambda raw: raw.buffer("xsave")[:],
    "xcrs": _xcrs_of,
    "msrs": _msrs_of,
    "events": lambda raw: raw.buffer("events")[:],
    "debugregs": lambda raw: raw.buffer("debugregs")[:],
}


def _sregs_to_json(s):
    d = {}
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        d[name] = {k: hex(v) for k, v in vars(getattr(s, name)).items()}
    for name in ("gdt", "idt"):
        d[name] = {k: hex(v) for k, v in vars(getattr(s, name)).items()}
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        d[name] = hex(getattr(s, name))
    d["interrupt_bitmap"] = [hex(v) for v in s.interrupt_bitmap]
    return d


def _sregs_from_json(c, d):
    name = "sregs"
    j = c.get(d, name, name, dict)
    s = Sregs()
    for seg in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        setattr(s, seg, Segment(**c.struct(j, seg, "struct kvm_segment", f"{name}.{seg}")))
    for t in ("gdt", "idt"):
        setattr(s, t, DTable(**c.struct(j, t, "struct kvm_dtable", f"{name}.{t}")))
    for r in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(s, r, c.u(j.get(r), 64, f"{name}.{r}"))
    bitmap = c.get(j, "interrupt_bitmap", f"{name}.interrupt_bitmap", list)
    n = len(ffi.new("struct kvm_sregs *").interrupt_bitmap)
    if len(bitmap) != n:
        raise StateError(f"{name}.interrupt_bitmap: {len(bitmap)} words, struct kvm_sregs has {n}")
    s.interrupt_bitmap = [c.u(v, 64, f"{name}.interrupt_bitmap[{i}]") for i, v in enumerate(bitmap)]
    # what KVM_SET_SREGS refuses with EINVAL (arch/x86/kvm/x86.c kvm_is_valid_sregs, kvm_is_valid_cr0)
    cr0, efer = s.cr0, s.efer
    if cr0 >> 32:
        raise StateError(f"{name}.cr0: {cr0:#x} sets reserved bits 63:32")
    if cr0 & X86_CR0_PG and not cr0 & X86_CR0_PE:
        raise StateError(f"{name}.cr0: {cr0:#x} has PG without PE")
    if cr0 & X86_CR0_NW and not cr0 & X86_CR0_CD:
        raise StateError(f"{name}.cr0: {cr0:#x} has NW without CD")
    if efer & EFER_LME and cr0 & X86_CR0_PG:
        if not s.cr4 & X86_CR4_PAE:
            raise StateError(f"{name}.cr4: {s.cr4:#x} lacks PAE, which long mode (EFER.LME, CR0.PG) needs")
        if not efer & EFER_LMA:
            raise StateError(f"{name}.efer: {efer:#x} has LME with CR0.PG but not LMA")
    elif efer & EFER_LMA or s.cs.l:
        raise StateError(f"{name}.cr0: {cr0:#x} with EFER {efer:#x} and CS.L {s.cs.l}: long mode "
                         "(EFER.LMA, CS.L) needs EFER.LME and CR0.PG")
    return s


# --- save ------------------------------------------------------------------------------------------
SYNC_REGS_ALL = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS | lib.KVM_SYNC_X86_EVENTS


def complete_pending_io(vcpu, sync_regs=False):
    """KVM_RUN with immediate_exit: KVM finishes an in-flight PIO/MMIO (an `in` gets its data,
    RIP moves past the instruction) and returns EINTR without running guest code. With
    `sync_regs`, KVM also stores regs, sregs and events in kvm_run on the way out
    (KVM_CAP_SYNC_REGS): the same values KVM_GET_REGS/SREGS/VCPU_EVENTS return, without them."""
    run = vcpu.kvm_run
    valid = run.kvm_valid_regs
    if sync_regs:
        run.kvm_valid_regs = SYNC_REGS_ALL
    run.immediate_exit = 1
    try:
        vcpu.run()
    finally:
        run.immediate_exit = 0
        run.kvm_valid_regs = valid


def _has_sync_regs(kvm):
    cached = getattr(kvm, "_sync_regs_all", None)
    if cached is None:
        cached = kvm._sync_regs_all = \
            kvm.check_extension(lib.KVM_CAP_SYNC_REGS) & SYNC_REGS_ALL == SYNC_REGS_ALL
    return cached


def saveable_msrs(vcpu, cpuid):
    """The MSRs this vCPU's state consists of: KVM_GET_MSR_INDEX_LIST minus what this vCPU cannot
    read, minus feature-gated MSRs the guest was not given, plus the gated ones it was."""
    gated = set(FEATURE_GATED_MSRS)
    want = [m for m in vcpu.vm.kvm.msr_index_list() if m not in gated] + gated_msrs(cpuid)
    readable = []
    # KVM_GET_MSRS stops at the first MSR it cannot read: drop that one and go on from there
    pending = want
    while pending:
        try:
            vcpu.get_msrs(pending)
            readable += pending
            break
        except KvmError as e:
            if e.ioctl != "KVM_GET_MSRS" or e.errno != errno.EINVAL:
                raise
            n = _stopped_at(vcpu, pending)
            readable += pending[:n]
            pending = pending[n + 1:]
    return readable


def _stopped_at(vcpu, indices):
    for i, m in enumerate(indices):
        try:
            vcpu.get_msrs([m])
        except KvmError:
            return i
    return len(indices)


def _saveable_msrs_cached(vcpu, cpuid):
    """saveable_msrs() per vCPU and guest CPUID: which MSRs a vCPU can read does not change
    while its CPUID stays the same, so it is probed once, not on every save."""
    hit = getattr(vcpu, "_saveable_msrs", None)
    if hit is None or hit[0] is not cpuid:
        hit = vcpu._saveable_msrs = (cpuid, saveable_msrs(vcpu, cpuid))
    return hit[1]


def save_state(vcpu, msr_indices=None, diagnose=False):
    """Everything KVM holds for this vCPU, in the order KVM's selftests read it.

    The ioctls are the C fast path's plan (cdefs/fastpath.c, one call): the KVM_RUN with
    immediate_exit that completes pending I/O also hands over regs, sregs and vCPU events
    (KVM_CAP_SYNC_REGS; KVM_GET_REGS/SREGS/VCPU_EVENTS where it does not), then KVM_GET_MSRS,
    GET_MP_STATE, GET_XSAVE2 (or GET_XSAVE), GET_XCRS, GET_DEBUGREGS and GET_LAPIC. The VcpuState
    keeps those buffers and decodes each piece on first access: the same values, byte for byte.

    The CPUID saved is the table this process gave KVM_SET_CPUID2 (KVM_GET_CPUID2 when there is
    none). With `diagnose`, KVM_GET_CPUID2 is also read and kept when it differs (snapshots do).
    The MSRs are `msr_indices` (default: saveable_msrs(), probed once per vCPU and CPUID), TSC
    deadline last. Raises KvmError naming the ioctl that failed."""
    kvm_cpuid = vcpu.get_cpuid2() if diagnose or vcpu.cpuid is None else None
    cpuid = vcpu.cpuid if vcpu.cpuid is not None else kvm_cpuid
    indices = _msr_order(vcpu, tuple(msr_indices) if msr_indices is not None else
                         tuple(_saveable_msrs_cached(vcpu, cpuid)))
    raw = save_raw(vcpu, indices)
    return VcpuState._from_raw(raw, cpuid, vcpu.tsc_khz(),
                               None if kvm_cpuid is None or kvm_cpuid == cpuid else kvm_cpuid)


def _msr_order(vcpu, indices):
    """The MSR indices with MSR_IA32_TSC_DEADLINE moved last (restore writes it after the LAPIC),
    remembered per vCPU for the last set asked for."""
    hit = getattr(vcpu, "_msr_order", None)
    if hit is None or hit[0] != indices:
        ordered = indices
        if MSR_IA32_TSC_DEADLINE in indices:
            ordered = tuple(m for m in indices if m != MSR_IA32_TSC_DEADLINE) + (MSR_IA32_TSC_DEADLINE,)
        hit = vcpu._msr_order = (indices, ordered)
    return hit[1]


# --- restore ---------------------------------------------------------------------------------------
def fit_xsave(buf, size):
    """The XSAVE image at `size` bytes, when that loses nothing, else StateError.

    The buffer size follows the process's AMX guest permission (KVM_CAP_XSAVE2), not the guest: a
    guest without AMX saved by a process that had the permission carries 11008 bytes whose tail is
    zero, and one saved without it carries 4096. Zeros may be cut or added; real state may not."""
    if len(buf) == size:
        return buf
    if len(buf) < size:
        return buf + bytes(size - len(buf))
    if any(buf[size:]):
        raise StateError(f"the saved XSAVE area is {len(buf)} bytes with state beyond byte {size}, this "
                         f"vCPU's area is {size} bytes (KVM_CAP_XSAVE2): the guest has state (AMX tile "
                         "data?) this process has no XSAVE permission for")
    return buf[:size]


def xsave_restored_as_saved(got, saved):
    """Whether the XSAVE area read back after a restore (`got`, this vCPU's size) is the saved one
    as the restore fitted it (fit_xsave): a zero tail the saving process's AMX permission added is
    not a difference."""
    try:
        return got == fit_xsave(saved, len(got))
    except StateError:
        return False


def check_restorable(vcpu, state):
    """Refuse, before any ioctl, state this vCPU cannot take. Returns the XSAVE image to load."""
    xsave = fit_xsave(state.xsave, vcpu.xsave_size())
    stray = msr_features.withheld(state.msrs, state.cpuid)
    if stray:
        raise StateError("the state carries MSRs for features its guest CPUID does not have: "
                         + ", ".join(f"0x{m:x} ({'/'.join(FEATURE_GATED_MSRS[m])})" for m in stray))
    if state.lapic is not None and not vcpu.vm.has_irqchip:
        raise StateError("the state has LAPIC registers but this VM has no in-kernel irqchip")
    return xsave


def restore_state(vcpu, state, order=None):
    """Load `state` into `vcpu` in the documented order (see the module docstring).

    Every check comes before any ioctl: the XSAVE image against this vCPU's size (fit_xsave) and
    the checks of Vcpu.set_xsave, MSRs of features the guest CPUID lacks, LAPIC registers without an
    in-kernel irqchip. Then KVM_SET_CPUID2 (only when the vCPU holds another table) and
    KVM_SET_TSC_KHZ (only when the rate differs) from Python, and the rest in one C call
    (cdefs/fastpath.c with every piece set by ioctl, none left in kvm_run). A state from save_state()
    that nobody decoded is restored from its own buffers. Raises StateError, XsaveError or KvmError.

    `order` exists for the test that demonstrates why the order matters; callers leave it None
    (with it, each step is its own Python ioctl call, in the order given)."""
    if order is not None:
        return _restore_in_order(vcpu, state, order)
    raw = state._undecoded_raw() if isinstance(state, VcpuState) else None
    if raw is not None and bool(raw.c.has_lapic) != (state.lapic is not None):
        raw = None
    memo = vcpu.__dict__.get("_restore_checked")
    if raw is not None and memo is not None and memo[0] is raw and memo[1] is state.cpuid \
            and memo[2] == raw.xsave_size:
        # these very buffers passed every check below on this vCPU: what they depend on cannot
        # have changed (guest XSAVE permissions only grow; the C code checks the XSAVE size first)
        if state.lapic is not None and not vcpu.vm.has_irqchip:
            raise StateError("the state has LAPIC registers but this VM has no in-kernel irqchip")
        st = raw
    else:
        limits = vcpu._xsave_limits()  # (size, supported CPUID): one read for both XSAVE checks
        if raw is not None and raw.xsave_size != limits[0]:
            raw = None
        if raw is not None:
            _check_msrs_and_lapic(vcpu, state, raw.msr_indices)
            vcpu.validate_xsave(memoryview(raw.buffer("xsave")), limits)
            st = raw
            vcpu._restore_checked = (raw, state.cpuid, raw.xsave_size)
        else:
            xsave = fit_xsave(state.xsave, limits[0])
            _check_msrs_and_lapic(vcpu, state, state.msrs)
            vcpu.validate_xsave(xsave, limits)
            st = fill(state, xsave)
    if not (vcpu.cpuid is state.cpuid or vcpu.cpuid == state.cpuid):
        vcpu.set_cpuid2(state.cpuid)  # a vCPU that already holds exactly this CPUID needs none
    if state.tsc_khz and state.tsc_khz != vcpu.tsc_khz():
        set_tsc_khz(vcpu, state.tsc_khz)
    restore_raw(vcpu, st)


def _check_msrs_and_lapic(vcpu, state, msr_indices):
    gated = _FEATURE_GATED
    stray = [m for m in msr_indices if m in gated]
    if stray:
        allowed = set(gated_msrs(state.cpuid))
        stray = sorted(m for m in stray if m not in allowed)
    if stray:
        raise StateError("the state carries MSRs for features its guest CPUID does not have: "
                         + ", ".join(f"0x{m:x} ({'/'.join(FEATURE_GATED_MSRS[m])})" for m in stray))
    if state.lapic is not None and not vcpu.vm.has_irqchip:
        raise StateError("the state has LAPIC registers but this VM has no in-kernel irqchip")


def _restore_in_order(vcpu, state, order):
    xsave = check_restorable(vcpu, state)
    # regs/sregs/events a fast-path restore left in kvm_run would overwrite these at the next KVM_RUN
    vcpu.kvm_run.kvm_dirty_regs = 0
    msrs = dict(state.msrs)
    deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    if deadline is not None:
        msrs[MSR_IA32_TSC_DEADLINE] = deadline  # KVM writes the entries in order: this one last
    steps = {
        # a vCPU that already holds exactly this CPUID (from us) needs no second KVM_SET_CPUID2
        "cpuid": lambda: (vcpu.cpuid is state.cpuid or vcpu.cpuid == state.cpuid
                          or vcpu.set_cpuid2(state.cpuid)),
        "tsc_khz": lambda: set_tsc_khz(vcpu, state.tsc_khz),
        "sregs": lambda: vcpu.set_sregs(state.sregs),
        "lapic": lambda: state.lapic is not None and vcpu.set_lapic(state.lapic),
        "msrs": lambda: msrs and vcpu.set_msrs(msrs),
        "xcrs": lambda: vcpu.set_xcrs(state.xcrs),
        "xsave": lambda: vcpu.set_xsave(xsave),
        "events": lambda: vcpu.set_vcpu_events(state.events),
        "mp_state": lambda: vcpu.set_mp_state(state.mp_state),
        "debugregs": lambda: vcpu.set_debugregs(state.debugregs),
        "regs": lambda: vcpu.set_regs(state.regs),
    }
    for step in order:
        steps[step]()


RESTORE_ORDER = ("cpuid", "tsc_khz", "sregs", "lapic", "msrs", "xcrs", "xsave",
                 "events", "mp_state", "debugregs", "regs")


def set_tsc_khz(vcpu, khz):
    """KVM_SET_TSC_KHZ unless the rate is already this vCPU's; a rate this host cannot give (beyond
    the 250 ppm KVM takes without TSC scaling, vmm/tsc.py) is refused with the reason."""
    from .tsc import rate_problem
    here = vcpu.tsc_khz()
    if not khz or here == khz:
        return
    problem = rate_problem(khz, here, vcpu.vm.kvm.check_extension(lib.KVM_CAP_TSC_CONTROL))
    if problem:
        raise StateError(problem.replace("the host's", "this host's").replace(" there ", " here "))
    vcpu.set_tsc_khz(khz)


# --- the fast path ---------------------------------------------------------------------------------
def fast_path(vcpu):
    """This vCPU's FastVcpu (vmm/fastpath.py), made on first use and kept with the Vcpu: the MSR
    set, XSAVE size and TSC frequency are read once. For a hot loop, keep its buffers:
    `fp = fast_path(vcpu); st = fp.save(); ...; fp.restore(st)`."""
    from .fastpath import FastVcpu
    fp = getattr(vcpu, "_fast_path", None)
    if fp is None or fp.vcpu is not vcpu or fp._fd != vcpu.fd:
        fp = FastVcpu(vcpu)
        vcpu._fast_path = fp
    return fp


def save_state_fast(vcpu):
    """save_state() through the C fast path: the same VcpuState (MSR set of saveable_msrs)."""
    fp = fast_path(vcpu)
    return fp.to_state(fp.save())


def restore_state_fast(vcpu, state):
    """restore_state() through the C fast path. A VcpuState not saved from this vCPU is checked,
    and its CPUID/TSC frequency set when they differ, by FastVcpu.load(); its first restore sets
    every piece by ioctl in RESTORE_ORDER (KVM_SET_MSRS once, TSC deadline last)."""
    fp = fast_path(vcpu)
    fp.restore(fp.load(state))
