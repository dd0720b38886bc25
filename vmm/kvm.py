"""Kvm: the /dev/kvm handle (system ioctls)."""

import errno
import os
import stat

from ._bindings import ffi, ioctl, lib
from .errors import KvmError
from .files import kind_of

DEFAULT_DEVICE = "/dev/kvm"

# Capabilities this project uses, by name, for `vmm caps` and probes.
CAPS = ("KVM_CAP_IRQCHIP", "KVM_CAP_HLT", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR",
        "KVM_CAP_EXT_CPUID", "KVM_CAP_NR_VCPUS", "KVM_CAP_MAX_VCPUS", "KVM_CAP_NR_MEMSLOTS",
        "KVM_CAP_PIT2", "KVM_CAP_ADJUST_CLOCK", "KVM_CAP_VCPU_EVENTS", "KVM_CAP_DEBUGREGS",
        "KVM_CAP_XSAVE", "KVM_CAP_XCRS", "KVM_CAP_XSAVE2", "KVM_CAP_TSC_CONTROL",
        "KVM_CAP_GET_TSC_KHZ", "KVM_CAP_TSC_DEADLINE_TIMER", "KVM_CAP_ONE_REG", "KVM_CAP_SYNC_REGS",
        "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_SPLIT_IRQCHIP", "KVM_CAP_X86_MSR_FILTER",
        "KVM_CAP_DIRTY_LOG_RING", "KVM_CAP_INTERNAL_ERROR_DATA", "KVM_CAP_X86_SMM",
        "KVM_CAP_GET_MSR_FEATURES")


def cap_number(name):
    return getattr(lib, name)


def read_cpuid2(fd, name):
    """A struct kvm_cpuid2 ioctl of the system fd (KVM_GET_SUPPORTED_CPUID, KVM_GET_EMULATED_CPUID) as
    entry tuples; E2BIG means the buffer was too small: grow it and ask again. (A vCPU's
    KVM_GET_CPUID2: read_vcpu_cpuid2.)"""
    n = 128
    while True:
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        try:
            ioctl(fd, name, buf)
        except KvmError as e:
            if e.errno == errno.E2BIG and n < 4096:
                n *= 2
                continue
            raise
        return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in buf.entries[0:buf.nent]]


def read_vcpu_cpuid2(fd, hint=0):
    """KVM_GET_CPUID2 on a vCPU fd: exactly the entries KVM holds, as entry tuples.

    Kernels before the upstream commit "KVM: x86: Always write vCPU's current CPUID nent to userspace"
    (Linux 6.1 among them; 6.12 has it) leave kvm_cpuid2.nent as the caller gave it on success and do
    not report it on E2BIG, so a larger buffer comes back padded with zeroed entries (leaf 0 sub-leaf 0,
    again and again). KVM answers E2BIG exactly when the buffer is smaller than its table, so the
    table's size is the smallest buffer KVM accepts. `hint` (the number of entries vmm set) makes that
    two ioctls; without it, or when it is wrong, a binary search finds it."""
    def get(n):
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": max(n, 1)})
        try:
            ioctl(fd, "KVM_GET_CPUID2", buf)
        except KvmError as e:
            if e.errno == errno.E2BIG and n < 4096:
                return None
            raise
        return buf

    hi = max(hint, 1)
    buf = get(hi)
    while buf is None:
        hi *= 2
        buf = get(hi)
    if buf.nent < hi:  # the kernel wrote the count back
        n = buf.nent
    else:  # the smallest size KVM accepts, in [0, hi]: usually hi itself (the hint was right)
        lo = hi if hi > 1 and get(hi - 1) is None else 0
        while lo < hi:
            mid = (lo + hi) // 2
            if get(mid) is None:
                lo = mid + 1
            else:
                hi = mid
        n = hi
        buf = get(n)
    return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx) for e in buf.entries[0:n]]


ARCH_GET_XCOMP_GUEST_PERM = 0x1024


def _guest_xsave_permission():
    out = ffi.new("unsigned long long *")
    r = lib.vmm_arch_prctl(ARCH_GET_XCOMP_GUEST_PERM, int(ffi.cast("uintptr_t", out)))
    return out[0] if r >= 0 else r  # kernels before 5.17: a constant errno, still a valid key


