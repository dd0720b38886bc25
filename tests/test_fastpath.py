"""The C fast path of vCPU state save/restore (vmm/fastpath.py, cdefs/fastpath.c) on real KVM: the
same bytes as the Python paths, fewer ioctls, deferred pieces that take effect at the next KVM_RUN,
the conditions that stop deferral, errors, and the bench floor program."""

import errno
import importlib.util
import shutil
import subprocess
import struct
from pathlib import Path

import pytest

from vmm import state
from vmm._bindings import ffi, lib
from vmm.errors import KvmError, StateError
from vmm.fastpath import SYNC_ALL, FastState, FastVcpu
from vmm.guest.runner import Done, Sync

MSR_TSC = 0x10
APIC_TASKPRI = 0x80
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _needs_sync_regs(kvm):
    if (kvm.check_extension(lib.KVM_CAP_SYNC_REGS) & SYNC_ALL) != SYNC_ALL:
        pytest.skip("KVM_CAP_SYNC_REGS does not cover regs, sregs and events here")


def assert_same_state(a, b):
    """VcpuStates equal field by field; the TSC MSR is a running counter, so only its presence and
    a plausible distance are compared."""
    for f in ("cpuid", "mp_state", "regs", "sregs", "xsave", "xcrs", "events", "debugregs", "lapic",
              "tsc_khz", "cpuid_kvm"):
        assert getattr(a, f) == getattr(b, f), f
    assert list(a.msrs) == list(b.msrs)
    ta, tb = a.msrs.pop(MSR_TSC, None), b.msrs.pop(MSR_TSC, None)
    assert (ta is None) == (tb is None)
    if ta is not None:
        assert abs(ta - tb) < 10 * 10**9, "TSC values seconds apart"
    assert a.msrs == b.msrs


def raw_without_tsc(st):
    raw = st.raw()
    entries = bytearray(raw["msrs"])
    for i, idx in enumerate(st.msr_indices):
        if idx == MSR_TSC:
            entries[16 * i + 8:16 * i + 16] = bytes(8)
    raw["msrs"] = bytes(entries)
    return raw


def test_fast_save_is_save_state(machine):
    """One C call reports exactly what save_state reports (checkpoint guest: GPRs, x87 and every
    XSAVE component this host has)."""
    m = machine("checkpoint")
    assert isinstance(m.run(timeout=10), Sync)
    fp = FastVcpu(m.vcpu)
    st = fp.save()
    assert (fp.vcpu_ioctls, fp.vm_ioctls) == (7, 1)  # KVM_RUN + 6 GETs; KVM_CAP_XSAVE2 on the VM fd
    assert m.vcpu.kvm_run.exit_reason == lib.KVM_EXIT_INTR  # as Vcpu.run() leaves it
    assert_same_state(fp.to_state(st), state.save_state(m.vcpu))
    assert raw_without_tsc(fp.save_py()) == raw_without_tsc(fp.save())  # C and Python: same bytes
    assert_same_state(state.save_state_fast(m.vcpu), state.save_state(m.vcpu))
    # without KVM_CAP_SYNC_REGS: GET_REGS/SREGS/VCPU_EVENTS instead, the same state
    plain = FastVcpu(m.vcpu, sync_regs=False)
    assert raw_without_tsc(plain.save()) == raw_without_tsc(fp.save())
    assert plain.vcpu_ioctls == 10
    plain.restore(st)
    assert (plain.vcpu_ioctls, plain.deferred) == (9, 0)


def test_fast_save_completes_pending_io(machine):
    m = machine("hello")
    assert m.vcpu.run() == lib.KVM_EXIT_IO and m.vcpu.kvm_run.io.port == 0x3FD
    rip_at_exit = m.vcpu.get_regs().rip
    st = FastVcpu(m.vcpu).save()
    assert st.c.regs.rip == rip_at_exit + 1  # `in %dx, %al` completed, as save_state does


