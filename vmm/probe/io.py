"""Probe checks on the KVM_RUN interface: the kvm_run sync-regs area (sync_regs_test) and string I/O
that exits to user space (userspace_io_test). Guests run their payload at CPL3."""

from ..errors import KvmError, errno_name
from .core import GUEST_TIMEOUT, check, hex_text, not_in_kernel, observed_ok, result, skip, upstream

INVALID_SYNC_FIELD = 1 << 31  # the bit sync_regs_test asks for; not a KVM_SYNC_X86_* field
REP_INS_PORT = 0x80
REP_INS_BYTES = 8192
REP_INS_FILL = 0xAA


def _machine(ctx, guest):
    from ..guest.machine import Machine
    return Machine(guest, kvm=ctx.kvm, cpuid=ctx.guest_cpuid)


def _sync_fields():
    from .._bindings import lib
    return lib.KVM_SYNC_X86_REGS | lib.KVM_SYNC_X86_SREGS | lib.KVM_SYNC_X86_EVENTS


@check("sync_regs_invalid_bits", "KVM_RUN with an invalid bit in kvm_valid_regs or kvm_dirty_regs", "io",
       selftest="sync_regs_test")
def _c_sync_invalid(ctx):
    cap = ctx.kvm.check_extension("KVM_CAP_SYNC_REGS")
    if not cap:
        return not_in_kernel(ctx, "KVM_CAP_SYNC_REGS came in Linux 4.17")
    if cap & INVALID_SYNC_FIELD:
        return skip(f"KVM_CAP_SYNC_REGS = {hex_text(cap)} includes bit 31: no invalid field to ask for")
    fields = _sync_fields()
    answers = {}
    with _machine(ctx, "sync") as m:
        run = m.vcpu.kvm_run
        for field in ("kvm_valid_regs", "kvm_dirty_regs"):
            for value in (INVALID_SYNC_FIELD, INVALID_SYNC_FIELD | fields):
                setattr(run, field, value)
                try:
                    reason = m.vcpu.run()
                    answers[f"{field}={hex_text(value)}"] = f"0 (exit reason {reason})"
                except KvmError as e:
                    answers[f"{field}={hex_text(value)}"] = errno_name(e.errno)
                finally:
                    setattr(run, field, 0)
    refused = [k for k, v in answers.items() if v == "EINVAL"]
    obs = observed_ok(answers, "; ".join(f"{k}: {v}" for k, v in answers.items()))
    exp = upstream("EINVAL for each: KVM_RUN refuses a sync-regs field it does not know, alone or with the "
                   f"valid ones ({hex_text(fields)})", {k: "EINVAL" for k in answers})
    if len(refused) == len(answers):
        verdict = "KVM_RUN refuses an unknown sync-regs field in either mask"
    else:
        verdict = (f"KVM_RUN accepted {len(answers) - len(refused)} of {len(answers)} requests with an "
                   "unknown sync-regs field")
    return result(f"the sync guest's VM and vCPU; KVM_CAP_SYNC_REGS = {hex_text(cap)}",
                  "KVM_RUN with kvm_run.kvm_valid_regs, then kvm_dirty_regs, = bit 31 (alone and with "
                  "REGS|SREGS|EVENTS)", obs, exp, verdict, details={"cap_sync_regs": cap})


@check("sync_regs_round_trip", "kvm_run sync regs: read at exit, written on entry only when dirty", "io",
       selftest="sync_regs_test")
