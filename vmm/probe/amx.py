"""Probe checks on XSAVE permissions (arch_prctl) and KVM_CAP_XSAVE2 before and after an AMX
permission request; they run in fresh processes (see vmm.probe.run)."""

from ..errors import KvmError
from .core import (XTILE, XTILECFG, XTILEDATA, arch_prctl, attempt, check, hex_text, mask_text, not_in_kernel,
                   observed_err, observed_ok, prctl_get, ProbeError, result, upstream)


# --- XSAVE permissions and KVM_CAP_XSAVE2 (fresh processes) -----------------------------------------
def _cap_xsave2(ctx, where, after_request):
    from ..amx import ARCH_GET_XCOMP_GUEST_PERM
    if after_request:
        req = ctx.request_amx()
    perm = prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
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
             f"{req['text']}; guest permission now {hex_text(perm)}" if after_request else
             f"a fresh process with the default guest permission {hex_text(perm)}")
    exp = upstream(exp_text + ("" if not after_request else
                               " (grows to include XTILEDATA once the request is granted)"), exp_value)
    v = obs["value"]
    if obs["ok"] and v == 0:
        return not_in_kernel(ctx, "KVM_CAP_XSAVE2 and KVM_GET_XSAVE2 came in Linux 5.17; KVM_GET_XSAVE's "
                             "4096 bytes is all there is")
    if not obs["ok"]:
        verdict = f"KVM_CHECK_EXTENSION failed: {obs['text']}"
    elif v == exp_value:
        verdict = f"a guest's XSAVE area here is {v} bytes" + (
            ", the same as before the request (not granted)" if after_request and not req["ok"] else "")
    else:
        verdict = f"{v} bytes, but the supported CPUID and guest permission imply {exp_value}"
    return result(setup, call, obs, exp, verdict,
                  details={"guest_perm": hex_text(perm), "supported_xcr0": hex_text(ctx.xcr0)})


@check("cap_xsave2_dev_kvm", "KVM_CAP_XSAVE2 on /dev/kvm, before any AMX permission request",
       "amx", process="fresh")
def _c_cap_dev(ctx):
    ctx.require_fresh("cap_xsave2_dev_kvm")
    return _cap_xsave2(ctx, "dev", False)


@check("cap_xsave2_vm_fd", "KVM_CAP_XSAVE2 on a VM fd, before any AMX permission request",
       "amx", process="fresh")
def _c_cap_vm(ctx):
    ctx.require_fresh("cap_xsave2_vm_fd")
    return _cap_xsave2(ctx, "vm", False)


@check("cap_xsave2_dev_kvm_after_request", "KVM_CAP_XSAVE2 on /dev/kvm after an AMX permission request",
       "amx", process="after-request")
def _c_cap_dev_after(ctx):
    ctx.require_fresh("cap_xsave2_dev_kvm_after_request")
    return _cap_xsave2(ctx, "dev", True)


@check("cap_xsave2_vm_fd_after_request", "KVM_CAP_XSAVE2 on a VM fd after an AMX permission request",
       "amx", process="after-request")
def _c_cap_vm_after(ctx):
    ctx.require_fresh("cap_xsave2_vm_fd_after_request")
    return _cap_xsave2(ctx, "vm", True)


def _xcomp_get(ctx, name, code_name):
    from .. import amx
    code = getattr(amx, code_name)
    guest = "GUEST" in code_name
    obs = attempt(lambda: prctl_get(code), mask_text)
    if obs["errno_name"] == "EINVAL":
        return not_in_kernel(ctx, f"arch_prctl({code_name}) came in Linux {'5.17' if guest else '5.16'} "
                             "with the XSAVE permission interface (answered EINVAL)")
    if name == "xcomp_supp":
        exp = upstream("the XSAVE user features the kernel enables; KVM's supported XCR0 (here "
                       f"{mask_text(ctx.xcr0)}) is a subset of them")
        if not obs["ok"]:
            return result("a fresh process", f"arch_prctl({code_name})", obs, exp,
                          f"{obs['text']}: no XSAVE permission interface (kernel before 5.16)", status="differs")
        v = obs["value"]
        outside = ctx.xcr0 & ~v
        verdict = ("AMX (XTILECFG/XTILEDATA) is available to processes" if v & XTILE == XTILE else
                   "no AMX: XTILEDATA (18) is not a feature of this host")
        if outside:
            verdict += f"; KVM claims {mask_text(outside)} beyond it"
        return result("a fresh process", f"arch_prctl({code_name})", obs, exp, verdict,
                      status="differs" if outside else "as-upstream")
    try:
        supp = ctx.xcomp_supp()
    except KvmError:
        supp = None
    default = None if supp is None else supp & ~(1 << XTILEDATA)
    exp = upstream(f"{'-' if default is None else mask_text(default)}: every supported feature but the "
                   "dynamically "
                   f"enabled XTILEDATA, until ARCH_REQ_XCOMP_{'GUEST_' if guest else ''}PERM asks for it",
                   default)
    who = "this process's guests" if guest else "this process itself"
    if not obs["ok"]:
        verdict = (f"{obs['text']}: this kernel has no {'guest ' if guest else ''}XSAVE permissions "
                   f"(before {'5.17' if guest else '5.16'})")
    elif obs["value"] == default:
        verdict = f"{who} may use {obs['text']}: the default"
    else:
        verdict = f"{who} may use {obs['text']}, not the default {mask_text(default)}"
    return result("a fresh process, no permission requested", f"arch_prctl({code_name})", obs, exp, verdict)


