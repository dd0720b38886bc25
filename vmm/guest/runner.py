"""The run loop: KVM_RUN until something the caller must see, returned as a typed event."""

import signal
import time
from dataclasses import asdict, dataclass

from .._bindings import ffi, lib
from ..errors import GuestInterrupted
from ..kvm import is_pvm
from . import ports

EXCEPTION_NAMES = {0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM", 8: "DF",
                   10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF", 17: "AC", 18: "MC",
                   19: "XM", 20: "VE", 21: "CP"}


@dataclass
class Event:
    vcpu: int = 0

    kind = "event"

    def to_json(self):
        d = {"event": self.kind}
        for k, v in asdict(self).items():
            d[k] = hex(v) if isinstance(v, int) and k not in ("vcpu", "vector", "suberror", "size", "len")\
                else v
        return d


@dataclass
class Sync(Event):
    value: int = 0
    kind = "sync"

    def __str__(self):
        return f"sync 0x{self.value:x}"


@dataclass
class Done(Event):
    kind = "done"

    def __str__(self):
        return "done"


@dataclass
class Fail(Event):
    code: int = 0
    kind = "fail"

    def __str__(self):
        return f"fail 0x{self.code:x}"


@dataclass
class Fault(Event):
    """An exception delivered to the runtime's CPL0 stub (the guest is stopped in the stub)."""
    vector: int = 0
    error_code: int = 0
    rip: int = 0
    cs: int = 0
    rsp: int = 0
    kind = "fault"

    @property
    def name(self):
        return "#" + EXCEPTION_NAMES.get(self.vector, f"vector {self.vector}")

    def __str__(self):
        ec = f" error 0x{self.error_code:x}" if self.vector in (8, 10, 11, 12, 13, 14, 17, 21) else ""
        return f"fault {self.name} at 0x{self.rip:x} (cpl {self.cs & 3}){ec}"


@dataclass
class Mmio(Event):
    address: int = 0
    is_write: bool = False
    len: int = 0
    data: int = 0
    rip: int = 0
    kind = "mmio"

    def __str__(self):
        op = "write" if self.is_write else "read"
        return f"mmio {op} of {self.len} bytes at 0x{self.address:x} (rip 0x{self.rip:x})"


@dataclass
class Hlt(Event):
    rip: int = 0
    kind = "hlt"

    def __str__(self):
        return f"hlt at 0x{self.rip:x}"


@dataclass
class Shutdown(Event):
    """Triple fault: the vCPU shut down. Registers as KVM left them."""
    rip: int = 0
    rsp: int = 0
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    cpl: int = 0
    kind = "shutdown"

    def __str__(self):
        return f"shutdown (triple fault) rip 0x{self.rip:x} cpl {self.cpl}"


@dataclass
class InternalError(Event):
    suberror: int = 0
    rip: int = 0
    cpl: int = 0
    insn: str = ""
    hint: str = ""
    kind = "internal-error"

    def __str__(self):
        s = f"internal error (suberror {self.suberror}) at 0x{self.rip:x}"
        if self.insn:
            s += f", instruction bytes {self.insn}"
        return s + (f"; {self.hint}" if self.hint else "")


@dataclass
class FailEntry(Event):
    reason: int = 0
    cpu: int = 0
    kind = "fail-entry"

    def __str__(self):
        return f"entry failed: hardware reason 0x{self.reason:x} on cpu {self.cpu}"


@dataclass
class Timeout(Event):
    seconds: float = 0.0
    rip: int = 0
    kind = "timeout"

    def __str__(self):
        return f"timeout after {self.seconds:.2f} s (rip 0x{self.rip:x})"


@dataclass
class Unhandled(Event):
    exit_reason: int = 0
    detail: str = ""
    kind = "unhandled"

    def __str__(self):
        return f"unhandled exit {self.exit_reason}{': ' + self.detail if self.detail else ''}"


TERMINAL = (Done, Fail, Fault, Shutdown, InternalError, FailEntry, Timeout, Unhandled, Hlt, Mmio)

_kick_installed = False


def _install_kick():
    global _kick_installed
    if not _kick_installed:
        r = lib.vmm_kick_install(signal.SIGALRM)
        if r < 0:
            raise OSError(-r, "sigaction(SIGALRM) for the run-loop timeout")
        _kick_installed = True


