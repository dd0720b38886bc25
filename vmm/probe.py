"""`vmm probe`: behaviour checks against this host's KVM, and the versioned report they make.

Each check sets something up, makes one call, and records what the kernel answered (a value or an
errno) next to what a current upstream kernel answers, with a one-line verdict. The report also
carries the host fingerprint (kernel, KVM capabilities, KVM_GET_SUPPORTED_CPUID as JSON and as a
dump, the XSAVE layout, XSAVE permissions, MSR lists), so `vmm compat` and `vmm baseline` can use a
report written on another host.

Process hygiene: XSAVE permissions (arch_prctl) belong to the process, a permission request cannot
be undone, and the first vCPU of a process locks them. The checks that depend on or change them
therefore run in fresh processes (`python -m vmm.probe --check NAME ...`: fork and exec, so the
child starts with the kernel's default permissions, not with a copy of the caller's), one process
per group, started first and run in parallel with the other checks. The caller's permissions are
never touched. Checks known to be dangerous on old kernels are skipped there, with the reason.

A small validator for the subset of JSON Schema the shipped schema uses (type, required,
properties, items, enum, const, additionalProperties) checks reports on write and on read.
"""

import errno as _errno
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import KvmError, VmmError, errno_name

SCHEMA_ID = "vmm-probe-report/1"
SCHEMA_PREFIX = "vmm-probe-report/"
SCHEMA_FILE = Path(__file__).resolve().parent / "schema" / "probe-report.schema.json"

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

CHILD_TIMEOUT = 8.0
GUEST_TIMEOUT = 2.0


class ProbeError(VmmError):
    """A check that cannot run in this process, or an unknown check name."""


class ReportError(VmmError):
    """A probe report file that cannot be used: says what is wrong with it."""


# --- small helpers ---------------------------------------------------------------------------------
def kernel_version(release=None):
    """(major, minor, patch) of a kernel release string such as '6.18.44-fc-v657'."""
    release = os.uname().release if release is None else release
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", release)
    if not m:
        return (0, 0, 0)
    return tuple(int(x or 0) for x in m.groups())


def _ver(v):
    return ".".join(str(x) for x in v[:2]) + (f".{v[2]}" if len(v) > 2 and v[2] else "")


def _hex(v):
    return f"{v:#x}"


def _mask(v):
    from .xsave import mask_names
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


def _arch_prctl(code, arg):
    """arch_prctl(code, arg) -> 0 or -errno (the raw kernel answer)."""
    from ._bindings import lib
    return lib.vmm_arch_prctl(code, arg)


def _prctl_get(code):
    from ._bindings import ffi
    out = ffi.new("unsigned long long *")
    r = _arch_prctl(code, int(ffi.cast("uintptr_t", out)))
    if r < 0:
        raise KvmError("arch_prctl", -r, detail=f"{code:#x}")
    return out[0]


# --- the context a process runs its checks in ------------------------------------------------------
class Context:
    """One /dev/kvm, what KVM supports, and this process's XSAVE permission history."""

    def __init__(self, device="/dev/kvm", kernel=None, fresh=False):
        from .kvm import Kvm
        self.device = device
        self.kernel = os.uname().release if kernel is None else kernel
        self.kver = kernel_version(self.kernel)
        self.fresh = fresh  # started by `python -m vmm.probe --check`: permissions are the defaults
        self.kvm = Kvm(device)
        self.requested = None  # observation of ARCH_REQ_XCOMP_GUEST_PERM(18), once made here
        self._read_supported()

    def _read_supported(self):
        from .xsave import XsaveLayout
        self.supported = self.kvm.get_supported_cpuid()
        self.xcr0 = self.supported.xcr0_supported()
        self.layout = XsaveLayout.from_cpuid(self.supported) if self.xcr0 else None

    def close(self):
        self.kvm.close()

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
        from .amx import ARCH_GET_XCOMP_SUPP
        return _prctl_get(ARCH_GET_XCOMP_SUPP)

    def require_fresh(self, name):
        if not self.fresh:
            raise ProbeError(f"check {name!r} depends on or changes this process's XSAVE permissions: "
                             f"run it in a fresh process (python -m vmm.probe --check {name})")

    def request_amx(self):
        """ARCH_REQ_XCOMP_GUEST_PERM(18), once per process; the observation. Re-reads the
        supported CPUID afterwards (KVM filters it by the permission)."""
        from .amx import ARCH_REQ_XCOMP_GUEST_PERM
        if self.requested is None:
            r = _arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILEDATA)
            self.requested = observed_ok(0, "0 (granted)") if r == 0 else observed_err(-r)
            self._read_supported()
        return self.requested

    def expected_xsave2(self, permitted):
        """What KVM_CAP_XSAVE2 is upstream: max(4096, standard-format size of the supported XCR0
        filtered by the guest permission), from the layout KVM_GET_SUPPORTED_CPUID describes."""
        from .amx import kvm_filtered_xcr0
        from .xsave import kvm_xsave_size
        if not self.layout:
            return LEGACY_XSAVE, "4096 (no XSAVE enumerated: struct kvm_xsave)"
        xcr0 = kvm_filtered_xcr0(self.xcr0, permitted) & self.layout.user_mask
        size = kvm_xsave_size(self.layout, xcr0)
        return size, (f"{size} = max(4096, {self.layout.standard_size(xcr0)} bytes for XCR0 "
                      f"{_mask(xcr0)})")


# --- the check registry ----------------------------------------------------------------------------
@dataclass
class Check:
    name: str
    title: str
    fn: object
    group: str = None  # None: in this process; else the name of the fresh process it runs in
    min_kernel: tuple = None  # skipped on older kernels, with `danger` as the reason
    danger: str = None


CHECKS = []
_BY_NAME = {}


def check(name, title, group=None, min_kernel=None, danger=None):
    def deco(fn):
        c = Check(name, title, fn, group, min_kernel, danger)
        CHECKS.append(c)
        _BY_NAME[name] = c
        return fn
    return deco


# The order of the report (and of the checks inside each fresh process): permissions before the request,
# the request, what it changed, then the checks that need no permission.
REPORT_ORDER = (
    "xcomp_supp", "xcomp_perm", "xcomp_guest_perm", "cap_xsave2_dev_kvm", "cap_xsave2_vm_fd",
    "req_xcomp_guest_perm", "cap_xsave2_dev_kvm_after_request", "cap_xsave2_vm_fd_after_request",
    "set_cpuid2_xtiledata_without_perm", "req_xcomp_guest_perm_after_vcpu",
    "get_xsave_sizes", "set_xsave_after_narrow_cpuid", "get_xsave_trims_to_guest_xcr0",
    "set_xsave_xcomp_bv", "set_xsave_reserved_header", "set_xsave_unpermitted_component",
    "one_reg_efer", "reg_list", "guest_ssp", "guest_beyond_xcr0", "get_cpuid2_matches_set",
    "msr_index_list",
)


