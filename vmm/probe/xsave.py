"""Probe checks on XSAVE buffers: KVM_GET_XSAVE{,2} sizes, KVM_SET_XSAVE validation and trimming,
and guest code beyond its XCR0."""

from ..errors import errno_name, KvmError
from .core import (AVX512_STATE, AVX_FAMILY, GUEST_TIMEOUT, LEGACY_XSAVE, SENTINEL, SET_XSAVE_FIX, X87_SSE,
                   XCR0_LEAK_DANGER, XCR0_LEAK_FIX, XSAVES_HOST_DANGER, XSAVES_HOST_FIX, XTILE, XTILEDATA,
                   attempt, check, has_set_xsave_fix, hex_text, mask_text, not_in_kernel, observed_ok,
                   pvm_note, raw_set_xsave, result, skip, upstream, xstate_bv)


@check("get_xsave_sizes", "KVM_GET_XSAVE and KVM_GET_XSAVE2 sizes", "xsave")
def _c_sizes(ctx):
    from .._bindings import ffi, ioctl
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        cap = vm.xsave2_size()
        legacy = ffi.new("struct kvm_xsave *")
        obs_legacy = attempt(lambda: ioctl(v.fd, "KVM_GET_XSAVE", legacy))
        if not cap:
            return not_in_kernel(ctx, "KVM_GET_XSAVE2 (KVM_CAP_XSAVE2) came in Linux 5.17; KVM_GET_XSAVE gives "
                                 "4096 bytes")
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
    from ..xsave import AVX, HI16_ZMM, OPMASK, ZMM_HI256, XsaveArea
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
       "xsave", min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_set_narrow(ctx):
    setup = _narrow_setup(ctx)
    if setup is None:
        return skip(f"the host supports no AVX-family XSAVE component ({mask_text(ctx.xcr0)}): "
                     "nothing to put beyond a narrower guest XCR0")
    narrow, extra = setup
    with ctx.vm() as vm:
        v, raw = _narrow_vcpu(ctx, vm, narrow, extra)
        obs = attempt(lambda: raw_set_xsave(v, raw), lambda _: "0 (accepted)")
    exp = upstream("0 (accepted) since 6.6 and 6.1.60: KVM checks KVM_SET_XSAVE against the features the "
                   "process may use, not the guest CPUID (5.17 to 6.5 answered EINVAL)", 0)
    if obs["ok"]:
        verdict = (f"accepted: a state with {mask_text(extra)} restores after a guest CPUID limited to "
                   f"XCR0 {hex_text(narrow)}")
    elif obs["errno_name"] == "EINVAL" and not has_set_xsave_fix(ctx.kver):
        return not_in_kernel(ctx, f"{SET_XSAVE_FIX}; this kernel answered EINVAL, as 5.17 to 6.5 do: set a guest "
                             "CPUID that covers every XSTATE_BV bit of the state before KVM_SET_XSAVE")
    elif obs["errno_name"] == "EINVAL":
        verdict = ("EINVAL, as 5.17 to 6.5 did: set a guest CPUID that covers every XSTATE_BV bit of the "
                   "state before KVM_SET_XSAVE, or strip those bits")
    else:
        verdict = f"refused with {obs['text']}"
    return result(f"VM and vCPU; KVM_SET_CPUID2 with guest XCR0 limited to {mask_text(narrow)}; an XSAVE "
                  f"buffer from KVM_GET_XSAVE2 with {mask_text(extra)} given values "
                  f"(XSTATE_BV {hex_text(xstate_bv(raw))})",
                  "KVM_SET_XSAVE (raw, no Python-side checks)", obs, exp, verdict,
                  details={"guest_xcr0": hex_text(narrow), "xstate_bv": hex_text(xstate_bv(raw))})