def test_restore_of_a_foreign_state_matches_restore_state(machine):
    """A saved VcpuState restored into two fresh VMs, by restore_state and by the fast path: KVM then
    reports the same state for both, and the checkpoint guest finds every register intact."""
    src = machine("checkpoint")
    assert isinstance(src.run(timeout=10), Sync)
    saved = state.save_state(src.vcpu)
    image = src.vm.read(0, src.memory.size)
    slow, fast = machine("hello"), machine("hello")
    for m in (slow, fast):
        m.vm.write(0, image)
    state.restore_state(slow.vcpu, saved)
    fp = state.fast_path(fast.vcpu)
    st = fp.load(saved)
    fp.restore(st)
    # not trusted yet: every piece by ioctl, in the documented order, nothing left in kvm_run
    assert (fp.vcpu_ioctls, fp.deferred, fp.pending) == (9, 0, 0)
    assert fast.vcpu.get_regs() == saved.regs
    assert_same_state(state.save_state(fast.vcpu), state.save_state(slow.vcpu))
    assert fast.vcpu.get_xsave() == saved.xsave
    for m in (slow, fast):
        ev = m.run(timeout=10)
        assert isinstance(ev, Done), f"{ev} (FAIL codes: 0x1nn GPR, 0x2nn ZMM, 0x3nn K, 0x4nn x87)"


def test_rewind_defers_regs_until_the_next_kvm_run(machine):
    """Restoring a state saved from the same vCPU: 6 ioctls, regs/sregs/events ride on kvm_run.
    KVM reports the old registers until the next KVM_RUN loads them; the guest then replays."""
    m = machine("sync")
    assert m.run(timeout=5) == Sync(0, 0x11)
    fp = FastVcpu(m.vcpu)
    st = fp.save()
    saved = fp.to_state(st)
    assert m.run(timeout=5) == Sync(0, 0x22)
    fp.restore(st)
    assert (fp.vcpu_ioctls, fp.deferred, fp.pending) == (6, SYNC_ALL, SYNC_ALL)
    assert m.vcpu.get_regs().rax == 0x22  # not loaded yet
    fp.flush()
    assert fp.pending == 0
    assert m.vcpu.get_regs() == saved.regs
    assert_same_state(state.save_state(m.vcpu), saved)
    # and again without flush: the guest's own KVM_RUN loads them
    fp.restore(st)
    assert [m.run(timeout=5) for _ in range(3)] == [Sync(0, 0x22), Sync(0, 0x33), Done(0)]


def test_c_and_python_restores_leave_the_same_state(machine):
    m = machine("sync")
    assert m.run(timeout=5) == Sync(0, 0x11)
    fp = FastVcpu(m.vcpu)
    st = fp.save()
    after = []
    for restore in (fp.restore_py, fp.restore):
        assert m.run(timeout=5) == Sync(0, 0x22)
        restore(st)
        after.append((fp.vcpu_ioctls, fp.deferred))
        fp.flush()
        after.append(raw_without_tsc(fp.save()))
    assert after[0] == after[2] == (6, SYNC_ALL)
    assert after[1] == after[3] == raw_without_tsc(st)


def test_what_stops_deferral(machine):
    m = machine("sync")
    assert m.run(timeout=5) == Sync(0, 0x11)
    fp = FastVcpu(m.vcpu)
    st = fp.save()
    sregs_bit = lib.KVM_SYNC_X86_SREGS
    # the APIC base the vCPU has (kvm_run.apic_base) differs: sregs by ioctl, before the LAPIC
    m.vcpu.kvm_run.apic_base ^= 0x100
    fp.restore(st)
    assert (fp.vcpu_ioctls, fp.deferred) == (7, SYNC_ALL & ~sregs_bit)
    fp.flush()
    # a TPR that CR8 cannot express (KVM_SET_SREGS would zero its low nibble)
    tpr = fp.save()
    struct.pack_into("<I", ffi.buffer(tpr._lapic), APIC_TASKPRI, 0x15)
    fp.restore(tpr)
    assert (fp.vcpu_ioctls, fp.deferred) == (7, SYNC_ALL & ~sregs_bit)
    fp.flush()
    assert struct.unpack_from("<I", m.vcpu.get_lapic(), APIC_TASKPRI)[0] == 0x15
    assert m.vcpu.get_sregs().cr8 == 1
    fp.restore(st)
    assert (fp.vcpu_ioctls, fp.deferred) == (6, SYNC_ALL)
    fp.flush()
    assert m.vcpu.get_sregs().cr8 == 0
    # an mp_state other than RUNNABLE/HALTED: nothing deferred
    st.c.mp_state.mp_state = lib.KVM_MP_STATE_INIT_RECEIVED
    assert fp._deferrable_py(st) == 0
    fp.restore(st)
    assert (fp.vcpu_ioctls, fp.deferred) == (9, 0)
    assert m.vcpu.get_mp_state() == lib.KVM_MP_STATE_INIT_RECEIVED
    st.c.mp_state.mp_state = lib.KVM_MP_STATE_RUNNABLE
    fp.restore(st)
    assert (fp.vcpu_ioctls, fp.deferred) == (6, SYNC_ALL)
    # forced, or buffers from elsewhere: every piece by ioctl
    fp.no_defer = True
    fp.restore(st)
    assert (fp.vcpu_ioctls, fp.deferred) == (9, 0)
    fp.no_defer = False
    other = FastVcpu(m.vcpu)
    other.restore(st)  # trusted on `fp`, not on `other`
    assert (other.vcpu_ioctls, other.deferred) == (9, 0)
    other.restore(st)
    assert (other.vcpu_ioctls, other.deferred) == (6, SYNC_ALL)
    assert [m.run(timeout=5) for _ in range(3)] == [Sync(0, 0x22), Sync(0, 0x33), Done(0)]


