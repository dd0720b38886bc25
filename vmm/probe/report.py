"""The probe report: the host fingerprint, the check results, and their text form."""

import time

from ..errors import KvmError
from .core import GROUPS, STATUSES, hex_text, prctl_get, ProbeError
from .run import run_checks
from .schema import SCHEMA_ID, load_schema, validate


# --- the report ------------------------------------------------------------------------------------
def host_info(device="/dev/kvm"):
    """The host fingerprint (as snapshots record it) plus what compat needs to judge a destination."""
    from .. import amx
    from ..cpuid import CpuidTable
    from ..kvm import Kvm
    from ..host import fingerprint

    def perm(code):
        try:
            return hex_text(prctl_get(code))
        except KvmError:
            return None
    with Kvm(device) as k:
        fp = fingerprint(k)
        # the same table as the fingerprint's: a second read could answer from another CPU
        # (leaf 1 EBX[31:24] and leaf 0xB EDX carry the APIC ID of the CPU that ran the ioctl)
        supported = CpuidTable.from_json(fp["supported_cpuid"])
        with k.create_vm() as vm:
            vm_xsave2 = vm.xsave2_size()
        fp.update({
            "api_version": k.get_api_version(),
            "cpuid_dump": supported.to_dump(),
            "xsave2": {"dev_kvm": fp["capabilities"]["KVM_CAP_XSAVE2"], "vm_fd": vm_xsave2},
            "xcomp": {"supp": perm(amx.ARCH_GET_XCOMP_SUPP), "perm": perm(amx.ARCH_GET_XCOMP_PERM),
                      "guest_perm": perm(amx.ARCH_GET_XCOMP_GUEST_PERM)},
            "msr_index_list": [hex_text(i) for i in k.get_msr_index_list()],
            "msr_feature_index_list": [hex_text(i) for i in k.get_msr_feature_index_list()],
            "msrs_readable": None,
            "amx": None,
        })
    return fp


def amx_from_checks(by_name):
    req = by_name.get("req_xcomp_guest_perm")
    if not req or req["status"] in ("skipped", "error"):
        return None
    after = {k: by_name[n]["observed"]["value"] if n in by_name and by_name[n]["observed"]["ok"] else None
             for k, n in (("dev_kvm", "cap_xsave2_dev_kvm_after_request"),
                          ("vm_fd", "cap_xsave2_vm_fd_after_request"))}
    return {"request": req["observed"]["text"], "granted": bool(req["observed"]["ok"]),
            "errno_name": req["observed"]["errno_name"], "xsave2_after": after,
            "supported_cpuid_after": req["details"].get("supported_cpuid_after")}


def _counts(checks):
    return {s: sum(1 for c in checks if c["status"] == s) for s in STATUSES}


def summarize(checks):
    """{status: count} over `checks`, and the same per group under "groups" (groups that ran)."""
    out = _counts(checks)
    out["groups"] = {g: _counts([c for c in checks if c["group"] == g])
                     for g in GROUPS if any(c["group"] == g for c in checks)}
    return out


def all_as_upstream(report):
    """True when every check is as upstream or skipped (with its reason): `vmm probe` exits 0."""
    s = report["summary"]
    return not s["differs"] and not s["error"]


def make_report(device="/dev/kvm", names=None, kernel=None, groups=None):
    """Run the checks (the named ones and those of the named groups; default all) and build the
    versioned report (validated against the shipped schema). Raises ProbeError for an unknown
    check or group."""
    from importlib import metadata
    t0 = time.monotonic()
    checks = run_checks(device, names, kernel, groups)
    host = host_info(device)
    by_name = {c["name"]: c for c in checks}
    msr = by_name.get("msr_index_list")
    if msr and msr["status"] != "error" and "msrs" in msr["details"]:
        host["msrs_readable"] = [r["index"] for r in msr["details"]["msrs"] if r["readable"]]
    host["amx"] = amx_from_checks(by_name)
    try:
        version = metadata.version("vmm")
    except metadata.PackageNotFoundError:
        version = "unknown"
    report = {
        "schema": SCHEMA_ID,
        "vmm_version": version,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": round(time.monotonic() - t0, 3),
        "host": host,
        "checks": checks,
        "summary": summarize(checks),
    }
    problems = validate(report, load_schema())
    if problems:  # a bug in this module, not in the host
        raise ProbeError("the probe report does not match its own schema: " + "; ".join(problems[:5]))
    return report


def _count_text(s):
    return f"{s['as-upstream']} as upstream, {s['differs']} differ, {s['skipped']} skipped, {s['error']} errors"


def format_summary(report):
    """The header line and one summary line per group of a report (a version 2 report)."""
    h = report["host"]
    s = report["summary"]
    lines = [f"vmm probe: Linux {h['kernel']}, {h['vendor']}{', kvm_pvm (PVM)' if h['pvm'] else ''}; "
             f"{len(report['checks'])} checks in {report['seconds']:.1f} s: {_count_text(s)}"]
    for g, gs in s.get("groups", {}).items():
        lines.append(f"  {g:<6} {sum(gs.values()):>2} checks: {_count_text(gs)}")
    return "\n".join(lines) + "\n"


def format_report(report):
    """The text form of a report: the summary, then one block per check."""
    lines = [format_summary(report)]
    for c in report["checks"]:
        label = {"as-upstream": "as upstream"}.get(c["status"], c["status"])
        lines.append(f"{c['name']:<52} {label}")
        lines.append(f"  {c['title']}" + (f" [{c['group']}; from {c['selftest']}]" if c.get("selftest") else
                                          f" [{c.get('group', '-')}]"))
        if c["status"] not in ("skipped",):
            lines.append(f"  setup     {c['setup']}")
            lines.append(f"  call      {c['call']}")
            lines.append(f"  observed  {c['observed']['text']}")
            lines.append(f"  upstream  {c['upstream']['text']}")
        lines.append(f"  verdict   {c['verdict']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
