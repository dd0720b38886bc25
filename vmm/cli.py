"""The `vmm` command line. Every command has --json; errors print one line on stderr (and a JSON
object on stdout with --json) and exit with a status from one scheme (commands/common.py)."""

import os
import sys
import time

import click

from .commands import LazyGroup
from .commands.common import (EXIT_STATUS_HELP, GuestArg, _emit, amx_option, device_option, exit_for_event, memory_option,
                              handle_errors, json_option, run_main, timeout_option)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EXIT_STATUS_HELP)
@click.version_option(package_name="vmm", message="%(prog)s %(version)s")
def main():
    """A userspace VMM over real /dev/kvm for debugging x86 vCPU state."""


def entry(argv=None):
    """The `vmm` console script: the click group with the exit status scheme applied."""
    run_main(main, argv)


@main.command()
@click.argument("guest", default="hello")
@timeout_option
@click.option("--cpl", type=click.Choice(["0", "3"]), default="3", show_default=True,
              help="Privilege level of the payload (0 is emulated on PVM hosts).")
@memory_option
@click.option("--cpu", "cpu_file", type=click.Path(), default=None,
              help="Guest CPUID from a JSON file (vmm cpuid --json / vmm baseline).")
@click.option("--arg", "args", multiple=True, type=GuestArg(), metavar="VALUE",
              help="A host-provided argument the guest reads (vmm.h vmm_arg(n), vmm.inc ARG n); repeatable.")
@amx_option
@device_option
@json_option
@handle_errors
def run(guest, timeout, cpl, memory_mib, cpu_file, args, amx, device, as_json):
    """Boot GUEST (a built-in name, or a guest file: a static ELF64 executable or a flat binary;
    default: hello) and run it to its end.

    Prints the guest's console output, each SYNC, then one line with how it ended.
    Exit status 0 when the guest reports DONE, 3 on timeout, 1 for any other ending."""
    from .commands.common import console_echo, load_cpu, run_to_end
    from .errors import GuestError
    from .guest import catalog
    from .guest.machine import Machine

    t0 = time.monotonic()
    image = catalog.load(guest)
    if image.driver:
        raise GuestError(f"guest {image.name!r} waits at each SYNC for its host to hand it work; "
                         f"`vmm run` has none to give: run it through `{image.driver}`")
    with Machine(image, cpl=int(cpl), memory=memory_mib << 20, device=device, on_console=console_echo(as_json),
                 cpuid=load_cpu(cpu_file), cpuid_source=cpu_file, amx=amx, args=args) as m:
        ev, syncs = run_to_end(m, timeout, as_json)
        elapsed = time.monotonic() - t0
        if as_json:
            _emit({"guest": m.image.name, "cpl": int(cpl), "console": m.console,
                   "syncs": [hex(v) for v in syncs], "exit": ev.to_json(), "str": str(ev),
                   "exits": m.runner.exits, "seconds": round(elapsed, 4)})
        else:
            if m.console and not m.console.endswith("\n"):
                click.echo()
            click.echo(str(ev))
    sys.exit(exit_for_event(ev))


@main.command()
@device_option
@json_option
@handle_errors
def caps(device, as_json):
    """KVM API version, the capabilities vmm uses, CAP_XSAVE2, MSR list size, PVM or not."""
    from . import kvm as kvm_mod
    with kvm_mod.Kvm(device) as k:
        caps = k.caps()
        with k.create_vm() as vm:
            vm_xsave2 = vm.xsave2_size()
        supported = k.get_supported_cpuid()
        info = {
            "kernel": os.uname().release,
            "api_version": k.get_api_version(),
            "pvm": kvm_mod.is_pvm(),
            "vcpu_mmap_size": k.get_vcpu_mmap_size(),
            "xsave2_size": {"dev_kvm": caps["KVM_CAP_XSAVE2"], "vm_fd": vm_xsave2},
            "supported_xcr0": hex(supported.xcr0_supported()),
            "msr_index_list": len(k.get_msr_index_list()),
            "msr_feature_index_list": len(k.get_msr_feature_index_list()),
            "capabilities": caps,
        }
    if as_json:
        _emit(info)
        return
    click.echo(f"kernel            {info['kernel']}")
    click.echo(f"KVM API version   {info['api_version']}")
    click.echo(f"host is PVM       {'yes (guest CPL0 code is emulated; payloads run at CPL3)' if info['pvm'] else 'no'}")
    click.echo(f"CAP_XSAVE2        {caps['KVM_CAP_XSAVE2']} on /dev/kvm, {vm_xsave2} on a VM fd")
    click.echo(f"supported XCR0    {info['supported_xcr0']}")
    click.echo(f"MSR index list    {info['msr_index_list']} MSRs ({info['msr_feature_index_list']} feature MSRs)")
    click.echo("capabilities:")
    for name, v in caps.items():
        click.echo(f"  {name:<28} {v}")


@main.command()
@json_option
@handle_errors
def guests(as_json):
    """List the built-in guests, with what each needs from the vCPU (checked before it runs)."""
    from .guest import catalog
    rows = [(n, catalog.describe(n), catalog.REQUIREMENTS.get(n, ())) for n in catalog.names()]
    if as_json:
        _emit([{"name": n, "description": d,
                "requires": [{"feature": r.feature, "xcr0": hex(r.xcr0)} for r in req],
                "driven_by": catalog.DRIVERS.get(n)} for n, d, req in rows])
        return
    for n, d, req in rows:
        needs = f" [needs {', '.join(str(r) for r in req)}]" if req else ""
        if n in catalog.DRIVERS:
            needs += f" [driven by `{catalog.DRIVERS[n]}`]"
        click.echo(f"{n:<14} {d.split('; ')[0].rstrip('.')}{needs}")


if __name__ == "__main__":
    entry()
