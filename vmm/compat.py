"""`vmm compat`: can a guest from SOURCE run, or be restored, on a destination?

A guest is what a snapshot holds (its guest CPUID, each vCPU's XSAVE area, XCR0 and MSRs), a guest
CPUID file (`vmm baseline`, `vmm cpuid --json`), or the default guest of a host (a probe report, a
CPUID dump, or `here`). A destination is a host: a probe report written there, a CPUID dump of its
CPU (read as what that CPU could give a guest under KVM), or `here` (this host, probed now).

The comparison is pure once both sides are loaded: vendor; every named CPUID feature of the guest
present there (bits the guest OS or KVM maintain are left out); every XSAVE component the guest's
state may hold (its CPUID's XCR0, its vCPUs' XCR0 and XSTATE_BV) present there at the same standard
offset and size; each XSAVE area within the destination's KVM_CAP_XSAVE2 (with or without the AMX
guest permission); the MSRs the state carries listed by the destination's KVM and, when feature
gated, backed by its CPUID; and AMX, which needs the guest permission before the first vCPU.
"""

import json
import os
from dataclasses import dataclass, field

from . import files
from .cpudump import parse_cpuid_text
from .cpuid import CpuidError, CpuidTable
from .errors import VmmError
from .xsave import XsaveError, XsaveLayout, bits_of, component_name, kvm_xsave_size, mask_names

# Bits the guest OS (OSXSAVE, OSPKE) or KVM (HYPERVISOR) set at run time: never a reason to refuse.
OS_CONTROLLED = frozenset({"OSXSAVE", "OSPKE", "HYPERVISOR"})
# What KVM gives every guest whatever the CPU has (seen in KVM_GET_SUPPORTED_CPUID on AMD hosts,
# which have neither TSC deadline nor IA32_ARCH_CAPABILITIES natively): added to a CPUID dump's
# features when the dump stands for a host.
KVM_EMULATED = ("X2APIC", "TSC_DEADLINE", "ARCH_CAPABILITIES", "HYPERVISOR")


XTILEDATA = 18
XTILE = (1 << 17) | (1 << 18)
SNAPSHOT_MAGIC = b"VMMSNAP\0"
BASELINE_PREFIX = "vmm-baseline/"


class CompatError(VmmError):
    """An input compat or baseline cannot use: says which and why."""




def _span(c):
    return None if c is None else {"offset": c.offset, "size": c.size}


def _fmt_span(s):
    return "-" if s is None else f"{s['size']}@{s['offset']}"


def _msr_name(i):
    from .regs import _MSR_NAME_BY_INDEX
    n = _MSR_NAME_BY_INDEX.get(i)
    return f"{i:#x} ({n})" if n else f"{i:#x}"


# --- reading SOURCE and TARGET ---------------------------------------------------------------------
def read_input(spec):
    """('here', None) | ('snapshot', path) | ('cloud-hypervisor', path) | ('report', dict)
    | ('baseline', dict) | ('cpuid', table)
    | ('dump', table), judged by content, not by the file name."""
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
    try:
        with open(spec, "rb") as f:
            head = f.read(len(SNAPSHOT_MAGIC))
    except OSError as e:
        raise CompatError(f"{spec}: cannot read: {e.strerror or e}") from None
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
            data = json.loads(text)
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
    return ("cpuid" if dump.format == "json" else "dump"), dump.table


def _check_baseline(data, spec):
    from .baseline import SCHEMA_ID
    if data.get("schema") != SCHEMA_ID:
        raise CompatError(f"{spec}: baseline schema {data.get('schema')!r} is not one this vmm reads ({SCHEMA_ID})")
    if not isinstance(data.get("cpuid"), dict):
        raise CompatError(f"{spec}: baseline without a 'cpuid' table")
    return data


