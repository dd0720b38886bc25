"""`vmm probe`, `vmm compat`, `vmm baseline`: what this host's KVM does, whether a guest can move to
another host, and the guest CPUID a whole pool of hosts can provide."""

import json
import os
import sys

import click

from .common import EXIT_GUEST, EXIT_OK, _emit, device_option, handle_errors, json_option


def _write_json(path, obj):
    """Write JSON to `path` through a temporary file in the same directory, then rename."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise OSError(e.errno, f"cannot write {path}: {e.strerror}") from None


@click.command("probe")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON report to FILE (for vmm compat / vmm baseline on other hosts).")
@click.option("--check", "names", multiple=True, metavar="NAME",
              help="Run only this check (repeatable); `python -m vmm.probe --list` lists them.")
@device_option
@json_option
@handle_errors
def probe_cmd(output, names, device, as_json):
    """Run behaviour checks against this host's KVM: for each, the setup, the call, the result
    observed, what a current upstream kernel gives, and a verdict; plus the host fingerprint.

    Checks that depend on or change XSAVE permissions run in fresh processes. Exit status 0 when
    every check ran (differences from upstream are findings, not failures), 1 when one failed."""
    from .. import probe
    report = probe.make_report(device, list(names) or None)
    if output:
        _write_json(output, report)
    if as_json:
        _emit(report)
    else:
        click.echo(probe.format_report(report), nl=False)
        if output:
            click.echo(f"report written to {output} (schema {report['schema']})")
    sys.exit(EXIT_GUEST if report["summary"]["error"] else EXIT_OK)


@click.command("compat")
@click.argument("source")
@click.option("--host", "target", default="here", show_default=True, metavar="TARGET",
              help="The destination: a probe report, a CPUID dump, or `here`.")
@device_option
@json_option
@handle_errors
def compat_cmd(source, target, device, as_json):
    """Can a guest from SOURCE run, or be restored, on TARGET?

    SOURCE is a snapshot file, a guest CPUID file (vmm baseline), or a host (a probe report, a
    CPUID dump, `here`) whose default guest is meant. Compares vendor, CPUID features, each XSAVE
    component's offset and size, the XSAVE size against KVM_CAP_XSAVE2, the MSRs the state
    carries and AMX permission. Exit status 0 for yes, 1 for no, 2 for unusable input."""
    from .. import compat
    guest = compat.load_guest(source, device)
    host = compat.load_host(target, device)
    c = compat.compare(guest, host)
    if as_json:
        _emit(c.to_json())
    else:
        click.echo(compat.format_comparison(c), nl=False)
    sys.exit(EXIT_OK if c.compatible else EXIT_GUEST)


@click.command("baseline")
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...")
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Guest CPUID file to write (for vmm run --cpu and vmm snapshot --cpu).")
@device_option
@json_option
@handle_errors
def baseline_cmd(hosts, output, device, as_json):
    """Write the guest CPUID every HOST can provide: common features and XSAVE components with
    identical layouts. HOST is a probe report, a CPUID dump, or `here`; all must share a vendor."""
    from .. import baseline
    b = baseline.baseline(list(hosts), device)
    _write_json(output, b)
    if as_json:
        _emit(b)
    else:
        click.echo(baseline.format_baseline(b, output), nl=False)


COMMANDS = [probe_cmd, compat_cmd, baseline_cmd]
