"""Probe checks on save/restore of vCPU state (state_test): an XSAVE image saved from one vCPU loads
into a fresh one whatever its guest CPUID."""

from ..errors import KvmError, errno_name
from .core import (GUEST_TIMEOUT, SET_XSAVE_FIX, XTILE, check, has_set_xsave_fix, hex_text, mask_text,
                   not_in_kernel, observed_ok, pvm_note, raw_set_xsave, result, skip, upstream, xstate_bv)


def _dirty(raw, layout, mask):
    """A copy of the XSAVE image `raw` with a recognizable value in every user component of `mask`
    that vmm can fill (x87, SSE, AVX, AVX-512, PKRU), their XSTATE_BV bits set."""
    from ..xsave import AVX, HI16_ZMM, OPMASK, PKRU, SSE, X87, ZMM_HI256, XsaveArea
    area = XsaveArea.parse(bytearray(raw), layout)
    fill = {X87: lambda: area.set("st7", 0x4000C90FDAA22168C235),  # pi as an 80-bit real
            SSE: lambda: area.set("xmm3", 0x33333333_22222222_11111111_00000000),
            AVX: lambda: area.set("ymm3h", 0xAAAA << 64 | 0x3),
            OPMASK: lambda: area.set("k3", 0x4B4B000000000003),
            ZMM_HI256: lambda: area.set("zmm5h", 0x5A5A << 128 | 0x5),
            HI16_ZMM: lambda: area.set("zmm20", 0x2020 << 256 | 0x20),
            PKRU: lambda: area.set("pkru", 0x55555554)}
    filled = 0
    for bit, f in fill.items():
        if mask >> bit & 1:
            f()
            filled |= 1 << bit
    return area.encode(), filled


def _with_bv(raw, bv):
    out = bytearray(raw)
    out[512:520] = bv.to_bytes(8, "little")
    return bytes(out)


@check("xsave_image_loads_anywhere", "an XSAVE image loads into a fresh vCPU without, or with an empty, CPUID",
       "state", selftest="state_test")
def _c_xsave_loads(ctx):
    from ..cpuid import CpuidTable
    from ..guest.machine import Machine
    from ..guest.runner import Sync
    if not ctx.layout:
        return skip("KVM_GET_SUPPORTED_CPUID enumerates no XSAVE state")
    user = ctx.xcr0 & ~XTILE  # AMX is off by default: the documented exception
    with Machine("sync", kvm=ctx.kvm, cpuid=ctx.guest_cpuid) as m:
        raw, filled = _dirty(m.vcpu.get_xsave(), ctx.layout, user)
        raw_set_xsave(m.vcpu, raw)
        ev = m.run(timeout=GUEST_TIMEOUT)  # the state goes through the CPU: XRSTOR at entry, XSAVE at exit
        if not isinstance(ev, Sync):
            return skip(f"the sync guest did not reach its first SYNC ({ev})")
        image = m.vcpu.get_xsave()
        vm = m.vm
        cases = [("no KVM_SET_CPUID2", None, image), ("no KVM_SET_CPUID2, XSTATE_BV = supported XCR0", None,
                                                        _with_bv(image, user)),
                 ("empty guest CPUID", "empty", image),
                 ("empty guest CPUID, XSTATE_BV = supported XCR0", "empty", _with_bv(image, user))]
        cases += [(f"empty guest CPUID, XSTATE_BV = bit {i}", "empty", _with_bv(image, 1 << i))
                  for i in range(64) if user >> i & 1]
        answers = {}
        for label, cpuid, buf in cases:
            v = vm.create_vcpu()
            try:
                if cpuid == "empty":
                    v.set_cpuid2(CpuidTable([]))
                raw_set_xsave(v, buf)
                answers[label] = "0"
            except KvmError as e:
                answers[label] = errno_name(e.errno)
            finally:
                v.close()
    saved_bv = xstate_bv(image)
    bad = [k for k, a in answers.items() if a != "0"]
    if bad and not has_set_xsave_fix(ctx.kver):
        return not_in_kernel(ctx, f"{SET_XSAVE_FIX}; here {len(bad)} of {len(answers)} loads were refused "
                             f"({answers[bad[0]]} for '{bad[0]}')")
    obs = observed_ok(answers, f"image XSTATE_BV {mask_text(saved_bv)}; " + (
        f"all {len(answers)} loads accepted" if not bad else "refused: " + "; ".join(
            f"{k}: {answers[k]}" for k in bad[:4])))
    exp = upstream("0 for every load: KVM_SET_XSAVE takes any state of the features the process may use, "
                   "whatever the vCPU's guest CPUID (AMX, off by default, excepted)", {k: "0" for k in answers})
    verdict = (f"a saved XSAVE image ({mask_text(saved_bv)}) loads into a fresh vCPU in all {len(answers)} ways"
               if not bad else f"{len(bad)} of {len(answers)} loads refused" + pvm_note(ctx))
    return result(f"a vCPU of the sync guest given {mask_text(filled)} values by KVM_SET_XSAVE, run at CPL3 to "
                  "its first SYNC, saved with KVM_GET_XSAVE2; then a fresh vCPU per load", "KVM_SET_XSAVE",
                  obs, exp, verdict, status="as-upstream" if not bad else "differs",
                  details={"filled": hex_text(filled), "image_xstate_bv": hex_text(saved_bv)})