# --- a destination host ----------------------------------------------------------------------------
@dataclass
class Host:
    """What a destination can give a guest."""

    label: str
    kind: str  # "report", "dump", "here"
    supported: CpuidTable  # KVM_GET_SUPPORTED_CPUID (report/here) or the CPU's CPUID (dump)
    amx_supported: CpuidTable = None  # the supported CPUID after an AMX permission was granted
    xsave2: int = None  # KVM_CAP_XSAVE2 without the AMX permission (None: unknown)
    xsave2_amx: int = None  # with it (None: cannot be granted there, or unknown)
    amx: str = "unknown"  # what an AMX guest permission request does there
    amx_problems: list = field(default_factory=list)
    msr_index_list: set = None  # KVM_GET_MSR_INDEX_LIST (None: unknown, e.g. a CPUID dump)
    msrs_readable: set = None
    kernel: str = None
    pvm: bool = None
    set_xsave_beyond_cpuid: bool = None  # KVM_SET_XSAVE takes components the guest CPUID lacks (6.6+)

    @property
    def vendor(self):
        return self.supported.vendor

    @property
    def table(self):
        """The widest table: the supported CPUID with AMX when the permission can be granted."""
        return self.amx_supported or self.supported

    @property
    def layout(self):
        return XsaveLayout.from_cpuid(self.table)

    def guest_cpuid(self, xcr0=None):
        """The guest CPUID this host gives for `xcr0` (default: everything it can, AMX included
        when grantable), with what KVM emulates added when the table is a CPU's own CPUID."""
        t = self.table
        mask = t.xcr0_supported() if xcr0 is None else xcr0
        try:
            g = t.guest_for_xcr0(mask)
        except CpuidError as e:
            raise CompatError(f"{self.label}: {e}") from None
        if self.kind == "dump":
            for name in KVM_EMULATED:
                f = CpuidTable.feature(name)
                if g.entry(f.leaf, f.subleaf) is not None:
                    g.set_feature(name, True)
            # Intel CPUs report SYSCALL (0x80000001 EDX[11]) only to 64-bit code, and dumps are often
            # taken by 32-bit tools: a long-mode CPU has SYSCALL for a 64-bit guest.
            if g.has("LM"):
                g.set_feature("SYSCALL", True)
        return g

    @property
    def capability(self):
        return self.guest_cpuid()

    def default_guest_cpuid(self):
        """What `vmm run` would give a guest there: no AMX (it needs the permission)."""
        return self.guest_cpuid(self.supported.xcr0_supported() & ~XTILE)

    def describe(self):
        return {"label": self.label, "kind": self.kind, "vendor": self.vendor, "kernel": self.kernel,
                "pvm": self.pvm}

    # -- constructors ---------------------------------------------------------------------------
    @classmethod
    def from_report(cls, data, label):
        h = data["host"]
        try:
            supported = CpuidTable.from_json(h["supported_cpuid"])
            amx = h.get("amx")
            after = None
            if amx and amx.get("granted") and amx.get("supported_cpuid_after"):
                after = CpuidTable.from_json(amx["supported_cpuid_after"])
        except CpuidError as e:
            raise CompatError(f"{label}: {e}") from None
        checks = {c["name"]: c for c in data.get("checks", [])}
        narrow = checks.get("set_xsave_after_narrow_cpuid")
        beyond = None
        if narrow and narrow["status"] in ("as-upstream", "differs"):
            beyond = bool(narrow["observed"]["ok"])
        granted = bool(amx and amx.get("granted"))
        return cls(
            label=label, kind="report", supported=supported, amx_supported=after,
            xsave2=h["xsave2"]["vm_fd"] or 4096,
            xsave2_amx=(amx["xsave2_after"].get("vm_fd") if granted else None),
            amx=("granted" if granted else amx["request"] if amx else "not probed"),
            amx_problems=([] if granted else [f"ARCH_REQ_XCOMP_GUEST_PERM(18) answered {amx['request']}"
                                              if amx else "the report has no AMX permission probe"]),
            msr_index_list={int(x, 16) for x in h["msr_index_list"]},
            msrs_readable=None if h.get("msrs_readable") is None else {int(x, 16) for x in h["msrs_readable"]},
            kernel=h["kernel"], pvm=h["pvm"], set_xsave_beyond_cpuid=beyond)

    @classmethod
    def from_dump(cls, table, label):
        from .amx import host_problems as amx_problems
        if not table.xcr0_supported():
            raise CompatError(f"{label}: the CPUID has no leaf 0xD: XSAVE is not enumerated")
        try:
            layout = XsaveLayout.from_cpuid(table)
        except XsaveError as e:
            raise CompatError(f"{label}: {e}") from None
        xcr0 = table.xcr0_supported()
        no_amx = table
        if xcr0 & XTILE:  # what KVM lists before the permission: no tiles, a smaller area
            no_amx = table.copy()
            d0 = no_amx.entry(0xD, 0)
            d0.eax &= ~XTILE
            d0.ebx = d0.ecx = layout.standard_size(xcr0 & ~XTILE & layout.user_mask)
            for i in (17, 18):
                no_amx.remove(0xD, i)
        problems = amx_problems(table, source="CPUID") if xcr0 & XTILE else ["the CPU has no AMX"]
        return cls(label=label, kind="dump", supported=no_amx, amx_supported=None if problems else table,
                   xsave2=kvm_xsave_size(layout, xcr0 & ~XTILE),
                   xsave2_amx=None if problems else kvm_xsave_size(layout, xcr0),
                   amx="possible (the CPU has AMX)" if not problems else "not possible", amx_problems=problems)

    @classmethod
    def here(cls, device="/dev/kvm"):
        """This host, probed now: fingerprint, plus the AMX permission request (in a fresh process)
        and KVM_SET_XSAVE beyond a narrower guest CPUID."""
        from . import probe
        checks = probe.run_checks(device, ["req_xcomp_guest_perm", "cap_xsave2_vm_fd_after_request",
                                           "set_xsave_after_narrow_cpuid"])
        host = probe.host_info(device)
        host["amx"] = probe.amx_from_checks({c["name"]: c for c in checks})
        return cls.from_report({"host": host, "checks": checks}, "this host")


