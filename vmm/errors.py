"""One exception type for ioctl failures, plus the project's input errors."""

import errno as _errno
import os


class VmmError(Exception):
    """Base of every error this package raises on purpose."""


class GuestError(VmmError):
    """A guest image or guest name that cannot be used."""


class StateError(VmmError):
    """vCPU state (or a snapshot of it) that cannot be saved or restored."""


class GuestInterrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) while a vCPU ran: still a KeyboardInterrupt, plus where the vCPU stopped
    (`vcpu` index, `rip`, `seconds` of running) and `where`, the same as one line."""

    def __init__(self, vcpu, rip, seconds):
        self.vcpu, self.rip, self.seconds = vcpu, rip, seconds
        self.where = f"vcpu {vcpu} stopped at rip 0x{rip:x} after {seconds:.3f} s"
        super().__init__(self.where)


# (ioctl, errno) -> what to do; (None, errno) is the fallback for any ioctl.
_HINTS = {
    ("open", _errno.ENOENT): "no KVM on this host: load kvm_intel/kvm_amd (or kvm_pvm), or use a machine "
    "with hardware virtualization; --device names another device node",
    ("open", _errno.EACCES): "no permission on the KVM device: add your user to the 'kvm' group "
    "(then log in again) or run as root",
    ("open", _errno.EPERM): "no permission on the KVM device: add your user to the 'kvm' group or run as root",
    ("open", _errno.EISDIR): "that is a directory, not the KVM device node (--device)",
    ("KVM_CREATE_VM", _errno.EBUSY): "another hypervisor holds the virtualization extensions",
    ("KVM_CREATE_VM", _errno.ENOMEM): "the host is out of memory for a VM",
    ("KVM_SET_CPUID2", _errno.EPERM): "the guest CPUID exposes a dynamically enabled XSAVE feature (AMX "
    "XTILEDATA) this process has no permission for: request it with "
    "arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) before creating vCPUs (vmm ... --amx)",
    ("KVM_SET_CPUID2", _errno.EINVAL): "KVM rejected the guest CPUID (inconsistent leaf 0xD sizes, too many "
    "entries, or a vCPU that has already run with a different CPUID)",
    ("KVM_SET_CPUID2", _errno.E2BIG): "too many CPUID entries for KVM",
    ("KVM_GET_SUPPORTED_CPUID", _errno.E2BIG): "the CPUID buffer was too small (retried internally)",
    ("KVM_SET_XSAVE", _errno.EINVAL): "KVM rejected the XSAVE area: XSTATE_BV has features outside the "
    "guest/host XCR0, XCOMP_BV is set, or reserved header bytes are non-zero",
    ("KVM_SET_XCRS", _errno.EINVAL): "XCR0 must include x87 and be a subset of what the guest CPUID "
    "(leaf 0xD) allows",
    ("KVM_SET_SREGS", _errno.EINVAL): "the segment/control register values are invalid for this vCPU "
    "(e.g. CR4 bits the guest CPUID does not allow)",
    ("KVM_GET_ONE_REG", _errno.EINVAL): "this vCPU does not have that register (feature absent from the "
    "guest CPUID or from the host)",
    ("KVM_SET_ONE_REG", _errno.EINVAL): "this vCPU does not have that register or rejects the value",
    ("KVM_GET_ONE_REG", _errno.ENOENT): "unknown register id for this architecture",
    ("KVM_SET_ONE_REG", _errno.ENOENT): "unknown register id for this architecture",
    ("KVM_GET_XSAVE", _errno.EINVAL): "the XSAVE state is larger than struct kvm_xsave: use KVM_GET_XSAVE2",
    ("KVM_RUN", _errno.EFAULT): "guest memory or kvm_run mapping is invalid",
    ("arch_prctl", _errno.EOPNOTSUPP): "the host CPU/kernel does not support this dynamic XSAVE feature "
    "(no AMX/XFD)",
    ("arch_prctl", _errno.EBUSY): "permission must be requested before the first vCPU is created",
    ("arch_prctl", _errno.ENOSPC): "the signal stack (sigaltstack) is too small for the larger XSAVE state",
    ("arch_prctl", _errno.EINVAL): "unknown feature number or arch_prctl code on this kernel",
    (None, _errno.ENOTTY): "this kernel's KVM does not implement the ioctl",
    (None, _errno.EINVAL): "KVM rejected the argument",
    (None, _errno.EFAULT): "bad buffer address (a bug in vmm: please report it)",
    (None, _errno.E2BIG): "the buffer is too small",
    (None, _errno.ENOMEM): "out of memory",
    (None, _errno.EPERM): "operation not permitted in this state",
}


def errno_name(err):
    """The kernel's name of an errno: Linux calls 95 EOPNOTSUPP (Python's table says ENOTSUP)."""
    return "EOPNOTSUPP" if err == _errno.EOPNOTSUPP else _errno.errorcode.get(err, str(err))


def hint_for(call, err):
    return _HINTS.get((call, err)) or _HINTS.get((None, err)) or "see the KVM API documentation for this ioctl"


class KvmError(VmmError, OSError):
    """A failed KVM ioctl (or /dev/kvm open, or arch_prctl): names the call, the errno, what to do."""

    def __init__(self, ioctl, err, hint=None, detail=None):
        self.ioctl = ioctl
        self.errno = err
        self.errno_name = errno_name(err)
        self.hint = hint or hint_for(ioctl, err)
        self.detail = detail
        what = f"{ioctl}{' (' + detail + ')' if detail else ''}"
        msg = f"{what} failed: {self.errno_name} ({os.strerror(err)}); {self.hint}"
        Exception.__init__(self, msg)
        self.strerror = os.strerror(err)

    def __str__(self):
        return self.args[0]
