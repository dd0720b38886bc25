"""The run loop: KVM_RUN until something the caller must see, returned as a typed event."""

import time
from dataclasses import asdict, dataclass

from .._bindings import ffi, lib
from ..errors import GuestInterrupted, KvmError
from ..kvm import is_pvm
from ..records import Record
from . import ports

EXCEPTION_NAMES = {0: "DE", 1: "DB", 2: "NMI", 3: "BP", 4: "OF", 5: "BR", 6: "UD", 7: "NM", 8: "DF",
                   10: "TS", 11: "NP", 12: "SS", 13: "GP", 14: "PF", 16: "MF", 17: "AC", 18: "MC",
                   19: "XM", 20: "VE", 21: "CP"}


@dataclass(init=False, repr=False, eq=False)  # cheap to build: vmm/records.py
class Event(Record):
    """Something the caller of the run loop must see, from vCPU `vcpu`."""

    vcpu: int = 0

    kind = "event"

    def __init__(self, vcpu=0):
        self.vcpu = vcpu

    def to_json(self):
        d = {"event": self.kind}
        for k, v in asdict(self).items():
            d[k] = hex(v) if isinstance(v, int) and k not in ("vcpu", "vector", "suberror", "size", "len")\
                else v
        return d


@dataclass(init=False, repr=False, eq=False)
class Sync(Event):
    """The guest wrote `value` to the SYNC port (0x500): a sync point."""

    value: int = 0
    kind = "sync"

    def __init__(self, vcpu=0, value=0):
        self.vcpu, self.value = vcpu, value

    def __str__(self):
        return f"sync 0x{self.value:x}"


@dataclass(init=False, repr=False, eq=False)
class Done(Event):
    """The guest reported that it finished (port 0x501)."""

    kind = "done"

    def __str__(self):
        return "done"


@dataclass(init=False, repr=False, eq=False)
class Fail(Event):
    """The guest reported a failure `code` (port 0x502)."""

    code: int = 0
    kind = "fail"

    def __init__(self, vcpu=0, code=0):
        self.vcpu, self.code = vcpu, code

    def __str__(self):
        return f"fail 0x{self.code:x}"


@dataclass(init=False, repr=False, eq=False)
class Fault(Event):
    """An exception delivered to the runtime's CPL0 stub (the guest is stopped in the stub)."""

    vector: int = 0
    error_code: int = 0
    rip: int = 0
    cs: int = 0
    rsp: int = 0
    kind = "fault"

    def __init__(self, vcpu=0, vector=0, error_code=0, rip=0, cs=0, rsp=0):
        self.vcpu, self.vector, self.error_code, self.rip, self.cs, self.rsp = vcpu, vector, error_code, rip, cs, rsp

    @property
    def name(self):
        return "#" + EXCEPTION_NAMES.get(self.vector, f"vector {self.vector}")

    def __str__(self):
        ec = f" error 0x{self.error_code:x}" if self.vector in (8, 10, 11, 12, 13, 14, 17, 21) else ""
        return f"fault {self.name} at 0x{self.rip:x} (cpl {self.cs & 3}){ec}"


@dataclass(init=False, repr=False, eq=False)
class Mmio(Event):
    """An access to guest-physical memory no slot backs (KVM_EXIT_MMIO)."""

    address: int = 0
    is_write: bool = False
    len: int = 0
    data: int = 0
    rip: int = 0
    kind = "mmio"

    def __init__(self, vcpu=0, address=0, is_write=False, len=0, data=0, rip=0):  # noqa: A002 (kvm_run's name)
        self.vcpu, self.address, self.is_write, self.len, self.data, self.rip = vcpu, address, is_write, len, data, rip

    def __str__(self):
        op = "write" if self.is_write else "read"
        return f"mmio {op} of {self.len} bytes at 0x{self.address:x} (rip 0x{self.rip:x})"


@dataclass(init=False, repr=False, eq=False)
class Hlt(Event):
    """HLT with no in-kernel LAPIC to wait in (KVM_EXIT_HLT)."""

    rip: int = 0
    kind = "hlt"

    def __init__(self, vcpu=0, rip=0):
        self.vcpu, self.rip = vcpu, rip

    def __str__(self):
        return f"hlt at 0x{self.rip:x}"