def load_host(spec, device="/dev/kvm"):
    kind, obj = read_input(spec)
    if kind == "here":
        return Host.here(device)
    if kind == "report":
        return Host.from_report(obj, f"probe report {spec}")
    if kind in ("dump", "cpuid"):
        return Host.from_dump(obj, f"CPUID {'dump' if kind == 'dump' else 'JSON'} {os.path.basename(spec)}")
    if kind in ("snapshot", "cloud-hypervisor"):
        raise CompatError(f"{spec}: a snapshot is a guest, not a host: give it as SOURCE, and as the "
                          "destination a probe report, a CPUID dump or 'here'")
    raise CompatError(f"{spec}: a baseline is a guest CPUID, not a host: give it as SOURCE")


# --- a guest ---------------------------------------------------------------------------------------
def _xsave_needed(buf):
    """Bytes of a saved XSAVE area a destination must take: the buffer size follows the saving
    process's AMX permission, and a zero tail may be cut on restore (vmm.state.fit_xsave)."""
    return min(len(buf), max(4096, len(buf.rstrip(b"\0"))))


@dataclass
class Guest:
    """A guest and the state it carries."""

    label: str
    kind: str  # "snapshot", "cpuid", "host" (the default guest of a host)
    cpuid: CpuidTable
    xsave_sizes: list = field(default_factory=list)  # per vCPU, bytes of the saved XSAVE area
    xstate_bv: int = 0  # OR over the vCPUs' saved XSTATE_BV
    xcr0: int = 0  # OR over the vCPUs' XCR0
    msrs: set = None  # MSR indices the state carries (None: no state)
    source_layout: XsaveLayout = None  # the XSAVE layout of the host the state was saved on
    source: dict = None  # kernel/vendor/pvm of the source host, when known

    @property
    def vendor(self):
        return self.cpuid.vendor

    @classmethod
    def from_snapshot(cls, snap, label):
        from .probe import xstate_bv
        host = snap.meta.get("host") or {}
        layout = None
        if host.get("xsave_layout"):
            try:
                layout = XsaveLayout.from_json(host["xsave_layout"])
            except XsaveError:
                layout = None
        return cls(label=label, kind="snapshot", cpuid=snap.guest_cpuid(),
                   xsave_sizes=[_xsave_needed(s.xsave) for s in snap.vcpus],
                   xstate_bv=_or(xstate_bv(s.xsave) for s in snap.vcpus),
                   xcr0=_or(s.xcrs.get(0, 0) for s in snap.vcpus),
                   msrs=set().union(*(s.msrs for s in snap.vcpus)) if snap.vcpus else set(),
                   source_layout=layout,
                   source={"kernel": host.get("kernel"), "vendor": host.get("vendor"), "pvm": host.get("pvm")})

    @classmethod
    def from_host(cls, host):
        g = host.default_guest_cpuid()
        msrs = host.msrs_readable if host.msrs_readable is not None else host.msr_index_list
        return cls(label=f"a guest with the default CPUID of {host.label}", kind="host", cpuid=g,
                   xsave_sizes=[host.xsave2] if host.xsave2 else [], xstate_bv=g.xcr0_supported(),
                   xcr0=g.xcr0_supported(), msrs=msrs, source_layout=host.layout,
                   source={"kernel": host.kernel, "vendor": host.vendor, "pvm": host.pvm})


