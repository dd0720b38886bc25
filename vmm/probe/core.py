"""What every probe check uses: the observation/result records, the process context (one /dev/kvm,
what KVM supports, this process's XSAVE permission history) and the check registry."""

import errno as _errno
import os
import re
from dataclasses import dataclass

from ..errors import KvmError, VmmError, errno_name
from ..kvm import is_pvm

STATUSES = ("as-upstream", "differs", "skipped", "error")

EFER = 0xC0000080
EFER_SCE, EFER_NXE = 1 << 0, 1 << 11
X87_SSE = 0x3
AVX_FAMILY = (1 << 2) | (1 << 5) | (1 << 6) | (1 << 7)  # AVX, opmask, ZMM_Hi256, Hi16_ZMM
AVX512_STATE = (1 << 5) | (1 << 6) | (1 << 7)
XTILECFG, XTILEDATA = 17, 18
XTILE = (1 << XTILECFG) | (1 << XTILEDATA)
LEGACY_XSAVE = 4096  # sizeof(struct kvm_xsave)
SENTINEL = 0xA5

# a bound for a hung fresh process, not a speed target: they run side by side, and Python alone takes
# 2-3 s to start inside a kernel under emulation (make test-kernels)
CHILD_TIMEOUT = 60.0
GUEST_TIMEOUT = 2.0


class ProbeError(VmmError):
    """A check that cannot run in this process, or an unknown check name."""


# --- small helpers ---------------------------------------------------------------------------------
def kernel_version(release=None):
    """(major, minor, patch) of a kernel release string such as '6.18.44-fc-v657'. Without one: the
    running kernel's, where a distribution's release string keeps an ABI number in the patch place
    (Debian's '6.1.0-57-amd64' is stable 6.1.192; Ubuntu's '5.15.0-91-generic' is 5.15.131) read from
    /proc/version_signature (Ubuntu) or /proc/version ('Debian 6.1.192-3'); see distro_version."""
    if release is None:
        own = kernel_version(os.uname().release)
        texts = []
        for path in ("/proc/version_signature", "/proc/version"):
            try:
                with open(path, encoding="utf-8", errors="replace") as f:
                    texts.append(f.read(4096))
            except OSError:
                texts.append("")
        upstream = distro_version(*texts)
        return upstream if upstream and upstream[:2] == own[:2] else own
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return (0, 0, 0)
    return tuple(int(x or 0) for x in m.groups())


def distro_version(version_signature="", proc_version=""):
    """The upstream (major, minor, patch) a distribution kernel names besides its release string:
    the last field of Ubuntu's /proc/version_signature ('Ubuntu 5.15.0-91.101-generic 5.15.131'), or
    the 'Debian X.Y.Z' of /proc/version; None when neither says."""
    m = re.search(r"\s(\d+)\.(\d+)\.(\d+)\s*$", version_signature or "")
    if not m:  # the last one: the compiler's "(Debian 12.2.0-14)" comes before the kernel's
        m = (re.findall(r"\bDebian (\d+)\.(\d+)\.(\d+)", proc_version or "") or [None])[-1]
        return tuple(int(x) for x in m) if m else None
    return tuple(int(x) for x in m.groups())


def version_text(v):
    return ".".join(str(x) for x in v[:2]) + (f".{v[2]}" if len(v) > 2 and v[2] else "")


def hex_text(v):
    return f"{v:#x}"


def mask_text(v):
    from ..xsave import mask_names
    return f"{v:#x} ({mask_names(v)})"


def observed_ok(value, text=None):
    return {"ok": True, "value": value, "errno": None, "errno_name": None,
            "text": str(value) if text is None else text}


def observed_err(err, text=None):
    name = errno_name(err)
    return {"ok": False, "value": None, "errno": err, "errno_name": name,
            "text": text or f"{name} ({os.strerror(err)})"}


def attempt(fn, fmt=None):
    """Call fn(); an observation of its value, or of the errno of the KvmError it raised."""
    try:
        v = fn()
    except KvmError as e:
        return observed_err(e.errno)
    return observed_ok(v, fmt(v) if fmt else None)


def upstream(text, value=None, errno=None):
    return {"text": text, "value": value, "errno_name": errno}


def _same(obs, exp):
    if exp.get("errno_name"):
        return obs["errno_name"] == exp["errno_name"]
    return obs["ok"] and obs["value"] == exp["value"]


def result(setup, call, observed, expected, verdict, status=None, details=None):
    if status is None:
        status = "as-upstream" if _same(observed, expected) else "differs"
    return {"setup": setup, "call": call, "observed": observed, "upstream": expected,
            "status": status, "verdict": verdict, "details": details or {}}


def arch_prctl(code, arg):
    """arch_prctl(code, arg) -> 0 or -errno (the raw kernel answer)."""
    from .._bindings import lib
    return lib.vmm_arch_prctl(code, arg)


