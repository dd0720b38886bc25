"""The fast path of vCPU state save/restore: one C call (cdefs/fastpath.c) into or from
preallocated buffers, with fewer ioctls than one per piece of state.

    fp = FastVcpu(vcpu)           # once per vCPU: the MSR set, the XSAVE size, the TSC frequency
    st = fp.save()                # C: KVM_RUN(immediate_exit) carrying regs/sregs/events + 6 GETs
    ...                           # the guest runs on
    fp.restore(st)                # C: 6 SETs; regs/sregs/events ride on kvm_run into the next KVM_RUN
    fp.to_state(st)               # a vmm.state.VcpuState, equal to what save_state() reports
    fp.load(state)                # buffers from a VcpuState (checks, CPUID, TSC kHz: once, here)

`save_py`/`restore_py` do the same plan in Python, one cffi ioctl call per step: the comparison
the benchmarks make, and a check on the C code (both must produce the same bytes).

What the hot path leaves out, and where it went instead:
  - the guest CPUID: KVM_SET_CPUID2 is issued once per vCPU (by load(), only when the state's
    CPUID differs from the vCPU's); KVM refuses a different CPUID after the first KVM_RUN anyway;
  - the TSC frequency: read when the FastVcpu is made, set by load() when the state's differs;
    call refresh() after changing it (or the CPUID) through other means;
  - the checks of vmm.state.check_restorable and of Vcpu.set_xsave: made by load(), once per
    state, not per restore.

Restored regs/sregs/events take effect at the next KVM_RUN (flush() forces it without running
guest code). Until then KVM_GET_REGS/SREGS/VCPU_EVENTS report the old values, and a
KVM_SET_REGS/SREGS/VCPU_EVENTS is overwritten by them. The conditions under which a piece is
deferred, and why, are at the top of cdefs/fastpath.c; any other restore sets every piece by ioctl
in state.py's documented order.
"""

import errno

from ._bindings import REQUEST, ffi, lib
from .cstructs import Regs, Sregs
from .errors import KvmError, StateError

SYNC_ALL = lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS | lib.KVM_SYNC_X86_EVENTS
_DEFERRABLE_MP_STATES = (lib.KVM_MP_STATE_RUNNABLE, lib.KVM_MP_STATE_HALTED)
_APIC_TASKPRI = 0x80

_STEPS = {  # step -> (save ioctl, restore ioctl)
    lib.VMM_FP_STEP_RUN: ("KVM_RUN", "KVM_RUN"),
    lib.VMM_FP_STEP_XSAVE_SIZE: ("KVM_CHECK_EXTENSION", "KVM_CHECK_EXTENSION"),
    lib.VMM_FP_STEP_REGS: ("KVM_GET_REGS", "KVM_SET_REGS"),
    lib.VMM_FP_STEP_SREGS: ("KVM_GET_SREGS", "KVM_SET_SREGS"),
    lib.VMM_FP_STEP_EVENTS: ("KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS"),
    lib.VMM_FP_STEP_MSRS: ("KVM_GET_MSRS", "KVM_SET_MSRS"),
    lib.VMM_FP_STEP_MP_STATE: ("KVM_GET_MP_STATE", "KVM_SET_MP_STATE"),
    lib.VMM_FP_STEP_XSAVE: ("KVM_GET_XSAVE2", "KVM_SET_XSAVE"),
    lib.VMM_FP_STEP_XCRS: ("KVM_GET_XCRS", "KVM_SET_XCRS"),
    lib.VMM_FP_STEP_DEBUGREGS: ("KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS"),
    lib.VMM_FP_STEP_LAPIC: ("KVM_GET_LAPIC", "KVM_SET_LAPIC"),
}