def _or(values):
    out = 0
    for v in values:
        out |= v
    return out


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
        return Guest(label=f"guest CPUID {spec}", kind="cpuid", cpuid=obj)
    return Guest.from_host(load_host(spec, device))


# --- the comparison --------------------------------------------------------------------------------
@dataclass
class Comparison:
    guest: Guest
    host: Host
    vendor: dict
    features: dict
    components: list
    xsave_size: dict
    msrs: dict
    amx: dict
    problems: list
    notes: list

    @property
    def compatible(self):
        return not self.problems

    def to_json(self):
        g = self.guest
        return {
            "compatible": self.compatible,
            "verdict": "yes" if self.compatible else "no",
            "source": {"label": g.label, "kind": g.kind, "vendor": g.vendor, "host": g.source,
                       "xcr0": f"{g.xcr0:#x}", "guest_cpuid_xcr0": f"{g.cpuid.xcr0_supported():#x}",
                       "xstate_bv": f"{g.xstate_bv:#x}", "xsave_sizes": g.xsave_sizes},
            "destination": self.host.describe(),
            "vendor": self.vendor, "features": self.features, "xsave_components": self.components,
            "xsave_size": self.xsave_size, "msrs": self.msrs, "amx": self.amx,
            "problems": self.problems, "notes": self.notes,
        }