def check_names():
    return [c.name for c in CHECKS]


def get_check(name):
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ProbeError(f"unknown check {name!r}; checks: {', '.join(check_names())}") from None


# Kernels known to misbehave on what some checks do (skipped there, with this reason).
XSAVES_HOST_FIX = (3, 18)
XSAVES_HOST_DANGER = ("before Linux 3.18, KVM_SET_XSAVE handed the caller's buffer to XRSTORS on hosts "
                      "that use XSAVES (fixed by 'KVM: x86: support XSAVES usage in the host'); a "
                      "deliberately bad buffer is not safe to send there")
XCR0_LEAK_FIX = (5, 1)
XCR0_LEAK_DANGER = ("before Linux 5.1, a machine check in guest mode could leave the guest's XCR0 loaded in "
                    "the host, and a guest XCR0 narrower than the host's then ends in a host double fault "
                    "(fixed by 'x86/kvm: move kvm_load/put_guest_xcr0 into atomic context')")


# --- XSAVE permissions and KVM_CAP_XSAVE2 (fresh processes) -----------------------------------------
def _cap_xsave2(ctx, where, after_request):
    from .amx import ARCH_GET_XCOMP_GUEST_PERM
    if after_request:
        req = ctx.request_amx()
    perm = _prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    exp_value, exp_text = ctx.expected_xsave2(perm)
    if where == "dev":
        obs = attempt(lambda: ctx.kvm.check_extension("KVM_CAP_XSAVE2"))
        call = "KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on /dev/kvm"
    else:
        with ctx.vm() as vm:
            obs = attempt(vm.xsave2_size)
        call = "KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on a VM fd created " + (
            "after the request" if after_request else "in this process")
    setup = ("a fresh process; arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) answered "
             f"{req['text']}; guest permission now {_hex(perm)}" if after_request else
             f"a fresh process with the default guest permission {_hex(perm)}")
    exp = upstream(exp_text + ("" if not after_request else
                               " (grows to include XTILEDATA once the request is granted)"), exp_value)
    v = obs["value"]
    if not obs["ok"]:
        verdict = f"KVM_CHECK_EXTENSION failed: {obs['text']}"
    elif v == 0:
        verdict = "no KVM_CAP_XSAVE2 (kernel before 5.17): KVM_GET_XSAVE's 4096 bytes is all there is"
    elif v == exp_value:
        verdict = f"a guest's XSAVE area here is {v} bytes" + (
            ", the same as before the request (not granted)" if after_request and not req["ok"] else "")
    else:
        verdict = f"{v} bytes, but the supported CPUID and guest permission imply {exp_value}"
    return result(setup, call, obs, exp, verdict,
                  details={"guest_perm": _hex(perm), "supported_xcr0": _hex(ctx.xcr0)})


@check("cap_xsave2_dev_kvm", "KVM_CAP_XSAVE2 on /dev/kvm, before any AMX permission request", "fresh")
def _c_cap_dev(ctx):
    ctx.require_fresh("cap_xsave2_dev_kvm")
    return _cap_xsave2(ctx, "dev", False)


@check("cap_xsave2_vm_fd", "KVM_CAP_XSAVE2 on a VM fd, before any AMX permission request", "fresh")
def _c_cap_vm(ctx):
    ctx.require_fresh("cap_xsave2_vm_fd")
    return _cap_xsave2(ctx, "vm", False)


@check("cap_xsave2_dev_kvm_after_request", "KVM_CAP_XSAVE2 on /dev/kvm after an AMX permission request",
       "after-request")
def _c_cap_dev_after(ctx):
    ctx.require_fresh("cap_xsave2_dev_kvm_after_request")
    return _cap_xsave2(ctx, "dev", True)


@check("cap_xsave2_vm_fd_after_request", "KVM_CAP_XSAVE2 on a VM fd after an AMX permission request",
       "after-request")
def _c_cap_vm_after(ctx):
    ctx.require_fresh("cap_xsave2_vm_fd_after_request")
    return _cap_xsave2(ctx, "vm", True)


def _xcomp_get(ctx, name, code_name):
    from . import amx
    code = getattr(amx, code_name)
    guest = "GUEST" in code_name
    obs = attempt(lambda: _prctl_get(code), _mask)
    if name == "xcomp_supp":
        exp = upstream("the XSAVE user features the kernel enables; KVM's supported XCR0 (here "
                       f"{_mask(ctx.xcr0)}) is a subset of them")
        if not obs["ok"]:
            return result("a fresh process", f"arch_prctl({code_name})", obs, exp,
                          f"{obs['text']}: no XSAVE permission interface (kernel before 5.16)", status="differs")
        v = obs["value"]
        outside = ctx.xcr0 & ~v
        verdict = ("AMX (XTILECFG/XTILEDATA) is available to processes" if v & XTILE == XTILE else
                   "no AMX: XTILEDATA (18) is not a feature of this host")
        if outside:
            verdict += f"; KVM claims {_mask(outside)} beyond it"
        return result("a fresh process", f"arch_prctl({code_name})", obs, exp, verdict,
                      status="differs" if outside else "as-upstream")
    try:
        supp = ctx.xcomp_supp()
    except KvmError:
        supp = None
    default = None if supp is None else supp & ~(1 << XTILEDATA)
    exp = upstream(f"{'-' if default is None else _mask(default)}: every supported feature but the dynamically "
                   f"enabled XTILEDATA, until ARCH_REQ_XCOMP_{'GUEST_' if guest else ''}PERM asks for it",
                   default)
    who = "this process's guests" if guest else "this process itself"
    if not obs["ok"]:
        verdict = (f"{obs['text']}: this kernel has no {'guest ' if guest else ''}XSAVE permissions "
                   f"(before {'5.17' if guest else '5.16'})")
    elif obs["value"] == default:
        verdict = f"{who} may use {obs['text']}: the default"
    else:
        verdict = f"{who} may use {obs['text']}, not the default {_mask(default)}"
    return result("a fresh process, no permission requested", f"arch_prctl({code_name})", obs, exp, verdict)


@check("xcomp_supp", "XSAVE features the kernel supports for user space", "fresh")
def _c_supp(ctx):
    return _xcomp_get(ctx, "xcomp_supp", "ARCH_GET_XCOMP_SUPP")


@check("xcomp_perm", "XSAVE features this process may use", "fresh")
def _c_perm(ctx):
    ctx.require_fresh("xcomp_perm")
    return _xcomp_get(ctx, "xcomp_perm", "ARCH_GET_XCOMP_PERM")


@check("xcomp_guest_perm", "XSAVE features this process's guests may use", "fresh")
def _c_guest_perm(ctx):
    ctx.require_fresh("xcomp_guest_perm")
    return _xcomp_get(ctx, "xcomp_guest_perm", "ARCH_GET_XCOMP_GUEST_PERM")


