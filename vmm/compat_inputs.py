"""What `vmm compat` and `vmm baseline` read (vmm.sources is what the register commands read): a snapshot, a probe report, a baseline, a CPUID dump
or JSON, or `here`; told apart by content, not by the file name. Loading is kept apart from the
judge (vmm.compat), which is pure, so restore can use the judge without this module's imports
(snapshot, probe)."""

import os

from . import files
from .compat import BASELINE_PREFIX, BASELINE_SCHEMA, CompatError, Guest
from .cpudump import parse_cpuid_text
from .cpuid import CpuidError, CpuidTable
from .host import Host, HostError

SNAPSHOT_MAGIC = b"VMMSNAP\0"

__all__ = ["read_input", "load_host", "load_guest", "here"]


def read_input(spec):
    """('here', None) | ('snapshot', path) | ('cloud-hypervisor', path) | ('report', dict)
    | ('baseline', dict) | ('cpuid', CpuidDump) | ('dump', CpuidDump), judged by content, not by the
    file name."""
    if spec == "here":
        return "here", None
    if not os.path.exists(spec):
        raise CompatError(f"{spec}: no such file (give a snapshot, a probe report, a CPUID dump, a "
                          "guest CPUID JSON file, or 'here')")
    if os.path.isdir(spec):
        from .chsnap import is_ch_snapshot
        if is_ch_snapshot(spec):
            return "cloud-hypervisor", spec
        raise CompatError(f"{spec}: is a directory, and not a Cloud Hypervisor snapshot (no state.json)")
    try:  # a regular file only: a FIFO or device would block or never end
        with files.open_input(spec, "snapshot, probe report, CPUID JSON or CPUID dump") as f:
            head = f.read(len(SNAPSHOT_MAGIC))
    except files.FileError as e:
        raise CompatError(str(e)) from None
    if head == SNAPSHOT_MAGIC:
        return "snapshot", spec
    try:
        raw = files.read_bytes(spec, "probe report, CPUID JSON or CPUID dump")
    except files.FileError as e:
        raise CompatError(str(e)) from None
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise CompatError(f"{spec}: not a vmm snapshot, probe report, CPUID JSON or CPUID dump "
                          "(binary data without the snapshot magic)") from None
    stripped = text.lstrip()
    if stripped.startswith(("{", "[")):
        try:
            data = files.parse_json(text)
        except ValueError as e:
            what = "truncated" if not text.rstrip().endswith(("}", "]")) else "not valid JSON"
            raise CompatError(f"{spec}: {what}: {e}") from None
        if isinstance(data, dict) and ("schema" in data or "host" in data or "checks" in data):
            from .probe import check_report
            schema = data.get("schema")
            if isinstance(schema, str) and schema.startswith(BASELINE_PREFIX):
                return "baseline", _check_baseline(data, spec)
            return "report", check_report(data, spec)
    if not any(line.strip() and not line.lstrip().startswith("#") for line in text.splitlines()):
        raise CompatError(f"{spec}: empty file")
    try:
        dump = parse_cpuid_text(text, spec)
    except CpuidError as e:
        raise CompatError(f"{spec}: not a vmm snapshot, probe report, CPUID JSON or CPUID dump ({e})") from None
    return ("cpuid" if dump.format == "json" else "dump"), dump


def _dump_label(kind, dump, spec):
    """'CPUID dump x.txt', with what the reader decided (which CPU of a multi-CPU dump) said."""
    label = f"CPUID {'dump' if kind == 'dump' else 'JSON'} {os.path.basename(spec)}"
    return f"{label} ({'; '.join(dump.notes)})" if dump.notes else label


def _check_baseline(data, spec):
    if data.get("schema") != BASELINE_SCHEMA:
        raise CompatError(f"{spec}: baseline schema {data.get('schema')!r} is not one this vmm reads "
                          f"({BASELINE_SCHEMA})")
    if not isinstance(data.get("cpuid"), dict):
        raise CompatError(f"{spec}: baseline without a 'cpuid' table")
    return data


def load_host(spec, device="/dev/kvm"):
    kind, obj = read_input(spec)
    if kind == "here":
        return here(device)
    if kind == "report":
        return _host(Host.from_report, obj, f"probe report {spec}")
    if kind in ("dump", "cpuid"):
        return _host(Host.from_dump, obj.table, _dump_label(kind, obj, spec))
    if kind in ("snapshot", "cloud-hypervisor"):
        raise CompatError(f"{spec}: a snapshot is a guest, not a host: give it as SOURCE, and as the "
                          "destination a probe report, a CPUID dump or 'here'")
    raise CompatError(f"{spec}: a baseline is a guest CPUID, not a host: give it as SOURCE")


def _host(make, obj, label):
    try:
        return make(obj, label)
    except HostError as e:
        raise CompatError(str(e)) from None


def here(device="/dev/kvm"):
    """This host, probed now: fingerprint, plus the AMX permission request (in a fresh process)
    and KVM_SET_XSAVE beyond a narrower guest CPUID."""
    from . import probe
    checks = probe.run_checks(device, ["req_xcomp_guest_perm", "cap_xsave2_vm_fd_after_request",
                                       "set_xsave_after_narrow_cpuid"])
    host = probe.host_info(device)
    host["amx"] = probe.amx_from_checks({c["name"]: c for c in checks})
    return Host.from_report({"host": host, "checks": checks}, "this host")


def load_guest(spec, device="/dev/kvm"):
    kind, obj = read_input(spec)
    if kind == "snapshot":
        from .snapshot import load
        return Guest.from_snapshot(load(spec), f"snapshot {spec}")
    if kind == "cloud-hypervisor":  # its vCPU states, read as vmm's (vmm/chsnap.py)
        from .chsnap import load as load_ch
        return Guest.from_snapshot(load_ch(spec), f"Cloud Hypervisor snapshot {spec}")
    if kind == "baseline":
        try:
            table = CpuidTable.from_json(obj["cpuid"])
        except CpuidError as e:
            raise CompatError(f"{spec}: {e}") from None
        return Guest(label=f"baseline {spec}", kind="cpuid", cpuid=table)
    if kind == "cpuid":
        return Guest(label=f"guest CPUID {spec}", kind="cpuid", cpuid=obj.table)
    return Guest.from_host(load_host(spec, device))