def compare(guest, host):
    """Everything that decides whether `guest` can run/restore on `host`; pure."""
    from .state import FEATURE_GATED_MSRS
    problems, notes = [], []

    # vendor
    vendor_ok = not (guest.vendor and host.vendor and guest.vendor != host.vendor)
    if not vendor_ok:
        problems.append(f"vendor: the guest's CPUID says {guest.vendor}, the destination is {host.vendor}")
    vendor = {"source": guest.vendor, "destination": host.vendor, "same": vendor_ok}

    # named CPUID features
    cap = host.capability
    wanted = sorted(guest.cpuid.features() - OS_CONTROLLED)
    there = cap.features()
    missing = [f for f in wanted if f not in there]
    if missing:
        problems.append("CPUID features the destination lacks: " + ", ".join(missing))
    features = {"guest": len(wanted), "present": [f for f in wanted if f in there], "missing": missing,
                "not_compared": sorted(OS_CONTROLLED)}

    # XSAVE components
    g_layout = _layout(guest.cpuid)
    h_layout = host.layout
    h_xcr0 = host.table.xcr0_supported()
    g_cpuid_xcr0 = guest.cpuid.xcr0_supported()
    mask = g_cpuid_xcr0 | guest.xcr0 | guest.xstate_bv
    components = []
    for i in bits_of(mask):
        src = g_layout.components.get(i) if g_layout and g_cpuid_xcr0 >> i & 1 else None
        if src is None and guest.source_layout is not None:
            src = guest.source_layout.components.get(i)
        dst = h_layout.components.get(i) if h_xcr0 >> i & 1 else None
        if dst is not None and dst.supervisor:
            dst = None
        why = ("guest XCR0" if g_cpuid_xcr0 >> i & 1 else
               "vCPU XCR0" if guest.xcr0 >> i & 1 else "XSTATE_BV beyond the guest's XCR0")
        legacy = i < 2
        if dst is None and not legacy:
            status = "missing"
            problems.append(f"XSAVE component {component_name(i)} ({i}) ({why}) is not supported there")
        elif legacy or src is None or (src.offset, src.size) == (dst.offset, dst.size):
            status = "same" if (legacy or src is not None) else "unknown"
            if status == "unknown":
                notes.append(f"XSAVE component {component_name(i)} ({i}): its layout on the source is unknown")
        else:
            status = "differs"
            problems.append(f"XSAVE component {component_name(i)} ({i}) is {src.size}@{src.offset} in the "
                            f"guest, {dst.size}@{dst.offset} there")
        components.append({"index": i, "name": component_name(i), "why": why,
                           "source": None if legacy else _span(src), "destination": None if legacy else _span(dst),
                           "status": status})
    beyond = guest.xstate_bv & ~(g_cpuid_xcr0 | 0x3)
    if beyond:
        text = (f"the saved XSTATE_BV has {mask_names(beyond)} beyond the guest CPUID's XCR0 "
                f"{g_cpuid_xcr0:#x} (the source did not enforce the guest's XCR0)")
        if host.set_xsave_beyond_cpuid is False:
            problems.append(text + "; the destination's KVM_SET_XSAVE refuses such state (EINVAL, as "
                            "kernels 5.17 to 6.5 do)")
        elif host.set_xsave_beyond_cpuid is None:
            notes.append(text + "; KVM_SET_XSAVE accepts it from Linux 6.6 (and 6.1.60), EINVAL before")
        else:
            notes.append(text + "; the destination's KVM_SET_XSAVE accepts it")

    # XSAVE size
    needs_amx = bool((g_cpuid_xcr0 | guest.xcr0 | guest.xstate_bv) >> XTILEDATA & 1)
    size_status = "not applicable" if not guest.xsave_sizes else "ok"
    for n, size in enumerate(guest.xsave_sizes):
        vcpu = f"vCPU {n}: " if len(guest.xsave_sizes) > 1 else ""
        if host.xsave2 is None:
            size_status = "unknown"
            notes.append(f"{vcpu}XSAVE area of {size} bytes; the destination's KVM_CAP_XSAVE2 is unknown")
        elif size <= host.xsave2:
            if size < host.xsave2:
                notes.append(f"{vcpu}the XSAVE area is {size} bytes, the destination's is {host.xsave2}: "
                             "pad it with zeros for KVM_SET_XSAVE")
        elif host.xsave2_amx is not None and size <= host.xsave2_amx:
            size_status = "needs AMX permission"
            needs_amx = True
        else:
            size_status = "too big"
            problems.append(f"{vcpu}the XSAVE area is {size} bytes, the destination's KVM_CAP_XSAVE2 is "
                            f"{host.xsave2}" + (f" ({host.xsave2_amx} with the AMX permission)"
                                                if host.xsave2_amx else ""))
    xsave_size = {"saved": guest.xsave_sizes, "destination": host.xsave2,
                  "destination_with_amx": host.xsave2_amx, "status": size_status}

    # MSRs
    carried = sorted(guest.msrs or ())
    msr_missing, gated_missing = [], []
    if guest.msrs is None:
        msr_status = "no state"
    else:
        if host.msr_index_list is None:
            msr_status = "unknown"
            if carried:
                notes.append(f"{len(carried)} MSRs carried, not checked: a CPUID dump lists no MSRs "
                             "(use a probe report of the destination)")
        else:
            msr_missing = [m for m in carried if m not in host.msr_index_list and m not in FEATURE_GATED_MSRS]
            msr_status = "ok"
        for m in carried:
            feats = FEATURE_GATED_MSRS.get(m)
            if feats and not any(cap.has(f) for f in feats):
                gated_missing.append(m)
        if msr_missing:
            msr_status = "missing"
            problems.append("MSRs the state carries that the destination's KVM does not list: "
                            + ", ".join(_msr_name(m) for m in msr_missing))
        if gated_missing:
            msr_status = "missing"
            problems.append("MSRs the state carries for features the destination lacks: "
                            + ", ".join(f"{_msr_name(m)} ({'/'.join(FEATURE_GATED_MSRS[m])})"
                                        for m in gated_missing))
    msrs = {"carried": [f"{m:#x}" for m in carried], "not_listed_there": [f"{m:#x}" for m in msr_missing],
            "feature_missing_there": [f"{m:#x}" for m in gated_missing], "status": msr_status}

    # AMX
    if needs_amx:
        if host.amx_problems:
            amx = {"needed": True, "status": "not available", "why": host.amx_problems}
            problems.append("AMX: the guest uses XTILEDATA, the destination cannot grant it: "
                            + "; ".join(host.amx_problems))
        else:
            amx = {"needed": True, "status": "permission required", "why": []}
            notes.append("AMX: the restoring process must call arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) "
                         "before its first vCPU")
    else:
        amx = {"needed": False, "status": "not used", "why": []}

    if guest.source and guest.source.get("kernel") and host.kernel and guest.source["kernel"] != host.kernel:
        notes.append(f"kernels differ: Linux {guest.source['kernel']} -> Linux {host.kernel}")
    return Comparison(guest, host, vendor, features, components, xsave_size, msrs, amx, problems, notes)