class FastState:
    """Preallocated buffers for one vCPU's state: `c` is the struct vmm_fp_state the C code reads
    and writes; the MSR list (indices fixed, TSC deadline last) and the XSAVE area hang off it."""

    def __init__(self, msr_indices, xsave_size, has_lapic):
        n = len(msr_indices)
        self.msr_indices = tuple(msr_indices)
        self.c = ffi.new("struct vmm_fp_state *")
        self._msrs = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, idx in enumerate(self.msr_indices):
            self._msrs.entries[i].index = idx
        self._xsave = ffi.new("char[]", xsave_size)
        self.c.msrs = self._msrs
        self.c.xsave = self._xsave
        self.c.xsave_size = xsave_size
        self.c.has_lapic = 1 if has_lapic else 0
        self.owner = None  # the FastVcpu this state is trusted on (cdefs/fastpath.c)
        # fixed addresses for the Python path
        self._regs = ffi.addressof(self.c, "regs")
        self._sregs = ffi.addressof(self.c, "sregs")
        self._events = ffi.addressof(self.c, "events")
        self._mp_state = ffi.addressof(self.c, "mp_state")
        self._xcrs = ffi.addressof(self.c, "xcrs")
        self._debugregs = ffi.addressof(self.c, "debugregs")
        self._lapic = ffi.addressof(self.c, "lapic")
        self._tpr = ffi.cast("uint32_t *", self._lapic) + _APIC_TASKPRI // 4

    @classmethod
    def like(cls, template):
        """Fresh buffers laid out as `template` (same MSR indices, XSAVE size, LAPIC or not), in one
        zeroed allocation: the MSR list is copied from the template, not set index by index. The
        Python path's addresses (_regs, ...) are not made; the C calls need none."""
        st = cls.__new__(cls)
        n = len(template.msr_indices)
        msrs_size = _SIZE_MSRS_HEAD + n * _SIZE_MSR_ENTRY
        # not cleared: KVM fills every piece (a failed save raises, and its buffers go unused)
        block = st._block = _new_uncleared("char[]", _SIZE_STATE + msrs_size + template.c.xsave_size)
        st.msr_indices = template.msr_indices
        c = st.c = ffi.cast("struct vmm_fp_state *", block)
        st._msrs = ffi.cast("struct kvm_msrs *", block + _SIZE_STATE)
        st._xsave = block + _SIZE_STATE + msrs_size
        ffi.memmove(st._msrs, template._msrs, msrs_size)
        c.msrs, c.xsave = st._msrs, st._xsave
        c.xsave_size, c.has_lapic = template.c.xsave_size, template.c.has_lapic
        st.owner = None
        return st

    def buffer(self, piece):
        """The bytes of one piece in place (a cffi buffer, no copy): regs, sregs, events,
        mp_state, xcrs, debugregs, lapic, or xsave."""
        if piece == "xsave":
            return ffi.buffer(self._xsave, self.c.xsave_size)
        return ffi.buffer(ffi.addressof(self.c, piece))

    @property
    def xsave_size(self):
        return self.c.xsave_size

    def raw(self):
        """Every byte of the state, piece by piece (for byte-for-byte comparisons)."""
        c = self.c
        out = {name: bytes(ffi.buffer(getattr(self, "_" + name)))
               for name in ("regs", "sregs", "events", "mp_state", "xcrs", "debugregs")}
        out["lapic"] = bytes(ffi.buffer(self._lapic)) if c.has_lapic else None
        out["msrs"] = bytes(ffi.buffer(self._msrs.entries, 16 * len(self.msr_indices)))
        out["xsave"] = bytes(ffi.buffer(self._xsave))
        return out


