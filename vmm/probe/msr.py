"""Probe checks on registers: x86 ONE_REG, KVM_GET_REG_LIST, GUEST_SSP and the MSR index list."""

from ..errors import KvmError
from .core import (EFER, EFER_NXE, EFER_SCE, ONE_REG_WHAT, attempt, check, hex_text, not_in_kernel,
                   observed_ok, result, upstream)


# --- registers --------------------------------------------------------------------------------------
@check("one_reg_efer", "x86 KVM_GET_ONE_REG of an MSR by id (EFER)", "msr")
def _c_one_reg(ctx):
    from ..regs import msr
    one_reg = ctx.kvm.check_extension("KVM_CAP_ONE_REG")
    if not ctx.one_reg():
        return not_in_kernel(ctx, ONE_REG_WHAT)
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        want = EFER_SCE | (EFER_NXE if ctx.guest_cpuid.has("NX") else 0)
        v.set_msrs({EFER: want})
        obs = attempt(lambda: v.get_one_reg(msr(EFER)), hex_text)
        set_back = None
        if obs["ok"]:
            try:
                v.set_one_reg(msr(EFER), EFER_SCE)
                set_back = v.get_msrs([EFER])[EFER] == EFER_SCE
            except KvmError:
                set_back = False
    exp = upstream(f"{hex_text(want)}, the value KVM_SET_MSRS wrote (x86 ONE_REG since 6.18; EINVAL before)",
                   want)
    if obs["ok"] and obs["value"] == want:
        verdict = (f"EFER reads by id through ONE_REG (KVM_CAP_ONE_REG = {one_reg})"
                   + ("; KVM_SET_ONE_REG writes it too" if set_back else "; KVM_SET_ONE_REG did not write it"))
    elif obs["ok"]:
        verdict = f"ONE_REG read {obs['text']}, KVM_SET_MSRS wrote {hex_text(want)}"
    else:
        verdict = (f"{obs['text']}: no x86 ONE_REG on this kernel (before 6.18); use KVM_GET/SET_MSRS"
                   + (f" although KVM_CAP_ONE_REG = {one_reg}" if one_reg else ""))
    return result(f"VM and vCPU with the default guest CPUID; KVM_SET_MSRS EFER = {hex_text(want)}",
                  "KVM_GET_ONE_REG(KVM_X86_REG_MSR(0xc0000080))", obs, exp, verdict,
                  details={"cap_one_reg": one_reg, "set_one_reg_works": set_back})


@check("reg_list", "x86 KVM_GET_REG_LIST", "msr")
def _c_reg_list(ctx):
    from .._bindings import ffi, ioctl
    if not ctx.one_reg():
        return not_in_kernel(ctx, ONE_REG_WHAT)
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


@check("guest_ssp", "KVM_GET_ONE_REG(GUEST_SSP) without shadow stacks", "msr")
def _c_ssp(ctx):
    from ..regs import KVM_REG_GUEST_SSP, kvm_reg
    if not ctx.one_reg():  # EINVAL there says nothing about GUEST_SSP
        return not_in_kernel(ctx, ONE_REG_WHAT)
    cpuid = ctx.guest_cpuid
    cpuid.set_feature("SHSTK", False)
    with ctx.vm() as vm:
        v = ctx.vcpu(vm, cpuid)
        obs = attempt(lambda: v.get_one_reg(kvm_reg(KVM_REG_GUEST_SSP)), hex_text)
    exp = upstream("EINVAL: GUEST_SSP exists only for a vCPU whose guest CPUID has SHSTK", errno="EINVAL")
    verdict = ("EINVAL: no GUEST_SSP for a guest without shadow stacks" if obs["errno_name"] == "EINVAL" else
               f"{obs['text']} for a guest without shadow stacks")
    return result("VM and vCPU with the default guest CPUID, SHSTK cleared",
                  "KVM_GET_ONE_REG(KVM_X86_REG_KVM(KVM_REG_GUEST_SSP))", obs, exp, verdict)


@check("msr_index_list", "KVM_GET_MSR_INDEX_LIST, and which of its MSRs read back", "msr")
def _c_msrs(ctx):
    from ..regs import _MSR_NAME_BY_INDEX
    indices = ctx.kvm.get_msr_index_list()
    features = ctx.kvm.get_msr_feature_index_list()
    rows, unreadable = [], []
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        for i in indices:
            try:
                value = v.get_msrs([i])[i]
                rows.append({"index": hex_text(i), "name": _MSR_NAME_BY_INDEX.get(i), "readable": True,
                             "value": hex_text(value)})
            except KvmError:
                unreadable.append(i)
                rows.append({"index": hex_text(i), "name": _MSR_NAME_BY_INDEX.get(i), "readable": False,
                             "value": None})
    readable = len(indices) - len(unreadable)
    obs = observed_ok(readable, f"{len(indices)} MSRs listed, {readable} read back"
                      + (f"; not: {', '.join(hex_text(i) for i in unreadable)}" if unreadable else ""))
    exp = upstream(f"every listed MSR reads back ({len(indices)}): host-initiated reads of MSRs KVM "
                   "advertises succeed even when the guest CPUID lacks the feature", len(indices))
    verdict = (f"all {len(indices)} listed MSRs read back; {len(features)} feature MSRs"
               if not unreadable else
               f"{len(unreadable)} listed MSRs do not read back for a vCPU with the default guest CPUID")
    return result("VM and vCPU with the default guest CPUID", "KVM_GET_MSR_INDEX_LIST, then KVM_GET_MSRS "
                  "of each MSR on its own", obs, exp, verdict,
                  details={"msrs": rows, "feature_msrs": [hex_text(i) for i in features]})
