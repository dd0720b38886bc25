"""`vmm xsave`: a guest's XSAVE area as KVM returns it, decoded; or the XSAVE layout table."""

import click

from ..kvm import Kvm, is_pvm
from ..xsave import (XsaveArea, check_xcr0_rules, XsaveError, XsaveLayout, component_name, kvm_xsave_size, mask_names,
                     parse_mask)
from ..regfile import format_value
from .common import (_emit, amx_option, console_echo, device_option, handle_errors, json_option, run_to_sync,
                     timeout_option)


def hexdump(raw):
    """16 bytes a line with offsets; a run of identical lines is one `*` line (like hexdump -C)."""
    lines, prev, starred = [], None, False
    for off in range(0, len(raw), 16):
        chunk = raw[off:off + 16]
        if chunk == prev:
            if not starred:
                lines.append("*")
                starred = True
            continue
        prev, starred = chunk, False
        hx = " ".join(f"{b:02x}" for b in chunk[:8]) + "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{off:08x}  {hx}  |{text}|")
    lines.append(f"{len(raw):08x}")
    return lines


def check_xcr0(kvm, mask):
    """Refuse an --xcr0 mask with components KVM does not support (None: no mask given)."""
    supported = kvm.get_supported_cpuid().xcr0_supported()
    if mask is not None and mask & ~supported:
        raise XsaveError(f"--xcr0 {mask:#x} has components KVM does not support here "
                         f"(supported XCR0 {supported:#x}): {mask_names(mask & ~supported)}")


def inspect(m, at_sync, timeout):
    """Run Machine `m` to its SYNC `at_sync` (0: not at all) and read its XSAVE area and the
    context needed to judge it. Returns a dict; "area" is the XsaveArea in the host's layout."""
    ev = run_to_sync(m, at_sync, timeout) if at_sync else None
    vcpu = m.vcpu
    supported = m.kvm.get_supported_cpuid()
    layout = XsaveLayout.from_cpuid(supported)  # the host's: KVM's buffer uses its offsets
    cap = m.vm.xsave2_size()
    raw = vcpu.get_xsave()
    area = XsaveArea.parse(raw, layout)
    xcr0 = vcpu.get_xcrs().get(0, 1)
    held = vcpu.get_cpuid2().xcr0_supported()
    regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
    return {
        "area": area, "raw": raw, "ioctl": "KVM_GET_XSAVE2" if cap else "KVM_GET_XSAVE",
        "xsave2_cap": cap, "host_size": layout.standard_size(),
        "xcr0": xcr0, "cpuid_given": m.cpuid.xcr0_supported(), "cpuid_held": held,
        "beyond": area.components_outside(xcr0), "rip": regs.rip, "cpl": sregs.cpl,
        "sync": ev.value if ev else None,
    }


def _registers_by_component(area):
    groups = {}
    for name, value in area.registers().items():
        groups.setdefault(area.register_component(name), []).append(
            (name, format_value(value, area.register_size(name))))
    return groups


def _beyond_note(info):
    names = ", ".join(f"{c.name} ({c.index})" for c in info["beyond"])
    why = ("this host (kvm_pvm) does not enforce the guest's XCR0 for CPL3 code" if is_pvm() else
           "state the guest wrote before lowering XCR0, or that the host set with KVM_SET_XSAVE")
    return (f"{names} live in XSTATE_BV although the guest's XCR0 {info['xcr0']:#x} does not "
            f"enable them: {why}")


def _echo_text(guest, at_sync, info, raw):
    a = info["area"]
    where = f"at SYNC {at_sync} (value {info['sync']:#x})" if at_sync else "before it runs"
    click.echo(f"guest {guest} {where} (rip {info['rip']:#x}, cpl {info['cpl']})")
    cap = f"KVM_CAP_XSAVE2 {info['xsave2_cap']}" if info["xsave2_cap"] else "no KVM_CAP_XSAVE2"
    click.echo(f"{info['ioctl']:<16} {len(info['raw'])} bytes ({cap}; host standard size "
               f"{info['host_size']})")
    click.echo(f"{'guest XCR0':<16} {info['xcr0']:#x}  {mask_names(info['xcr0'])}")
    cpuid_line = f"{info['cpuid_held']:#x}  {mask_names(info['cpuid_held'])}"
    if info["cpuid_held"] != info["cpuid_given"]:
        cpuid_line += f" (KVM_GET_CPUID2; vmm set {info['cpuid_given']:#x} and KVM changed it)"
    click.echo(f"{'guest CPUID 0xD':<16} {cpuid_line}")
    click.echo(f"{'XSTATE_BV':<16} {a.xstate_bv:#x}  {mask_names(a.xstate_bv)}")
    click.echo(f"{'XCOMP_BV':<16} {a.xcomp_bv:#x}")
    if info["beyond"]:
        click.echo(f"{'beyond XCR0':<16} {_beyond_note(info)}")
    if raw:
        for line in hexdump(info["raw"]):
            click.echo(line)
        return
    echo_components(a, {c.index for c in info["beyond"]})