class FastVcpu:
    """Save and restore one vCPU through the C fast path (or, for comparison, the same plan in
    Python). Made once per vCPU; `vmm.state.fast_path(vcpu)` keeps one per Vcpu."""

    def __init__(self, vcpu, msr_indices=None, sync_regs=None):
        self.vcpu = vcpu
        self._fd = vcpu.fd
        if sync_regs is None:
            sync_regs = (vcpu.vm.kvm.check_extension(lib.KVM_CAP_SYNC_REGS) & SYNC_ALL) == SYNC_ALL
        self.sync_regs = bool(sync_regs)
        c = self.c = ffi.new("struct vmm_fp_vcpu *")
        c.fd, c.vm_fd, c.run = vcpu.fd, vcpu.vm.fd, vcpu.kvm_run
        c.flags = (lib.VMM_FP_HAS_LAPIC if vcpu.vm.has_irqchip else 0) | \
            (lib.VMM_FP_SYNC_REGS if self.sync_regs else 0)
        run = self._run = vcpu.kvm_run
        self._run_regs = ffi.addressof(run.s.regs, "regs")
        self._run_sregs = ffi.addressof(run.s.regs, "sregs")
        self._run_events = ffi.addressof(run.s.regs, "events")
        self.refresh(msr_indices)

    def refresh(self, msr_indices=None):
        """Read the per-vCPU constants again: guest CPUID, MSR set, XSAVE size, TSC frequency."""
        from .state import MSR_IA32_TSC_DEADLINE, saveable_msrs
        self._alive()
        cpuid = self.vcpu.cpuid if self.vcpu.cpuid is not None else self.vcpu.get_cpuid2()
        idx = list(msr_indices) if msr_indices is not None else saveable_msrs(self.vcpu, cpuid)
        if MSR_IA32_TSC_DEADLINE in idx:  # last, so restore writes it after the LAPIC
            idx = [m for m in idx if m != MSR_IA32_TSC_DEADLINE] + [MSR_IA32_TSC_DEADLINE]
        self.msr_indices = tuple(idx)
        self.xsave_size = self.vcpu.xsave_size()
        self.tsc_khz = self.vcpu.get_tsc_khz()
        self._xsave2 = bool(self.vcpu.vm.xsave2_size())

    @property
    def no_defer(self):
        """True: every restore sets every piece by ioctl (state.py's order, no sync regs)."""
        return bool(self.c.flags & lib.VMM_FP_NO_DEFER)

    @no_defer.setter
    def no_defer(self, on):
        self.c.flags = (self.c.flags | lib.VMM_FP_NO_DEFER) if on else (self.c.flags & ~lib.VMM_FP_NO_DEFER)

    # what the last save/restore/flush did (C and Python paths alike)
    @property
    def vcpu_ioctls(self):
        return self.c.vcpu_ioctls

    @property
    def vm_ioctls(self):
        return self.c.vm_ioctls

    @property
    def deferred(self):
        """KVM_SYNC_X86_* bits the last restore left in kvm_run for the next KVM_RUN."""
        return self.c.deferred

    @property
    def pending(self):
        """KVM_SYNC_X86_* bits KVM has not loaded yet (kvm_run.kvm_dirty_regs)."""
        self._alive()
        return self._run.kvm_dirty_regs & SYNC_ALL

    def new_state(self):
        """Empty buffers sized for this vCPU's save()."""
        return FastState(self.msr_indices, self.xsave_size, self.vcpu.vm.has_irqchip)

    # --- the C path ---------------------------------------------------------------------------
    def save(self, st=None):
        """Save into `st` (new buffers when None) with one C call; returns `st`."""
        st = self._for_save(st)
        r = lib.vmm_fp_save(self.c, st.c)
        if r < 0:
            self._raise(r, 0, st)
        st.owner = self
        return st

    def restore(self, st):
        """Restore `st` with one C call. Regs/sregs/events may take effect only at the next KVM_RUN."""
        self._for_restore(st)
        r = lib.vmm_fp_restore(self.c, st.c)
        if r < 0:
            self._raise(r, 1, st)
        st.owner = self

    def flush(self):
        """Make KVM load what the last restore left in kvm_run now (KVM_RUN with immediate_exit,
        which runs no guest code; it also completes pending I/O as save does)."""
        self._alive()
        r = lib.vmm_fp_flush(self.c)
        if r == -errno.EAGAIN:
            raise StateError("KVM_RUN returned before loading the restored registers from kvm_run "
                             "(is the vCPU's mp_state UNINITIALIZED?)")
        if r < 0:
            self._raise(r, 1, None)

    # --- the same plan in Python (one cffi call per ioctl) ------------------------------------
    def save_py(self, st=None):
        st = self._for_save(st)
        c, run, fd, ioctl = self.c, self._run, self._fd, lib.vmm_ioctl
        c.step = c.done = c.vm_ioctls = 0
        st.c.trusted = 0
        n = 0
        valid = run.kvm_valid_regs
        if self.sync_regs:
            run.kvm_valid_regs = valid | SYNC_ALL
        run.immediate_exit = 1
        r = ioctl(fd, _RUN, ffi.NULL)
        run.immediate_exit = 0
        run.kvm_valid_regs = valid
        n += 1
        if r == -errno.EINTR:
            run.exit_reason = lib.KVM_EXIT_INTR
        elif r < 0:
            self._fail(lib.VMM_FP_STEP_RUN, r, n, 0, st)
        if self.sync_regs:
            ffi.memmove(st._regs, self._run_regs, _SIZE_REGS)
            ffi.memmove(st._sregs, self._run_sregs, _SIZE_SREGS)
            ffi.memmove(st._events, self._run_events, _SIZE_EVENTS)
        r = ioctl(fd, _GET_MSRS, st._msrs)
        n += 1
        if r < 0 or r < len(st.msr_indices):
            c.done = max(r, 0)
            self._fail(lib.VMM_FP_STEP_MSRS, r if r < 0 else -errno.EINVAL, n, 0, st)
        steps = [(lib.VMM_FP_STEP_MP_STATE, _GET_MP_STATE, st._mp_state)]
        if not self.sync_regs:
            steps += [(lib.VMM_FP_STEP_REGS, _GET_REGS, st._regs),
                      (lib.VMM_FP_STEP_SREGS, _GET_SREGS, st._sregs)]
        for step, req, arg in steps:
            r = ioctl(fd, req, arg)
            n += 1
            if r < 0:
                self._fail(step, r, n, 0, st)
        get_xsave = self._xsave_size_py(st, n)
        steps = [(lib.VMM_FP_STEP_XSAVE, get_xsave, st._xsave), (lib.VMM_FP_STEP_XCRS, _GET_XCRS, st._xcrs)]
        if not self.sync_regs:
            steps.append((lib.VMM_FP_STEP_EVENTS, _GET_EVENTS, st._events))
        steps.append((lib.VMM_FP_STEP_DEBUGREGS, _GET_DEBUGREGS, st._debugregs))
        has_lapic = self.vcpu.vm.has_irqchip
        st.c.has_lapic = 1 if has_lapic else 0
        if has_lapic:
            steps.append((lib.VMM_FP_STEP_LAPIC, _GET_LAPIC, st._lapic))
        for step, req, arg in steps:
            r = ioctl(fd, req, arg)
            n += 1
            if r < 0:
                self._fail(step, r, n, 1, st)
        c.vcpu_ioctls, c.vm_ioctls = n, 1
        st.c.trusted = 1
        st.owner = self
        return st

    def restore_py(self, st):
        self._for_restore(st)
        c, run, fd, ioctl = self.c, self._run, self._fd, lib.vmm_ioctl
        c.step = c.done = c.vm_ioctls = c.deferred = 0
        defer = self._deferrable_py(st)
        self._xsave_size_py(st, 0, restore=True)  # before any piece is set, as the C code does
        run.kvm_dirty_regs &= ~SYNC_ALL
        n = 0
        steps = []
        if not defer & lib.KVM_SYNC_X86_SREGS:
            steps.append((lib.VMM_FP_STEP_SREGS, _SET_SREGS, st._sregs))
        if st.c.has_lapic:
            steps.append((lib.VMM_FP_STEP_LAPIC, _SET_LAPIC, st._lapic))
        for step, req, arg in steps:
            r = ioctl(fd, req, arg)
            n += 1
            if r < 0:
                self._fail(step, r, n, 0, st, restore=True)
        r = ioctl(fd, _SET_MSRS, st._msrs)
        n += 1
        if r < 0 or r < len(st.msr_indices):
            c.done = max(r, 0)
            self._fail(lib.VMM_FP_STEP_MSRS, r if r < 0 else -errno.EINVAL, n, 0, st, restore=True)
        r = ioctl(fd, _SET_XCRS, st._xcrs)
        n += 1
        if r < 0:
            self._fail(lib.VMM_FP_STEP_XCRS, r, n, 0, st, restore=True)
        steps = [(lib.VMM_FP_STEP_XSAVE, _SET_XSAVE, st._xsave)]
        if not defer & lib.KVM_SYNC_X86_EVENTS:
            steps.append((lib.VMM_FP_STEP_EVENTS, _SET_EVENTS, st._events))
        steps += [(lib.VMM_FP_STEP_MP_STATE, _SET_MP_STATE, st._mp_state),
                  (lib.VMM_FP_STEP_DEBUGREGS, _SET_DEBUGREGS, st._debugregs)]
        if not defer & lib.KVM_SYNC_X86_REGS:
            steps.append((lib.VMM_FP_STEP_REGS, _SET_REGS, st._regs))
        for step, req, arg in steps:
            r = ioctl(fd, req, arg)
            n += 1
            if r < 0:
                self._fail(step, r, n, 1, st, restore=True)
        if defer & lib.KVM_SYNC_X86_REGS:
            ffi.memmove(self._run_regs, st._regs, _SIZE_REGS)
        if defer & lib.KVM_SYNC_X86_SREGS:
            ffi.memmove(self._run_sregs, st._sregs, _SIZE_SREGS)
        if defer & lib.KVM_SYNC_X86_EVENTS:
            ffi.memmove(self._run_events, st._events, _SIZE_EVENTS)
        run.kvm_dirty_regs |= defer
        c.vcpu_ioctls, c.vm_ioctls, c.deferred = n, 1, defer
        st.c.trusted = 1
        st.owner = self

    def _deferrable_py(self, st):
        """vmm_fp_deferrable() of cdefs/fastpath.c, in Python."""
        c = st.c
        if not self.sync_regs or self.c.flags & lib.VMM_FP_NO_DEFER or not c.trusted:
            return 0
        if c.mp_state.mp_state not in _DEFERRABLE_MP_STATES:
            return 0
        bits = SYNC_ALL
        if c.sregs.apic_base != self._run.apic_base:
            bits &= ~lib.KVM_SYNC_X86_SREGS
        if c.has_lapic and (st._tpr[0] & 0xFF) != ((c.sregs.cr8 & 0xF) << 4):
            bits &= ~lib.KVM_SYNC_X86_SREGS
        return bits

    def _xsave_size_py(self, st, n, restore=False):
        size = lib.vmm_ioctl_int(self.c.vm_fd, _CHECK_EXTENSION, lib.KVM_CAP_XSAVE2)
        if size < 0:
            self._fail(lib.VMM_FP_STEP_XSAVE_SIZE, size, n, 1, st, restore=restore)
        get = _GET_XSAVE2 if size else _GET_XSAVE
        size = max(size, 4096)
        if size != st.c.xsave_size:
            self.c.done = size
            self._fail(lib.VMM_FP_STEP_XSAVE_SIZE, -errno.EMSGSIZE, n, 1, st, restore=restore)
        return get

    def _fail(self, step, r, vcpu_ioctls, vm_ioctls, st, restore=False):
        self.c.step, self.c.vcpu_ioctls, self.c.vm_ioctls = step, vcpu_ioctls, vm_ioctls
        self._raise(r, 1 if restore else 0, st)

    # --- VcpuState in and out -----------------------------------------------------------------
    def to_state(self, st, diagnose=False):
        """The VcpuState these buffers hold; equal to what vmm.state.save_state() reports for the same
        vCPU state and the same `diagnose` (with it, `cpuid_kvm` is KVM_GET_CPUID2 read now)."""
        from .state import VcpuState
        c = st.c
        kvm_cpuid = self.vcpu.get_cpuid2() if diagnose or self.vcpu.cpuid is None else None
        cpuid = self.vcpu.cpuid if self.vcpu.cpuid is not None else kvm_cpuid
        e = st._msrs.entries
        return VcpuState(
            cpuid=cpuid,
            mp_state=c.mp_state.mp_state,
            regs=Regs.from_c(c.regs),
            sregs=Sregs.from_c(c.sregs),
            xsave=bytes(ffi.buffer(st._xsave)),
            xcrs={c.xcrs.xcrs[i].xcr: c.xcrs.xcrs[i].value for i in range(c.xcrs.nr_xcrs)},
            msrs={e[i].index: e[i].data for i in range(len(st.msr_indices))},
            events=bytes(ffi.buffer(st._events)),
            debugregs=bytes(ffi.buffer(st._debugregs)),
            lapic=bytes(ffi.buffer(st._lapic)) if c.has_lapic else None,
            tsc_khz=self.tsc_khz,
            cpuid_kvm=None if kvm_cpuid is None or kvm_cpuid == cpuid else kvm_cpuid,
        )

    def load(self, state, st=None):
        """Buffers holding `state`, ready for restore(). Makes here, once, what restore_state()
        makes on every restore: check_restorable, the XSAVE checks of Vcpu.set_xsave, KVM_SET_CPUID2
        (only when the state's CPUID differs from the vCPU's) and KVM_SET_TSC_KHZ (only when the
        frequency differs). The first restore of loaded buffers sets every piece by ioctl."""
        from .state import set_tsc_khz, check_restorable
        self._alive()
        if self.vcpu.cpuid is None or state.cpuid != self.vcpu.cpuid:
            self.vcpu.set_cpuid2(state.cpuid)
            self.refresh()
        xsave = check_restorable(self.vcpu, state)  # the image at this vCPU's XSAVE size
        self.vcpu.validate_xsave(xsave)
        if state.tsc_khz and state.tsc_khz != self.tsc_khz:
            set_tsc_khz(self.vcpu, state.tsc_khz)
            self.tsc_khz = self.vcpu.get_tsc_khz()
        return fill(state, xsave, st)

    # --- checks and errors --------------------------------------------------------------------
    def _alive(self):
        if self.vcpu.fd < 0 or self.vcpu.fd != self._fd:
            raise StateError("the vCPU of this fast path is closed")

    def _for_save(self, st):
        self._alive()
        if st is None:
            return self.new_state()
        if st.msr_indices != self.msr_indices or st.xsave_size != self.xsave_size:
            raise StateError("these buffers were not made for this vCPU's save (MSR set or XSAVE size "
                             "differ): use new_state()")
        return st

    def _for_restore(self, st):
        self._alive()
        if st.owner is not self:
            st.c.trusted = 0
        if st.c.has_lapic and not self.vcpu.vm.has_irqchip:
            raise StateError("the state has LAPIC registers but this VM has no in-kernel irqchip")

    def _raise(self, r, restore, st):
        _raise(self.c, self._xsave2, r, restore, st)