@check("get_xsave_trims_to_guest_xcr0", "KVM_GET_XSAVE2 limits XSTATE_BV to the guest's XCR0 | FP | SSE",
       "xsave", min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_trim(ctx):
    setup = _narrow_setup(ctx)
    if setup is None:
        return skip(f"the host supports no AVX-family XSAVE component ({mask_text(ctx.xcr0)}): "
                     "nothing a narrower guest XCR0 could trim")
    narrow, extra = setup
    with ctx.vm() as vm:
        v, raw = _narrow_vcpu(ctx, vm, narrow, extra)
        try:
            raw_set_xsave(v, raw)
        except KvmError as e:
            return skip(f"KVM_SET_XSAVE refused the buffer with host features ({errno_name(e.errno)}), so "
                         "no state beyond the guest XCR0 can be put in (see set_xsave_after_narrow_cpuid)")
        got = v.get_xsave()
        held = v.get_cpuid2().xcr0_supported()
    bv = xstate_bv(got)
    allowed = narrow | X87_SSE
    obs = observed_ok(hex_text(bv), f"XSTATE_BV {mask_text(bv)}")
    exp = upstream(f"XSTATE_BV within {mask_text(allowed)} (since 6.6 and 6.1.60: KVM trims at "
                   "KVM_GET_XSAVE{,2} to the guest-supported XCR0 | FP | SSE)", hex_text(xstate_bv(raw) & allowed))
    beyond = bv & ~allowed
    if not beyond:
        verdict = f"trimmed to {mask_text(bv)}: the components the guest CPUID lacks are dropped at GET"
        status = "as-upstream"
    elif held != narrow:
        verdict = (f"not trimmed: {mask_text(beyond)} still in XSTATE_BV; KVM_GET_CPUID2 shows CPUID.(0DH,0) "
                   f"XCR0 {hex_text(held)} where {hex_text(narrow)} was set: this KVM widened the guest CPUID, "
                   "so its guest-supported XCR0 is the host's" + pvm_note(ctx))
        status = "differs"
    else:
        verdict = f"not trimmed: {mask_text(beyond)} beyond the guest XCR0 come back from KVM_GET_XSAVE2"
        status = "differs"
    return result(f"as set_xsave_after_narrow_cpuid (guest XCR0 {hex_text(narrow)}, buffer XSTATE_BV "
                  f"{hex_text(xstate_bv(raw))} accepted)", "KVM_GET_XSAVE2", obs, exp, verdict, status=status,
                  details={"guest_xcr0_set": hex_text(narrow), "guest_xcr0_held": hex_text(held),
                           "xstate_bv_set": hex_text(xstate_bv(raw)), "xstate_bv_got": hex_text(bv)})


def _bad_buffer(ctx, what, edit, why):
    with ctx.vm() as vm:
        v = ctx.vcpu(vm)
        raw = v.get_xsave()
        bad = bytearray(raw)
        edit(bad)
        obs = attempt(lambda: raw_set_xsave(v, bad), lambda _: "0 (accepted)")
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
       "xsave", min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_xcomp(ctx):
    def edit(b):
        b[520:528] = ((1 << 63) | xstate_bv(b)).to_bytes(8, "little")
    return _bad_buffer(ctx, "XCOMP_BV = bit 63 | XSTATE_BV", edit,
                       "KVM_SET_XSAVE takes the standard format only; XCOMP_BV must be 0")


@check("set_xsave_reserved_header", "KVM_SET_XSAVE with a reserved XSAVE header byte set",
       "xsave", min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_reserved(ctx):
    def edit(b):
        b[540] = 0x01
    return _bad_buffer(ctx, "header byte 540 (reserved, 528..575) = 0x01", edit,
                       "reserved header bytes 528..575 must be zero")


@check("set_xsave_unpermitted_component", "KVM_SET_XSAVE with XTILEDATA in XSTATE_BV, not permitted",
       "xsave", min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_unpermitted(ctx):
    def edit(b):
        b[512:520] = (xstate_bv(b) | 1 << XTILEDATA).to_bytes(8, "little")
    return _bad_buffer(ctx, "XSTATE_BV bit 18 (XTILEDATA) set, no AMX in the guest CPUID", edit,
                       "XSTATE_BV may name only features of the vCPU's XSAVE buffer (user features the "
                       "process may use)")


# --- guest execution and CPUID ------------------------------------------------------------------------
@check("guest_beyond_xcr0", "guest CPL3 code using XSAVE state beyond XCR0 = x87|SSE",
       "xsave", min_kernel=XCR0_LEAK_FIX, danger=XCR0_LEAK_DANGER)
def _c_beyond(ctx):
    from ..guest.machine import Machine, USER_XSTATE, XSTATE_FORCED
    from ..guest.runner import Fault, Sync
    beyond = ctx.xcr0 & USER_XSTATE & ~X87_SSE
    if not beyond:
        return skip(f"the host has no XSAVE state beyond x87/SSE that CPL3 can write ({mask_text(ctx.xcr0)})")
    # the checkpoint guest, told to fill every component KVM supports here without asking the CPU,
    # with a guest CPUID and XCR0 limited to x87|SSE (CPUID.1:ECX.XSAVE kept, so XCR0 is settable)
    narrow = ctx.kvm.get_supported_cpuid().guest_for_xcr0(X87_SSE).with_xsave_enabled()
    with Machine("checkpoint", kvm=ctx.kvm, cpuid=narrow, xcr0=X87_SSE) as m:
        regs = m.vcpu.get_regs()
        regs.rdx = XSTATE_FORCED | beyond | X87_SSE
        m.vcpu.set_regs(regs)
        xcr0 = m.vcpu.get_xcrs().get(0, 0)
        ev = m.run(timeout=GUEST_TIMEOUT)
        bv = xstate_bv(m.vcpu.get_xsave())
        held = m.vcpu.get_cpuid2().xcr0_supported()
    if isinstance(ev, Sync):
        obs = observed_ok("sync", f"SYNC {ev.value:#x}: the guest filled {mask_text(ev.value)}; "
                                  f"XSTATE_BV then {mask_text(bv)}")
        verdict = (f"guest XCR0 {hex_text(xcr0)} is not enforced for CPL3 code: the guest used "
                   f"{mask_text(beyond)} state, and its saved XSTATE_BV carries it (a restore target needs "
                   "those components too)" + pvm_note(ctx))
    elif isinstance(ev, Fault):
        obs = observed_ok(ev.name, f"{ev} (XSTATE_BV {mask_text(bv)})")
        verdict = ("#UD: guest XCR0 is enforced" if ev.name == "#UD" else
                   f"{ev.name}, not the #UD an unenabled XSAVE feature raises")
    else:
        obs = observed_ok(getattr(ev, "kind", "event"), str(ev))
        verdict = f"the guest ended with '{ev}' before its first SYNC"
    exp = upstream("#UD at the first instruction beyond XCR0: the CPU runs guest code under the guest's XCR0",
                   "#UD")
    return result(f"the checkpoint guest at CPL3 filling {mask_text(beyond)} with its guest CPUID and XCR0 "
                  "limited to 0x3 (x87 SSE)",
                  "KVM_RUN", obs, exp, verdict,
                  details={"guest_xcr0": hex_text(xcr0), "filled": hex_text(beyond | X87_SSE),
                           "xstate_bv": hex_text(bv), "cpuid2_xcr0": hex_text(held)})


@check("guest_cpl0_payload", "a guest payload using every XSAVE component KVM supports, at CPL0", "xsave")
def _c_cpl0(ctx):
    from ..guest.machine import Machine
    from ..guest.runner import Sync
    # the checkpoint guest at CPL0: integer and vector code filling what the guest's XCR0 enables
    with Machine("checkpoint", kvm=ctx.kvm, cpl=0) as m:
        xcr0 = m.vcpu.get_xcrs().get(0, 0)
        ev = m.run(timeout=GUEST_TIMEOUT)
    kind = getattr(ev, "kind", "event")
    obs = observed_ok(kind, str(ev))
    exp = upstream("SYNC: guest CPL0 code executes natively (SVM guest mode or VMX non-root)", "sync")
    if isinstance(ev, Sync):
        verdict = f"the checkpoint payload ran at CPL0 to its SYNC, filling {mask_text(ev.value)}"
    elif kind == "internal-error":
        verdict = ("KVM_EXIT_INTERNAL_ERROR: this KVM emulates guest CPL0 code instruction by instruction and "
                   "cannot emulate vector instructions; payloads must run at CPL3 here" + pvm_note(ctx))
    else:
        verdict = f"the checkpoint payload ended with '{ev}' at CPL0"
    return result(f"the checkpoint guest at CPL0 with the default guest CPUID (XCR0 {hex_text(xcr0)})",
                  "KVM_RUN", obs, exp, verdict, details={"guest_xcr0": hex_text(xcr0)})


# --- XCR0 rules (xcr0_cpuid_test) --------------------------------------------------------------------
XCR0_RULES = (  # (features, what they need, all-or-none); SDM Vol. 1, 13.3 "Enabling the XSAVE feature set"
    ("AVX (YMM) needs SSE", 1 << 2, 1 << 1, False),
    ("MPX BNDREGS and BNDCSR together", (1 << 3) | (1 << 4), 0, True),
    ("AVX-512 needs SSE and AVX", AVX512_STATE, (1 << 1) | (1 << 2), False),
    ("AVX-512 opmask, ZMM_Hi256 and Hi16_ZMM together", AVX512_STATE, 0, True),
    ("AMX XTILECFG and XTILEDATA together", XTILE, 0, True),
)


@check("supported_xcr0_dependencies", "the supported XCR0 of KVM_GET_SUPPORTED_CPUID keeps XSAVE's bundles",
       "xsave", selftest="xcr0_cpuid_test")
def _c_xcr0_rules(ctx):
    xcr0 = ctx.xcr0
    broken = []
    if xcr0 and not xcr0 & 1:
        broken.append("x87 (bit 0) is always enabled")
    for text, features, needs, bundle in XCR0_RULES:
        have = xcr0 & (features | needs)
        if bundle and have & features not in (0, features):
            broken.append(f"{text}: has {mask_text(have & features)}")
        elif not bundle and have & features == features and have != features | needs:
            broken.append(f"{text}: has {mask_text(have)}")
    obs = observed_ok(broken, f"supported XCR0 {mask_text(xcr0)}; " + (
        "every rule holds" if not broken else "broken: " + "; ".join(broken)))
    exp = upstream("a supported XCR0 XSETBV accepts as is: " + "; ".join(r[0] for r in XCR0_RULES), [])
    verdict = ("KVM's supported XCR0 can be loaded as it is" if not broken else
               f"KVM's supported XCR0 breaks {len(broken)} of XSAVE's dependency rules: XSETBV of it would #GP")
    return result("KVM_GET_SUPPORTED_CPUID (in this process: no AMX permission requested)",
                  "CPUID.(0DH,0).EDX:EAX of it", obs, exp, verdict,
                  status="as-upstream" if not broken else "differs")


def _xcr0_machine(ctx):
    from ..guest.machine import Machine
    return Machine("xcr0", kvm=ctx.kvm, cpuid=ctx.guest_cpuid)


@check("guest_initial_xcr0", "the guest's XCR0 after KVM_SET_CPUID2 and KVM_SET_XCRS of the supported XCR0",
       "xsave", selftest="xcr0_cpuid_test")
def _c_initial_xcr0(ctx):
    from ..errors import GuestError
    from ..guest.runner import Sync
    want = ctx.guest_cpuid.xcr0_supported()
    if not ctx.guest_cpuid.has("XSAVE"):
        return skip("the guest CPUID has no XSAVE: there is no XCR0 to read")
    try:
        m = _xcr0_machine(ctx)
    except GuestError as e:
        return skip(f"the xcr0 guest is not available: {e}")
    with m:
        held = m.vcpu.get_xcrs().get(0)
        ev = m.run(timeout=GUEST_TIMEOUT)
    seen = ev.value if isinstance(ev, Sync) else None
    obs = observed_ok(seen, f"XGETBV(0)[31:0] at CPL3 = {mask_text(seen)}; KVM_GET_XCRS XCR0 = {mask_text(held)}"
                      if seen is not None else f"the guest ended with '{ev}' before its first SYNC")
    exp = upstream(f"{mask_text(want & 0xFFFFFFFF)}: the guest reads the XCR0 it was given, the guest CPUID's "
                   "supported XCR0", want & 0xFFFFFFFF)
    if seen == want & 0xFFFFFFFF:
        verdict = "the guest starts with the XCR0 it was given"
    elif seen is None:
        verdict = f"the xcr0 guest did not reach its first SYNC: {ev}"
    else:
        verdict = (f"the guest reads XCR0 {mask_text(seen)} where KVM holds {mask_text(held)}: XCR0 at CPL3 is "
                   "not the guest's" + pvm_note(ctx))
    return result(f"the xcr0 guest at CPL3; KVM_SET_CPUID2 with the default guest CPUID, KVM_SET_XCRS XCR0 = "
                  f"{hex_text(want)}", "KVM_RUN to the first SYNC (XGETBV(0) at CPL3)", obs, exp, verdict,
                  details={"xcr0_held": hex_text(held) if held is not None else None})


@check("xsetbv_unsupported_gp", "XSETBV of each XCR0 bit the guest CPUID lacks raises #GP", "xsave",
       selftest="xcr0_cpuid_test")
def _c_xsetbv_gp(ctx):
    from ..errors import GuestError
    from ..guest.runner import Fault, InternalError, Sync
    guest_xcr0 = ctx.guest_cpuid.xcr0_supported()
    if not ctx.guest_cpuid.has("XSAVE"):
        return skip("the guest CPUID has no XSAVE: XSETBV is #UD there")
    values = [("x87 only", 1), ("the supported XCR0", guest_xcr0)]
    values += [(f"+ bit {i}", guest_xcr0 | 1 << i) for i in range(64) if not guest_xcr0 >> i & 1]
    answers = {}
    stopped = None
    try:
        m = _xcr0_machine(ctx)
    except GuestError as e:
        return skip(f"the xcr0 guest is not available: {e}")
    with m:
        ev = m.run(timeout=GUEST_TIMEOUT)  # the initial-XCR0 SYNC
        for label, value in values:
            ev = m.run(timeout=GUEST_TIMEOUT)
            if not (isinstance(ev, Sync) and ev.value == 0x100):
                stopped = str(ev)
                break
            regs = m.vcpu.get_regs()
            regs.rbx = value
            m.vcpu.set_regs(regs)
            ev = m.run(timeout=GUEST_TIMEOUT)
            if isinstance(ev, Fault):
                answers[label] = ev.name
                rsp = m.vcpu.get_regs().rsp  # the runtime's exception frame: vector, error, RIP, ...
                rip = int.from_bytes(m.vm.read(rsp + 16, 8), "little")
                m.vm.write(rsp + 16, (rip + 3).to_bytes(8, "little"))  # past the 3-byte XSETBV
                ev = m.run(timeout=GUEST_TIMEOUT)
                if not isinstance(ev, Sync):
                    stopped = str(ev)
                    break
            elif isinstance(ev, Sync):
                answers[label] = "0"
            else:
                answers[label] = str(ev)
                stopped = str(ev)
                break
    want = {label: ("0" if i < 2 else "#GP") for i, (label, _) in enumerate(values)}
    bad = [k for k in want if answers.get(k) != want[k]]
    gp = sum(1 for k, a in answers.items() if a == "#GP")
    obs = observed_ok(answers, f"x87 only: {answers.get('x87 only', '-')}; supported: "
                      f"{answers.get('the supported XCR0', '-')}; #GP for {gp} of {len(values) - 2} unsupported "
                      "bits"
                      + (f"; stopped: {stopped}" if stopped else ""))
    exp = upstream("XSETBV(0, 1) and XSETBV(0, supported XCR0) succeed; XSETBV of the supported XCR0 plus any "
                   "other bit raises #GP", want)
    if not bad:
        verdict = f"XSETBV enforces the guest CPUID's XCR0 {mask_text(guest_xcr0)}"
    elif stopped and isinstance(ev, InternalError):
        verdict = (f"XSETBV in the CPL0 runtime service ended in KVM_EXIT_INTERNAL_ERROR ({ev}): this KVM cannot "
                   "run XSETBV at guest CPL0" + pvm_note(ctx))
    else:
        verdict = f"{len(bad)} of {len(values)} XSETBV answers differ: {', '.join(bad[:6])}" + pvm_note(ctx)
    return result("the xcr0 guest: XSETBV(0, value) through its CPL0 runtime service for each value, a #GP "
                  "reported and skipped", "KVM_RUN per value", obs, exp, verdict,
                  status="as-upstream" if not bad else "differs",
                  details={"guest_xcr0": hex_text(guest_xcr0), "stopped": stopped})