def test_restore_state_drops_a_pending_fast_restore(machine):
    """restore_state after a fast restore that KVM has not loaded yet: restore_state's state wins."""
    m = machine("sync")
    assert m.run(timeout=5) == Sync(0, 0x11)
    at_11 = state.save_state(m.vcpu)
    fp = FastVcpu(m.vcpu)
    st = fp.save()
    assert m.run(timeout=5) == Sync(0, 0x22)
    at_22 = state.save_state(m.vcpu)
    fp.restore(st)  # back to 0x11, pending
    state.restore_state(m.vcpu, at_22, order=[s for s in state.RESTORE_ORDER if s != "cpuid"])
    assert m.run(timeout=5) == Sync(0, 0x33)
    assert at_11.regs.rip != at_22.regs.rip


def test_errors(machine):
    m = machine("sync")
    assert m.run(timeout=5) == Sync(0, 0x11)
    # an MSR KVM will not read: named, as Vcpu.get_msrs names it
    fp = FastVcpu(m.vcpu, msr_indices=[MSR_TSC, 0xDEADBEEF])
    with pytest.raises(KvmError, match="MSR 0xdeadbeef") as e:
        fp.save()
    assert e.value.ioctl == "KVM_GET_MSRS"
    fp = FastVcpu(m.vcpu)
    st = fp.save()
    # buffers whose XSAVE area is not the size KVM_CAP_XSAVE2 says: the C code refuses, no overflow
    wrong = FastState(fp.msr_indices, fp.xsave_size // 2, True)
    assert lib.vmm_fp_save(fp.c, wrong.c) == -errno.EMSGSIZE
    assert fp.c.step == lib.VMM_FP_STEP_XSAVE_SIZE and fp.c.done == fp.xsave_size
    with pytest.raises(StateError, match="not made for this vCPU"):
        fp.save(wrong)
    # state for a guest without XFD carrying XFD: refused by load(), before any ioctl
    s = fp.to_state(st)
    s.msrs[state.MSR_IA32_XFD] = 0
    with pytest.raises(StateError, match=r"0x1c4 \(XFD\)"):
        fp.load(s)
    # KVM rejects a piece: the error names the ioctl
    bad = fp.load(fp.to_state(st))
    bad.c.xcrs.xcrs[0].value = 0  # XCR0 without x87
    with pytest.raises(KvmError) as e:
        fp.restore(bad)
    assert e.value.ioctl == "KVM_SET_XCRS"
    m.vcpu.close()
    with pytest.raises(StateError, match="closed"):
        fp.save(st)


def test_bench_floor_program_runs(kvm, tmp_path):
    """bench/floor.c builds and measures on the same set-up as the bench's vmm VM (tiny counts)."""
    if not shutil.which("gcc") or not shutil.which("as"):
        pytest.skip("gcc/as missing")
    spec = importlib.util.spec_from_file_location("vmm_bench", ROOT / "bench" / "bench.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    guest, floor = bench.build()
    from vmm.guest.machine import Machine
    with Machine(str(guest), kvm=kvm) as m:
        fp = FastVcpu(m.vcpu)
        bench.write_setup(tmp_path / "setup.bin", m, fp.msr_indices)
        assert m.run(timeout=5) == Sync(0, 1)
    out = subprocess.run([str(floor), str(tmp_path / "setup.bin"), "20", "0.5", "50", "2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    import json
    r = json.loads(out.stdout)
    assert r["nmsrs"] == len(fp.msr_indices) and r["save"]["n"] == 20 and r["pio_exit"]["n"] == 2
    assert 0 < r["save"]["min_ns"] <= r["save"]["median_ns"]