def _raise(c, xsave2, r, restore, st):
    """The error of a failed vmm_fp_save (restore=0) or vmm_fp_restore (1): KvmError naming the
    ioctl of the step that failed (c.step), or StateError when the XSAVE size changed under us."""
    step = c.step
    name = _STEPS.get(step, ("vmm_fp_save", "vmm_fp_restore"))[restore]
    if step == lib.VMM_FP_STEP_XSAVE and not xsave2:
        name = "KVM_SET_XSAVE" if restore else "KVM_GET_XSAVE"
    if step == lib.VMM_FP_STEP_XSAVE_SIZE and r == -errno.EMSGSIZE:
        raise StateError(f"KVM_CAP_XSAVE2 now says the XSAVE area is {c.done} bytes, the buffers "
                         f"hold {st.xsave_size if st else '?'}: the guest XSAVE permission changed "
                         "(arch_prctl?); call refresh() and use new buffers")
    if step == lib.VMM_FP_STEP_MSRS and r == -errno.EINVAL and st is not None and c.done < len(st.msr_indices):
        n, idx = c.done, st.msr_indices[c.done]
        verb = "wrote" if restore else "read"
        raise KvmError(name, errno.EINVAL, detail=f"MSR 0x{idx:x}",
                       hint=f"KVM {verb} {n} of {len(st.msr_indices)} MSRs and stopped at MSR 0x{idx:x}")
    raise KvmError(name, -r)


