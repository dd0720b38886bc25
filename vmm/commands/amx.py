"""`vmm amx`: can this host give AMX to a guest? Permissions and CAP_XSAVE2 before/after a request."""

import os
import sys
from dataclasses import asdict

import click

from .. import amx
from .. import kvm as kvm_mod
from ..errors import KvmError
from .common import EXIT_GUEST, EXIT_OK, _emit, device_option, handle_errors, json_option


def _guest_summary(g):
    d0 = g.entry(0xD, 0)
    return {"xcr0": hex(g.xcr0_supported()), "xsave_size": d0.ebx,
            "xfd_msrs": [hex(i) for i in amx.xfd_msrs(g)]}


def _enumeration(t):
    p, tm = amx.palettes(t), amx.tmul(t)
    return {"palettes": [asdict(x) for x in p], "tmul": asdict(tm) if tm else None}


def host_report(device):
    """Everything `vmm amx` shows, measured in this order: the state before, the guest permission
    request, the state after (KVM_GET_SUPPORTED_CPUID only after the request)."""
    with kvm_mod.Kvm(device) as k, k.create_vm() as vm:
        def sizes():
            return {"dev_kvm": k.check_extension("KVM_CAP_XSAVE2"), "vm_fd": vm.xsave2_size()}

        supp = amx.get_xcomp_supp()
        before = {"perm": amx.get_xcomp_perm(), "guest_perm": amx.get_xcomp_guest_perm(),
                  "xsave2": sizes()}
        request = {"call": "ARCH_REQ_XCOMP_GUEST_PERM", "feature": amx.XFEATURE_XTILEDATA, "ok": True,
                   "errno": None, "errno_name": None, "error": None}
        try:
            amx.req_xcomp_guest_perm(amx.XFEATURE_XTILEDATA)
        except KvmError as e:
            request.update(ok=False, errno=e.errno, errno_name=e.errno_name, error=str(e))
        after = {"perm": amx.get_xcomp_perm(), "guest_perm": amx.get_xcomp_guest_perm(),
                 "xsave2": sizes()}
        supported = k.get_supported_cpuid()
    problems = ([] if request["ok"] else [request["error"]]) + amx.host_problems(supported, supp)
    guest = None if problems else _guest_summary(amx.guest_cpuid(supported))
    return {
        "available": not problems,
        "problems": problems,
        "request": request,
        "xcomp_supp": hex(supp),
        "xcomp_perm": {"before": hex(before["perm"]), "after": hex(after["perm"])},
        "xcomp_guest_perm": {"before": hex(before["guest_perm"]), "after": hex(after["guest_perm"])},
        "xsave2_size": {"before": before["xsave2"], "after": after["xsave2"]},
        "supported": {"xcr0": hex(supported.xcr0_supported()),
                      "amx_features": [n for n in amx.AMX_FEATURES if supported.has(n)],
                      "xfd": supported.has("XFD")},
        **_enumeration(supported),
        "guest_cpuid": guest,
    }


def dump_report(path):
    """What the AMX flow would do on the CPU a recorded CPUID describes (no KVM involved)."""
    from .cpuid import load_cpuid_file
    t = load_cpuid_file(path)
    problems = amx.host_problems(t, source="CPUID")
    default_perm = t.xcr0_supported() & ~amx.XFEATURE_MASK_XTILEDATA  # before any request
    return {
        "source": str(path),
        "available": not problems,
        "problems": problems,
        "xsave2_size": {"without_permission": amx.xsave2_size_for(t, default_perm),
                        "with_permission": amx.xsave2_size_for(t, t.xcr0_supported())},
        **_enumeration(t),
        "guest_cpuid": None if problems else _guest_summary(amx.guest_cpuid(t)),
    }


def _echo_common(r):
    for p in r["palettes"]:
        click.echo(f"palette {p['palette']:<20} {p['total_tile_bytes']} total bytes, "
                   f"{p['bytes_per_tile']} per tile, {p['bytes_per_row']} per row, "
                   f"{p['max_names']} names, {p['max_rows']} rows")
    if not r["palettes"]:
        click.echo(f"{'palettes':<28} none (no CPUID leaf 0x1D)")
    t = r["tmul"]
    tmul = f"maxk {t['maxk']}, maxn {t['maxn']}" if t else "none (no CPUID leaf 0x1E)"
    click.echo(f"{'TMUL':<28} {tmul}")
    g = r["guest_cpuid"]
    if g:
        click.echo(f"{'guest CPUID':<28} XCR0 {g['xcr0']}, XSAVE size {g['xsave_size']}, "
                   f"XFD MSRs {', '.join(g['xfd_msrs']) or 'none'}")
    if r["problems"]:
        click.echo("why not:")
    for p in r["problems"]:
        click.echo(f"  - {p}")


def _echo_host(r):
    click.echo(f"{'AMX for guests':<28} {'yes' if r['available'] else 'no'}")
    click.echo(f"{'ARCH_GET_XCOMP_SUPP':<28} {r['xcomp_supp']}")
    for key, name in (("xcomp_perm", "ARCH_GET_XCOMP_PERM"),
                      ("xcomp_guest_perm", "ARCH_GET_XCOMP_GUEST_PERM")):
        click.echo(f"{name:<28} {r[key]['before']} before, {r[key]['after']} after the request")
    q = r["request"]
    outcome = "ok" if q["ok"] else f"{q['errno_name']} ({os.strerror(q['errno'])})"
    click.echo(f"{q['call'] + ' ' + str(q['feature']):<28} {outcome}")
    b, a = r["xsave2_size"]["before"], r["xsave2_size"]["after"]
    click.echo(f"{'CAP_XSAVE2':<28} {b['dev_kvm']} -> {a['dev_kvm']} on /dev/kvm, "
               f"{b['vm_fd']} -> {a['vm_fd']} on a VM fd")
    s = r["supported"]
    click.echo(f"{'supported CPUID':<28} XCR0 {s['xcr0']}, {', '.join(s['amx_features']) or 'no AMX'}, "
               f"{'XFD' if s['xfd'] else 'no XFD'}")
    _echo_common(r)


def _echo_dump(r):
    click.echo(f"{'AMX for guests':<28} {'yes' if r['available'] else 'no'} (from {r['source']})")
    x = r["xsave2_size"]
    click.echo(f"{'CAP_XSAVE2':<28} {x['without_permission']} without XTILEDATA permission, "
               f"{x['with_permission']} with it")
    _echo_common(r)


@click.command("amx")
@click.option("--file", "dump", metavar="DUMP", type=click.Path(dir_okay=False),
              help="Instead of this host: what the AMX flow would do on the CPU of a CPUID dump "
                   "(or `vmm cpuid --json` file).")
@device_option
@json_option
@handle_errors
def amx_command(dump, device, as_json):
    """Whether guests can have AMX: host support, process and guest XSAVE permissions and
    KVM_CAP_XSAVE2 before and after arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18), tile palettes.

    Exit status 0 when AMX can be exposed to a guest, 1 when not (the reasons are listed)."""
    r = dump_report(dump) if dump else host_report(device)
    if as_json:
        _emit(r)
    else:
        (_echo_dump if dump else _echo_host)(r)
    sys.exit(EXIT_OK if r["available"] else EXIT_GUEST)


COMMANDS = [amx_command]