def _amx_expectation(ctx, late):
    try:
        supp = ctx.xcomp_supp()
    except KvmError:
        supp = 0
    if not supp >> XTILEDATA & 1:
        return upstream("EOPNOTSUPP: XTILEDATA is not a dynamically enabled feature of this host "
                        f"(ARCH_GET_XCOMP_SUPP {_hex(supp)}); the support check comes before any other",
                        errno="EOPNOTSUPP")
    if late:
        return upstream("EBUSY: the first vCPU of a process locks its guest permissions", errno="EBUSY")
    return upstream("0: granted (the feature is supported and no vCPU exists yet)", 0)


@check("req_xcomp_guest_perm", "ARCH_REQ_XCOMP_GUEST_PERM(18) before any vCPU", "after-request")
def _c_req(ctx):
    from .amx import ARCH_GET_XCOMP_GUEST_PERM
    ctx.require_fresh("req_xcomp_guest_perm")
    before = _prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    first = ctx.requested is None
    obs = ctx.request_amx()
    after = _prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    exp = _amx_expectation(ctx, late=False)
    if obs["ok"]:
        verdict = f"granted: guest permission {_hex(before)} -> {_hex(after)}; AMX guests are possible here"
    elif obs["errno_name"] == "EOPNOTSUPP":
        verdict = "refused with EOPNOTSUPP: this host has no AMX for guests"
    elif obs["errno_name"] == "EINVAL":
        verdict = "EINVAL: this kernel does not know ARCH_REQ_XCOMP_GUEST_PERM (before 5.17)"
    else:
        verdict = f"refused with {obs['text']}"
    details = {"guest_perm_before": _hex(before), "guest_perm_after": _hex(after),
               "supported_xcr0_after": _hex(ctx.xcr0),
               "supported_cpuid_after": ctx.supported.to_json() if obs["ok"] else None}
    return result("a fresh process, no vCPU yet" + ("" if first else " (request made earlier here)"),
                  "arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18)", obs, exp, verdict, details=details)


@check("set_cpuid2_xtiledata_without_perm", "KVM_SET_CPUID2 exposing XTILEDATA without the permission",
       "fresh")
def _c_cpuid_xtile(ctx):
    from .cpuid import SIGNIFICANT_INDEX, CpuidEntry
    ctx.require_fresh("set_cpuid2_xtiledata_without_perm")
    if ctx.requested is not None and ctx.requested["ok"]:
        raise ProbeError("set_cpuid2_xtiledata_without_perm needs a process without the AMX permission")
    table = ctx.guest_cpuid
    d0 = table.entry(0xD, 0)
    d0.eax |= XTILE
    # Sapphire Rapids' XTILECFG/XTILEDATA sub-leaves when KVM does not list them (no AMX here)
    sub = {XTILECFG: (64, 2752, 2), XTILEDATA: (8192, 2816, 6)}
    for i, (size, off, ecx) in sub.items():
        have = ctx.supported.entry(0xD, i)
        if have is not None and have.eax:
            size, off, ecx = have.eax, have.ebx, have.ecx
        table.put(CpuidEntry(0xD, i, SIGNIFICANT_INDEX, size, off, ecx, 0))
        d0.ebx = d0.ecx = max(d0.ecx, off + size)
    with ctx.vm() as vm:
        v = vm.create_vcpu()
        obs = attempt(lambda: v.set_cpuid2(table) or 0, lambda _: "0 (accepted)")
    exp = upstream("EPERM (since 5.17): a guest CPUID with a dynamically enabled feature needs "
                   "arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM) first", errno="EPERM")
    if obs["errno_name"] == "EPERM":
        verdict = "EPERM: exposing AMX to a guest needs the guest permission first"
    elif obs["ok"]:
        verdict = ("accepted without the permission: this kernel does not gate dynamic XSAVE features "
                   "(before 5.17), or grants them itself")
    else:
        verdict = f"refused with {obs['text']}, not for the missing permission"
    return result("a fresh process without AMX permission; VM and vCPU; the default guest CPUID with "
                  f"XTILECFG|XTILEDATA added to CPUID.(0DH,0).EAX ({_hex(d0.eax)}) and sub-leaves 17, 18",
                  "KVM_SET_CPUID2", obs, exp, verdict)


@check("req_xcomp_guest_perm_after_vcpu", "ARCH_REQ_XCOMP_GUEST_PERM(18) after a vCPU exists", "fresh")
def _c_req_late(ctx):
    from .amx import ARCH_REQ_XCOMP_GUEST_PERM
    ctx.require_fresh("req_xcomp_guest_perm_after_vcpu")
    if ctx.requested is not None:
        raise ProbeError("req_xcomp_guest_perm_after_vcpu needs a process that has not asked for the "
                         "permission yet")
    with ctx.vm() as vm:
        ctx.vcpu(vm)
        r = _arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILEDATA)
        obs = observed_ok(0, "0 (granted)") if r == 0 else observed_err(-r)
    exp = _amx_expectation(ctx, late=True)
    if obs["errno_name"] == "EBUSY":
        verdict = "EBUSY: the permission must be requested before the first vCPU"
    elif obs["errno_name"] == "EOPNOTSUPP":
        verdict = "EOPNOTSUPP: no AMX here, so the support check answers before the vCPU lock is looked at"
    elif obs["ok"]:
        verdict = "granted although a vCPU exists: this kernel does not lock guest permissions"
    else:
        verdict = f"refused with {obs['text']}"
    return result("a fresh process that created a VM and a vCPU and made no request",
                  "arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18)", obs, exp, verdict)


# --- XSAVE buffers (this process) ------------------------------------------------------------------
def _raw_set_xsave(vcpu, raw):
    """KVM_SET_XSAVE with exactly these bytes: no validation on the Python side."""
    from ._bindings import ffi, ioctl
    return ioctl(vcpu.fd, "KVM_SET_XSAVE", ffi.new("char[]", bytes(raw)))


def _bv(raw):
    return int.from_bytes(raw[512:520], "little")