@dataclass(init=False, repr=False, eq=False)
class Shutdown(Event):
    """Triple fault: the vCPU shut down. Registers as KVM left them."""

    rip: int = 0
    rsp: int = 0
    cr0: int = 0
    cr3: int = 0
    cr4: int = 0
    cpl: int = 0
    kind = "shutdown"

    def __init__(self, vcpu=0, rip=0, rsp=0, cr0=0, cr3=0, cr4=0, cpl=0):
        self.vcpu, self.rip, self.rsp, self.cr0, self.cr3, self.cr4, self.cpl = vcpu, rip, rsp, cr0, cr3, cr4, cpl

    def __str__(self):
        return f"shutdown (triple fault) rip 0x{self.rip:x} cpl {self.cpl}"


@dataclass(init=False, repr=False, eq=False)
class InternalError(Event):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not go on (e.g. an instruction it cannot emulate)."""

    suberror: int = 0
    rip: int = 0
    cpl: int = 0
    insn: str = ""
    hint: str = ""
    kind = "internal-error"

    def __init__(self, vcpu=0, suberror=0, rip=0, cpl=0, insn="", hint=""):
        self.vcpu, self.suberror, self.rip, self.cpl, self.insn, self.hint = vcpu, suberror, rip, cpl, insn, hint

    def __str__(self):
        s = f"internal error (suberror {self.suberror}) at 0x{self.rip:x}"
        if self.insn:
            s += f", instruction bytes {self.insn}"
        return s + (f"; {self.hint}" if self.hint else "")


@dataclass(init=False, repr=False, eq=False)
class FailEntry(Event):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused to enter the guest."""

    reason: int = 0
    cpu: int = 0
    kind = "fail-entry"

    def __init__(self, vcpu=0, reason=0, cpu=0):
        self.vcpu, self.reason, self.cpu = vcpu, reason, cpu

    def __str__(self):
        return f"entry failed: hardware reason 0x{self.reason:x} on cpu {self.cpu}"


@dataclass(init=False, repr=False, eq=False)
class Timeout(Event):
    """The run's wall-clock limit passed after `seconds`; the guest was at `rip`."""

    seconds: float = 0.0
    rip: int = 0
    kind = "timeout"

    def __init__(self, vcpu=0, seconds=0.0, rip=0):
        self.vcpu, self.seconds, self.rip = vcpu, seconds, rip

    def __str__(self):
        return f"timeout after {self.seconds:.2f} s (rip 0x{self.rip:x})"


@dataclass(init=False, repr=False, eq=False)
class Unhandled(Event):
    """An exit this run loop does not handle."""

    exit_reason: int = 0
    detail: str = ""
    kind = "unhandled"

    def __init__(self, vcpu=0, exit_reason=0, detail=""):
        self.vcpu, self.exit_reason, self.detail = vcpu, exit_reason, detail

    def __str__(self):
        return f"unhandled exit {self.exit_reason}{': ' + self.detail if self.detail else ''}"


TERMINAL = (Done, Fail, Fault, Shutdown, InternalError, FailEntry, Timeout, Unhandled, Hlt, Mmio)

TIMER_INTERVAL_NS = 10_000_000  # after the first kick at the deadline, one every 10 ms