def _c_sync_round_trip(ctx):
    from .._bindings import lib
    from ..guest.runner import Sync
    cap = ctx.kvm.check_extension("KVM_CAP_SYNC_REGS")
    fields = _sync_fields()
    if cap & fields != fields:
        return not_in_kernel(ctx, "KVM_CAP_SYNC_REGS (REGS|SREGS|EVENTS) came in Linux 4.17")
    names = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
             "r14", "r15", "rip", "rflags")
    steps = {}
    with _machine(ctx, "sync") as m:
        run, v = m.vcpu.kvm_run, m.vcpu
        # 1: every valid field requested; the area matches KVM_GET_REGS at the exit
        run.kvm_valid_regs = fields
        ev = m.run(timeout=GUEST_TIMEOUT)
        regs = v.get_regs()
        diff = [n for n in names if getattr(run.s.regs.regs, n) != getattr(regs, n)]
        steps["valid: area = KVM_GET_REGS"] = isinstance(ev, Sync) and not diff
        # 2: rbx written through the area (dirty REGS) reaches the vCPU; the guest leaves rbx alone
        run.s.regs.regs.rbx = 0xBAD1DEA
        run.kvm_dirty_regs = lib.KVM_SYNC_X86_REGS
        ev2 = m.run(timeout=GUEST_TIMEOUT)
        steps["dirty REGS: rbx reaches the vCPU"] = isinstance(ev2, Sync) and v.get_regs().rbx == 0xBAD1DEA
        # 3: nothing valid or dirty: the area is left alone and does not overwrite the vCPU
        run.kvm_valid_regs = run.kvm_dirty_regs = 0
        run.s.regs.regs.rbx = 0xAAAA
        r = v.get_regs()
        r.rbx = 0xBAC0
        v.set_regs(r)
        ev3 = m.run(timeout=GUEST_TIMEOUT)
        steps["neither: area untouched"] = isinstance(ev3, Sync) and run.s.regs.regs.rbx == 0xAAAA
        steps["neither: vCPU keeps KVM_SET_REGS's rbx"] = v.get_regs().rbx == 0xBAC0
    bad = [k for k, ok in steps.items() if not ok]
    obs = observed_ok(steps, "all hold" if not bad else "fails: " + "; ".join(bad))
    exp = upstream("at each exit the area holds what KVM_GET_REGS gives for the requested fields; on entry "
                   "only the fields marked dirty are loaded; with neither mask the area and the vCPU are "
                   "independent", {k: True for k in steps})
    verdict = ("the sync-regs area behaves as documented" if not bad else
               f"{len(bad)} of {len(steps)} sync-regs steps differ: {', '.join(bad)}"
               + (f" (registers differing at step 1: {', '.join(diff)})" if diff else ""))
    return result("the sync guest (three SYNCs, rbx untouched) at CPL3; KVM_CAP_SYNC_REGS = "
                  f"{hex_text(cap)}", "KVM_RUN x3 with kvm_valid_regs/kvm_dirty_regs = REGS|SREGS|EVENTS, "
                  "REGS, then 0", obs, exp, verdict,
                  details={"events": [str(ev), str(ev2), str(ev3)], "differing_at_exit": diff})


@check("userspace_io_rep_ins", "rep insb from a port exits to user space with the right count", "io",
       selftest="userspace_io_test")
def _c_rep_ins(ctx):
    from .._bindings import ffi, lib
    from ..errors import GuestError
    from ..guest.runner import Done, Sync
    counts = []

    def port80(io, data):
        if io.direction != lib.KVM_EXIT_IO_IN:
            return None
        counts.append(io.count)
        ffi.buffer(data, io.size * io.count)[:] = bytes([REP_INS_FILL]) * (io.size * io.count)
        return None
    try:
        m = _machine(ctx, "rep-ins")
    except GuestError as e:
        return skip(f"the rep-ins guest is not available: {e}")
    events = []
    with m:
        m.runner.serve_port_in(REP_INS_PORT, port80)
        for _ in range(5):
            ev = m.run(timeout=GUEST_TIMEOUT)
            events.append(ev)
            if not isinstance(ev, Sync):
                break
    syncs = [e.value for e in events if isinstance(e, Sync)]
    ended = bool(events) and isinstance(events[-1], Done)
    got = {"exits": len(counts), "bytes_in_exits": sum(counts), "rcx_left": syncs[1] if len(syncs) > 1 else None,
           "rdi_advanced": syncs[2] if len(syncs) > 2 else None, "filled": syncs[3] if len(syncs) > 3 else None}
    want = {"bytes_in_exits": REP_INS_BYTES, "rcx_left": 0, "rdi_advanced": REP_INS_BYTES,
            "filled": REP_INS_BYTES}
    ok = ended and all(got[k] == v for k, v in want.items())
    obs = observed_ok({k: got[k] for k in want},
                      f"{len(counts)} KVM_EXIT_IO exits for port {REP_INS_PORT:#x} carrying {sum(counts)} bytes "
                      f"(counts {counts[:6]}{'...' if len(counts) > 6 else ''}); guest saw %rcx "
                      f"{got['rcx_left']}, %rdi +{got['rdi_advanced']}, {got['filled']} bytes of "
                      f"{REP_INS_FILL:#x}; ended with '{events[-1] if events else 'nothing'}'")
    exp = upstream(f"the {REP_INS_BYTES} bytes reach user space in KVM_EXIT_IO exits (KVM batches a page at "
                   "most per exit); the guest ends with %rcx = 0, %rdi advanced by the count and every byte "
                   "as user space filled it", want)
    verdict = ("rep insb to a user-space port completes with the right count and data" if ok else
               "rep insb to a user-space port did not complete as upstream: " + obs["text"])
    return result("the rep-ins guest at CPL3 (IOPL 3): rep insb of 8192 bytes from port 0x80 into guest "
                  "memory; the host fills each exit's data with 0xaa", "KVM_RUN until DONE", obs, exp, verdict,
                  status="as-upstream" if ok else "differs",
                  details={"exit_counts": counts, "events": [str(e) for e in events]})
