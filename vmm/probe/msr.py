"""Probe checks on registers: x86 ONE_REG, KVM_GET_REG_LIST, GUEST_SSP and the MSR index list."""

from ..errors import KvmError, errno_name
from .core import (EFER, EFER_NXE, EFER_SCE, GUEST_TIMEOUT, ONE_REG_WHAT, attempt, check, hex_text,
                   not_in_kernel, observed_err, observed_ok, pvm_note, result, skip, upstream)


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


@check("reg_list", "x86 KVM_GET_REG_LIST", "msr", selftest="msrs_test")
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
    from ..regs import MSRS
    names = {i: n for n, i in MSRS.items()}
    indices = ctx.kvm.get_msr_index_list()
    features = ctx.kvm.get_msr_feature_index_list()
    rows, unreadable = [], []
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        for i in indices:
            try:
                value = v.get_msrs([i])[i]
                rows.append({"index": hex_text(i), "name": names.get(i), "readable": True,
                             "value": hex_text(value)})
            except KvmError:
                unreadable.append(i)
                rows.append({"index": hex_text(i), "name": names.get(i), "readable": False,
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


# --- selftest-derived MSR checks -----------------------------------------------------------------------
IA32_XSS = 0xDA0
MSR_K7_HWCR = 0xC0010015
HWCR_IGNORED = (1 << 3) | (1 << 6) | (1 << 8)  # accepted, read back as 0 (hwcr_msr_test)
HWCR_VALID = (1 << 18) | (1 << 24)  # McStatusWrEn, CpbDis: kept
IA32_UCODE_REV, MSR_AMD64_DE_CFG = 0x8B, 0xC0011029
VMX_KVM_CONTROLLED = {0x487, 0x489}  # IA32_VMX_CR0_FIXED1, IA32_VMX_CR4_FIXED1: any value is legal
VMX_HIDDEN = {0x481, 0x482, 0x483, 0x484}  # settable only through their TRUE_* variants
NON_CANONICAL = 1 << 56  # non-canonical for 48- and 57-bit linear addresses


@check("xss_reset_and_save_list", "IA32_XSS resets to 0; any settable bit puts it in the MSR save list", "msr",
       selftest="xss_msr_test")
def _c_xss(ctx):
    if not ctx.supported.has("XSAVES"):
        return skip("KVM_GET_SUPPORTED_CPUID has no XSAVES (CPUID.(0DH,1).EAX[3]): the guest has no IA32_XSS")
    listed = IA32_XSS in ctx.kvm.get_msr_index_list()
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        reset = attempt(lambda: v.get_msrs([IA32_XSS])[IA32_XSS], hex_text)
        settable = []
        for i in range(64):
            try:
                v.set_msrs({IA32_XSS: 1 << i})
                settable.append(i)
            except KvmError:
                pass
    ok = reset["ok"] and reset["value"] == 0 and (listed or not settable)
    obs = observed_ok({"reset": reset["value"], "settable_bits": settable, "in_save_list": listed},
                      f"reset {reset['text']}; settable bits {settable or 'none'}; "
                      f"{'in' if listed else 'not in'} KVM_GET_MSR_INDEX_LIST")
    exp = upstream("0 after reset; if any bit can be set, IA32_XSS is in KVM_GET_MSR_INDEX_LIST (a state "
                   "that cannot be saved must not be settable)", {"reset": 0})
    what = f"its settable bits {settable} are saved" if settable else "no bit of it can be set"
    verdict = (f"IA32_XSS starts at 0 and {what}" if ok else
               "IA32_XSS " + ("does not reset to 0" if reset["value"] != 0 else
                              f"takes bits {settable} but is not in the MSR save list"))
    return result("VM and vCPU with the default guest CPUID", "KVM_GET_MSRS IA32_XSS, then KVM_SET_MSRS IA32_XSS "
                  "= 1 << i for i in 0..63", obs, exp, verdict, status="as-upstream" if ok else "differs")


@check("feature_msrs_reset", "each feature MSR of a new vCPU holds what /dev/kvm supports", "msr",
       selftest="feature_msrs_test")
def _c_feature_msrs(ctx):
    if not ctx.kvm.check_extension("KVM_CAP_GET_MSR_FEATURES"):
        return not_in_kernel(ctx, "KVM_CAP_GET_MSR_FEATURES came in Linux 4.17")
    indices = ctx.kvm.get_msr_feature_index_list()
    supported = ctx.kvm.get_feature_msrs(indices)
    vendor = ctx.supported.vendor or ""
    rows, bad = [], []
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        for i in indices:
            if i in VMX_KVM_CONTROLLED:
                continue
            want = supported[i] if i != MSR_AMD64_DE_CFG else 0  # DE_CFG is not quirked: starts at 0
            if i == IA32_UCODE_REV:  # KVM's arbitrary reset revision, not the host's
                want = 0x100000000 if "Intel" in vendor else 0x01000065
            got = attempt(lambda: v.get_msrs([i])[i], hex_text)
            settable = None
            if i not in VMX_HIDDEN:
                try:
                    v.set_msrs({i: supported[i]})
                    settable = True
                except KvmError:
                    settable = False
            row = {"index": hex_text(i), "supported": hex_text(supported[i]), "reset": got["text"],
                   "expected": hex_text(want), "set_supported": settable}
            rows.append(row)
            if not got["ok"] or got["value"] != want or settable is False:
                bad.append(row)
    obs = observed_ok(len(bad), f"{len(rows)} feature MSRs: " + ("all as expected" if not bad else "; ".join(
        f"{r['index']} reset {r['reset']} (want {r['expected']}), set {r['set_supported']}" for r in bad[:4])))
    exp = upstream("a new vCPU's feature MSR equals KVM_GET_MSRS on /dev/kvm (IA32_UCODE_REV: KVM's reset "
                   "revision; DE_CFG: 0), and KVM_SET_MSRS of that value is accepted", 0)
    verdict = (f"the {len(rows)} feature MSRs start at what KVM supports" if not bad else
               f"{len(bad)} of {len(rows)} feature MSRs differ" + pvm_note(ctx))
    return result("KVM_GET_MSR_FEATURE_INDEX_LIST and KVM_GET_MSRS on /dev/kvm; VM and vCPU with the default "
                  "guest CPUID", "KVM_GET_MSRS and KVM_SET_MSRS of each feature MSR on the vCPU", obs, exp,
                  verdict, details={"msrs": rows})


@check("hwcr_bits", "MSR_K7_HWCR: which bits KVM_SET_MSRS takes and keeps", "msr", selftest="hwcr_msr_test")
def _c_hwcr(ctx):
    answers = {}
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        for bit in range(64):
            val = 1 << bit
            try:
                v.set_msrs({MSR_K7_HWCR: val})
                took = True
            except KvmError:
                took = False
            try:
                back = v.get_msrs([MSR_K7_HWCR])[MSR_K7_HWCR]
            except KvmError as e:
                return result("VM and vCPU", "KVM_GET_MSRS MSR_K7_HWCR", observed_err(e.errno),
                              upstream("readable", 0), f"MSR_K7_HWCR does not read back: {errno_name(e.errno)}",
                              status="differs")
            answers[bit] = (took, back)
            if back:
                v.set_msrs({MSR_K7_HWCR: 0})
                stuck = v.get_msrs([MSR_K7_HWCR])[MSR_K7_HWCR]
                if stuck:  # McStatusWrEn cannot be cleared once set: a kernel before 6.6
                    return not_in_kernel(ctx, f"writing 0 left MSR_K7_HWCR at {hex_text(stuck)} after bit {bit}: "
                                         "clearing HWCR.McStatusWrEn once set and keeping bit 24 (TscFreqSel) "
                                         "came in Linux 6.6 ('KVM: x86: Allow HWCR.McStatusWrEn to be cleared "
                                         "once set', 'KVM: x86: Virtualize HWCR.TscFreqSel [bit 24]')")
    legal = HWCR_IGNORED | HWCR_VALID
    bad = [b for b, (took, back) in answers.items()
           if took != bool((1 << b) & legal) or back != (1 << b) & HWCR_VALID]
    taken = [b for b, (took, _) in answers.items() if took]
    if bad == [24] and 24 not in taken:
        return not_in_kernel(ctx, "KVM keeps HWCR bit 24 (TscFreqSel) since Linux 6.6 ('KVM: x86: Virtualize "
                             f"HWCR.TscFreqSel [bit 24]'); bits accepted here {taken}")
    obs = observed_ok(bad, f"bits accepted {taken}; kept " + str([b for b, (_, back) in answers.items() if back])
                      + (f"; differing bits {bad}" if bad else ""))
    exp = upstream("bits 3, 6, 8 accepted and read back as 0; 18 and 24 accepted and kept; every other bit "
                   "refused", [])
    verdict = ("MSR_K7_HWCR takes and keeps exactly the bits KVM emulates" if not bad else
               f"MSR_K7_HWCR differs for bits {bad}")
    return result("VM and vCPU with the default guest CPUID", "KVM_SET_MSRS MSR_K7_HWCR = 1 << bit, then "
                  "KVM_GET_MSRS, for bit 0..63", obs, exp, verdict, status="as-upstream" if not bad else "differs")


MISC_ENABLE_RESET = (1 << 11) | (1 << 12)  # BTS_UNAVAIL | PEBS_UNAVAIL (msrs_test's reset value)
PAT_RESET = 0x0007040600070406  # SDM Vol. 3, 13.12.4 "Programming the PAT": the power-up value


def _reset_of(index):
    return {0x1A0: MISC_ENABLE_RESET, 0x277: PAT_RESET}.get(index, 0)


def _msr_cases(ctx):
    """(name, index, test value, invalid value or None) for the msrs_test MSRs this vCPU has."""
    out = [("MISC_ENABLE", 0x1A0, MISC_ENABLE_RESET | 1, None),  # | FAST_STRING
           ("PAT", 0x277, 0x07070707, None),
           ("STAR", 0xC0000081, 0x0023001000000000, None),
           ("LSTAR", 0xC0000082, 0xFFFFFFFF81000000, NON_CANONICAL),
           ("CSTAR", 0xC0000083, 0xFFFFFFFF81000040, NON_CANONICAL),
           ("SYSCALL_MASK", 0xC0000084, 0x47700, None),
           ("KERNEL_GS_BASE", 0xC0000102, 0x00007FFF12345000, NON_CANONICAL),
           ("SYSENTER_CS", 0x174, 0x10, None),
           # 32-bit values: AMD keeps only the low half for an AMD guest; a non-canonical value is
           # made canonical, not refused (arch/x86/kvm/x86.c, __kvm_set_msr)
           ("SYSENTER_ESP", 0x175, 0x12345000, None),
           ("SYSENTER_EIP", 0x176, 0x81001000, None)]
    if ctx.guest_cpuid.has("RDTSCP") or ctx.guest_cpuid.has("RDPID"):
        out.append(("TSC_AUX", 0xC0000103, 0x12, 1 << 32))
    return out


def _after_invalid(ctx, name, invalid):
    """What an invalid write does upstream: None when KVM refuses it, else the value it leaves. TSC_AUX
    bits 63:32 are reserved for an Intel-compatible guest and dropped for others (AMD CPUs ignore
    them; arch/x86/kvm/x86.c, __kvm_set_msr, MSR_TSC_AUX)."""
    if name == "TSC_AUX" and "Intel" not in (ctx.guest_cpuid.vendor or ""):
        return invalid & 0xFFFFFFFF
    return None


@check("msrs_reset_write_read", "MSRs reset to 0, read back what is written, refuse invalid values", "msr",
       selftest="msrs_test")
def _c_msrs_rw(ctx):
    rows, bad = [], []
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        for name, index, value, invalid in _msr_cases(ctx):
            reset = attempt(lambda: v.get_msrs([index])[index])
            wrote = attempt(lambda: v.set_msrs({index: value}) or 0)
            back = attempt(lambda: v.get_msrs([index])[index])
            refused = handled = None
            if invalid is not None:
                took = attempt(lambda: v.set_msrs({index: invalid}) or 0)["ok"]
                now = v.get_msrs([index])[index]
                refused = not took and now == value
                want = _after_invalid(ctx, name, invalid)
                handled = refused if want is None else took and now == want
            row = {"msr": name, "reset": reset["value"], "reset_upstream": _reset_of(index),
                   "invalid_refused": refused,
                   "invalid_as_upstream": handled, "read_back": back["value"] == value if back["ok"] else None}
            rows.append(row)
            if reset["value"] != _reset_of(index) or not wrote["ok"] or not row["read_back"] or handled is False:
                bad.append(name)
    obs = observed_ok(bad, f"{len(rows)} MSRs: " + ("each resets as upstream, reads back, refuses its invalid "
                                                   "value" if not bad else f"differ: {', '.join(bad)}"))
    exp = upstream(f"0 after reset (MISC_ENABLE {hex_text(MISC_ENABLE_RESET)}, PAT {hex_text(PAT_RESET)}); the "
                   "written value reads back; a non-canonical address is refused even from the "
                   "host and the MSR keeps its value; TSC_AUX bits 63:32 likewise for an Intel-compatible guest, "
                   "dropped for others", [])
    verdict = (f"{', '.join(r['msr'] for r in rows)}: as upstream" if not bad else
               f"{len(bad)} MSRs differ: {', '.join(bad)}" + pvm_note(ctx))
    return result("VM and vCPU with the default guest CPUID; host-initiated accesses only (the selftest's guest "
                  "side needs CPL0 RDMSR/WRMSR)", "KVM_GET_MSRS / KVM_SET_MSRS per MSR", obs, exp, verdict,
                  status="as-upstream" if not bad else "differs", details={"msrs": rows})


@check("one_reg_agrees_with_msrs", "KVM_GET/SET_ONE_REG and KVM_GET/SET_MSRS see the same MSR values", "msr",
       selftest="msrs_test")
def _c_one_reg_msrs(ctx):
    from ..regs import msr
    if not ctx.one_reg():
        return not_in_kernel(ctx, ONE_REG_WHAT)
    rows, bad = [], []
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        for name, index, value, _ in _msr_cases(ctx):
            v.set_msrs({index: value})
            got = attempt(lambda: v.get_one_reg(msr(index)))
            v.set_one_reg(msr(index), 0)
            cleared = v.get_msrs([index])[index]
            row = {"msr": name, "one_reg_read": got["value"] == value if got["ok"] else got["text"],
                   "one_reg_write_seen": cleared == 0}
            rows.append(row)
            if row["one_reg_read"] is not True or not row["one_reg_write_seen"]:
                bad.append(name)
    obs = observed_ok(bad, f"{len(rows)} MSRs: " + ("the two interfaces agree" if not bad else
                                                   f"disagree on {', '.join(bad)}"))
    exp = upstream("KVM_GET_ONE_REG(KVM_X86_REG_MSR(i)) reads what KVM_SET_MSRS wrote, and KVM_GET_MSRS reads "
                   "what KVM_SET_ONE_REG wrote (since 6.18)", [])
    verdict = ("ONE_REG and KVM_GET/SET_MSRS agree" if not bad else f"they disagree on {', '.join(bad)}")
    return result("VM and vCPU with the default guest CPUID", "KVM_SET_MSRS then KVM_GET_ONE_REG; KVM_SET_ONE_REG "
                  "then KVM_GET_MSRS, per MSR", obs, exp, verdict, status="as-upstream" if not bad else "differs",
                  details={"msrs": rows})


@check("msrs_guest_access", "guest WRMSR/RDMSR: values read back, invalid ones raise #GP and change nothing",
       "msr", selftest="msrs_test")
def _c_msrs_guest(ctx):
    from ..errors import GuestError
    from ..guest.machine import Machine
    from ..guest.runner import Fault, Sync
    from ..guest.runtime import SCRATCH_BASE
    try:
        m = Machine("msr-access", kvm=ctx.kvm, cpuid=ctx.guest_cpuid)
    except GuestError as e:
        return skip(f"the msr-access guest is not available: {e}")
    rows, bad, stopped = [], [], None

    def access(index, value, write):
        """(faults, value read, the event that ended it) of one WRMSR (when `write`) and RDMSR."""
        ev = m.run(timeout=GUEST_TIMEOUT)
        if ev != Sync(m.vcpu.id, 0x100):
            return None, None, ev
        r = m.vcpu.get_regs()
        r.rbx, r.r12, r.r13 = index, value, int(write)
        m.vcpu.set_regs(r)
        faults = []
        ev = m.run(timeout=GUEST_TIMEOUT)
        while isinstance(ev, Fault) and ev.cs & 3 == 0 and len(faults) < 2:
            faults.append(ev.name)
            rsp = m.vcpu.get_regs().rsp  # the runtime's exception frame: vector, error, RIP, ...
            rip = int.from_bytes(m.vm.read(rsp + 16, 8), "little")
            m.vm.write(rsp + 16, (rip + 2).to_bytes(8, "little"))  # past the 2-byte WRMSR/RDMSR
            ev = m.run(timeout=GUEST_TIMEOUT)
        if ev != Sync(m.vcpu.id, 0x200):
            return faults, None, ev
        return faults, int.from_bytes(m.vm.read(SCRATCH_BASE, 8), "little"), ev
    with m:
        for name, index, value, invalid in _msr_cases(ctx):
            faults, got, ev = access(index, value, True)
            if got is None:
                stopped = f"{name}: {ev}"
                break
            row = {"msr": name, "write": faults or "0", "read_back": got == value}
            ok = not faults and got == value
            if invalid is not None:
                want = _after_invalid(ctx, name, invalid)
                faults2, got2, ev = access(index, invalid, True)
                if got2 is None:
                    stopped = f"{name}: {ev}"
                    break
                row["invalid"] = faults2 or "0"
                row["after_invalid"] = hex_text(got2)
                if want is None:
                    ok = ok and faults2 == ["#GP"] and got2 == value
                else:
                    ok = ok and not faults2 and got2 == want
            rows.append(row)
            if not ok:
                bad.append(name)
    if stopped:
        bad.append(f"stopped at {stopped}")
    obs = observed_ok(bad, f"{len(rows)} MSRs from the guest: " + ("as upstream" if not bad else
                                                                   "differ: " + "; ".join(bad)))
    exp = upstream("the guest's WRMSR of a valid value succeeds and RDMSR reads it back; WRMSR of a non-canonical "
                   "address (TSC_AUX bits 63:32 for an Intel-compatible guest) raises #GP and leaves the MSR as "
                   "it was", [])
    verdict = ("the guest reads back what it writes and gets #GP for invalid values" if not bad else
               f"guest MSR accesses differ for {', '.join(bad)}" + pvm_note(ctx))
    return result("the msr-access guest: WRMSR then RDMSR through its CPL0 runtime services, per MSR a valid "
                  "value and an invalid one; a #GP reported and skipped", "KVM_RUN per access", obs, exp, verdict,
                  status="as-upstream" if not bad else "differs", details={"msrs": rows})


# The MSRs msrs_test covers; the CPUID features that make each exist come from vmm.msr_features
# (none: every 64-bit guest has it).
MSRS_TEST_MSRS = (0x1A0, 0x277, 0xC0000103, 0x174, 0x175, 0x176, 0xC0000102, 0xC0000082, 0xC0000083,
                  0xC0000084, 0x6A2, 0x6A0, 0x6A4, 0x6A5, 0x6A6, 0x6A7)


@check("msr_list_matches_cpuid", "each MSR is in KVM_GET_MSR_INDEX_LIST exactly when KVM supports its feature",
       "msr", selftest="msrs_test")
def _c_msr_list_cpuid(ctx):
    from .. import msr_features
    listed = set(ctx.kvm.get_msr_index_list())

    def row(index):
        features = msr_features.features_of(index)
        supported = msr_features.given(index, ctx.supported)
        return {"msr": msr_features.msr_name(index), "features": list(features), "supported": supported,
                "listed": index in listed}
    rows, bad = [row(i) for i in MSRS_TEST_MSRS], []
    for r in rows:
        if r["listed"] != r["supported"]:
            bad.append(f"{r['msr']} {'listed' if r['listed'] else 'not listed'} but "
                       f"{'supported' if r['supported'] else 'unsupported'}")
    # the rest of the gating table, for the record: upstream asserts nothing about these (e.g. IA32_XSS
    # is listed only when KVM supports a non-zero XSS, TSC_DEADLINE whatever the CPUID says)
    others = [row(i) for i in sorted(msr_features.GATED) if i not in MSRS_TEST_MSRS]
    obs = observed_ok(bad, f"{len(rows)} MSRs: " + ("the list and KVM_GET_SUPPORTED_CPUID agree" if not bad else
                                                   "; ".join(bad)))
    exp = upstream("each msrs_test MSR listed exactly when KVM_GET_SUPPORTED_CPUID has one of its features "
                   "(vmm.msr_features: TSC_AUX RDTSCP or RDPID; the CET MSRs SHSTK or IBT; the SSPs SHSTK); "
                   "architectural ones always", [])
    verdict = ("KVM lists exactly the MSRs of the features it supports" if not bad else
               f"{len(bad)} MSRs disagree with the supported CPUID: {'; '.join(bad)}" + pvm_note(ctx))
    return result("KVM_GET_MSR_INDEX_LIST and KVM_GET_SUPPORTED_CPUID", "membership of each msrs_test MSR",
                  obs, exp, verdict, status="as-upstream" if not bad else "differs",
                  details={"msrs": rows, "other_gated_msrs": [r for r in others if r["listed"] != r["supported"]]})
