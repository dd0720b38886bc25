"""Probe checks on save/restore of vCPU state (state_test): an XSAVE image saved from one vCPU loads
into a fresh one whatever its guest CPUID."""

from ..errors import KvmError, errno_name
from .core import (GUEST_TIMEOUT, XTILE, check, hex_text, mask_text, observed_ok, pvm_note, raw_set_xsave, result,
                   skip, upstream, xstate_bv)


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
