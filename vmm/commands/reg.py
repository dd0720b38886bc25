"""`vmm reg`: registers by name through x86 ONE_REG (or KVM_GET/SET_MSRS where ONE_REG is absent)."""

import sys

import click

from .. import regs
from .common import (_emit, exit_for_event, console_echo, device_option, handle_errors, json_option,
                     run_to_end, run_to_sync, timeout_option)

guest_arg = click.argument("guest")
sync_option = click.option("--at-sync", "at_sync", type=click.IntRange(min=1), default=1, show_default=True,
                           help="Act at the guest's N-th SYNC.")


@click.group("reg")
def reg():
    """Read and write vCPU registers by name or id (x86 KVM_GET/SET_ONE_REG)."""


def _boot(guest, device, at_sync, timeout, as_json):
    from ..guest.machine import Machine
    m = Machine(guest, device=device, on_console=console_echo(as_json))
    try:
        run_to_sync(m, at_sync, timeout)
    except BaseException:
        m.close()
        raise
    return m


@reg.command("list")
@guest_arg
@device_option
@sync_option
@timeout_option
@json_option
@handle_errors
def reg_list(guest, device, at_sync, timeout, as_json):
    """KVM_GET_REG_LIST, and every MSR of KVM_GET_MSR_INDEX_LIST with its value (MSRs are not
    listed by KVM_GET_REG_LIST), at the guest's SYNC."""
    with _boot(guest, device, at_sync, timeout, as_json) as m:
        acc = regs.RegisterAccess(m.vcpu)
        listed = m.vcpu.get_reg_list()
        values = acc.readable_msrs(m.kvm.get_msr_index_list())
        unreadable = sorted(set(m.kvm.get_msr_index_list()) - set(values))
    rows = [dict(regs.describe(i), value=None, source="KVM_GET_REG_LIST") for i in listed]
    rows += [dict(regs.describe(regs.msr(i)), value=hex(v), source="KVM_GET_MSR_INDEX_LIST")
             for i, v in sorted(values.items())]
    if as_json:
        _emit({"via": acc.via, "reg_list": [hex(i) for i in listed], "registers": rows,
               "unreadable_msrs": [hex(i) for i in unreadable]})
        return
    click.echo(f"KVM_GET_REG_LIST: {len(listed)} registers; MSRs from KVM_GET_MSR_INDEX_LIST read via {acc.via}")
    for r in rows:
        click.echo(f"  {r['id']}  {r['name']:<28} {r['value'] or '':>18}")
    if unreadable:
        click.echo(f"not readable on this vCPU: {', '.join(regs.name_of(regs.msr(i)) for i in unreadable)}")


@reg.command("get")
@guest_arg
@click.argument("names", nargs=-1, required=True)
@device_option
@sync_option
@timeout_option
@json_option
@handle_errors
def reg_get(guest, names, device, at_sync, timeout, as_json):
    """Read NAMES (e.g. EFER, MSR_LSTAR, 0xc0000080, GUEST_SSP, or a full 64-bit id)."""
    ids = [regs.parse_reg(n) for n in names]  # validate before touching KVM
    with _boot(guest, device, at_sync, timeout, as_json) as m:
        acc = regs.RegisterAccess(m.vcpu)
        values = [(i, acc.get(i)) for i in ids]
    if as_json:
        _emit({"via": acc.via, "registers": [dict(regs.describe(i), value=hex(v)) for i, v in values]})
        return
    for i, v in values:
        click.echo(f"{regs.name_of(i):<24} 0x{v:016x}")


@reg.command("set")
@guest_arg
@click.argument("assignments", nargs=-1, required=True)
@device_option
@sync_option
@timeout_option
@json_option
@handle_errors
def reg_set(guest, assignments, device, at_sync, timeout, as_json):
    """Set NAME=VALUE at the guest's SYNC, read it back, then let the guest continue to its end
    (so a guest such as msr-report shows what it sees)."""
    pairs = [regs.parse_assignment(a) for a in assignments]
    with _boot(guest, device, at_sync, timeout, as_json) as m:
        acc = regs.RegisterAccess(m.vcpu)
        done = []
        for i, v in pairs:
            acc.set(i, v)
            done.append((i, v, acc.get(i)))
            if not as_json:
                click.echo(f"set {regs.name_of(i)} = 0x{v:x} via {acc.via}; reads back 0x{done[-1][2]:x}")
        ev, syncs = run_to_end(m, timeout, as_json)
        if as_json:
            _emit({"via": acc.via, "set": [dict(regs.describe(i), value=hex(v), readback=hex(r))
                                           for i, v, r in done],
                   "console": m.console, "syncs": [hex(s) for s in syncs], "exit": ev.to_json()})
        else:
            click.echo(str(ev))
    sys.exit(exit_for_event(ev))


COMMANDS = [reg]
