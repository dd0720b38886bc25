"""`vmm probe`, `vmm compat`, `vmm baseline`: what this host's KVM does, whether a guest can move to
another host, and the guest CPUID a whole pool of hosts can provide."""

import json
import sys

import click

from .common import EXIT_GUEST, EXIT_OK, _emit, device_option, handle_errors, json_option


def _write_json(path, obj):
    """Write JSON to `path` through vmm.files.output: atomically for a regular file, through for a
    FIFO or character device, '-' for standard output; never replacing anything else."""
    from .. import files
    files.write_text(path, json.dumps(obj, indent=2) + "\n")


PROBE_GROUPS = ("xsave", "amx", "cpuid", "msr", "state", "io")  # vmm.probe.GROUPS, without importing it


def _list_checks(as_json):
    from .. import probe
    rows = [{"name": c.name, "group": c.group, "selftest": c.selftest, "process": c.process or "probe",
             "title": c.title} for c in probe.CHECKS]
    if as_json:
        _emit(rows)
        return
    for r in rows:
        click.echo(f"{r['name']:<36} {r['group']:<6} {r['selftest'] or '-':<18} {r['title']}")


@click.command("probe")
@click.option("-o", "--output", metavar="FILE", default=None,
              help="Also write the JSON report to FILE (for vmm compat / vmm baseline on other hosts; "
                   "'-': standard output).")
@click.option("--check", "names", multiple=True, metavar="NAME[,NAME...]",
              help="Run only these checks (repeatable, or comma-separated).")
@click.option("--group", "groups", multiple=True, type=click.Choice(PROBE_GROUPS),
              help="Run only the checks of this group (repeatable).")
@click.option("--list", "list_only", is_flag=True,
              help="List the checks (name, group, selftest, title); run none.")
@device_option
@json_option
@handle_errors
def probe_cmd(output, names, groups, list_only, device, as_json):
    """Run behaviour checks against this host's KVM, many derived from the assertions of the Linux KVM
    selftests (tools/testing/selftests/kvm/x86/): for each, the setup, the call, the result observed,
    what a current upstream kernel gives, and a verdict; a summary per group; the host fingerprint.

    A check is "as upstream", "differs" (with the reason, e.g. PVM), "skipped" (with the reason,
    e.g. "not in this kernel") or "error". Checks that depend on or change XSAVE permissions run in
    fresh processes. Exit status 0 when every check is as upstream or skipped, 1 when one differs or
    failed, 2 for bad arguments."""
    from .. import probe
    if list_only:
        _list_checks(as_json)
        return
    names = [n for arg in names for n in arg.split(",") if n]
    report = probe.make_report(device, names or None, groups=list(groups) or None)
    if output:
        _write_json(output, report)
    to_stdout = output == "-"  # the report went to stdout: the summary goes to stderr
    if as_json:
        _emit(report, err=to_stdout)
    else:
        click.echo(probe.format_report(report), nl=False, err=to_stdout)
        if output:
            click.echo(f"report written to {output} (schema {report['schema']})", err=to_stdout)
    sys.exit(EXIT_OK if probe.all_as_upstream(report) else EXIT_GUEST)


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
    CPUID dump, `here`) whose default guest is meant. Compares vendor, every CPUID field by its
    kind (feature flags, bounding numbers, skipped per-host fields, unknown bits as warnings), each
    XSAVE component's offset and size (no overlaps), the XSAVE size against KVM_CAP_XSAVE2, the MSRs the state
    carries and AMX permission. Exit status 0 for yes, 1 for no, 2 for unusable input."""
    from .. import compat, compat_inputs as sources
    guest = sources.load_guest(source, device)
    host = sources.load_host(target, device)
    c = compat.compare(guest, host)
    if as_json:
        _emit(c.to_json())
    else:
        click.echo(compat.format_comparison(c), nl=False)
    sys.exit(EXIT_OK if c.compatible else EXIT_GUEST)


@click.command("baseline")
@click.argument("hosts", nargs=-1, required=True, metavar="HOST...")
@click.option("-o", "--output", required=True, metavar="FILE",
              help="Guest CPUID file to write (for vmm run --cpu and vmm snapshot --cpu; '-': standard output).")
@device_option
@json_option
@handle_errors
def baseline_cmd(hosts, output, device, as_json):
    """Write the guest CPUID every HOST can provide: common features and XSAVE components with
    identical layouts. HOST is a probe report, a CPUID dump, or `here`; all must share a vendor."""
    from .. import baseline
    b = baseline.baseline(list(hosts), device)
    _write_json(output, b)
    to_stdout = output == "-"  # the file went to stdout: the summary goes to stderr
    if as_json:
        _emit(b, err=to_stdout)
    else:
        click.echo(baseline.format_baseline(b, output), nl=False, err=to_stdout)


COMMANDS = [probe_cmd, compat_cmd, baseline_cmd]