def prctl_get(code):
    from .._bindings import ffi
    out = ffi.new("unsigned long long *")
    r = arch_prctl(code, int(ffi.cast("uintptr_t", out)))
    if r < 0:
        raise KvmError("arch_prctl", -r, detail=f"{code:#x}")
    return out[0]


# --- the context a process runs its checks in ------------------------------------------------------
class Context:
    """One /dev/kvm, what KVM supports, and this process's XSAVE permission history."""

    def __init__(self, device="/dev/kvm", kernel=None, fresh=False):
        from ..kvm import Kvm
        self.device = device
        self.kernel = os.uname().release if kernel is None else kernel
        self.kver = kernel_version() if kernel is None else kernel_version(kernel)
        self.fresh = fresh  # started by `python -m vmm.probe --check`: permissions are the defaults
        self.kvm = Kvm(device)
        self.requested = None  # observation of ARCH_REQ_XCOMP_GUEST_PERM(18), once made here
        self.pvm = is_pvm()
        self._one_reg = None
        self._read_supported()

    def _read_supported(self):
        from ..xsave import XsaveLayout
        self.supported = self.kvm.get_supported_cpuid()
        self.xcr0 = self.supported.xcr0_supported()
        self.layout = XsaveLayout.from_cpuid(self.supported) if self.xcr0 else None

    def close(self):
        self.kvm.close()

    def one_reg(self):
        """Whether this kernel has x86 KVM_GET/SET_ONE_REG (Linux >= 6.18, 'KVM: x86: Add
        KVM_{G,S}ET_ONE_REG support for MSRs'): asked once per process by reading EFER by id on a
        scratch vCPU (an older kernel answers EINVAL, or ENOTTY without any ONE_REG)."""
        if self._one_reg is None:
            from ..regs import msr
            with self.vm() as vm:
                v = self.vcpu(vm)
                try:
                    v.get_one_reg(msr(EFER))
                    self._one_reg = True
                except KvmError as e:
                    if e.errno not in (_errno.EINVAL, _errno.ENOTTY):
                        raise
                    self._one_reg = False
        return self._one_reg

    @property
    def guest_cpuid(self):
        """The guest CPUID a VM gets by default here (no AMX: that needs the permission)."""
        return self.supported.guest_for_xcr0(self.xcr0 & ~XTILE)

    def vm(self):
        return self.kvm.create_vm()

    def vcpu(self, vm, cpuid="default"):
        v = vm.create_vcpu()
        if cpuid is not None:
            v.set_cpuid2(self.guest_cpuid if cpuid == "default" else cpuid)
        return v

    def xcomp_supp(self):
        from ..amx import ARCH_GET_XCOMP_SUPP
        return prctl_get(ARCH_GET_XCOMP_SUPP)

    def require_fresh(self, name):
        if not self.fresh:
            raise ProbeError(f"check {name!r} depends on or changes this process's XSAVE permissions: "
                             f"run it in a fresh process (python -m vmm.probe --check {name})")

    def request_amx(self):
        """ARCH_REQ_XCOMP_GUEST_PERM(18), once per process; the observation. Re-reads the
        supported CPUID afterwards (KVM filters it by the permission)."""
        from ..amx import ARCH_REQ_XCOMP_GUEST_PERM
        if self.requested is None:
            r = arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILEDATA)
            self.requested = observed_ok(0, "0 (granted)") if r == 0 else observed_err(-r)
            self._read_supported()
        return self.requested

    def expected_xsave2(self, permitted):
        """What KVM_CAP_XSAVE2 is upstream: max(4096, standard-format size of the supported XCR0
        filtered by the guest permission), from the layout KVM_GET_SUPPORTED_CPUID describes."""
        from ..amx import kvm_filtered_xcr0
        from ..xsave import kvm_xsave_size
        if not self.layout:
            return LEGACY_XSAVE, "4096 (no XSAVE enumerated: struct kvm_xsave)"
        xcr0 = kvm_filtered_xcr0(self.xcr0, permitted) & self.layout.user_mask
        size = kvm_xsave_size(self.layout, xcr0)
        return size, (f"{size} = max(4096, {self.layout.standard_size(xcr0)} bytes for XCR0 "
                      f"{mask_text(xcr0)})")


# --- the check registry ----------------------------------------------------------------------------
GROUPS = ("xsave", "amx", "cpuid", "msr", "state", "io")


@dataclass
class Check:
    name: str
    title: str
    fn: object
    group: str  # one of GROUPS: what the check is about (`vmm probe --group`)
    process: str = None  # None: in this process; else the name of the fresh process it runs in
    min_kernel: tuple = None  # skipped on older kernels, with `danger` as the reason
    danger: str = None
    selftest: str = None  # the Linux KVM selftest (tools/testing/selftests/kvm/x86/) it derives from


CHECKS = []
_BY_NAME = {}


def check(name, title, group, process=None, min_kernel=None, danger=None, selftest=None):
    if group not in GROUPS:
        raise ValueError(f"check {name!r}: unknown group {group!r}")

    def deco(fn):
        c = Check(name, title, fn, group, process, min_kernel, danger, selftest)
        CHECKS.append(c)
        _BY_NAME[name] = c
        return fn
    return deco


