"""`vmm reg`: registers by name, every class (vmm/regfile.py), from a running guest at a SYNC, a vmm
snapshot file or a Cloud Hypervisor snapshot directory. MSR and KVM register names on a running guest
go through x86 ONE_REG (or KVM_GET/SET_MSRS where ONE_REG is absent), as KVM sees them now."""

import sys

import click

from .. import regs
from ..regfile import RegFileError, check_name, format_value, json_value
from .common import (_emit, exit_for_event, console_echo, device_option, handle_errors, json_option,
                     run_to_end, run_to_sync, timeout_option)

source_arg = click.argument("source", metavar="SOURCE")
sync_option = click.option("--at-sync", "at_sync", type=click.IntRange(1, 1 << 31), default=1, show_default=True,
                           help="A running guest: act at its N-th SYNC.")
vcpu_option = click.option("--vcpu", type=click.IntRange(0, 1023), default=0, show_default=True,
                           help="Which vCPU of the source.")

CLASSES = ("gpr", "segment", "dtable", "control", "debug", "xcr", "msr", "xsave", "lapic", "vcpu")


@click.group("reg")
def reg():
    """Read registers by name from a running guest (at a SYNC), a vmm snapshot or a Cloud Hypervisor
    snapshot directory; write them on a running guest.

    \b
    Names: RAX..R15 RIP RFLAGS; CS..GS SS TR LDTR (.SELECTOR .BASE .LIMIT .ATTRIBUTES); GDTR/IDTR
    .BASE .LIMIT; CR0 CR2 CR3 CR4 CR8 EFER APIC_BASE; DR0-7; XCR0; MSRs by name or index
    (LSTAR, MSR_IA32_XSS, 0xc0000080); XSAVE registers (FCW FSW FTW MXCSR ST0-7 XMM0-15 YMM0-15
    ZMM0-31 K0-7 PKRU TILECFG TMM0-7 ..., as the layout has them, XSTATE_BV XCOMP_BV); LAPIC.<reg>;
    GUEST_SSP (running guests)."""


def _is_file_source(source):
    from ..sources import kind_of
    return kind_of(source) != "guest"


def _boot(guest, device, at_sync, timeout, as_json, vcpu=0):
    from ..guest.machine import Machine
    m = Machine(guest, device=device, on_console=console_echo(as_json), vcpus=vcpu + 1)
    try:
        run_to_sync(m, at_sync, timeout, vcpu=vcpu)
    except BaseException:
        m.close()
        raise
    return m


def _one_reg_name(name):
    """The ONE_REG id for MSR/KVM register names and indices; None for the other classes."""
    try:
        return regs.parse_reg(name)
    except regs.RegError:
        return None


def _row(rf, name):
    r = rf.lookup(name)
    v = rf.get(r.name)
    return {"name": r.name, "class": r.cls, "size": r.size, "value": json_value(v)}, format_value(v, r.size)


def _echo_rows(rows):
    width = max((len(r["name"]) for r, _ in rows), default=0)
    for r, text in rows:
        click.echo(f"{r['name']:<{width}}  {text}")


@reg.command("list")
@source_arg
@click.option("--class", "classes", multiple=True, type=click.Choice(CLASSES),
              help="Only registers of this class (repeatable).")
@vcpu_option
@device_option
@sync_option
@timeout_option
@json_option
@handle_errors
def reg_list(source, classes, vcpu, device, at_sync, timeout, as_json):
    """Every register SOURCE holds, with its value. For a running guest also KVM_GET_REG_LIST and each
    MSR of KVM_GET_MSR_INDEX_LIST this vCPU can read (MSRs are not listed by KVM_GET_REG_LIST)."""
    from .. import sources
    if _is_file_source(source):
        src = sources.open_file_source(source)
        rf = src.regfile(vcpu)
        rows = [_row(rf, r.name) for r in rf.registers(composites=True) if not classes or r.cls in classes]
        if as_json:
            _emit({"source": src.label, "vcpu": vcpu, "registers": [r for r, _ in rows]})
        else:
            _echo_rows(rows)
        return
    from .. import msr_features
    with _boot(source, device, at_sync, timeout, as_json, vcpu) as m:
        acc = regs.RegisterAccess(m.vcpus[vcpu])
        # x86 KVM_GET_REG_LIST came with x86 ONE_REG (Linux 6.18); older kernels answer EINVAL
        listed = m.vcpus[vcpu].get_reg_list() if acc.one_reg else None
        values = acc.readable_msrs(m.kvm.get_msr_index_list())
        unreadable = sorted(set(m.kvm.get_msr_index_list()) - set(values))
        rf = sources.from_machine(m).regfile(vcpu)
        cpuid = m.vcpus[vcpu].cpuid
    state_rows = [_row(rf, r.name) for r in rf.registers(composites=True)
                  if r.cls != "msr" and (not classes or r.cls in classes)]
    rows = [dict(regs.describe(i), value=None, source="KVM_GET_REG_LIST") for i in listed or ()]
    if not classes or "msr" in classes:
        # an MSR the guest's CPUID does not give it (vmm.msr_features) is not part of its state
        rows += [dict(regs.describe(regs.msr(i)), value=hex(v), source="KVM_GET_MSR_INDEX_LIST", **{"class": "msr"},
                      given_to_guest=msr_features.given(i, cpuid), needs=list(msr_features.features_of(i)))
                 for i, v in sorted(values.items())]
    if as_json:
        _emit({"via": acc.via, "vcpu": vcpu, "reg_list": None if listed is None else [hex(i) for i in listed],
               "registers": [dict(r, source="vCPU state") for r, _ in state_rows] + rows,
               "unreadable_msrs": [hex(i) for i in unreadable]})
        return
    _echo_rows(state_rows)
    have = (f"{len(listed)} registers" if listed is not None
            else "not in this kernel (x86 ONE_REG and KVM_GET_REG_LIST arrived in Linux 6.18)")
    click.echo(f"KVM_GET_REG_LIST: {have}; MSRs from KVM_GET_MSR_INDEX_LIST read via {acc.via}")
    for r in rows:
        note = "" if r.get("given_to_guest", True) else f"  not given to this guest (needs {'/'.join(r['needs'])})"
        click.echo(f"  {r['id']}  {r['name']:<28} {r['value'] or '':>18}{note}")
    if unreadable:
        click.echo(f"not readable on this vCPU: {', '.join(regs.name_of(regs.msr(i)) for i in unreadable)}")