def is_pvm():
    """True when /dev/kvm is served by the kvm_pvm module (guest CPL0 code is emulated)."""
    return os.path.isdir("/sys/module/kvm_pvm")


class Kvm:
    """An open /dev/kvm. Use as a context manager."""

    def __init__(self, device=DEFAULT_DEVICE):
        self.device = device
        self._supported = None
        self._msr_index_list = None
        try:
            self.fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmError("open", e.errno, detail=device) from None
        try:
            mode = os.fstat(self.fd).st_mode
            if not stat.S_ISCHR(mode):
                raise KvmError("open", errno.ENODEV, detail=device,
                               hint=f"{device} is {kind_of(mode)}, not the KVM character device (--device)")
            try:
                version = self.get_api_version()
            except KvmError as e:
                if e.errno != errno.ENOTTY:
                    raise
                raise KvmError("KVM_GET_API_VERSION", e.errno, detail=device,
                               hint=f"{device} is not a KVM device (--device names the KVM device node)") from None
            if version != lib.KVM_API_VERSION:
                raise KvmError("KVM_GET_API_VERSION", errno.EINVAL,
                               hint=f"KVM API version {version}, this vmm needs {lib.KVM_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise

    def get_api_version(self):
        return ioctl(self.fd, "KVM_GET_API_VERSION")

    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on /dev/kvm; cap is a number or a KVM_CAP_* name."""
        if isinstance(cap, str):
            cap = cap_number(cap)
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", cap)

    def get_vcpu_mmap_size(self):
        return ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")

    def supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID, cached for the hot paths (XSAVE validation, state save/restore).

        KVM derives its XSAVE answers from this process's guest XSAVE permission, so the cache is
        keyed by ARCH_GET_XCOMP_GUEST_PERM, read on every call (one syscall): a permission request
        (arch_prctl ARCH_REQ_XCOMP_GUEST_PERM) invalidates it. Callers must not modify the table."""
        perm = _guest_xsave_permission()
        if self._supported is None or self._supported[0] != perm:
            self._supported = (perm, self.get_supported_cpuid())
        return self._supported[1]

    def get_supported_cpuid(self):
        """KVM_GET_SUPPORTED_CPUID as a CpuidTable. Re-read after any arch_prctl permission change."""
        from .cpuid import CpuidTable
        return CpuidTable.from_kvm_entries(read_cpuid2(self.fd, "KVM_GET_SUPPORTED_CPUID"))

    def _msr_list(self, name):
        probe = ffi.new("struct kvm_msr_list *", {"nmsrs": 0, "indices": 0})
        try:
            ioctl(self.fd, name, probe)
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
        n = probe.nmsrs
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        ioctl(self.fd, name, buf)
        return list(buf.indices[0:buf.nmsrs])

    def get_msr_index_list(self):
        return self._msr_list("KVM_GET_MSR_INDEX_LIST")

    def msr_index_list(self):
        """KVM_GET_MSR_INDEX_LIST, read once: it is fixed for the life of the KVM module."""
        if self._msr_index_list is None:
            self._msr_index_list = tuple(self.get_msr_index_list())
        return self._msr_index_list

    def get_msr_feature_index_list(self):
        return self._msr_list("KVM_GET_MSR_FEATURE_INDEX_LIST")

    def get_feature_msrs(self, indices):
        """KVM_GET_MSRS on /dev/kvm (KVM_CAP_GET_MSR_FEATURES, Linux 4.17): {index: the features KVM
        supports in that feature MSR}. Raises KvmError naming the first MSR KVM would not read."""
        indices = list(indices)
        c = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": [{"index": i} for i in indices]})
        n = ioctl(self.fd, "KVM_GET_MSRS", c)
        if n < len(indices):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, detail=f"feature MSR 0x{indices[n]:x}",
                           hint=f"/dev/kvm read {n} of {len(indices)} feature MSRs, stopped at 0x{indices[n]:x}")
        return {e.index: e.data for e in c.entries[0:n]}

    def create_vm(self, **kw):
        from .vm import Vm
        return Vm(self, ioctl(self.fd, "KVM_CREATE_VM", 0), **kw)

    def caps(self):
        return {name: self.check_extension(name) for name in CAPS}

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