class Runner:
    """Runs one vCPU and turns its exits into events; console bytes go to `on_console`."""

    def __init__(self, vm, vcpu, on_console=None, args=()):
        self.vm = vm
        self.args = tuple(args)  # host-provided arguments the guest reads from PORT_ARG
        self.arg_selected = 0
        self.vcpu = vcpu
        self.run = vcpu.kvm_run
        self.console = bytearray()
        self.on_console = on_console
        self.exits = 0

    def _io(self):
        io = self.run.io
        data = ffi.cast("uint8_t *", self.run) + io.data_offset
        port, size = io.port, io.size
        out = io.direction == lib.KVM_EXIT_IO_OUT
        value = int.from_bytes(ffi.buffer(data, size), "little") if out else 0
        vid = self.vcpu.id
        if port == ports.COM1_THR and out:
            chunk = bytes(ffi.buffer(data, size * io.count))[::size]
            self.console += chunk
            if self.on_console:
                self.on_console(chunk)
            return None
        if port == ports.COM1_LSR and not out:
            data[0] = ports.LSR_IDLE
            return None
        if port == ports.PORT_SYNC and out:
            return Sync(vid, value)
        if port == ports.PORT_DONE and out:
            return Done(vid)
        if port == ports.PORT_FAIL and out:
            return Fail(vid, value)
        if port == ports.PORT_EXC and out:
            rsp = self.vcpu.get_regs().rsp
            vec, err, rip, cs, _rflags, ursp = (self.vm.mem_at(rsp, 48).read_u64(rsp + 8 * i)
                                                for i in range(6))
            return Fault(vid, vec, err, rip, cs, ursp)
        if port == ports.PORT_ARG and out:
            self.arg_selected = value
            return None
        if port in (ports.PORT_ARG, ports.PORT_ARG_HI, ports.PORT_ARG_COUNT) and not out:
            arg = self.args[self.arg_selected] if self.arg_selected < len(self.args) else 0
            v = {ports.PORT_ARG: arg & 0xFFFFFFFF, ports.PORT_ARG_HI: arg >> 32,
                 ports.PORT_ARG_COUNT: len(self.args)}[port]
            ffi.buffer(data, size)[:] = (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            return None
        if not out:  # unknown input port reads as all-ones, like an empty ISA bus
            ffi.buffer(data, size * io.count)[:] = b"\xff" * (size * io.count)
            return None
        return None  # writes to unknown ports are ignored

    def _internal_error(self):
        r = self.run
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        insn = ""
        if r.internal.suberror == lib.KVM_INTERNAL_ERROR_EMULATION and r.emulation_failure.flags & 1:
            n = min(r.emulation_failure.insn_size, 15)
            insn = bytes(r.emulation_failure.insn_bytes[0:n]).hex(" ")
        if not insn:
            try:
                insn = self.vm.read(regs.rip, 15).hex(" ")
            except ValueError:
                insn = ""
        hint = ""
        if is_pvm() and sregs.cpl == 0:
            hint = ("this host's KVM (kvm_pvm) emulates guest CPL0 code instruction by instruction and "
                    "cannot emulate SSE/AVX/XSAVE instructions: run the payload at CPL3 (--cpl 3)")
        return InternalError(self.vcpu.id, r.internal.suberror, regs.rip, sregs.cpl, insn, hint)

    def step(self):
        """One KVM_RUN; returns an Event, or None when the exit was handled internally."""
        reason = self.vcpu.run()
        self.exits += 1
        r = self.run
        if reason == lib.KVM_EXIT_IO:
            return self._io()
        if reason == lib.KVM_EXIT_INTR:
            return None
        if reason == lib.KVM_EXIT_HLT:
            return Hlt(self.vcpu.id, self.vcpu.get_regs().rip)
        if reason == lib.KVM_EXIT_MMIO:
            m = r.mmio
            return Mmio(self.vcpu.id, m.phys_addr, bool(m.is_write), m.len,
                        int.from_bytes(bytes(m.data[0:m.len]), "little") if m.is_write else 0,
                        self.vcpu.get_regs().rip)
        if reason == lib.KVM_EXIT_SHUTDOWN:
            regs, s = self.vcpu.get_regs(), self.vcpu.get_sregs()
            return Shutdown(self.vcpu.id, regs.rip, regs.rsp, s.cr0, s.cr3, s.cr4, s.cpl)
        if reason == lib.KVM_EXIT_INTERNAL_ERROR:
            return self._internal_error()
        if reason == lib.KVM_EXIT_FAIL_ENTRY:
            return FailEntry(self.vcpu.id, r.fail_entry.hardware_entry_failure_reason, r.fail_entry.cpu)
        if reason == lib.KVM_EXIT_SYSTEM_EVENT:
            return Unhandled(self.vcpu.id, reason, f"system event type {r.system_event.type}")
        return Unhandled(self.vcpu.id, reason)

    def run_until_event(self, timeout=None):
        """KVM_RUN until an event; a wall-clock timeout kicks KVM_RUN with SIGALRM + immediate_exit.
        SIGINT (a KeyboardInterrupt) ends KVM_RUN with EINTR and is raised as GuestInterrupted,
        which tells where the vCPU stopped."""
        start = time.monotonic()
        try:
            return self._run_until_event(start, timeout)
        except KeyboardInterrupt:
            try:
                rip = self.vcpu.get_regs().rip
            except Exception:  # the interrupt itself is what matters
                raise KeyboardInterrupt() from None
            raise GuestInterrupted(self.vcpu.id, rip, time.monotonic() - start) from None

    def _run_until_event(self, start, timeout):
        if timeout is None:
            while True:
                ev = self.step()
                if ev is not None:
                    return ev
        _install_kick()
        lib.vmm_kick_target(self.run)
        deadline = start + timeout
        # a repeating timer: a signal that lands between two KVM_RUNs still leaves
        # immediate_exit set for the next entry, and later ones keep kicking
        signal.setitimer(signal.ITIMER_REAL, max(timeout, 1e-4), 0.01)
        try:
            while True:
                ev = self.step()
                if ev is not None:
                    return ev
                if self.run.exit_reason == lib.KVM_EXIT_INTR or self.run.immediate_exit:
                    now = time.monotonic()
                    if now >= deadline:
                        self.run.immediate_exit = 0
                        return Timeout(self.vcpu.id, now - start, self.vcpu.get_regs().rip)
                    self.run.immediate_exit = 0
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0, 0)
            lib.vmm_kick_target(ffi.NULL)
            self.run.immediate_exit = 0