@check("amx_tiles_xfd_and_restore", "AMX: TMM0 survives save/restore into a fresh VM; XFD raises #NM with XFD_ERR",
       "state", process="amx-guest", selftest="amx_test")
def _c_amx(ctx):
    from .. import amx
    from ..guest.machine import Machine
    from ..guest.runner import Done, Fault, Sync
    from ..xsave import XsaveArea, XsaveLayout
    ctx.require_fresh("amx_tiles_xfd_and_restore")
    try:
        supp = ctx.xcomp_supp()
    except KvmError as e:
        return not_in_kernel(ctx, f"ARCH_GET_XCOMP_SUPP answered {errno_name(e.errno)}: no AMX permission "
                             "interface (Linux 5.16/5.17)")
    if not supp >> amx.XFEATURE_XTILEDATA & 1:
        return skip(f"no AMX on this host: ARCH_GET_XCOMP_SUPP {mask_text(supp)} lacks XTILEDATA (18)")
    xfd, xfd_err, tiledata = 0x1C4, 0x1C5, 1 << amx.XFEATURE_XTILEDATA
    steps = {}
    with Machine("amx", kvm=ctx.kvm, amx=True) as m:
        layout = XsaveLayout.from_cpuid(m.cpuid)
        data_at = m.image.symbols["TILEDATA"]

        def round_trip(step):
            """The vCPU's XSAVE image, loaded into a vCPU of a fresh VM and read back: TMM0 the same."""
            raw = m.vcpu.get_xsave()
            with ctx.vm() as vm2:
                v2 = vm2.create_vcpu()
                v2.set_cpuid2(m.cpuid)
                raw_set_xsave(v2, raw)
                back = v2.get_xsave()
            a, b = XsaveArea.parse(raw, layout), XsaveArea.parse(back, layout)
            steps[f"{step}: TMM0 through save/restore"] = a.tmm(0) == b.tmm(0) and a.xstate_bv == b.xstate_bv
            return a
        ev = m.run(timeout=GUEST_TIMEOUT * 5)
        steps["SYNC 1 after TILELOADD"] = isinstance(ev, Sync) and ev.value == 1
        if steps["SYNC 1 after TILELOADD"]:
            area = round_trip("sync 1")
            steps["sync 1: TMM0 holds the loaded rows"] = area.tmm(0) == m.vm.read(data_at, 1024)
            ev = m.run(timeout=GUEST_TIMEOUT * 5)
            steps["SYNC 2 after TILERELEASE"] = isinstance(ev, Sync) and ev.value == 2
            round_trip("sync 2")
            ev = m.run(timeout=GUEST_TIMEOUT * 5)
            steps["#NM with XFD armed"] = isinstance(ev, Fault) and ev.vector == 7
            steps["XFD_ERR = XTILEDATA at the #NM"] = m.vcpu.get_msrs([xfd, xfd_err]) == {xfd: tiledata,
                                                                                         xfd_err: tiledata}
            m.vcpu.set_msrs({xfd_err: 0, xfd: 0})
            ev = m.run(timeout=GUEST_TIMEOUT * 5)
            steps["SYNC 3 after the retried load"] = isinstance(ev, Sync) and ev.value == 3
            round_trip("sync 3")
            steps["DONE"] = isinstance(m.run(timeout=GUEST_TIMEOUT * 5), Done)
        last = str(ev)
    bad = [k for k, ok in steps.items() if not ok]
    obs = observed_ok(steps, "all hold" if not bad else f"fail: {'; '.join(bad)} (last event: {last})")
    exp = upstream("the amx_test sequence: TILELOADD, TILERELEASE, #NM from XFD with XFD_ERR = XTILEDATA, the "
                   "retried load; at every SYNC the XSAVE image restores into a fresh VM with TMM0 intact",
                   {k: True for k in steps})
    verdict = ("AMX tile state and XFD behave as upstream, and TMM0 survives save/restore" if not bad else
               f"{len(bad)} of {len(steps)} AMX steps differ: {', '.join(bad)}" + pvm_note(ctx))
    return result("a fresh process: ARCH_REQ_XCOMP_GUEST_PERM(18), the amx guest at CPL3 with AMX in its guest "
                  "CPUID", "KVM_RUN to each SYNC; KVM_GET_XSAVE2, then KVM_SET_XSAVE into a vCPU of a new VM",
                  obs, exp, verdict, status="as-upstream" if not bad else "differs")