class Runner:
    """Runs one vCPU and turns its exits into events; console bytes go to `on_console`.

    The hot loop is C (cdefs/runloop.c): writes to ports outside the protocol, reads of the COM1
    line status and of unknown ports, and signal kicks before the deadline never come back to
    Python. Everything else is dispatched here through tables made once per Runner."""

    def __init__(self, vm, vcpu, on_console=None, args=()):
        self.vm = vm
        self.args = tuple(args)  # host-provided arguments the guest reads from PORT_ARG
        self.arg_selected = 0
        self.vcpu = vcpu
        self.run = vcpu.kvm_run
        self.console = bytearray()
        self.on_console = on_console
        self._out = {ports.COM1_THR: self._console, ports.PORT_SYNC: self._sync,
                     ports.PORT_DONE: self._done, ports.PORT_FAIL: self._fail, ports.PORT_EXC: self._fault,
                     ports.PORT_ARG: self._select_arg}
        self._in = {ports.PORT_ARG: self._arg_low, ports.PORT_ARG_HI: self._arg_high,
                    ports.PORT_ARG_COUNT: lambda: len(self.args)}
        self._exit = {lib.KVM_EXIT_INTR: _ignore, lib.KVM_EXIT_IO: self._io, lib.KVM_EXIT_HLT: self._hlt, lib.KVM_EXIT_MMIO: self._mmio,
                      lib.KVM_EXIT_SHUTDOWN: self._shutdown, lib.KVM_EXIT_INTERNAL_ERROR: self._internal_error,
                      lib.KVM_EXIT_FAIL_ENTRY: self._fail_entry, lib.KVM_EXIT_SYSTEM_EVENT: self._system_event}
        loop = self._loop = ffi.new("struct vmm_loop *")
        loop.fd, loop.run = vcpu.fd, self.run
        wanted = sorted(set(self._out) | set(self._in))
        loop.nports = len(wanted)
        loop.ports[0:len(wanted)] = wanted
        loop.in_port, loop.in_value = ports.COM1_LSR, ports.LSR_IDLE
        self._in_raw = {}

    def serve_port_in(self, port, fn):
        """Let fn(kvm_run.io, data pointer) fill guest reads of `port`: all size * count bytes of a
        string read (rep ins) at once. Its return value, an Event or None, is what the exit gives.
        Raises ValueError when the C loop has no room for another port."""
        loop = self._loop
        if port not in loop.ports[0:loop.nports]:
            if loop.nports >= len(loop.ports):
                raise ValueError(f"the run loop hands at most {len(loop.ports)} ports to Python")
            loop.ports[loop.nports] = port
            loop.nports += 1
        self._in_raw[port] = fn

    @property
    def exits(self):
        """KVM_RUN returns so far, handled in C or not."""
        return self._loop.exits

    # --- exits the C loop returns -------------------------------------------------------------
    def _io(self, reason):
        loop = self._loop
        if loop.out:
            handler = self._out.get(loop.port)
            return handler() if handler else None  # writes to other ports are ignored
        data = ffi.cast("uint8_t *", self.run) + self.run.io.data_offset
        if loop.port in self._in_raw:
            return self._in_raw[loop.port](self.run.io, data)
        handler = self._in.get(loop.port)
        if handler is None:  # reads as all-ones, like an empty ISA bus
            n = loop.size * loop.count
            ffi.memmove(data, b"\xff" * n, n)
        else:
            size = loop.size
            ffi.memmove(data, (handler() & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), size)
        return None

    def _select_arg(self):
        self.arg_selected = self._loop.value
        return None

    def _arg(self):
        return self.args[self.arg_selected] if self.arg_selected < len(self.args) else 0

    def _arg_low(self):
        return self._arg() & 0xFFFFFFFF

    def _arg_high(self):
        return self._arg() >> 32

    def _console(self):
        loop = self._loop
        data = ffi.cast("uint8_t *", self.run) + self.run.io.data_offset
        chunk = ffi.buffer(data, loop.size * loop.count)[::loop.size]
        self.console += chunk
        if self.on_console:
            self.on_console(chunk)
        return None

    def _sync(self):
        return Sync(self.vcpu.id, self._loop.value)

    def _done(self):
        return Done(self.vcpu.id)

    def _fail(self):
        return Fail(self.vcpu.id, self._loop.value)

    def _fault(self):
        rsp = self.vcpu.get_regs().rsp
        vec, err, rip, cs, _rflags, ursp = (self.vm.mem_at(rsp, 48).read_u64(rsp + 8 * i) for i in range(6))
        return Fault(self.vcpu.id, vec, err, rip, cs, ursp)

    def _hlt(self, reason):
        return Hlt(self.vcpu.id, self.vcpu.get_regs().rip)

    def _mmio(self, reason):
        m = self.run.mmio
        return Mmio(self.vcpu.id, m.phys_addr, bool(m.is_write), m.len,
                    int.from_bytes(bytes(m.data[0:m.len]), "little") if m.is_write else 0,
                    self.vcpu.get_regs().rip)

    def _shutdown(self, reason):
        regs, s = self.vcpu.get_regs(), self.vcpu.get_sregs()
        return Shutdown(self.vcpu.id, regs.rip, regs.rsp, s.cr0, s.cr3, s.cr4, s.cpl)

    def _fail_entry(self, reason):
        r = self.run
        return FailEntry(self.vcpu.id, r.fail_entry.hardware_entry_failure_reason, r.fail_entry.cpu)

    def _system_event(self, reason):
        return Unhandled(self.vcpu.id, reason, f"system event type {self.run.system_event.type}")

    def _internal_error(self, reason):
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
            kind = vector_insn_kind(insn)
            hint = ("this host's KVM (kvm_pvm) emulates guest CPL0 code instruction by instruction and "
                    + (f"cannot emulate {kind} instructions" if kind else
                       f"could not emulate the instruction at 0x{regs.rip:x} ({insn or 'bytes unknown'})")
                    + ": run the payload at CPL3 (--cpl 3)")
        return InternalError(self.vcpu.id, r.internal.suberror, regs.rip, sregs.cpl, insn, hint)

    # --- the loop -----------------------------------------------------------------------------
    def run_until_event(self, timeout=None):
        """KVM_RUN until an event. A wall-clock `timeout` (seconds) is armed once for the whole
        call: a SIGALRM timer whose C handler sets immediate_exit (cdefs/runloop.c). SIGINT (a
        KeyboardInterrupt) ends KVM_RUN with EINTR and is raised as GuestInterrupted, which tells
        where the vCPU stopped. Raises KvmError when KVM_RUN fails."""
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
        loop, handlers, run = self._loop, self._exit, self.run
        if timeout is not None:
            r = lib.vmm_loop_arm(loop, max(int(timeout * 1e9), 1000), TIMER_INTERVAL_NS)
            if r < 0:
                raise OSError(-r, "sigaction/setitimer for the run-loop timeout")
        try:
            while True:
                # Python runs its signal handlers (SIGINT) when this call returns
                r = lib.vmm_run_loop(loop)
                if r == _LOOP_EXIT:
                    reason = run.exit_reason
                    handler = handlers.get(reason)
                    ev = handler(reason) if handler else Unhandled(self.vcpu.id, reason)
                    if ev is not None:
                        return ev
                elif r == _LOOP_TIMEOUT:
                    return Timeout(self.vcpu.id, time.monotonic() - start, self.vcpu.get_regs().rip)
                else:
                    raise KvmError("KVM_RUN", -r)
        finally:
            if timeout is not None:
                lib.vmm_loop_disarm(loop)