def fill(state, xsave, st=None):
    """Buffers holding the typed `state` (a vmm.state.VcpuState) with the XSAVE image `xsave`
    (already fitted to the vCPU and checked); `st` is reused when its layout fits. StateError when a
    piece does not fit its struct. No ioctl."""
    from .state import MSR_IA32_TSC_DEADLINE
    msrs = dict(state.msrs)
    deadline = msrs.pop(MSR_IA32_TSC_DEADLINE, None)
    order = list(msrs) + ([MSR_IA32_TSC_DEADLINE] if deadline is not None else [])
    if st is None or st.msr_indices != tuple(order) or st.xsave_size != len(xsave) \
            or bool(st.c.has_lapic) != (state.lapic is not None):
        st = FastState(order, len(xsave), state.lapic is not None)
    c = st.c
    state.regs.to_c(c.regs)
    state.sregs.to_c(c.sregs)
    _fill(st._events, state.events, "events")
    _fill(st._debugregs, state.debugregs, "debugregs")
    if state.lapic is not None:
        _fill(st._lapic, state.lapic, "lapic")
    c.mp_state.mp_state = state.mp_state
    if len(state.xcrs) > len(c.xcrs.xcrs):
        raise StateError(f"{len(state.xcrs)} XCRs, KVM takes at most {len(c.xcrs.xcrs)}")
    ffi.memmove(st._xcrs, bytes(ffi.sizeof(c.xcrs)), ffi.sizeof(c.xcrs))
    c.xcrs.nr_xcrs = len(state.xcrs)
    for i, (xcr, value) in enumerate(sorted(state.xcrs.items())):
        c.xcrs.xcrs[i].xcr, c.xcrs.xcrs[i].value = xcr, value
    e = st._msrs.entries
    for i, m in enumerate(order):
        e[i].data = deadline if m == MSR_IA32_TSC_DEADLINE and deadline is not None else msrs[m]
    ffi.memmove(st._xsave, xsave, len(xsave))
    c.trusted = 0
    st.owner = None
    return st


