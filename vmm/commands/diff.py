"""`vmm diff A B`: register-level differences of every vCPU, then the guest memory extents that differ.
A and B are vmm snapshot files, Cloud Hypervisor snapshot directories, or running guests (run to
--at-sync)."""

import contextlib
import sys

import click

from ..regfile import format_value, json_value
from .common import EXIT_GUEST, EXIT_OK, _emit, device_option, handle_errors, json_option, timeout_option


def _value_json(v):
    if v is None or isinstance(v, bool):
        return v
    return json_value(v)


def _value_text(v, size):
    if v is None:
        return "(absent)"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, str):
        return v
    return format_value(v, size or 8)


class _Side:
    """One side of the diff: a StateSource plus its guest memory, when vmm can read it, as
    (extents that may hold data, read(gpa, n))."""

    def __init__(self, spec, stack, at_sync, timeout, device):
        from .. import sources
        from ..statediff import memory_reader
        from .common import run_to_sync
        self.spec = spec
        self.memory = None
        if sources.kind_of(spec) == "guest":
            from ..guest.machine import Machine
            m = stack.enter_context(Machine(spec, device=device))
            run_to_sync(m, at_sync, timeout)
            self.src = sources.from_machine(m, f"guest {spec} at SYNC {at_sync}")
            slots = [(mem.gpa, mem.size, lambda off, n, g=mem.gpa: m.vm.read(g + off, n)) for mem in m.vm.memory]
            self.memory = ([(g, size) for g, size, _ in slots], memory_reader(slots))
            return
        self.src = sources.open_file_source(spec)
        snap = self.src.snapshot
        if self.src.kind == "snapshot":
            f = stack.enter_context(open(spec, "rb"))
            slots, extents = [], []
            for mm in snap.memory:
                base = snap.sections[f"mem.{mm['slot']}"].offset
                slots.append((mm["gpa"], mm["size"], _file_fetch(f, base)))
                extents += [(mm["gpa"] + o, n) for o, n, _ in mm["extents"]]
            self.memory = (extents, memory_reader(slots))
        elif snap.memory_file is not None:  # Cloud Hypervisor: memory-ranges, ranges back to back
            f = stack.enter_context(open(snap.memory_file, "rb"))
            slots = [(g, n, _file_fetch(f, off)) for g, n, off in snap.memory_ranges]
            self.memory = ([(g, n) for g, n, _ in snap.memory_ranges], memory_reader(slots))


def _file_fetch(f, base):
    def fetch(off, n):
        f.seek(base + off)
        data = f.read(n)
        if len(data) != n:
            raise ValueError(f"{f.name}: truncated at offset {base + off + len(data)}")
        return data
    return fetch


@click.command("diff")
@click.argument("a")
@click.argument("b")
@click.option("--at-sync", "at_sync", type=click.IntRange(1, 1 << 31), default=1, show_default=True,
              help="A side that is a running guest is compared at its N-th SYNC.")
@click.option("--no-memory", is_flag=True, help="Compare registers only.")
@timeout_option
@device_option
@json_option
@handle_errors
def diff_cmd(a, b, at_sync, no_memory, timeout, device, as_json):
    """Compare A and B register by register for every vCPU (GPRs, segments, control and debug
    registers, XCR0, MSRs by name, LAPIC, XSTATE_BV/XCOMP_BV and each XSAVE register, CPUID fields),
    then list the guest memory extents that differ. Exit status 0 when equal, 1 when not."""
    from ..statediff import diff_memory, diff_vcpus
    with contextlib.ExitStack() as stack:
        sa = _Side(a, stack, at_sync, timeout, device)
        sb = _Side(b, stack, at_sync, timeout, device)
        na, nb = len(sa.src.vcpus), len(sb.src.vcpus)
        vcpus = []
        for i in range(min(na, nb)):
            vcpus.append((i, diff_vcpus(sa.src.regfile(i), sb.src.regfile(i))))
        memory, mem_note = None, None
        if no_memory:
            mem_note = "not compared (--no-memory)"
        elif sa.memory is None or sb.memory is None:
            which = a if sa.memory is None else b
            mem_note = f"not compared: vmm does not read the guest memory of {which}"
        else:
            memory = diff_memory(sa.memory[0], sb.memory[0], sa.memory[1], sb.memory[1])
    equal = na == nb and not any(d for _, d in vcpus) and not memory
    if as_json:
        _emit({"a": sa.src.label, "b": sb.src.label, "equal": equal, "vcpu_count": [na, nb],
               "vcpus": [{"vcpu": i, "differences": [{"class": d.cls, "name": d.name, "a": _value_json(d.a),
                                                       "b": _value_json(d.b)} for d in ds]}
                         for i, ds in vcpus],
               "memory": None if memory is None else [{"gpa": hex(g), "length": n} for g, n in memory],
               "memory_note": mem_note})
    else:
        click.echo(f"A: {sa.src.label}")
        click.echo(f"B: {sb.src.label}")
        if na != nb:
            click.echo(f"vCPUs: A has {na}, B has {nb}; the first {min(na, nb)} are compared")
        for i, ds in vcpus:
            if not ds:
                click.echo(f"vcpu {i}: registers equal")
                continue
            click.echo(f"vcpu {i}: {len(ds)} difference{'s' * (len(ds) != 1)}")
            width = max(len(d.name) for d in ds)
            for d in ds:
                click.echo(f"  {d.cls:<13} {d.name:<{width}}  {_value_text(d.a, d.size)}  ->  "
                           f"{_value_text(d.b, d.size)}")
        if mem_note:
            click.echo(f"memory: {mem_note}")
        elif not memory:
            click.echo("memory: equal")
        else:
            total = sum(n for _, n in memory)
            click.echo(f"memory: {len(memory)} extent{'s' * (len(memory) != 1)} differ ({total} bytes)")
            for g, n in memory:
                click.echo(f"  0x{g:x}..0x{g + n:x} ({n} bytes)")
    sys.exit(EXIT_OK if equal else EXIT_GUEST)


COMMANDS = [diff_cmd]