_LOOP_EXIT, _LOOP_TIMEOUT = lib.VMM_LOOP_EXIT, lib.VMM_LOOP_TIMEOUT

_LEGACY_PREFIXES = {0x66, 0x67, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0xF0}


def vector_insn_kind(insn_hex):
    """"AVX" (a VEX or EVEX prefix), "XSAVE" (0F AE /4-/6, 0F C7 /3-/5 with a memory operand,
    XGETBV/XSETBV 0F 01 D0/D1), "SSE" (the 0F opcodes of SSE to SSE4, 0F 38, 0F 3A, LDMXCSR/STMXCSR)
    for an instruction given as hex bytes ("0f 28 c1"), or None for anything else (SDM vol. 2, opcode
    map, appendix A). Approximate: it names what kvm_pvm's CPL0 emulator is known to fail on."""
    try:
        b = bytes.fromhex(insn_hex)
    except ValueError:
        return None
    i = 0
    while i < len(b) and b[i] in _LEGACY_PREFIXES:
        i += 1
    if i < len(b) and b[i] in (0xC4, 0xC5, 0x62):  # in 64-bit mode always VEX/EVEX
        return "AVX"
    if i < len(b) and 0x40 <= b[i] <= 0x4F:  # REX
        i += 1
    if i + 1 >= len(b) or b[i] != 0x0F:
        return None
    op = b[i + 1]
    modrm = b[i + 2] if i + 2 < len(b) else None
    if op == 0x01 and modrm in (0xD0, 0xD1):
        return "XSAVE"
    reg = None if modrm is None or modrm >> 6 == 3 else modrm >> 3 & 7  # memory forms only
    if op == 0xAE and reg in (2, 3):  # LDMXCSR, STMXCSR
        return "SSE"
    if (op == 0xAE and reg in (4, 5, 6)) or (op == 0xC7 and reg in (3, 4, 5)):  # XSAVE/XRSTOR/XSAVEOPT; XRSTORS/XSAVEC/XSAVES
        return "XSAVE"
    if op in (0x38, 0x3A) or 0x10 <= op <= 0x17 or 0x28 <= op <= 0x2F or 0x50 <= op <= 0x7F \
            or op in (0xC2, 0xC4, 0xC5, 0xC6) or op >= 0xD0:
        return "SSE"
    return None


def _ignore(reason):
    return None
