"""`vmm snapshot`, `vmm restore`, `vmm inspect`: whole-VM snapshot files."""

import json
import os
import struct
import sys
import time

import click

from .common import (EXIT_GUEST, EXIT_OK, _emit, exit_for_event, memory_option, progress_bar, console_echo, device_option, handle_errors, json_option,
                     amx_option, load_cpu, run_to_end, run_to_sync, timeout_option)


@click.command("snapshot")
@click.argument("guest")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Snapshot file to write ('-': standard output; a FIFO or device is written through).")
@click.option("--at-sync", "at_sync", type=click.IntRange(1, 1 << 31), default=1, show_default=True,
              help="Snapshot when every vCPU has reached its N-th SYNC.")
@click.option("--vcpus", type=click.IntRange(1, 32), default=1, show_default=True,
              help="Number of vCPUs; each runs the guest from its entry (1 to 32).")
@memory_option
@click.option("--cpu", "cpu_file", type=click.Path(), default=None, help="Guest CPUID JSON (vmm baseline).")
@timeout_option
@amx_option
@device_option
@json_option
@handle_errors
def snapshot_cmd(guest, output, at_sync, vcpus, memory_mib, cpu_file, timeout, amx, device, as_json):
    """Run GUEST to its N-th SYNC on every vCPU and write a snapshot of the whole VM to FILE."""
    from .. import snapshot, state
    from ..guest.machine import Machine
    from .. import files
    files.output_target(output)  # a missing directory or an unwritable kind of file: before the guest runs
    with Machine(guest, vcpus=vcpus, memory=memory_mib << 20, cpuid=load_cpu(cpu_file), cpuid_source=cpu_file, device=device,
                 on_console=console_echo(as_json), amx=amx) as m:
        for i in range(vcpus):
            run_to_sync(m, at_sync, timeout, vcpu=i)
        t0 = time.monotonic()
        states = [state.save_state(v, diagnose=True) for v in m.vcpus]
        size = snapshot.save(output, m.kvm, m.vm, m.vcpus, states,
                             guest={"name": m.image.name, "cpl": m.cpl},
                             extra_meta={"at_sync": at_sync}, progress=progress_bar("saving guest memory"))
        seconds = time.monotonic() - t0
    on_disk = os.stat(output).st_blocks * 512 if output != "-" and os.path.isfile(output) else None
    info = {"file": output, "guest": m.image.name, "at_sync": at_sync, "vcpus": vcpus,
            "memory_bytes": memory_mib << 20, "file_size": size, "allocated_bytes": on_disk,
            "seconds": round(seconds, 4)}
    to_stdout = output == "-"  # the snapshot went to stdout: the summary goes to stderr
    if as_json:
        click.echo(json.dumps(info, indent=2), err=to_stdout)
    else:
        click.echo(f"snapshot of {m.image.name} at SYNC {at_sync} ({vcpus} vCPU{'s' * (vcpus > 1)}, "
                   f"{memory_mib} MiB RAM) -> {output}: {size} bytes"
                   f"{f', {on_disk} allocated' if on_disk is not None else ''}, {seconds * 1000:.1f} ms",
                   err=to_stdout)


@click.command("restore")
@click.argument("file")
@timeout_option
@device_option
@json_option
@handle_errors
def restore_cmd(file, timeout, device, as_json):
    """Restore FILE in this process and run every vCPU to its end (exit 0 when all are DONE)."""
    from .. import snapshot
    from ..guest.machine import Machine
    from ..state import xsave_restored_as_saved
    snap = snapshot.load(file, check_memory=False)  # every check but the memory checksums, which
    # restore makes on worker threads alongside its own work, before the guest can run
    t0 = time.monotonic()
    with Machine.from_snapshot(snap, device=device, on_console=console_echo(as_json)) as m:
        restore_ms = (time.monotonic() - t0) * 1000
        identical = [xsave_restored_as_saved(v.get_xsave(), s.xsave) for v, s in zip(m.vcpus, snap.vcpus)]
        results = []
        for i in range(len(m.vcpus)):
            ev, syncs = run_to_end(m, timeout, as_json, vcpu=i)
            results.append((ev, syncs))
            if not as_json:
                click.echo(f"vcpu {i}: {ev}" if len(m.vcpus) > 1 else str(ev))
        console = m.console
    if as_json:
        _emit({"file": file, "restore_ms": round(restore_ms, 3), "xsave_identical": identical,
               "console": console,
               "vcpus": [{"exit": ev.to_json(), "syncs": [hex(s) for s in syncs]} for ev, syncs in results]})
    elif not all(identical):
        click.echo("warning: the XSAVE area after restore differs from the saved one", err=True)
    codes = [exit_for_event(ev) for ev, _ in results]
    sys.exit(max(codes) if any(codes) else (EXIT_OK if all(identical) else EXIT_GUEST))


@click.command("inspect")
@click.argument("file", type=click.Path())
@click.option("--vcpu", type=click.IntRange(0, 1023), default=None,
              help="Decode only this vCPU (default: every vCPU).")
