"""Probe checks on XSAVE buffers: KVM_GET_XSAVE{,2} sizes, KVM_SET_XSAVE validation and trimming,
and guest code beyond its XCR0."""

import errno as _errno
from ..errors import errno_name, KvmError
from .core import (AVX512_STATE, AVX_FAMILY, GUEST_TIMEOUT, LEGACY_XSAVE, SENTINEL, X87_SSE,
                   XCR0_LEAK_DANGER, XCR0_LEAK_FIX, XSAVES_HOST_DANGER, XSAVES_HOST_FIX, XTILEDATA, attempt,
                   check, hex_text, mask_text, observed_err, observed_ok, raw_set_xsave, result, skip,
                   upstream, xstate_bv)


@check("get_xsave_sizes", "KVM_GET_XSAVE and KVM_GET_XSAVE2 sizes")
def _c_sizes(ctx):
    from .._bindings import ffi, ioctl
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
       min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
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
    elif obs["errno_name"] == "EINVAL":
        verdict = ("EINVAL, as 5.17 to 6.5 do: set a guest CPUID that covers every XSTATE_BV bit of the "
                   "state before KVM_SET_XSAVE, or strip those bits")
    else:
        verdict = f"refused with {obs['text']}"
    return result(f"VM and vCPU; KVM_SET_CPUID2 with guest XCR0 limited to {mask_text(narrow)}; an XSAVE "
                  f"buffer from KVM_GET_XSAVE2 with {mask_text(extra)} given values "
                  f"(XSTATE_BV {hex_text(xstate_bv(raw))})",
                  "KVM_SET_XSAVE (raw, no Python-side checks)", obs, exp, verdict,
                  details={"guest_xcr0": hex_text(narrow), "xstate_bv": hex_text(xstate_bv(raw))})


@check("get_xsave_trims_to_guest_xcr0", "KVM_GET_XSAVE2 limits XSTATE_BV to the guest's XCR0 | FP | SSE",
       min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
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
                   "so its "
                   "guest-supported XCR0 is the host's")
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
       min_kernel=XSAVES_HOST_FIX, danger=XSAVES_HOST_DANGER)
def _c_xcomp(ctx):
    def edit(b):
        b[520:528] = ((1 << 63) | xstate_bv(b)).to_bytes(8, "little")
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
        b[512:520] = (xstate_bv(b) | 1 << XTILEDATA).to_bytes(8, "little")
    return _bad_buffer(ctx, "XSTATE_BV bit 18 (XTILEDATA) set, no AMX in the guest CPUID", edit,
                       "XSTATE_BV may name only features of the vCPU's XSAVE buffer (user features the "
                       "process may use)")


# --- guest execution and CPUID ------------------------------------------------------------------------


@check("guest_beyond_xcr0", "guest CPL3 code executing AVX-512 with XCR0 = x87|SSE|AVX",
       min_kernel=XCR0_LEAK_FIX, danger=XCR0_LEAK_DANGER)
def _c_beyond(ctx):
    from ..errors import GuestError
    from ..guest.machine import Machine
    from ..guest.runner import Fault, Sync
    if ctx.xcr0 & AVX512_STATE != AVX512_STATE:
        return skip(f"the host has no AVX-512 state ({mask_text(ctx.xcr0)}): the avx512 probe guest has "
                     "nothing beyond XCR0 0x7 to execute")
    try:
        m = Machine("avx512", kvm=ctx.kvm, xcr0=0x7)
    except GuestError as e:
        return skip(f"the avx512 guest is not available: {e}")
    with m:
        xcr0 = m.vcpu.get_xcrs().get(0, 0)
        ev = m.run(timeout=GUEST_TIMEOUT)
        bv = xstate_bv(m.vcpu.get_xsave())
        held = m.vcpu.get_cpuid2().xcr0_supported()
    if isinstance(ev, Sync):
        obs = observed_ok("sync", f"SYNC {ev.value:#x}: AVX-512 executed; XSTATE_BV then {mask_text(bv)}")
        verdict = (f"guest XCR0 {hex_text(xcr0)} is not enforced for CPL3 code: the guest used opmask/ZMM "
                   "state, and its saved XSTATE_BV carries it (a restore target needs those components too)")
    elif isinstance(ev, Fault):
        obs = observed_ok(ev.name, f"{ev} (XSTATE_BV {mask_text(bv)})")
        verdict = ("#UD: guest XCR0 is enforced" if ev.name == "#UD" else
                   f"{ev.name}, not the #UD an unenabled XSAVE feature raises")
    else:
        obs = observed_ok(getattr(ev, "kind", "event"), str(ev))
        verdict = f"the guest ended with '{ev}' before its first SYNC"
    exp = upstream("#UD at the first EVEX instruction: the CPU runs guest code under the guest's XCR0", "#UD")
    return result("the avx512 guest at CPL3 with its guest CPUID and XCR0 limited to 0x7 (x87 SSE AVX)",
                  "KVM_RUN", obs, exp, verdict,
                  details={"guest_xcr0": hex_text(xcr0), "xstate_bv": hex_text(bv), "cpuid2_xcr0": hex_text(held)})