# --- the general path (vmm.state.save_state / restore_state) ---------------------------------------
class _Plan:
    """What the general path keeps per Vcpu: its struct vmm_fp_vcpu, the XSAVE size last seen, and
    one template of buffers per MSR set. Buffers saved from this vCPU (owner: this plan) are
    trusted here, so their restore may defer regs/sregs/events under the conditions at the top of
    cdefs/fastpath.c; restore_raw() then loads them at once (flush), so the restore is complete
    when it returns, as one by ioctls is."""

    def __init__(self, vcpu):
        self.fd = vcpu.fd
        c = self.c = ffi.new("struct vmm_fp_vcpu *")
        c.fd, c.vm_fd, c.run = vcpu.fd, vcpu.vm.fd, vcpu.kvm_run
        sync = (vcpu.vm.kvm.check_extension(lib.KVM_CAP_SYNC_REGS) & SYNC_ALL) == SYNC_ALL
        c.flags = (lib.VMM_FP_HAS_LAPIC if vcpu.vm.has_irqchip else 0) | (lib.VMM_FP_SYNC_REGS if sync else 0)
        self.xsave2 = bool(vcpu.vm.xsave2_size())
        self.xsave_size = max(vcpu.vm.xsave2_size(), 4096)
        self.templates = {}

    def template(self, indices, has_lapic):
        key = (indices, self.xsave_size, has_lapic)
        t = self.templates.get(key)
        if t is None:
            if len(self.templates) > 16:
                self.templates.clear()
            t = self.templates[key] = FastState(indices, self.xsave_size, has_lapic)
        return t