@check("xcomp_supp", "XSAVE features the kernel supports for user space", "amx", process="fresh")
def _c_supp(ctx):
    return _xcomp_get(ctx, "xcomp_supp", "ARCH_GET_XCOMP_SUPP")


@check("xcomp_perm", "XSAVE features this process may use", "amx", process="fresh")
def _c_perm(ctx):
    ctx.require_fresh("xcomp_perm")
    return _xcomp_get(ctx, "xcomp_perm", "ARCH_GET_XCOMP_PERM")


@check("xcomp_guest_perm", "XSAVE features this process's guests may use", "amx", process="fresh")
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
                        f"(ARCH_GET_XCOMP_SUPP {hex_text(supp)}); the support check comes before any other",
                        errno="EOPNOTSUPP")
    if late:
        return upstream("EBUSY: the first vCPU of a process locks its guest permissions", errno="EBUSY")
    return upstream("0: granted (the feature is supported and no vCPU exists yet)", 0)


@check("req_xcomp_guest_perm", "ARCH_REQ_XCOMP_GUEST_PERM(18) before any vCPU", "amx", process="after-request")
def _c_req(ctx):
    from ..amx import ARCH_GET_XCOMP_GUEST_PERM
    ctx.require_fresh("req_xcomp_guest_perm")
    before = prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    first = ctx.requested is None
    obs = ctx.request_amx()
    if obs["errno_name"] == "EINVAL":
        return not_in_kernel(ctx, "ARCH_REQ_XCOMP_GUEST_PERM came in Linux 5.17 (answered EINVAL)")
    after = prctl_get(ARCH_GET_XCOMP_GUEST_PERM)
    exp = _amx_expectation(ctx, late=False)
    if obs["ok"]:
        verdict = (f"granted: guest permission {hex_text(before)} -> {hex_text(after)}; AMX guests are "
                   "possible here")
    elif obs["errno_name"] == "EOPNOTSUPP":
        verdict = "refused with EOPNOTSUPP: this host has no AMX for guests"
    elif obs["errno_name"] == "EINVAL":
        verdict = "EINVAL: this kernel does not know ARCH_REQ_XCOMP_GUEST_PERM (before 5.17)"
    else:
        verdict = f"refused with {obs['text']}"
    details = {"guest_perm_before": hex_text(before), "guest_perm_after": hex_text(after),
               "supported_xcr0_after": hex_text(ctx.xcr0),
               "supported_cpuid_after": ctx.supported.to_json() if obs["ok"] else None}
    return result("a fresh process, no vCPU yet" + ("" if first else " (request made earlier here)"),
                  "arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18)", obs, exp, verdict, details=details)


@check("set_cpuid2_xtiledata_without_perm", "KVM_SET_CPUID2 exposing XTILEDATA without the permission",
       "amx", process="fresh")
def _c_cpuid_xtile(ctx):
    from ..cpuid import SIGNIFICANT_INDEX, CpuidEntry
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
    if obs["ok"] and ctx.kver < (5, 17):
        return not_in_kernel(ctx, "dynamically enabled XSAVE features and their guest permission came in "
                             "Linux 5.17; KVM_SET_CPUID2 accepted the AMX CPUID")
    if obs["errno_name"] == "EPERM":
        verdict = "EPERM: exposing AMX to a guest needs the guest permission first"
    elif obs["ok"]:
        verdict = ("accepted without the permission: this kernel does not gate dynamic XSAVE features "
                   "(before 5.17), or grants them itself")
    else:
        verdict = f"refused with {obs['text']}, not for the missing permission"
    return result("a fresh process without AMX permission; VM and vCPU; the default guest CPUID with "
                  f"XTILECFG|XTILEDATA added to CPUID.(0DH,0).EAX ({hex_text(d0.eax)}) and sub-leaves 17, 18",
                  "KVM_SET_CPUID2", obs, exp, verdict)


@check("req_xcomp_guest_perm_after_vcpu", "ARCH_REQ_XCOMP_GUEST_PERM(18) after a vCPU exists",
       "amx", process="fresh")
def _c_req_late(ctx):
    from ..amx import ARCH_REQ_XCOMP_GUEST_PERM
    ctx.require_fresh("req_xcomp_guest_perm_after_vcpu")
    if ctx.requested is not None:
        raise ProbeError("req_xcomp_guest_perm_after_vcpu needs a process that has not asked for the "
                         "permission yet")
    with ctx.vm() as vm:
        ctx.vcpu(vm)
        r = arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, XTILEDATA)
        obs = observed_ok(0, "0 (granted)") if r == 0 else observed_err(-r)
    if obs["errno_name"] == "EINVAL":
        return not_in_kernel(ctx, "ARCH_REQ_XCOMP_GUEST_PERM came in Linux 5.17 (answered EINVAL)")
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
