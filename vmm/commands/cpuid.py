"""`vmm cpuid`: KVM's supported CPUID, a vCPU's CPUID as KVM holds it, or a CPUID dump file."""

import click

from ..cpuid import REGISTERS, CpuidTable
from ..xsave import XsaveError, XsaveLayout, mask_names
from .common import _emit, device_option, handle_errors, json_option, run_to_sync, timeout_option


def load_cpuid_file(path):
    """A CPUID table from a dump file of any format vmm reads (vmm.cpudump: AIDA64/InstLatx64 lines,
    `cpuid -r` output, vmm's CPUID JSON, a probe report), told apart by content."""
    return load_cpuid_dump(path).table


def load_cpuid_dump(path):
    """vmm.cpudump.CpuidDump of `path` (the table, its format and the reader's notes)."""
    from ..cpudump import read_cpuid_file
    return read_cpuid_file(path)


def changed_entries(given, held):
    """How the table KVM holds (KVM_GET_CPUID2) differs from the one it was given (KVM_SET_CPUID2):
    a list of {leaf, subleaf, registers: {reg: [given, held]}} (a missing entry counts as zeros)."""
    out = []
    keys = [(e.function, e.index) for e in held] + [(e.function, e.index) for e in given]
    for fn, idx in dict.fromkeys(keys):
        a, b = given.entry(fn, idx), held.entry(fn, idx)
        regs = {r: [a.reg(r) if a else None, b.reg(r) if b else None] for r in REGISTERS
                if (a.reg(r) if a else None) != (b.reg(r) if b else None)}
        if regs:
            out.append({"leaf": fn, "subleaf": idx, "registers": regs})
    return out


def _hex(v):
    return "-" if v is None else f"{v:#x}"


def _summary(table):
    """Comment lines: vendor, leaf range, XSAVE enumeration, named features."""
    lines = [f"vendor {table.vendor or '?'}; max leaf {_hex(table.max_leaf)}, "
             f"max extended leaf {_hex(table.max_extended_leaf)}; {len(table)} entries"]
    xcr0 = table.xcr0_supported()
    if xcr0:
        d0 = table.entry(0xD, 0)
        line = f"XCR0 supported {xcr0:#x} ({mask_names(xcr0)}), IA32_XSS supported {table.xss_supported():#x}"
        try:
            size = f"{XsaveLayout.from_cpuid(table).standard_size()} bytes"
        except XsaveError as e:  # e.g. a vCPU's CPUID that KVM rewrote only in part
            size = f"not computable: {e}"
        lines.append(f"{line}; XSAVE area {size} (CPUID.(0DH,0).ECX = {d0.ecx})")
    else:
        lines.append("no CPUID leaf 0xD: XSAVE is not enumerated")
    lines.append("features: " + " ".join(sorted(table.features())))
    return lines


def _features(table, names):
    rows = []
    for n in names:
        f = CpuidTable.feature(n)
        rows.append({"name": n.upper(), "leaf": f"{f.leaf:#x}", "subleaf": f.subleaf,
                     "register": f.register, "bit": f.bit, "set": table.has(n)})
    return rows


def _xcr0_option(value):
    from ..xsave import check_xcr0_rules, parse_mask
    if value is None:
        return None
    mask = parse_mask(value)
    check_xcr0_rules(mask, "--xcr0")  # before any ioctl
    return mask


@click.command("cpuid")
@click.option("--supported", "supported", is_flag=True,
              help="KVM_GET_SUPPORTED_CPUID (the default).")
@click.option("--vcpu", "guest", metavar="GUEST",
              help="KVM_GET_CPUID2 of a vCPU set up for GUEST, and how it differs from what vmm gave "
                   "KVM_SET_CPUID2.")
@click.option("--file", "dump", metavar="DUMP", type=click.Path(dir_okay=False),
              help="A CPUID dump: AIDA64/InstLatx64 lines, `cpuid -r` output, `vmm cpuid --json`, or a "
                   "probe report.")
@click.option("--xcr0", metavar="MASK", help="With --vcpu: limit the guest CPUID and XCR0 to MASK "
                                             "(0x7 or x87|SSE|AVX).")
@click.option("--at-sync", "at_sync", type=click.IntRange(0, 1 << 31), default=0, show_default=True,
              help="With --vcpu: run the guest to its N-th SYNC first (0: before it runs).")