def plan(vcpu):
    """The general path's _Plan of this Vcpu, made on first use."""
    p = getattr(vcpu, "_fp_plan", None)
    if p is None or p.fd != vcpu.fd:
        p = vcpu._fp_plan = _Plan(vcpu)
    return p


def save_raw(vcpu, msr_indices):
    """Save this vCPU into new buffers with one C call (the fast path's save: regs/sregs/events from
    the KVM_RUN that completes pending I/O when KVM_CAP_SYNC_REGS allows). `msr_indices` must have
    MSR_IA32_TSC_DEADLINE, if present, last. Raises KvmError naming the ioctl that failed."""
    if vcpu.fd < 0:
        raise StateError("the vCPU is closed")
    p = plan(vcpu)
    has_lapic = vcpu.vm.has_irqchip
    for _ in range(2):
        st = FastState.like(p.template(msr_indices, has_lapic))
        r = lib.vmm_fp_save(p.c, st.c)
        if r == -errno.EMSGSIZE and p.c.step == lib.VMM_FP_STEP_XSAVE_SIZE:
            p.xsave_size = p.c.done  # KVM_CAP_XSAVE2 changed (a permission request): new buffers
            continue
        if r < 0:
            _raise(p.c, p.xsave2, r, 0, st)
        st.owner = p
        return st
    _raise(p.c, p.xsave2, r, 0, st)