@check("get_xsave_sizes", "KVM_GET_XSAVE and KVM_GET_XSAVE2 sizes")
def _c_sizes(ctx):
    from ._bindings import ffi, ioctl
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        cap = vm.xsave2_size()
        legacy = ffi.new("struct kvm_xsave *")
        obs_legacy = attempt(lambda: ioctl(v.fd, "KVM_GET_XSAVE", legacy))
        if not cap:
            obs = observed_err(_errno.ENOTTY, "no KVM_CAP_XSAVE2: KVM_GET_XSAVE2 absent")
            return result("VM and vCPU with the default guest CPUID", "KVM_GET_XSAVE2", obs,
                          upstream("KVM_GET_XSAVE2 fills KVM_CAP_XSAVE2 bytes (since 5.17)"),
                          "no KVM_GET_XSAVE2 on this kernel; KVM_GET_XSAVE gives 4096 bytes", status="differs")
        buf = ffi.new("char[]", cap + LEGACY_XSAVE)  # exactly this size (a bytes initializer adds a NUL)
        ffi.buffer(buf)[:] = bytes([SENTINEL]) * (cap + LEGACY_XSAVE)
        ioctl(v.fd, "KVM_GET_XSAVE2", buf)
        raw = bytes(ffi.buffer(buf))
        written = len(raw.rstrip(bytes([SENTINEL])))  # KVM zero-fills what the state does not use
        legacy_raw = bytes(ffi.buffer(legacy))
    same = obs_legacy["ok"] and legacy_raw[:min(cap, LEGACY_XSAVE)] == raw[:min(cap, LEGACY_XSAVE)]
    obs = observed_ok(written, f"KVM_GET_XSAVE2 wrote {written} bytes; KVM_GET_XSAVE "
                      + (f"{LEGACY_XSAVE} bytes, " + ("identical" if same else "different")
                         + f" over the first {min(cap, LEGACY_XSAVE)}" if obs_legacy["ok"]
                         else obs_legacy["text"]))
    exp = upstream(f"KVM_GET_XSAVE2 writes exactly KVM_CAP_XSAVE2 = {cap} bytes; KVM_GET_XSAVE writes "
                   f"{LEGACY_XSAVE} (struct kvm_xsave), cutting off whatever lies beyond", cap)
    ok = written == cap and same
    verdict = (f"a vCPU's XSAVE area is {cap} bytes here"
               + (" and the legacy ioctl holds all of it" if cap <= LEGACY_XSAVE else
                  f"; KVM_GET_XSAVE loses the {cap - LEGACY_XSAVE} bytes beyond 4096") if ok else
               f"KVM_GET_XSAVE2 wrote {written} bytes for KVM_CAP_XSAVE2 {cap}"
               + ("" if same else "; KVM_GET_XSAVE disagrees with it"))
    return result("VM and vCPU with the default guest CPUID; KVM_GET_XSAVE2 into a buffer of "
                  f"KVM_CAP_XSAVE2 + 4096 bytes filled with {SENTINEL:#x}",
                  "KVM_GET_XSAVE2 and KVM_GET_XSAVE", obs, exp, verdict, status=None if ok else "differs",
                  details={"xsave2_cap": cap, "xsave2_written": written, "legacy_size": LEGACY_XSAVE,
                           "legacy_identical": same})


def _narrow_setup(ctx):
    """(narrow guest XCR0, host components beyond it that any bit pattern is valid for) or None."""
    extra = ctx.xcr0 & AVX_FAMILY & ~0x7
    if extra:
        return 0x7, extra
    extra = ctx.xcr0 & AVX_FAMILY & ~X87_SSE
    return (X87_SSE, extra) if extra else None


def _fill_components(raw, layout, mask):
    """Give each component in mask a recognizable value and set its XSTATE_BV bit."""
    from .xsave import AVX, HI16_ZMM, OPMASK, ZMM_HI256, XsaveArea
    area = XsaveArea.parse(bytearray(raw), layout)
    if mask >> AVX & 1:
        area.set("ymm3h", 0xAAAA << 64 | 0x3)
    if mask >> OPMASK & 1:
        area.set_k(3, 0x4B4B000000000003)
    if mask >> ZMM_HI256 & 1:
        area.set("zmm5h", 0x5A5A << 128 | 0x5)
    if mask >> HI16_ZMM & 1:
        area.set_zmm(20, 0x2020 << 256 | 0x20)
    return area.encode()


def _narrow_vcpu(ctx, vm, narrow, extra):
    v = ctx.vcpu(vm, ctx.supported.guest_for_xcr0(narrow))
    raw = _fill_components(v.get_xsave(), ctx.layout, extra)
    return v, raw