def _layout(cpuid):
    if not cpuid.xcr0_supported():
        return None
    try:
        return XsaveLayout.from_cpuid(cpuid)
    except XsaveError:
        return None


def format_comparison(c):
    """The readable diff: vendor, feature by feature, component by component, size, MSRs, AMX, verdict."""
    g, h = c.guest, c.host
    where = "saved on" if g.kind == "snapshot" else "on"
    out = [f"source       {g.label}" + (f" ({where} {g.source['vendor']}, Linux {g.source['kernel']}"
                                        f"{', PVM' if g.source.get('pvm') else ''})"
                                        if g.source and g.source.get("kernel") else ""),
           f"destination  {h.label} ({h.vendor or 'vendor unknown'}"
           + (f", Linux {h.kernel}" if h.kernel else "") + (", PVM" if h.pvm else "") + ")",
           ""]
    v = c.vendor
    out.append(f"{'vendor':<22} {v['source'] or '?'} -> {v['destination'] or '?'}"
               f"{'':<8}{'same' if v['same'] else 'DIFFERS'}")
    f = c.features
    out.append(f"{'CPUID features':<22} {len(f['present'])} of {f['guest']} present there"
               + (f"; missing: {len(f['missing'])}" if f["missing"] else ""))
    for name in f["missing"]:
        out.append(f"  {name:<20} missing there")
    out.append(f"{'XSAVE components':<22} guest CPUID XCR0 {g.cpuid.xcr0_supported():#x}"
               + (f", vCPU XCR0 {g.xcr0:#x}, XSTATE_BV {g.xstate_bv:#x}" if g.kind == "snapshot" else ""))
    for r in c.components:
        name = f"{r['name']} ({r['index']})"
        if r["index"] < 2:
            spans = "legacy region"
        else:
            spans = f"{_fmt_span(r['source'])} -> {_fmt_span(r['destination'])}"
        label = {"same": "same", "differs": "DIFFERS", "missing": "MISSING", "unknown": "unknown"}[r["status"]]
        out.append(f"  {name:<20} {spans:<28} {label}")
    s = c.xsave_size
    if s["saved"]:
        amx = f" ({s['destination_with_amx']} with AMX permission)" if s["destination_with_amx"] else ""
        out.append(f"{'XSAVE size':<22} {', '.join(str(x) for x in s['saved'])} bytes saved; KVM_CAP_XSAVE2 "
                   f"there {s['destination'] if s['destination'] is not None else 'unknown'}{amx}  {s['status']}")
    m = c.msrs
    if m["status"] != "no state":
        extra = {"ok": "all listed there", "unknown": "not checked (no MSR list for the destination)",
                 "missing": "MISSING there: " + ", ".join(m["not_listed_there"] + m["feature_missing_there"])}
        out.append(f"{'MSRs':<22} {len(m['carried'])} carried; {extra[m['status']]}")
    a = c.amx
    out.append(f"{'AMX':<22} {a['status']}" + (f": {'; '.join(a['why'])}" if a["why"] else ""))
    out.append("")
    if c.compatible:
        out.append("verdict: yes: the guest can " + ("be restored" if g.kind == "snapshot" else "run") + " there")
    else:
        out.append("verdict: no: the guest cannot " + ("be restored" if g.kind == "snapshot" else "run") + " there")
        out += [f"  - {p}" for p in c.problems]
    if c.notes:
        out.append("notes:")
        out += [f"  - {n}" for n in c.notes]
    return "\n".join(out) + "\n"