@click.option("--summary", is_flag=True, help="Only the summary, no per-vCPU decode.")
@json_option
@handle_errors
def inspect_cmd(file, vcpu, summary, as_json):
    """Print what a snapshot holds, without touching KVM (the file is fully validated): a summary,
    then per vCPU the registers (GPRs, segments, control, debug), the MSRs by name and the XSAVE area
    decoded as `vmm xsave` prints it. FILE is a vmm snapshot or a Cloud Hypervisor snapshot directory."""
    from .. import sources
    src = sources.open_file_source(file)
    if vcpu is not None:
        src.check_vcpu(vcpu)
    snap = src.snapshot
    meta = snap.meta
    vcpus = []
    for i, s in enumerate(snap.vcpus):
        xstate_bv = struct.unpack_from("<Q", s.xsave, 512)[0] if len(s.xsave) >= 520 else 0
        vcpus.append({"vcpu": i, "rip": hex(s.regs.rip), "cpl": s.sregs.cpl, "xcr0": hex(s.xcrs.get(0, 0)),
                      "xstate_bv": hex(xstate_bv), "xsave_bytes": len(s.xsave), "msrs": len(s.msrs),
                      "lapic": s.lapic is not None, "tsc_khz": s.tsc_khz})
    host = meta.get("host", {})
    if src.kind == "snapshot":
        mem = [{"slot": m["slot"], "gpa": hex(m["gpa"]), "size": m["size"],
                "stored_bytes": sum(n for _, n, _ in m["extents"]), "extents": len(m["extents"])}
               for m in snap.memory]
        info = {"file": file, "format": f"{snap.major}.{snap.minor}", "created": meta.get("created"),
                "guest": meta.get("guest"), "at_sync": meta.get("at_sync"),
                "irqchip": meta["vm"]["irqchip"], "vcpus": vcpus, "memory": mem,
                "host": {"kernel": host.get("kernel"), "vendor": host.get("vendor"), "pvm": host.get("pvm")},
                "guest_cpuid_features": sorted(snap.guest_cpuid().features()),
                "kvm_cpuid_differs": _kvm_cpuid_diff(snap.vcpus[0]) if snap.vcpus else [],
                "sections": [{"tag": s.tag, "offset": s.offset, "length": s.length}
                             for s in snap.sections.values()]}
    else:
        info = {"file": file, "format": "cloud-hypervisor", "vcpus": vcpus,
                "guest_cpuid_features": sorted(snap.guest_cpuid().features())}
    chosen = [] if summary else ([vcpu] if vcpu is not None else range(len(snap.vcpus)))
    decoded = [_decode_vcpu(src, i) for i in chosen]
    if as_json:
        for d in decoded:
            info["vcpus"][d["vcpu"]]["decoded"] = d
        _emit(info)
        return
    if src.kind == "snapshot":
        g = meta.get("guest", {})
        click.echo(f"{file}: vmm snapshot format {info['format']}, created {info['created']}")
        click.echo(f"guest       {g.get('name')} (cpl {g.get('cpl')}) at SYNC {info['at_sync']}")
        click.echo(f"source host {host.get('vendor')}, Linux {host.get('kernel')}"
                   f"{', PVM' if host.get('pvm') else ''}")
        click.echo(f"irqchip     {'in-kernel' if info['irqchip'] else 'none'}")
    else:
        click.echo(f"{file}: Cloud Hypervisor snapshot (x86_64 KVM vCPU state)")
    for v in vcpus:
        click.echo(f"vcpu {v['vcpu']}      rip {v['rip']} cpl {v['cpl']} XCR0 {v['xcr0']} XSTATE_BV {v['xstate_bv']} "
                   f"XSAVE {v['xsave_bytes']} bytes, {v['msrs']} MSRs{', LAPIC' if v['lapic'] else ''}")
    for m in info.get("memory", []):
        click.echo(f"memory {m['slot']}    {m['size'] >> 20} MiB at {m['gpa']}: {m['stored_bytes']} bytes stored "
                   f"in {m['extents']} extents")
    click.echo(f"guest CPUID {len(info['guest_cpuid_features'])} named features: "
               + " ".join(info["guest_cpuid_features"]))
    if info.get("kvm_cpuid_differs"):
        click.echo("KVM_GET_CPUID2 differs from the CPUID set: " + " ".join(info["kvm_cpuid_differs"]))
    for i in chosen:
        _echo_vcpu(src, i)


def _decode_vcpu(src, i):
    """JSON of one vCPU: registers by class (vmm/regfile.py), MSRs by name, the XSAVE area."""
    from ..regfile import json_value
    rf = src.regfile(i)
    classes = {}
    for r in rf.registers():
        if r.cls != "xsave":
            classes.setdefault(r.cls, {})[r.name] = json_value(rf.get(r.name))
    return {"vcpu": i, "registers": classes,
            "xsave": rf.area.to_json() if rf.area is not None else {"error": rf.xsave_problem}}


def _echo_vcpu(src, i):
    from ..regfile import format_value
    from .xsave import echo_components
    rf = src.regfile(i)
    click.echo(f"--- vcpu {i}")
    by_class = {}
    for r in rf.registers():
        if r.cls != "xsave":
            by_class.setdefault(r.cls, []).append(r)
    for cls, rows in by_class.items():
        click.echo(f"{cls}:")
        width = max(len(r.name) for r in rows)
        per_line = 1 if cls in ("msr", "vcpu") else 3
        for k in range(0, len(rows), per_line):
            click.echo("  " + "   ".join(f"{r.name:<{width}} {format_value(rf.get(r.name), r.size):<18}"
                                          for r in rows[k:k + per_line]).rstrip())
    if rf.area is None:
        click.echo(f"xsave: {rf.xsave_problem}")
        return
    a = rf.area
    click.echo(f"xsave: {len(a.raw)} bytes, XSTATE_BV {a.xstate_bv:#x}, XCOMP_BV {a.xcomp_bv:#x}")
    echo_components(a, {c.index for c in a.components_outside(src.vcpus[i].xcrs.get(0, 1))}, indent="  ")


def _kvm_cpuid_diff(s):
    if s.cpuid_kvm is None:
        return []
    mine, kvms = s.cpuid.features(), s.cpuid_kvm.features()
    return [f"+{f}" for f in sorted(kvms - mine)] + [f"-{f}" for f in sorted(mine - kvms)]


COMMANDS = [snapshot_cmd, restore_cmd, inspect_cmd]