def restore_raw(vcpu, st):
    """Restore buffers with one C call (the fast path's plan: pieces by ioctl in state.py's
    documented order, regs/sregs/events through kvm_run where cdefs/fastpath.c finds that safe),
    then, if any piece was deferred, KVM_RUN with immediate_exit to load it now: on return KVM
    holds the whole state. The caller made every check first. Raises KvmError or StateError."""
    p = vcpu.__dict__.get("_fp_plan")
    if p is None or p.fd != vcpu.fd:
        if vcpu.fd < 0:
            raise StateError("the vCPU is closed")
        p = plan(vcpu)
    if st.owner is not p:
        st.c.trusted = 0  # saved elsewhere: every piece by ioctl, in order
    r = lib.vmm_fp_restore(p.c, st.c)
    if r < 0:
        st.owner = None
        _raise(p.c, p.xsave2, r, 1, st)
    st.owner = p
    if p.c.deferred:
        r = lib.vmm_fp_flush(p.c)
        if r == -errno.EAGAIN:
            raise StateError("KVM_RUN returned before loading the restored registers from kvm_run")
        if r < 0:
            _raise(p.c, p.xsave2, r, 1, None)


def _fill(ptr, raw, what):
    n = ffi.sizeof(ptr[0])
    if len(raw) != n:
        raise StateError(f"the saved {what} are {len(raw)} bytes, struct kvm_{what} here is {n}")
    ffi.memmove(ptr, raw, n)


_RUN = REQUEST["KVM_RUN"]
_CHECK_EXTENSION = REQUEST["KVM_CHECK_EXTENSION"]
_GET_REGS, _SET_REGS = REQUEST["KVM_GET_REGS"], REQUEST["KVM_SET_REGS"]
_GET_SREGS, _SET_SREGS = REQUEST["KVM_GET_SREGS"], REQUEST["KVM_SET_SREGS"]
_GET_EVENTS, _SET_EVENTS = REQUEST["KVM_GET_VCPU_EVENTS"], REQUEST["KVM_SET_VCPU_EVENTS"]
_GET_MSRS, _SET_MSRS = REQUEST["KVM_GET_MSRS"], REQUEST["KVM_SET_MSRS"]
_GET_MP_STATE, _SET_MP_STATE = REQUEST["KVM_GET_MP_STATE"], REQUEST["KVM_SET_MP_STATE"]
_GET_XSAVE2, _GET_XSAVE = REQUEST["KVM_GET_XSAVE2"], REQUEST["KVM_GET_XSAVE"]
_SET_XSAVE = REQUEST["KVM_SET_XSAVE"]
_GET_XCRS, _SET_XCRS = REQUEST["KVM_GET_XCRS"], REQUEST["KVM_SET_XCRS"]
_GET_DEBUGREGS, _SET_DEBUGREGS = REQUEST["KVM_GET_DEBUGREGS"], REQUEST["KVM_SET_DEBUGREGS"]
_GET_LAPIC, _SET_LAPIC = REQUEST["KVM_GET_LAPIC"], REQUEST["KVM_SET_LAPIC"]
_SIZE_REGS = ffi.sizeof("struct kvm_regs")
_SIZE_SREGS = ffi.sizeof("struct kvm_sregs")
_SIZE_EVENTS = ffi.sizeof("struct kvm_vcpu_events")
_SIZE_MSR_ENTRY = ffi.sizeof("struct kvm_msr_entry")
_SIZE_MSRS_HEAD = ffi.sizeof("struct kvm_msrs")  # without the entries
_SIZE_STATE = (ffi.sizeof("struct vmm_fp_state") + 63) & ~63
_new_uncleared = ffi.new_allocator(should_clear_after_alloc=False)