def echo_components(a, beyond=(), indent=""):
    """The components present (XSTATE_BV) and the non-zero registers of XsaveArea `a`, grouped by
    component, as `vmm xsave` prints them (`vmm inspect` prints snapshots' areas the same way)."""
    click.echo(f"{indent}components present (XSTATE_BV):")
    for c in a.components_present():
        mark = "  beyond XCR0" if c.index in beyond else ""
        click.echo(f"{indent}  {c.index:>2} {c.name:<10} offset {c.offset:>5} size {c.size:>5}{mark}")
    registers = _registers_by_component(a)
    click.echo(f"{indent}non-zero registers:{'' if registers else ' none'}")
    for index, rows in sorted(registers.items()):
        click.echo(f"{indent}  {component_name(index)}:")
        width = max(len(n) for n, _ in rows)
        for name, text in rows:
            click.echo(f"{indent}    {name:<{width}}  {text}")


def _json(guest, at_sync, info, raw):
    a = info["area"]
    out = {"guest": guest, "at_sync": at_sync, "sync_value": None if info["sync"] is None else hex(info["sync"]),
           "rip": hex(info["rip"]), "cpl": info["cpl"],
           "ioctl": info["ioctl"], "xsave2_cap": info["xsave2_cap"], **a.to_json(),
           "xcr0": hex(info["xcr0"]), "guest_cpuid_xcr0": hex(info["cpuid_held"]),
           "vmm_cpuid_xcr0": hex(info["cpuid_given"]),
           "beyond_xcr0": [c.name for c in info["beyond"]]}
    if info["beyond"]:
        out["beyond_xcr0_note"] = _beyond_note(info)
    if raw:
        out["raw"] = info["raw"].hex()
    return out


def _layout(dump, device, as_json):
    """The layout table; what the dump leaves unknown or contradictory is reported, not fatal: only
    the KVM buffer size, which needs every user component's offset, is then unknown."""
    if dump is not None:
        from .cpuid import load_cpuid_dump
        d = load_cpuid_dump(dump)
        table, source = d.table, f"CPUID dump {dump} ({d.format})"
    else:
        with Kvm(device) as k:
            table, source = k.get_supported_cpuid(), f"KVM_GET_SUPPORTED_CPUID on {device}"
    layout = XsaveLayout.from_cpuid(table)
    try:
        size, why = kvm_xsave_size(layout), None
    except XsaveError as e:
        size, why = None, str(e)
    if as_json:
        _emit({"source": source, **layout.to_json(), "kvm_xsave_size": size, "kvm_xsave_size_unknown": why})
        return
    click.echo(f"XSAVE layout from {source}")
    click.echo(layout.format_table())
    if size is None:
        click.echo(f"KVM_GET_XSAVE2 buffer for XCR0 {layout.xcr0_supported:#x}: unknown: {why}")
    else:
        click.echo(f"KVM_GET_XSAVE2 buffer for XCR0 {layout.xcr0_supported:#x}: "
                   f"max(4096, {layout.standard_size()}) = {size} bytes")


@click.command("xsave")
@click.argument("guest", required=False)
@click.option("--layout", "layout", is_flag=True,
              help="Print the XSAVE layout table (CPUID leaf 0xD) of this host, or of --file.")
@click.option("--file", "dump", metavar="DUMP", type=click.Path(dir_okay=False),
              help="With --layout: a CPUID dump or `vmm cpuid --json` file (works without KVM).")
@click.option("--xcr0", metavar="MASK", help="Limit the guest's CPUID and XCR0 to MASK (0x7 or x87|SSE|AVX).")
@click.option("--at-sync", "at_sync", type=click.IntRange(0, 1 << 31), default=1, show_default=True,
              help="Read the state at the guest's N-th SYNC (0: before it runs).")
@click.option("--raw", is_flag=True, help="The raw buffer (hex dump; with --json a hex string).")
@timeout_option
@amx_option
@device_option
@json_option
@handle_errors
def xsave(guest, layout, dump, xcr0, at_sync, raw, timeout, amx, device, as_json):
    """Run GUEST to a SYNC and print its XSAVE area as KVM returns it: size, XSTATE_BV, the
    components present (marking any the guest's XCR0 does not enable) and the non-zero registers.
    With --layout, print the layout table instead."""
    if layout:
        if guest is not None or xcr0 is not None or raw:
            raise click.UsageError("--layout takes no GUEST, --xcr0 or --raw")
        _layout(dump, device, as_json)
        return
    if guest is None:
        raise click.UsageError("give GUEST (e.g. avx512) or --layout")
    if dump is not None:
        raise click.UsageError("--file goes with --layout")
    if at_sync < 0:
        raise click.UsageError("--at-sync must be 0 or more")
    mask = None if xcr0 is None else parse_mask(xcr0)
    if mask is not None:
        check_xcr0_rules(mask, "--xcr0")  # before any ioctl
    from ..guest.machine import Machine
    with Kvm(device) as k:
        if amx:  # before anything reads the supported CPUID or creates a vCPU
            from ..amx import req_xcomp_guest_perm
            req_xcomp_guest_perm()
        check_xcr0(k, mask)
        with Machine(guest, kvm=k, xcr0=mask, amx=amx, on_console=console_echo(as_json)) as m:
            info = inspect(m, at_sync, timeout)
    if as_json:
        _emit(_json(guest, at_sync, info, raw))
    else:
        _echo_text(guest, at_sync, info, raw)


COMMANDS = [xsave]
