"""Vcpu: one method per vCPU ioctl, plus the mapped kvm_run area."""

import errno
import mmap
import os

from ._bindings import ffi, ioctl, lib
from .cstructs import Regs, Sregs
from .errors import KvmError, StateError
from .xsave_layout import SSE, SSE_COMPONENT, X87, X87_COMPONENT, XsaveError, XsaveLayout

XSAVE_LEGACY_SIZE = 4096  # sizeof(struct kvm_xsave): the most legacy KVM_GET_XSAVE can carry
XCR0_X87_SSE = 0x3
MXCSR_DEFAULT_MASK = 0xFFBF  # what MXCSR_MASK = 0 stands for


_layouts = {}


def _layout_of(supported):
    """XsaveLayout of a (cached, unmodified) supported-CPUID table."""
    key = id(supported)
    hit = _layouts.get(key)
    if hit is None or hit[0] is not supported:
        _layouts.clear()
        hit = _layouts[key] = (supported, XsaveLayout.from_cpuid(supported))
    return hit[1]


class Vcpu:
    def __init__(self, vm, fd, vcpu_id):
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        self.cpuid = None  # the table last given to KVM_SET_CPUID2 (KVM_GET_CPUID2 may differ)
        self._mxcsr_mask = None
        self._tsc_khz = None
        size = vm.kvm.get_vcpu_mmap_size()
        self._run_mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_buf = ffi.from_buffer(self._run_mm)
        self.kvm_run = ffi.cast("struct kvm_run *", self._run_buf)

    # --- KVM_RUN ------------------------------------------------------------------------------
    def run(self):
        """KVM_RUN once; returns kvm_run.exit_reason (KVM_EXIT_INTR when a signal kicked it out)."""
        try:
            ioctl(self.fd, "KVM_RUN")
        except KvmError as e:
            if e.errno != errno.EINTR:
                raise
            self.kvm_run.exit_reason = lib.KVM_EXIT_INTR
        return self.kvm_run.exit_reason

    # --- registers ----------------------------------------------------------------------------
    def get_regs(self):
        c = ffi.new("struct kvm_regs *")
        ioctl(self.fd, "KVM_GET_REGS", c)
        return Regs.from_c(c)

    def set_regs(self, regs):
        ioctl(self.fd, "KVM_SET_REGS", regs.to_c())

    def get_sregs(self):
        c = ffi.new("struct kvm_sregs *")
        ioctl(self.fd, "KVM_GET_SREGS", c)
        return Sregs.from_c(c)

    def set_sregs(self, sregs):
        ioctl(self.fd, "KVM_SET_SREGS", sregs.to_c())

    def _get_raw(self, name, ctype):
        c = ffi.new(ctype + " *")
        ioctl(self.fd, name, c)
        return bytes(ffi.buffer(c))

    def _set_raw(self, name, ctype, raw):
        c = ffi.new(ctype + " *")
        buf = ffi.buffer(c)
        if len(raw) != len(buf):
            raise ValueError(f"{name}: {ctype} is {len(buf)} bytes, got {len(raw)}")
        buf[:] = raw
        ioctl(self.fd, name, c)

    def get_fpu(self):
        return self._get_raw("KVM_GET_FPU", "struct kvm_fpu")

    def set_fpu(self, raw):
        self._set_raw("KVM_SET_FPU", "struct kvm_fpu", raw)

    def get_vcpu_events(self):
        return self._get_raw("KVM_GET_VCPU_EVENTS", "struct kvm_vcpu_events")

    def set_vcpu_events(self, raw):
        self._set_raw("KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events", raw)

    def get_debugregs(self):
        return self._get_raw("KVM_GET_DEBUGREGS", "struct kvm_debugregs")

    def set_debugregs(self, raw):
        self._set_raw("KVM_SET_DEBUGREGS", "struct kvm_debugregs", raw)

    def get_lapic(self):
        return self._get_raw("KVM_GET_LAPIC", "struct kvm_lapic_state")

    def set_lapic(self, raw):
        self._set_raw("KVM_SET_LAPIC", "struct kvm_lapic_state", raw)

    def get_mp_state(self):
        c = ffi.new("struct kvm_mp_state *")
        ioctl(self.fd, "KVM_GET_MP_STATE", c)
        return c.mp_state

    def set_mp_state(self, state):
        ioctl(self.fd, "KVM_SET_MP_STATE", ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    def get_tsc_khz(self):
        khz = self._tsc_khz = ioctl(self.fd, "KVM_GET_TSC_KHZ")
        return khz

    def set_tsc_khz(self, khz):
        ioctl(self.fd, "KVM_SET_TSC_KHZ", khz)
        self._tsc_khz = None  # KVM may round it: read it back when next asked

    def tsc_khz(self):
        """The TSC rate, read once: it changes only through KVM_SET_TSC_KHZ on this vCPU."""
        return self._tsc_khz if self._tsc_khz is not None else self.get_tsc_khz()

    # --- XCRs ---------------------------------------------------------------------------------
    def get_xcrs(self):
        c = ffi.new("struct kvm_xcrs *")
        ioctl(self.fd, "KVM_GET_XCRS", c)
        return {c.xcrs[i].xcr: c.xcrs[i].value for i in range(c.nr_xcrs)}

    def set_xcrs(self, xcrs):
        c = ffi.new("struct kvm_xcrs *")
        c.nr_xcrs = len(xcrs)
        for i, (xcr, value) in enumerate(sorted(xcrs.items())):
            c.xcrs[i].xcr, c.xcrs[i].value = xcr, value
        ioctl(self.fd, "KVM_SET_XCRS", c)

    # --- MSRs ---------------------------------------------------------------------------------
    def get_msrs(self, indices):
        """KVM_GET_MSRS: {index: value}. Raises KvmError naming the first MSR KVM would not read."""
        indices = list(indices)
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices),
                                          "entries": [{"index": i} for i in indices]})
        n = ioctl(self.fd, "KVM_GET_MSRS", c)
        if n < len(indices):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, detail=f"MSR 0x{indices[n]:x}",
                           hint=f"KVM read {n} of {len(indices)} MSRs and stopped at MSR 0x{indices[n]:x}: "
                                "this vCPU does not have it (feature absent from guest CPUID?)")
        return {e.index: e.data for e in c.entries[0:n]}

    def set_msrs(self, values):
        """KVM_SET_MSRS from {index: value}; raises KvmError naming the first MSR KVM rejected."""
        items = list(values.items())
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(items),
                                          "entries": [{"index": i, "data": v} for i, v in items]})
        n = ioctl(self.fd, "KVM_SET_MSRS", c)
        if n < len(items):
            idx, v = items[n]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, detail=f"MSR 0x{idx:x}",
                           hint=f"KVM wrote {n} of {len(items)} MSRs and rejected MSR 0x{idx:x} = 0x{v:x}")

    # --- ONE_REG ------------------------------------------------------------------------------
    def get_one_reg(self, reg_id):
        val = ffi.new("__u64 *")
        r = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": int(ffi.cast("uintptr_t", val))})
        ioctl(self.fd, "KVM_GET_ONE_REG", r, detail=f"id 0x{reg_id:x}")
        return val[0]

    def set_one_reg(self, reg_id, value):
        val = ffi.new("__u64 *", value)
        r = ffi.new("struct kvm_one_reg *", {"id": reg_id, "addr": int(ffi.cast("uintptr_t", val))})
        ioctl(self.fd, "KVM_SET_ONE_REG", r, detail=f"id 0x{reg_id:x}")

    def get_reg_list(self):
        """KVM_GET_REG_LIST with the E2BIG protocol: ask with n=0, KVM says how many, ask again."""
        probe = ffi.new("struct kvm_reg_list *", {"n": 0, "reg": 0})
        try:
            ioctl(self.fd, "KVM_GET_REG_LIST", probe)
            return []
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        n = probe.n
        buf = ffi.new("struct kvm_reg_list *", {"n": n, "reg": n})
        ioctl(self.fd, "KVM_GET_REG_LIST", buf)
        return list(buf.reg[0:buf.n])

    # --- CPUID --------------------------------------------------------------------------------
    def set_cpuid2(self, table):
        entries = table.to_kvm_entries()
        c = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        for i, (fn, idx, flags, a, b, cc, d) in enumerate(entries):
            e = c.entries[i]
            e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = fn, idx, flags, a, b, cc, d
        ioctl(self.fd, "KVM_SET_CPUID2", c)
        self.cpuid = table

    def get_cpuid2(self):
        """KVM_GET_CPUID2: the CPUID KVM holds for this vCPU (on some hosts not what was set)."""
        from .cpuid import CpuidTable
        from .kvm import read_vcpu_cpuid2
        return CpuidTable.from_kvm_entries(read_vcpu_cpuid2(self.fd, len(self.cpuid) if self.cpuid else 0))

    # --- XSAVE --------------------------------------------------------------------------------
    def xsave_size(self):
        """Bytes of this vCPU's XSAVE area, as KVM_GET_XSAVE2 fills and KVM_SET_XSAVE reads it.

        Asked anew on every call, never cached: KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd
        grows after an arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM) and is read again after any
        KVM_SET_CPUID2. Cross-checked against max(4096, CPUID.(0DH,0).ECX) of
        KVM_GET_SUPPORTED_CPUID, which KVM computes from the same permitted XCR0. 4096 (struct
        kvm_xsave) when the kernel predates KVM_CAP_XSAVE2."""
        return self._xsave_limits()[0]

    def _xsave_limits(self):
        """(size, supported CPUID), both read now; StateError when KVM contradicts itself."""
        cap = self.vm.xsave2_size()
        supported = self.vm.kvm.supported_cpuid()
        if not cap:
            return XSAVE_LEGACY_SIZE, supported
        d0 = supported.entry(0xD, 0)
        if d0 is not None and cap != max(XSAVE_LEGACY_SIZE, d0.ecx):
            raise StateError(
                f"KVM_CAP_XSAVE2 on the VM fd says the XSAVE area is {cap} bytes, but "
                f"KVM_GET_SUPPORTED_CPUID says max({XSAVE_LEGACY_SIZE}, CPUID.(0DH,0).ECX = {d0.ecx}) = "
                f"{max(XSAVE_LEGACY_SIZE, d0.ecx)}: the permitted XSAVE features changed between the two "
                "reads (an arch_prctl permission request in another thread?)")
        return cap, supported

    def get_xsave2(self):
        """KVM_GET_XSAVE2 into a buffer of xsave_size() bytes (KVM writes exactly that many)."""
        if not self.vm.xsave2_size():
            raise KvmError("KVM_GET_XSAVE2", errno.ENOTTY,
                           hint="KVM_CAP_XSAVE2 is absent on this kernel: use get_xsave_legacy()")
        size = self.xsave_size()
        buf = ffi.new("char[]", size)
        ioctl(self.fd, "KVM_GET_XSAVE2", buf)
        return bytes(ffi.buffer(buf))

    def get_xsave_legacy(self):
        """KVM_GET_XSAVE (4096 bytes). Refused when the vCPU's state is larger: it would be cut."""
        need = self.vm.xsave2_size()
        if need > XSAVE_LEGACY_SIZE:
            raise KvmError("KVM_GET_XSAVE", errno.E2BIG,
                           hint=f"the XSAVE state needs {need} bytes (KVM_CAP_XSAVE2) but struct kvm_xsave "
                                f"holds {XSAVE_LEGACY_SIZE}: use KVM_GET_XSAVE2")
        c = ffi.new("struct kvm_xsave *")
        ioctl(self.fd, "KVM_GET_XSAVE", c)
        return bytes(ffi.buffer(c))

    def get_xsave(self):
        """The XSAVE area: KVM_GET_XSAVE2 when the capability exists, else legacy KVM_GET_XSAVE
        (which refuses state larger than 4096 bytes)."""
        if self.vm.xsave2_size():
            return self.get_xsave2()
        return self.get_xsave_legacy()

    def set_xsave(self, raw):
        """KVM_SET_XSAVE, after the checks KVM makes, against the host layout and XCR0 of
        KVM_GET_SUPPORTED_CPUID read now (xsave.validate_for_set): size = xsave_size(),
        XCOMP_BV = 0, reserved header bytes zero, XSTATE_BV within the supported XCR0, MXCSR
        within the MXCSR_MASK this vCPU reports. A buffer that fails raises XsaveError naming
        each problem (and each offending component) and is not passed to KVM."""
        raw = bytes(raw)
        self.validate_xsave(raw)
        buf = ffi.new("char[]", raw)
        ioctl(self.fd, "KVM_SET_XSAVE", buf)

    def validate_xsave(self, raw, limits=None):
        """The checks set_xsave makes before KVM_SET_XSAVE (raises XsaveError); no ioctl but the
        size and permission reads (`limits`: the (size, supported CPUID) of _xsave_limits() when the
        caller has just read them)."""
        from .xsave import validate_for_set  # the buffer decoder: only when a buffer is set
        size, supported = self._xsave_limits() if limits is None else limits
        if supported.xcr0_supported():
            layout = _layout_of(supported)
        else:  # a host without XSAVE: KVM takes the FXSAVE image in the same buffer
            layout = XsaveLayout({X87: X87_COMPONENT, SSE: SSE_COMPONENT}, XCR0_X87_SSE)
        try:
            validate_for_set(raw, layout, layout.xcr0_supported, expected_size=size,
                             mxcsr_feature_mask=self._mxcsr_feature_mask())
        except XsaveError as e:
            raise XsaveError(f"KVM_SET_XSAVE not attempted: {e}", e.problems) from None

    def _mxcsr_feature_mask(self):
        """MXCSR bits the host allows: MXCSR_MASK of this vCPU's FXSAVE image (0 means 0xFFBF, SDM
        vol. 1, 11.6.6). KVM rejects MXCSR values outside the host's mask. Read once per vCPU:
        it is a property of the host CPU."""
        if self._mxcsr_mask is None:
            self._mxcsr_mask = int.from_bytes(self.get_xsave()[28:32], "little") or MXCSR_DEFAULT_MASK
        return self._mxcsr_mask

    # --- lifetime -----------------------------------------------------------------------------
    def close(self):
        if self.fd >= 0:
            self.kvm_run = None
            ffi.release(self._run_buf)
            self._run_mm.close()
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