@click.option("--feature", "features", metavar="NAME", multiple=True,
              help="Show only these named features (e.g. AVX512F, XSAVE); repeatable.")
@timeout_option
@device_option
@json_option
@handle_errors
def cpuid(supported, guest, dump, xcr0, at_sync, features, timeout, device, as_json):
    """Print a CPUID table in the dump format `--file` reads back, with a summary (XSAVE
    enumeration, named features) as `#` comments. --json output is accepted by `vmm run --cpu`."""
    if supported + (guest is not None) + (dump is not None) > 1:
        raise click.UsageError("give one of --supported, --vcpu GUEST, --file DUMP")
    if (xcr0 is not None or at_sync) and guest is None:
        raise click.UsageError("--xcr0 and --at-sync need --vcpu GUEST")
    for n in features:
        CpuidTable.feature(n)  # unknown names fail before anything touches KVM
    mask = _xcr0_option(xcr0)
    changed = None
    notes = []
    if dump is not None:
        d = load_cpuid_dump(dump)
        table, notes = d.table, d.notes
        source = f"CPUID dump {dump} ({d.format})"
    elif guest is not None:
        from ..guest.machine import Machine
        from ..kvm import Kvm
        from .xsave import check_xcr0
        with Kvm(device) as k:
            check_xcr0(k, mask)
            with Machine(guest, kvm=k, xcr0=mask) as m:  # console output would break the dump
                if at_sync:
                    run_to_sync(m, at_sync, timeout)
                table = m.vcpu.get_cpuid2()
                given = m.vcpu.cpuid  # what vmm gave KVM_SET_CPUID2 (this vCPU's APIC ID)
                changed = changed_entries(given, table)
                feature_diff = given.diff(table)
        when = f"at SYNC {at_sync}" if at_sync else "before it runs"
        source = f"KVM_GET_CPUID2 of a vCPU for guest {guest} {when}"
    else:
        from ..kvm import Kvm
        with Kvm(device) as k:
            table = k.get_supported_cpuid()
        source = f"KVM_GET_SUPPORTED_CPUID on {device}"

    if as_json and features:  # the features asked for, as the text output shows them; not the table
        _emit({"source": source, "features": _features(table, features)})
        return
    if as_json:
        out = {"source": source, **table.to_json(), "notes": notes,
               "xcr0_supported": f"{table.xcr0_supported():#x}",
               "features": sorted(table.features())}
        if changed is not None:
            out["changed_by_kvm"] = [
                {"leaf": f"{c['leaf']:#x}", "subleaf": c["subleaf"],
                 "registers": {r: [_hex(a), _hex(b)] for r, (a, b) in c["registers"].items()}}
                for c in changed]
            out["features_added_by_kvm"] = [n for n, _, held in feature_diff if held]
            out["features_removed_by_kvm"] = [n for n, given, _ in feature_diff if given]
        _emit(out)
        return
    if features:
        for f in _features(table, features):
            click.echo(f"{f['name']:<16} CPUID.({f['leaf']},{f['subleaf']}).{f['register'].upper()}"
                       f"[{f['bit']}]  {'yes' if f['set'] else 'no'}")
        return
    click.echo(table.to_dump(comment="\n".join([source] + notes)), nl=False)
    for line in _summary(table):
        click.echo(f"# {line}")
    if changed is not None:
        _echo_changes(changed, feature_diff)


def _echo_changes(changed, feature_diff):
    if not changed:
        click.echo("# KVM holds exactly the CPUID vmm gave KVM_SET_CPUID2")
        return
    click.echo(f"# KVM changed {len(changed)} entries from what vmm gave KVM_SET_CPUID2 (given -> held):")
    for c in changed:
        regs = ", ".join(f"{r} {_hex(a)} -> {_hex(b)}" for r, (a, b) in c["registers"].items())
        click.echo(f"#   leaf {c['leaf']:#x}.{c['subleaf']}: {regs}")
    added = [n for n, _, held in feature_diff if held]
    removed = [n for n, given, _ in feature_diff if given]
    if added:
        click.echo(f"# features KVM added: {' '.join(added)}")
    if removed:
        click.echo(f"# features KVM removed: {' '.join(removed)}")


COMMANDS = [cpuid]