@reg.command("get")
@source_arg
@click.argument("names", nargs=-1, required=True)
@vcpu_option
@device_option
@sync_option
@timeout_option
@json_option
@handle_errors
def reg_get(source, names, vcpu, device, at_sync, timeout, as_json):
    """Read NAMES from SOURCE (e.g. `vmm reg get s.snap RIP CR4 XMM0 --vcpu 1`, `vmm reg get ch-snap/
    TMM0`, `vmm reg get sync EFER`). Snapshots are read without KVM."""
    from .. import sources
    if _is_file_source(source):
        src = sources.open_file_source(source)
        rf = src.regfile(vcpu)
        rows = [_row(rf, n) for n in names]  # every name checked before anything is printed
        if as_json:
            _emit({"source": src.label, "vcpu": vcpu, "registers": [r for r, _ in rows]})
        else:
            _echo_rows(rows)
        return
    ids = {n: _one_reg_name(n) for n in names}
    for n in names:  # every name checked before the guest boots
        if ids[n] is None:
            check_name(n)
    with _boot(source, device, at_sync, timeout, as_json, vcpu) as m:
        acc = regs.RegisterAccess(m.vcpus[vcpu])
        rf = sources.from_machine(m).regfile(vcpu) if None in ids.values() else None
        out = []
        for n in names:
            if ids[n] is not None:
                v = acc.get(ids[n])
                out.append((dict(regs.describe(ids[n]), value=hex(v)), format_value(v, 8)))
            else:
                out.append(_row(rf, n))
    if as_json:
        _emit({"source": f"guest {source}", "via": acc.via, "vcpu": vcpu, "registers": [r for r, _ in out]})
        return
    _echo_rows(out)


def _parse_value(text, name):
    try:
        v = int(text.replace("_", ""), 0)
    except ValueError:
        raise RegFileError(f"value for {name} {text!r} is not a number (0x hex or decimal)") from None
    if v < 0:
        raise RegFileError(f"value for {name} {text!r} is negative")
    return v


def _write_piece(vcpu, state, piece):
    """Write one piece of a changed VcpuState to the vCPU through the ioctl that owns it: the
    state's field names are the Vcpu's setter names (regs -> set_regs, xsave -> set_xsave, ...)."""
    getattr(vcpu, f"set_{piece}")(getattr(state, piece))


@reg.command("set")
@click.argument("guest")
@click.argument("assignments", nargs=-1, required=True)
@vcpu_option
@device_option
@sync_option
@timeout_option
@json_option
@handle_errors
def reg_set(guest, assignments, vcpu, device, at_sync, timeout, as_json):
    """Set NAME=VALUE on a running GUEST at its SYNC, read it back, then let the guest continue to its
    end (so a guest such as msr-report shows what it sees). Snapshots are read only."""
    from .. import sources
    if _is_file_source(guest):
        raise RegFileError(f"{guest} is a snapshot: snapshots are read only; `vmm reg set` changes a "
                           "running guest")
    pairs = []
    for a in assignments:
        name, sep, value = a.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise RegFileError(f"expected NAME=VALUE, got {a!r}")
        rid = _one_reg_name(name)
        if rid is None:
            check_name(name)
        pairs.append((name.strip(), rid, regs.parse_assignment(a)[1] if rid is not None
                      else _parse_value(value.strip(), name)))
    with _boot(guest, device, at_sync, timeout, as_json, vcpu) as m:
        v = m.vcpus[vcpu]
        acc = regs.RegisterAccess(v)
        done = []
        for name, rid, value in pairs:
            if rid is not None:
                acc.set(rid, value)
                back, shown, via = acc.get(rid), regs.name_of(rid), acc.via
            else:
                src = sources.from_machine(m)
                rf = src.regfile(vcpu)
                piece = rf.set(name, value)
                _write_piece(v, rf.state, piece)
                r = rf.lookup(name)
                back = sources.from_machine(m).regfile(vcpu).get(r.name)
                shown, via = r.name, f"KVM_SET_{piece.upper()}"
                back = int.from_bytes(back, "little") if isinstance(back, bytes) else back
            done.append((shown, value, back, via))
            if not as_json:
                click.echo(f"set {shown} = 0x{value:x} via {via}; reads back 0x{back:x}")
        ev, syncs = run_to_end(m, timeout, as_json, vcpu=vcpu)
        if as_json:
            _emit({"via": acc.via, "set": [{"name": n, "value": hex(val), "readback": hex(b), "via": via}
                                           for n, val, b, via in done],
                   "console": m.console, "syncs": [hex(s) for s in syncs], "exit": ev.to_json()})
        else:
            click.echo(str(ev))
    sys.exit(exit_for_event(ev))


COMMANDS = [reg]