# Inside a group, these come first in this order (and so run in this order in their fresh process):
# permissions before the request, the request, what it changed. Other checks follow in the order
# their modules register them.
REPORT_ORDER = (
    "xcomp_supp", "xcomp_perm", "xcomp_guest_perm", "cap_xsave2_dev_kvm", "cap_xsave2_vm_fd",
    "req_xcomp_guest_perm", "cap_xsave2_dev_kvm_after_request", "cap_xsave2_vm_fd_after_request",
    "set_cpuid2_xtiledata_without_perm", "req_xcomp_guest_perm_after_vcpu",
)


def sort_checks():
    """Put CHECKS in report order: by group, then REPORT_ORDER, then registration."""
    first = {n: i for i, n in enumerate(REPORT_ORDER)}
    reg = {c.name: i for i, c in enumerate(CHECKS)}
    CHECKS.sort(key=lambda c: (GROUPS.index(c.group), first.get(c.name, len(first)), reg[c.name]))


def check_names():
    return [c.name for c in CHECKS]


def get_check(name):
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ProbeError(f"unknown check {name!r}; `vmm probe --list` lists them") from None


def select(names=None, groups=None):
    """The checks named or in the groups named (all when neither is given), in report order;
    raises ProbeError for an unknown name or group."""
    for g in groups or ():
        if g not in GROUPS:
            raise ProbeError(f"unknown group {g!r}; groups: {', '.join(GROUPS)}")
    wanted = {get_check(n).name for n in names or ()}
    if not names and not groups:
        return list(CHECKS)
    return [c for c in CHECKS if c.name in wanted or c.group in (groups or ())]


SET_XSAVE_FIX = ("KVM_SET_XSAVE checks XSTATE_BV against the features the process may use, not the guest "
                 "CPUID, since Linux 6.6 and 6.1.60 ('KVM: x86: Constrain guest-supported xfeatures only at "
                 "KVM_GET_XSAVE{2}')")


def has_set_xsave_fix(kver):
    """Whether a kernel of version `kver` has the SET_XSAVE-after-narrower-SET_CPUID2 fix."""
    return kver >= (6, 6) or (6, 1, 60) <= kver < (6, 2)


ONE_REG_WHAT = ("x86 KVM_GET/SET_ONE_REG and KVM_GET_REG_LIST came in Linux 6.18; older kernels "
                "read and write MSRs with KVM_GET/SET_MSRS only")


# Kernels known to misbehave on what some checks do (skipped there, with this reason).
XSAVES_HOST_FIX = (3, 18)
XSAVES_HOST_DANGER = ("before Linux 3.18, KVM_SET_XSAVE handed the caller's buffer to XRSTORS on hosts "
                      "that use XSAVES (fixed by 'KVM: x86: support XSAVES usage in the host'); a "
                      "deliberately bad buffer is not safe to send there")
XCR0_LEAK_FIX = (5, 1)
XCR0_LEAK_DANGER = ("before Linux 5.1, a machine check in guest mode could leave the guest's XCR0 loaded in "
                    "the host, and a guest XCR0 narrower than the host's then ends in a host double fault "
                    "(fixed by 'x86/kvm: move kvm_load/put_guest_xcr0 into atomic context')")


def skip(reason):
    return {"skip": reason}


def not_in_kernel(ctx, what):
    """A skip for a check whose subject this kernel does not have: `what` names the feature and the
    kernel that brought it."""
    return skip(f"not in this kernel (Linux {version_text(ctx.kver)}): {what}")


PVM_REASON = ("this /dev/kvm is PVM (kvm_pvm): a paravirtualized KVM that runs guests without VMX/SVM, "
              "emulates guest CPL0 code and holds its own view of the guest CPUID")


TCG_REASON = ("the CPU under this KVM is QEMU's TCG emulator: what the CPU itself does for the guest "
              "(its instructions, the MSRs KVM passes through to it) is the emulator's, not hardware's")


def cpu_model(path="/proc/cpuinfo"):
    """The host CPU's model name ('' when /proc/cpuinfo does not say)."""
    try:
        with open(path) as f:
            for line in f.read(1 << 20).splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def pvm_note(ctx):
    """The reason to add to a verdict that differs from upstream, when the platform under KVM explains
    it: PVM, or a CPU emulated by QEMU TCG (nested KVM on these machines)."""
    if ctx.pvm:
        return f" ({PVM_REASON})"
    return f" ({TCG_REASON})" if "QEMU TCG" in cpu_model() else ""


# --- XSAVE buffers (this process) ------------------------------------------------------------------
def raw_set_xsave(vcpu, raw):
    """KVM_SET_XSAVE with exactly these bytes: no validation on the Python side."""
    from .._bindings import ffi, ioctl
    return ioctl(vcpu.fd, "KVM_SET_XSAVE", ffi.new("char[]", bytes(raw)))


def xstate_bv(raw):
    return int.from_bytes(raw[512:520], "little")