@check("set_xsave_after_narrow_cpuid", "KVM_SET_XSAVE with host features after a narrower KVM_SET_CPUID2",
       min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_set_narrow(ctx):
    setup = _narrow_setup(ctx)
    if setup is None:
        return _skip(f"the host supports no AVX-family XSAVE component ({_mask(ctx.xcr0)}): "
                     "nothing to put beyond a narrower guest XCR0")
    narrow, extra = setup
    with ctx.vm() as vm:
        v, raw = _narrow_vcpu(ctx, vm, narrow, extra)
        obs = attempt(lambda: _raw_set_xsave(v, raw), lambda _: "0 (accepted)")
    exp = upstream("0 (accepted) since 6.6 and 6.1.60: KVM checks KVM_SET_XSAVE against the features the "
                   "process may use, not the guest CPUID (5.17 to 6.5 answered EINVAL)", 0)
    if obs["ok"]:
        verdict = (f"accepted: a state with {_mask(extra)} restores after a guest CPUID limited to "
                   f"XCR0 {_hex(narrow)}")
    elif obs["errno_name"] == "EINVAL":
        verdict = ("EINVAL, as 5.17 to 6.5 do: set a guest CPUID that covers every XSTATE_BV bit of the "
                   "state before KVM_SET_XSAVE, or strip those bits")
    else:
        verdict = f"refused with {obs['text']}"
    return result(f"VM and vCPU; KVM_SET_CPUID2 with guest XCR0 limited to {_mask(narrow)}; an XSAVE "
                  f"buffer from KVM_GET_XSAVE2 with {_mask(extra)} given values (XSTATE_BV {_hex(_bv(raw))})",
                  "KVM_SET_XSAVE (raw, no Python-side checks)", obs, exp, verdict,
                  details={"guest_xcr0": _hex(narrow), "xstate_bv": _hex(_bv(raw))})


@check("get_xsave_trims_to_guest_xcr0", "KVM_GET_XSAVE2 limits XSTATE_BV to the guest's XCR0 | FP | SSE",
       min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_trim(ctx):
    setup = _narrow_setup(ctx)
    if setup is None:
        return _skip(f"the host supports no AVX-family XSAVE component ({_mask(ctx.xcr0)}): "
                     "nothing a narrower guest XCR0 could trim")
    narrow, extra = setup
    with ctx.vm() as vm:
        v, raw = _narrow_vcpu(ctx, vm, narrow, extra)
        try:
            _raw_set_xsave(v, raw)
        except KvmError as e:
            return _skip(f"KVM_SET_XSAVE refused the buffer with host features ({errno_name(e.errno)}), so "
                         "no state beyond the guest XCR0 can be put in (see set_xsave_after_narrow_cpuid)")
        got = v.get_xsave()
        held = v.get_cpuid2().xcr0_supported()
    bv = _bv(got)
    allowed = narrow | X87_SSE
    obs = observed_ok(_hex(bv), f"XSTATE_BV {_mask(bv)}")
    exp = upstream(f"XSTATE_BV within {_mask(allowed)} (since 6.6 and 6.1.60: KVM trims at "
                   "KVM_GET_XSAVE{,2} to the guest-supported XCR0 | FP | SSE)", _hex(_bv(raw) & allowed))
    beyond = bv & ~allowed
    if not beyond:
        verdict = f"trimmed to {_mask(bv)}: the components the guest CPUID lacks are dropped at GET"
        status = "as-upstream"
    elif held != narrow:
        verdict = (f"not trimmed: {_mask(beyond)} still in XSTATE_BV; KVM_GET_CPUID2 shows CPUID.(0DH,0) "
                   f"XCR0 {_hex(held)} where {_hex(narrow)} was set: this KVM widened the guest CPUID, so its "
                   "guest-supported XCR0 is the host's")
        status = "differs"
    else:
        verdict = f"not trimmed: {_mask(beyond)} beyond the guest XCR0 come back from KVM_GET_XSAVE2"
        status = "differs"
    return result(f"as set_xsave_after_narrow_cpuid (guest XCR0 {_hex(narrow)}, buffer XSTATE_BV "
                  f"{_hex(_bv(raw))} accepted)", "KVM_GET_XSAVE2", obs, exp, verdict, status=status,
                  details={"guest_xcr0_set": _hex(narrow), "guest_xcr0_held": _hex(held),
                           "xstate_bv_set": _hex(_bv(raw)), "xstate_bv_got": _hex(bv)})


def _bad_buffer(ctx, what, edit, why):
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        raw = v.get_xsave()
        bad = bytearray(raw)
        edit(bad)
        obs = attempt(lambda: _raw_set_xsave(v, bad), lambda _: "0 (accepted)")
        unchanged = v.get_xsave() == raw
    exp = upstream(f"EINVAL: {why}", errno="EINVAL")
    if obs["errno_name"] == "EINVAL":
        verdict = "EINVAL" + (", and the vCPU's state is unchanged" if unchanged else
                              ", but the vCPU's state changed anyway")
    elif obs["ok"]:
        verdict = "accepted: this kernel does not validate the XSAVE header (KVM before 5.17 copied it blindly)"
    else:
        verdict = f"refused with {obs['text']}"
    return result(f"VM and vCPU with the default guest CPUID; its KVM_GET_XSAVE2 buffer with {what}",
                  "KVM_SET_XSAVE (raw, no Python-side checks)", obs, exp, verdict,
                  status=None if unchanged or obs["ok"] else "differs", details={"state_unchanged": unchanged})


@check("set_xsave_xcomp_bv", "KVM_SET_XSAVE with XCOMP_BV set (compacted format)",
       min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_xcomp(ctx):
    def edit(b):
        b[520:528] = ((1 << 63) | _bv(b)).to_bytes(8, "little")
    return _bad_buffer(ctx, "XCOMP_BV = bit 63 | XSTATE_BV", edit,
                       "KVM_SET_XSAVE takes the standard format only; XCOMP_BV must be 0")


@check("set_xsave_reserved_header", "KVM_SET_XSAVE with a reserved XSAVE header byte set",
       min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_reserved(ctx):
    def edit(b):
        b[540] = 0x01
    return _bad_buffer(ctx, "header byte 540 (reserved, 528..575) = 0x01", edit,
                       "reserved header bytes 528..575 must be zero")


@check("set_xsave_unpermitted_component", "KVM_SET_XSAVE with XTILEDATA in XSTATE_BV, not permitted",
       min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_unpermitted(ctx):
    def edit(b):
        b[512:520] = (_bv(b) | 1 << XTILEDATA).to_bytes(8, "little")
    return _bad_buffer(ctx, "XSTATE_BV bit 18 (XTILEDATA) set, no AMX in the guest CPUID", edit,
                       "XSTATE_BV may name only features of the vCPU's XSAVE buffer (user features the "
                       "process may use)")


# --- registers --------------------------------------------------------------------------------------
@check("one_reg_efer", "x86 KVM_GET_ONE_REG of an MSR by id (EFER)")
def _c_one_reg(ctx):
    from .regs import msr
    one_reg = ctx.kvm.check_extension("KVM_CAP_ONE_REG")
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        want = EFER_SCE | (EFER_NXE if ctx.guest_cpuid.has("NX") else 0)
        v.set_msrs({EFER: want})
        obs = attempt(lambda: v.get_one_reg(msr(EFER)), _hex)
        set_back = None
        if obs["ok"]:
            try:
                v.set_one_reg(msr(EFER), EFER_SCE)
                set_back = v.get_msrs([EFER])[EFER] == EFER_SCE
            except KvmError:
                set_back = False
    exp = upstream(f"{_hex(want)}, the value KVM_SET_MSRS wrote (x86 ONE_REG since 6.18; EINVAL before)",
                   want)
    if obs["ok"] and obs["value"] == want:
        verdict = (f"EFER reads by id through ONE_REG (KVM_CAP_ONE_REG = {one_reg})"
                   + ("; KVM_SET_ONE_REG writes it too" if set_back else "; KVM_SET_ONE_REG did not write it"))
    elif obs["ok"]:
        verdict = f"ONE_REG read {obs['text']}, KVM_SET_MSRS wrote {_hex(want)}"
    else:
        verdict = (f"{obs['text']}: no x86 ONE_REG on this kernel (before 6.18); use KVM_GET/SET_MSRS"
                   + (f" although KVM_CAP_ONE_REG = {one_reg}" if one_reg else ""))
    return result(f"VM and vCPU with the default guest CPUID; KVM_SET_MSRS EFER = {_hex(want)}",
                  "KVM_GET_ONE_REG(KVM_X86_REG_MSR(0xc0000080))", obs, exp, verdict,
                  details={"cap_one_reg": one_reg, "set_one_reg_works": set_back})


@check("reg_list", "x86 KVM_GET_REG_LIST")
def _c_reg_list(ctx):
    from ._bindings import ffi, ioctl
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        shstk = ctx.guest_cpuid.has("SHSTK")
        rl = ffi.new("struct kvm_reg_list *", {"n": 0, "reg": 0})
        obs = attempt(lambda: ioctl(v.fd, "KVM_GET_REG_LIST", rl) or rl.n, lambda n: f"0, n = {n}")
        if obs["errno_name"] == "E2BIG":
            obs["value"] = rl.n
            obs["text"] = f"E2BIG, n = {rl.n}"
    want = 1 if shstk else 0
    exp = upstream(f"n = {want}: the list has GUEST_SSP only for a guest with shadow stacks (SHSTK), and "
                   "never MSRs (KVM_GET_MSR_INDEX_LIST lists those); since 6.18, EINVAL before",
                   want, "E2BIG" if shstk else None)
    if obs["ok"]:
        verdict = f"KVM_GET_REG_LIST answers with n = {obs['value']}" + (
            ": nothing beyond MSRs to list for a guest without SHSTK" if obs["value"] == 0 else "")
    elif obs["errno_name"] == "E2BIG":
        verdict = f"E2BIG with n = {rl.n}: the list has {rl.n} register(s)"
    else:
        verdict = f"{obs['text']}: no x86 KVM_GET_REG_LIST on this kernel (before 6.18)"
    return result(f"VM and vCPU with the default guest CPUID ({'with' if shstk else 'no'} SHSTK)",
                  "KVM_GET_REG_LIST with n = 0", obs, exp, verdict)


@check("guest_ssp", "KVM_GET_ONE_REG(GUEST_SSP) without shadow stacks")
def _c_ssp(ctx):
    from .regs import KVM_REG_GUEST_SSP, kvm_reg
    cpuid = ctx.guest_cpuid
    cpuid.set_feature("SHSTK", False)
    with ctx.vm() as vm:
        v = ctx.vcpu(vm, cpuid)
        obs = attempt(lambda: v.get_one_reg(kvm_reg(KVM_REG_GUEST_SSP)), _hex)
    exp = upstream("EINVAL: GUEST_SSP exists only for a vCPU whose guest CPUID has SHSTK", errno="EINVAL")
    verdict = ("EINVAL: no GUEST_SSP for a guest without shadow stacks" if obs["errno_name"] == "EINVAL" else
               f"{obs['text']} for a guest without shadow stacks")
    return result("VM and vCPU with the default guest CPUID, SHSTK cleared",
                  "KVM_GET_ONE_REG(KVM_X86_REG_KVM(KVM_REG_GUEST_SSP))", obs, exp, verdict)


# --- guest execution and CPUID ------------------------------------------------------------------------
@check("guest_beyond_xcr0", "guest CPL3 code executing AVX-512 with XCR0 = x87|SSE|AVX",
       min_kernel=XCR0_LEAK_FIX, danger=XCR0_LEAK_DANGER)
def _c_beyond(ctx):
    from .errors import GuestError
    from .guest.machine import Machine
    from .guest.runner import Fault, Sync
    if ctx.xcr0 & AVX512_STATE != AVX512_STATE:
        return _skip(f"the host has no AVX-512 state ({_mask(ctx.xcr0)}): the avx512 probe guest has "
                     "nothing beyond XCR0 0x7 to execute")
    try:
        m = Machine("avx512", kvm=ctx.kvm, xcr0=0x7)
    except GuestError as e:
        return _skip(f"the avx512 guest is not available: {e}")
    with m:
        xcr0 = m.vcpu.get_xcrs().get(0, 0)
        ev = m.run(timeout=GUEST_TIMEOUT)
        bv = _bv(m.vcpu.get_xsave())
        held = m.vcpu.get_cpuid2().xcr0_supported()
    if isinstance(ev, Sync):
        obs = observed_ok("sync", f"SYNC {ev.value:#x}: AVX-512 executed; XSTATE_BV then {_mask(bv)}")
        verdict = (f"guest XCR0 {_hex(xcr0)} is not enforced for CPL3 code: the guest used opmask/ZMM "
                   "state, and its saved XSTATE_BV carries it (a restore target needs those components too)")
    elif isinstance(ev, Fault):
        obs = observed_ok(ev.name, f"{ev} (XSTATE_BV {_mask(bv)})")
        verdict = ("#UD: guest XCR0 is enforced" if ev.name == "#UD" else
                   f"{ev.name}, not the #UD an unenabled XSAVE feature raises")
    else:
        obs = observed_ok(getattr(ev, "kind", "event"), str(ev))
        verdict = f"the guest ended with '{ev}' before its first SYNC"
    exp = upstream("#UD at the first EVEX instruction: the CPU runs guest code under the guest's XCR0", "#UD")
    return result("the avx512 guest at CPL3 with its guest CPUID and XCR0 limited to 0x7 (x87 SSE AVX)",
                  "KVM_RUN", obs, exp, verdict,
                  details={"guest_xcr0": _hex(xcr0), "xstate_bv": _hex(bv), "cpuid2_xcr0": _hex(held)})


RUNTIME_FEATURES = {"OSXSAVE", "OSPKE", "APIC"}  # KVM keeps these in step with CR4 / the APIC base


@check("get_cpuid2_matches_set", "KVM_GET_CPUID2 returns the table KVM_SET_CPUID2 gave it")
def _c_cpuid2(ctx):
    given = ctx.guest_cpuid
    with ctx.vm() as vm:
        v = ctx.vcpu(vm, given)
        held = v.get_cpuid2()
    supported = ctx.supported.features()
    added = sorted(held.features() - given.features() - RUNTIME_FEATURES)
    removed = sorted(given.features() - held.features() - RUNTIME_FEATURES)
    unsupported = [f for f in added if f not in supported]
    text = (f"+{len(added)} features ({', '.join(added[:6])}{', ...' if len(added) > 6 else ''}), "
            f"-{len(removed)}" + (f" ({', '.join(removed)})" if removed else "")) if added or removed \
        else "the same named features"
    obs = observed_ok({"added": added, "removed": removed}, text)
    exp = upstream("the same table, apart from bits KVM keeps in step at run time (OSXSAVE, OSPKE, APIC, "
                   "CPUID.(0DH,0/1).EBX)", {"added": [], "removed": []})
    if not added and not removed:
        verdict = "KVM holds the guest CPUID it was given"
    else:
        verdict = (f"KVM holds a different guest CPUID: {len(added)} features added"
                   + (f", {len(unsupported)} of them not in KVM_GET_SUPPORTED_CPUID" if unsupported else "")
                   + (f", {len(removed)} removed" if removed else "")
                   + "; a snapshot must record the table it set, not this one")
    return result("VM and vCPU; KVM_SET_CPUID2 with the default guest CPUID "
                  f"({len(given.features())} named features)", "KVM_GET_CPUID2", obs, exp, verdict,
                  details={"added": added, "removed": removed, "added_not_supported": unsupported,
                           "xcr0_set": _hex(given.xcr0_supported()), "xcr0_held": _hex(held.xcr0_supported())})


@check("msr_index_list", "KVM_GET_MSR_INDEX_LIST, and which of its MSRs read back")
def _c_msrs(ctx):
    from .regs import _MSR_NAME_BY_INDEX
    indices = ctx.kvm.get_msr_index_list()
    features = ctx.kvm.get_msr_feature_index_list()
    rows, unreadable = [], []
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        for i in indices:
            try:
                value = v.get_msrs([i])[i]
                rows.append({"index": _hex(i), "name": _MSR_NAME_BY_INDEX.get(i), "readable": True,
                             "value": _hex(value)})
            except KvmError:
                unreadable.append(i)
                rows.append({"index": _hex(i), "name": _MSR_NAME_BY_INDEX.get(i), "readable": False,
                             "value": None})
    readable = len(indices) - len(unreadable)
    obs = observed_ok(readable, f"{len(indices)} MSRs listed, {readable} read back"
                      + (f"; not: {', '.join(_hex(i) for i in unreadable)}" if unreadable else ""))
    exp = upstream(f"every listed MSR reads back ({len(indices)}): host-initiated reads of MSRs KVM "
                   "advertises succeed even when the guest CPUID lacks the feature", len(indices))
    verdict = (f"all {len(indices)} listed MSRs read back; {len(features)} feature MSRs"
               if not unreadable else
               f"{len(unreadable)} listed MSRs do not read back for a vCPU with the default guest CPUID")
    return result("VM and vCPU with the default guest CPUID", "KVM_GET_MSR_INDEX_LIST, then KVM_GET_MSRS "
                  "of each MSR on its own", obs, exp, verdict,
                  details={"msrs": rows, "feature_msrs": [_hex(i) for i in features]})


def _skip(reason):
    return {"skip": reason}


CHECKS.sort(key=lambda c: REPORT_ORDER.index(c.name))


# --- running checks --------------------------------------------------------------------------------
def _finish(c, out, seconds):
    base = {"name": c.name, "title": c.title, "process": c.group or "probe"}
    if "skip" in out:
        return {**base, "setup": "-", "call": "-",
                "observed": {"ok": False, "value": None, "errno": None, "errno_name": None,
                             "text": "not run"},
                "upstream": upstream("-"), "status": "skipped", "verdict": f"skipped: {out['skip']}",
                "details": {}, "seconds": round(seconds, 4)}
    return {**base, **out, "seconds": round(seconds, 4)}


def _error_result(c, message, seconds=0.0):
    return {"name": c.name, "title": c.title, "process": c.group or "probe", "setup": "-", "call": "-",
            "observed": {"ok": False, "value": None, "errno": None, "errno_name": None, "text": message},
            "upstream": upstream("-"), "status": "error", "verdict": f"the check did not complete: {message}",
            "details": {}, "seconds": round(seconds, 4)}


def run_check(ctx, c):
    """Run one check in this process; never raises for the check's own failures."""
    t0 = time.monotonic()
    if c.min_kernel and ctx.kver < c.min_kernel:
        return _finish(c, _skip(f"Linux {_ver(ctx.kver)} is older than {_ver(c.min_kernel)}: {c.danger}"), 0.0)
    try:
        out = c.fn(ctx)
    except ProbeError:
        raise
    except Exception as e:  # noqa: BLE001 - one failing check must not cost the others their results
        return _error_result(c, f"{type(e).__name__}: {e}", time.monotonic() - t0)
    return _finish(c, out, time.monotonic() - t0)


def _child_cmd(names, device, kernel):
    cmd = [sys.executable, "-m", "vmm.probe", "--device", device]
    if kernel is not None:
        cmd += ["--kernel", kernel]
    for n in names:
        cmd += ["--check", n]
    return cmd


def _child_env():
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_groups(checks, device, kernel):
    groups = {}
    for c in checks:
        if c.group:
            groups.setdefault(c.group, []).append(c)
    procs = []
    for group, members in groups.items():
        p = subprocess.Popen(_child_cmd([c.name for c in members], device, kernel), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_child_env())
        procs.append((group, members, p, time.monotonic()))
    return procs


def _collect(procs):
    out = {}
    for group, members, p, t0 in procs:
        left = max(CHILD_TIMEOUT - (time.monotonic() - t0), 0.1)
        try:
            stdout, stderr = p.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            for c in members:
                out[c.name] = _error_result(c, f"the {group} process did not finish within {CHILD_TIMEOUT:.0f} s")
            continue
        try:
            results = json.loads(stdout) if p.returncode == 0 else None
        except ValueError:
            results = None
        if not isinstance(results, list):
            tail = (stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
            for c in members:
                out[c.name] = _error_result(c, f"the {group} process failed: {tail}")
            continue
        for r in results:
            out[r["name"]] = r
        for c in members:
            out.setdefault(c.name, _error_result(c, f"the {group} process gave no result"))
    return out


def run_checks(device="/dev/kvm", names=None, kernel=None):
    """Run the named checks (default: all) and return their results in registry order. Checks with a
    group run in fresh processes, in parallel with the others. `kernel` pretends another kernel
    release for the skip rules (a testing aid)."""
    wanted = [get_check(n) for n in names] if names else list(CHECKS)
    order = [c.name for c in CHECKS if c in wanted]
    procs = _start_groups(wanted, device, kernel)
    results = {}
    try:
        local = [c for c in wanted if not c.group]
        if local:
            ctx = Context(device, kernel=kernel)
            try:
                for c in local:
                    results[c.name] = run_check(ctx, c)
            finally:
                ctx.close()
    finally:
        results.update(_collect(procs))
    return [results[n] for n in order]


# --- the report ------------------------------------------------------------------------------------
def host_info(device="/dev/kvm"):
    """The host fingerprint (as snapshots record it) plus what compat needs to judge a destination."""
    from . import amx
    from .cpuid import CpuidTable
    from .kvm import Kvm
    from .snapshot import host_fingerprint

    def perm(code):
        try:
            return _hex(_prctl_get(code))
        except KvmError:
            return None
    with Kvm(device) as k:
        fp = host_fingerprint(k)
        # the same table as the fingerprint's: a second read could answer from another CPU
        # (leaf 1 EBX[31:24] and leaf 0xB EDX carry the APIC ID of the CPU that ran the ioctl)
        supported = CpuidTable.from_json(fp["supported_cpuid"])
        with k.create_vm() as vm:
            vm_xsave2 = vm.xsave2_size()
        fp.update({
            "api_version": k.get_api_version(),
            "cpuid_dump": supported.to_dump(),
            "xsave2": {"dev_kvm": fp["capabilities"]["KVM_CAP_XSAVE2"], "vm_fd": vm_xsave2},
            "xcomp": {"supp": perm(amx.ARCH_GET_XCOMP_SUPP), "perm": perm(amx.ARCH_GET_XCOMP_PERM),
                      "guest_perm": perm(amx.ARCH_GET_XCOMP_GUEST_PERM)},
            "msr_index_list": [_hex(i) for i in k.get_msr_index_list()],
            "msr_feature_index_list": [_hex(i) for i in k.get_msr_feature_index_list()],
            "msrs_readable": None,
            "amx": None,
        })
    return fp


def _amx_from_checks(by_name):
    req = by_name.get("req_xcomp_guest_perm")
    if not req or req["status"] in ("skipped", "error"):
        return None
    after = {k: by_name[n]["observed"]["value"] if n in by_name and by_name[n]["observed"]["ok"] else None
             for k, n in (("dev_kvm", "cap_xsave2_dev_kvm_after_request"),
                          ("vm_fd", "cap_xsave2_vm_fd_after_request"))}
    return {"request": req["observed"]["text"], "granted": bool(req["observed"]["ok"]),
            "errno_name": req["observed"]["errno_name"], "xsave2_after": after,
            "supported_cpuid_after": req["details"].get("supported_cpuid_after")}


def make_report(device="/dev/kvm", names=None, kernel=None):
    """Run the checks and build the versioned report (validated against the shipped schema)."""
    from importlib import metadata
    t0 = time.monotonic()
    checks = run_checks(device, names, kernel)
    host = host_info(device)
    by_name = {c["name"]: c for c in checks}
    msr = by_name.get("msr_index_list")
    if msr and msr["status"] != "error" and "msrs" in msr["details"]:
        host["msrs_readable"] = [r["index"] for r in msr["details"]["msrs"] if r["readable"]]
    host["amx"] = _amx_from_checks(by_name)
    try:
        version = metadata.version("vmm")
    except metadata.PackageNotFoundError:
        version = "unknown"
    report = {
        "schema": SCHEMA_ID,
        "vmm_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - t0, 3),
        "host": host,
        "checks": checks,
        "summary": {s: sum(1 for c in checks if c["status"] == s) for s in STATUSES},
    }
    problems = validate(report, load_schema())
    if problems:  # a bug in this module, not in the host
        raise ProbeError("the probe report does not match its own schema: " + "; ".join(problems[:5]))
    return report


def format_report(report):
    """The text form of a report: a header, then one block per check."""
    h = report["host"]
    s = report["summary"]
    lines = [f"vmm probe: Linux {h['kernel']}, {h['vendor']}{', kvm_pvm (PVM)' if h['pvm'] else ''}; "
             f"{len(report['checks'])} checks in {report['seconds']:.1f} s: {s['as-upstream']} as upstream, "
             f"{s['differs']} differ, {s['skipped']} skipped, {s['error']} errors", ""]
    for c in report["checks"]:
        label = {"as-upstream": "as upstream"}.get(c["status"], c["status"])
        lines.append(f"{c['name']:<52} {label}")
        lines.append(f"  {c['title']}")
        if c["status"] not in ("skipped",):
            lines.append(f"  setup     {c['setup']}")
            lines.append(f"  call      {c['call']}")
            lines.append(f"  observed  {c['observed']['text']}")
            lines.append(f"  upstream  {c['upstream']['text']}")
        lines.append(f"  verdict   {c['verdict']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# --- JSON Schema (the subset the shipped schema uses) ----------------------------------------------
_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}
SUPPORTED_KEYWORDS = {"type", "required", "properties", "items", "enum", "const", "additionalProperties",
                      "$schema", "$id", "title", "description"}


def validate(instance, schema, path="$"):
    """Errors of `instance` against `schema` (type, required, properties, items, enum, const,
    additionalProperties), each naming its JSON path; [] when it validates. A schema keyword
    outside that subset raises ValueError rather than being ignored."""
    unknown = set(schema) - SUPPORTED_KEYWORDS
    if unknown:
        raise ValueError(f"schema at {path} uses unsupported keywords: {', '.join(sorted(unknown))}")
    errors = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        for t in types:
            if t not in _TYPES:
                raise ValueError(f"schema at {path}: unknown type {t!r}")
        if not any(_TYPES[t](instance) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {_json_type(instance)}"]
    if "const" in schema and not _json_equal(instance, schema["const"]):
        errors.append(f"{path}: must be {json.dumps(schema['const'])}, got {json.dumps(instance)[:60]}")
    if "enum" in schema and not any(_json_equal(instance, e) for e in schema["enum"]):
        errors.append(f"{path}: must be one of {', '.join(json.dumps(e) for e in schema['enum'])}, "
                      f"got {json.dumps(instance)[:60]}")
    if isinstance(instance, dict):
        for key in schema.get("required", []):
            if key not in instance:
                errors.append(f"{path}: missing required field {key!r}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, value in instance.items():
            sub = f"{path}.{key}"
            if key in props:
                errors += validate(value, props[key], sub)
            elif extra is False:
                errors.append(f"{path}: unexpected field {key!r}")
            elif isinstance(extra, dict):
                errors += validate(value, extra, sub)
    if isinstance(instance, list) and "items" in schema:
        for i, item in enumerate(instance):
            errors += validate(item, schema["items"], f"{path}[{i}]")
    return errors


def _json_type(v):
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](v):
            return name
    return type(v).__name__


def _json_equal(a, b):
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def load_schema():
    with open(SCHEMA_FILE) as f:
        return json.load(f)


def check_report(data, source="report"):
    """Raise ReportError unless `data` is a probe report this vmm reads."""
    if not isinstance(data, dict):
        raise ReportError(f"{source}: not a vmm probe report (a JSON {_json_type(data)}, not an object)")
    schema = data.get("schema")
    if schema is None:
        raise ReportError(f"{source}: not a vmm probe report (no 'schema' field)")
    if schema != SCHEMA_ID:
        if isinstance(schema, str) and schema.startswith(SCHEMA_PREFIX):
            raise ReportError(f"{source}: probe report schema {schema!r} is not one this vmm reads "
                              f"({SCHEMA_ID}); write the report again with this vmm's `vmm probe`")
        raise ReportError(f"{source}: not a vmm probe report (schema {schema!r}, expected {SCHEMA_ID!r})")
    problems = validate(data, load_schema())
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ReportError(f"{source}: invalid {SCHEMA_ID} report: " + "; ".join(problems[:3]) + more)
    return data


def load_report(path):
    """Read and validate a probe report file; raises ReportError with what is wrong."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not a vmm probe report (not text)") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        what = "truncated" if text.strip() and not text.rstrip().endswith(("}", "]")) else "not valid JSON"
        raise ReportError(f"{path}: {what}: {e}") from None
    return check_report(data, str(path))


# --- python -m vmm.probe --check NAME ... (the fresh processes) -------------------------------------
def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(prog="python -m vmm.probe",
                                description="Run probe checks in this (fresh) process; JSON results on stdout.")
    p.add_argument("--check", action="append", default=[], metavar="NAME", help="a check to run (repeatable)")
    p.add_argument("--device", default="/dev/kvm")
    p.add_argument("--kernel", default=None, help=argparse.SUPPRESS)
    p.add_argument("--list", action="store_true", help="list the checks")
    args = p.parse_args(argv)
    if args.list:
        for c in CHECKS:
            print(f"{c.name:<36} {'fresh process: ' + c.group if c.group else 'in process':<28} {c.title}")
        return 0
    try:
        checks = [get_check(n) for n in args.check]
        ctx = Context(args.device, kernel=args.kernel, fresh=True)
    except VmmError as e:
        print(f"vmm.probe: error: {e}", file=sys.stderr)
        return 2
    try:
        results = [run_check(ctx, c) for c in checks]
    except ProbeError as e:
        print(f"vmm.probe: error: {e}", file=sys.stderr)
        return 2
    finally:
        ctx.close()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
