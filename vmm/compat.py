"""`vmm compat`: can a guest from SOURCE run, or be restored, on a destination? The one judge: restore's
host check (vmm.snapshot.host_problems), `vmm compat` and `vmm baseline` all call `compare`, with
their own wording (Wording: "in the guest ... there" or "in the snapshot ... here").

A guest is what a snapshot holds (its guest CPUID, each vCPU's XSAVE area, XCR0 and MSRs), a guest
CPUID file (`vmm baseline`, `vmm cpuid --json`), or the default guest of a host. A destination is a
vmm.host.Host (a probe report, a CPU's CPUID dump, this host probed, or this process's /dev/kvm).
Reading inputs is vmm.sources' job; this module is pure.

The comparison: vendor; every CPUID field by its kind (vmm.cpuid_model: feature flags a subset,
bounding numbers at most, per-vCPU/per-host fields skipped with the reason, unknown differing bits a
warning); every XSAVE component the guest's state may hold (its CPUID's XCR0, its vCPUs' XCR0 and
XSTATE_BV) present there at the same standard offset and size, and no two components overlapping
on either side; each XSAVE area within the destination's KVM_CAP_XSAVE2 (with or without the AMX
guest permission); the MSRs the state carries given by the guest's CPUID (vmm.msr_features), listed
by the destination's KVM and backed by its CPUID; and AMX, which needs the guest permission before
the first vCPU.
"""

from dataclasses import dataclass, field

from . import msr_features
from .cpuid import CpuidTable
from .cpuid_model import FLAGS, compare_tables, problems_of, warnings_of
from .errors import VmmError
from .host import KVM_EMULATED, XTILE, Host, HostError  # noqa: F401 (re-exported: the judge's inputs)
from .tsc import rate_problem
from .xsave import XsaveError, XsaveLayout, XSTATE_BV_OFFSET, bits_of, component_name, mask_names

XTILEDATA = 18
BASELINE_PREFIX = "vmm-baseline/"
BASELINE_SCHEMA = "vmm-baseline/1"


class CompatError(VmmError):
    """An input compat or baseline cannot use: says which and why."""


@dataclass(frozen=True)
class Wording:
    """How the judge names the two sides in what it says."""

    guest: str  # "the guest's CPUID" subject
    in_guest: str  # "in the guest"
    there: str  # "there"
    dest: str  # "the destination"


COMPAT = Wording("the guest", "in the guest", "there", "the destination")
RESTORE = Wording("the snapshot", "in the snapshot", "here", "this host")
RUN = Wording("the guest", "in the guest", "here", "this host")


def _span(c):
    return None if c is None else {"offset": c.offset, "size": c.size}


def _fmt_span(s):
    return "-" if s is None else f"{s['size']}@{s['offset']}"


def _xstate_bv(buf):
    return int.from_bytes(buf[XSTATE_BV_OFFSET:XSTATE_BV_OFFSET + 8], "little")


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
    tsc_khz: list = field(default_factory=list)  # per vCPU, the TSC rate the state carries (kHz)

    @property
    def vendor(self):
        return self.cpuid.vendor

    @classmethod
    def from_snapshot(cls, snap, label):
        """From a loaded vmm.snapshot.Snapshot (its guest CPUID, vCPU states and source host)."""
        host = snap.meta.get("host") or {}
        layout = None
        if host.get("xsave_layout"):
            try:
                layout = XsaveLayout.from_json(host["xsave_layout"])
            except XsaveError:
                layout = None
        return cls(label=label, kind="snapshot", cpuid=snap.guest_cpuid(),
                   xsave_sizes=[_xsave_needed(s.xsave) for s in snap.vcpus],
                   xstate_bv=_or(_xstate_bv(s.xsave) for s in snap.vcpus),
                   xcr0=_or(s.xcrs.get(0, 0) for s in snap.vcpus),
                   msrs=set().union(*(s.msrs for s in snap.vcpus)) if snap.vcpus else set(),
                   source_layout=layout,
                   source={"kernel": host.get("kernel"), "vendor": host.get("vendor"), "pvm": host.get("pvm")},
                   tsc_khz=[s.tsc_khz for s in snap.vcpus])

    @classmethod
    def from_host(cls, host):
        g = host.default_guest_cpuid()
        msrs = host.msrs_readable if host.msrs_readable is not None else host.msr_index_list
        if msrs is not None:  # what a guest there carries: what its CPUID gives it
            msrs = {m for m in msrs if msr_features.given(m, g)}
        return cls(label=f"a guest with the default CPUID of {host.label}", kind="host", cpuid=g,
                   xsave_sizes=[host.xsave2] if host.xsave2 else [], xstate_bv=g.xcr0_supported(),
                   xcr0=g.xcr0_supported(), msrs=msrs, source_layout=host.layout,
                   source={"kernel": host.kernel, "vendor": host.vendor, "pvm": host.pvm})


def _or(values):
    out = 0
    for v in values:
        out |= v
    return out


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
    warnings: list = field(default_factory=list)
    tsc: dict = field(default_factory=dict)

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
            "xsave_size": self.xsave_size, "msrs": self.msrs, "amx": self.amx, "tsc": self.tsc,
            "problems": self.problems, "warnings": self.warnings, "notes": self.notes,
        }


def compare(guest, host, wording=COMPAT):
    """Everything that decides whether `guest` (a Guest) can run/restore on `host` (a vmm.host.Host);
    pure. Returns a Comparison; `.problems` empty means yes."""
    w = wording
    problems, notes, warnings = [], [], []

    # vendor
    vendor_ok = not (guest.vendor and host.vendor and guest.vendor != host.vendor)
    if not vendor_ok:
        problems.append(f"vendor: {w.guest}'s CPUID says {guest.vendor}, {w.dest} is {host.vendor}")
    vendor = {"source": guest.vendor, "destination": host.vendor, "same": vendor_ok}

    # CPUID, field by field
    cap = host.capability
    diffs = compare_tables(guest.cpuid, cap, w.in_guest, w.there)
    problems += problems_of(diffs, w.dest)
    warnings += warnings_of(diffs)
    missing = sorted({n for d in diffs if d.verdict == "problem" and d.field.kind == FLAGS for n in d.bits})
    named = sorted(guest.cpuid.features())
    refused = set(missing)  # present: what the judge does not refuse (KVM-emulated bits included)
    features = {"guest": len(named), "present": [f for f in named if f not in refused], "missing": missing,
                "fields": [d.to_json() for d in diffs],
                "refused": sum(d.verdict == "problem" for d in diffs),
                "warnings": sum(d.verdict == "warning" for d in diffs),
                "skipped": sum(d.verdict == "skipped" for d in diffs)}

    # XSAVE components
    g_layout = _layout(guest.cpuid)
    h_layout = host.layout
    h_xcr0 = host.table.xcr0_supported()
    g_cpuid_xcr0 = guest.cpuid.xcr0_supported()
    mask = g_cpuid_xcr0 | guest.xcr0 | guest.xstate_bv
    if g_layout is not None:
        problems += [f"XSAVE layout {w.in_guest}: {p}" for p in g_layout.overlap_problems(mask & g_cpuid_xcr0)]
    problems += [f"XSAVE layout {w.there}: {p}" for p in h_layout.overlap_problems(mask & h_xcr0)]
    warnings += [f"XSAVE layout {w.there}: {x}" for x in h_layout.warnings]
    if g_layout is not None:
        warnings += [f"XSAVE layout {w.in_guest}: {x}" for x in g_layout.warnings]
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
            if i in h_layout.unknown:
                problems.append(f"XSAVE component {component_name(i)} ({i}) ({why}): its offset {w.there} is "
                                f"unknown ({h_layout.unknown[i]})")
            else:
                problems.append(f"XSAVE component {component_name(i)} ({i}) is not supported {w.there} ({why})")
        elif legacy or src is None or (src.offset, src.size) == (dst.offset, dst.size):
            status = "same" if (legacy or src is not None) else "unknown"
            if status == "unknown":
                notes.append(f"XSAVE component {component_name(i)} ({i}): its layout on the source is unknown")
        else:
            status = "differs"
            problems.append(f"XSAVE component {component_name(i)} ({i}) is {src.size}@{src.offset} "
                            f"{w.in_guest}, {dst.size}@{dst.offset} {w.there}")
        components.append({"index": i, "name": component_name(i), "why": why,
                           "source": None if legacy else _span(src), "destination": None if legacy else _span(dst),
                           "status": status})

    beyond = guest.xstate_bv & ~(g_cpuid_xcr0 | 0x3)
    if beyond:
        text = (f"the saved XSTATE_BV has {mask_names(beyond)} beyond the guest CPUID's XCR0 "
                f"{g_cpuid_xcr0:#x} (the source did not enforce the guest's XCR0)")
        if host.set_xsave_beyond_cpuid is False:
            problems.append(text + f"; {w.dest}'s KVM_SET_XSAVE refuses such state (EINVAL, as "
                            "kernels 5.17 to 6.5 do)")
        elif host.set_xsave_beyond_cpuid is None:
            notes.append(text + "; KVM_SET_XSAVE accepts it from Linux 6.6 (and 6.1.60), EINVAL before")
        else:
            notes.append(text + f"; {w.dest}'s KVM_SET_XSAVE accepts it")

    # XSAVE size
    needs_amx = bool((g_cpuid_xcr0 | guest.xcr0 | guest.xstate_bv) >> XTILEDATA & 1)
    size_status = "not applicable" if not guest.xsave_sizes else "ok"
    for n, size in enumerate(guest.xsave_sizes):
        vcpu = f"vCPU {n}: " if len(guest.xsave_sizes) > 1 else ""
        if host.xsave2 is None:
            size_status = "unknown"
            notes.append(f"{vcpu}XSAVE area of {size} bytes; {w.dest}'s KVM_CAP_XSAVE2 is unknown")
        elif size <= host.xsave2:
            if size < host.xsave2:
                notes.append(f"{vcpu}the XSAVE area is {size} bytes, {w.dest}'s is {host.xsave2}: "
                             "pad it with zeros for KVM_SET_XSAVE")
        elif host.xsave2_amx is not None and size <= host.xsave2_amx:
            size_status = "needs AMX permission"
            needs_amx = True
        else:
            size_status = "too big"
            problems.append(f"{vcpu}the XSAVE area is {size} bytes, {w.dest}'s KVM_CAP_XSAVE2 is "
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
            msr_missing = [m for m in carried if m not in host.msr_index_list and not msr_features.features_of(m)]
            msr_status = "ok"
        stray = msr_features.withheld(carried, guest.cpuid)
        gated_missing = [m for m in msr_features.withheld(carried, cap) if m not in stray]
        if stray:
            msr_status = "missing"
            problems.append(f"MSRs the state carries that {w.guest}'s CPUID does not give it: "
                            + ", ".join(f"{msr_features.msr_name(m)} ({'/'.join(msr_features.features_of(m))})"
                                        for m in stray))
        if msr_missing:
            msr_status = "missing"
            problems.append(f"MSRs the state carries that {w.dest}'s KVM does not list: "
                            + ", ".join(msr_features.msr_name(m) for m in msr_missing))
        if gated_missing:
            msr_status = "missing"
            problems.append(f"MSRs the state carries for features {w.dest} lacks: "
                            + ", ".join(f"{msr_features.msr_name(m)} ({'/'.join(msr_features.features_of(m))})"
                                        for m in gated_missing))
    msrs = {"carried": [f"{m:#x}" for m in carried], "not_listed_there": [f"{m:#x}" for m in msr_missing],
            "feature_missing_there": [f"{m:#x}" for m in gated_missing], "status": msr_status}

    # AMX
    if needs_amx:
        if host.amx_problems:
            amx = {"needed": True, "status": "not available", "why": host.amx_problems}
            problems.append(f"AMX: {w.guest} uses XTILEDATA, {w.dest} cannot grant it: "
                            + "; ".join(host.amx_problems))
        else:
            amx = {"needed": True, "status": "permission required", "why": []}
            notes.append("AMX: the restoring process must call arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) "
                         "before its first vCPU")
    else:
        amx = {"needed": False, "status": "not used", "why": []}

    # TSC rate: KVM gives a rate within 250 ppm of the host's without scaling (vmm/tsc.py)
    rates = sorted({r for r in guest.tsc_khz if r})
    tsc = {"saved_khz": rates, "destination_khz": host.tsc_khz, "tsc_control": host.tsc_control,
           "status": "not applicable" if not rates else "ok"}
    for rate in rates:
        why = rate_problem(rate, host.tsc_khz, host.tsc_control)
        if why:
            tsc["status"] = "differs"
            problems.append("TSC: " + why.replace("the host's", f"{w.dest}'s"))
    if rates and tsc["status"] == "ok" and not host.tsc_control and host.tsc_khz is None:
        tsc["status"] = "unknown"
        notes.append(f"TSC rate {', '.join(map(str, rates))} kHz not checked: {w.dest}'s TSC rate is unknown "
                     "(a CPUID dump or an older probe report)")

    if guest.source and guest.source.get("kernel") and host.kernel and guest.source["kernel"] != host.kernel:
        notes.append(f"kernels differ: Linux {guest.source['kernel']} -> Linux {host.kernel}")
    return Comparison(guest, host, vendor, features, components, xsave_size, msrs, amx, problems, notes,
                      warnings, tsc)


def check_runs_here(table, kvm, label):
    """Refuse, before any VM, a guest CPUID (a vmm.cpuid.CpuidTable, e.g. `vmm run --cpu FILE`) that
    this process's /dev/kvm cannot give: the judge of `vmm compat FILE --host here` (compare against
    vmm.host.Host.from_kvm), so another vendor or an XSAVE component missing here (its XCR0 would be
    EINVAL at KVM_SET_XCRS, AMX EPERM at KVM_SET_CPUID2) is named before any ioctl. The judge's
    field-by-field CPUID verdicts (compare_tables) do not refuse a run: KVM_SET_CPUID2 takes feature
    bits KVM_GET_SUPPORTED_CPUID leaves out, and kvm_pvm gives its vCPUs host features it does not list
    there (so a `vmm cpuid --vcpu --json` file of this host runs here). Raises CompatError."""
    host = Host.from_kvm(kvm)
    c = compare(Guest(label=f"guest CPUID {label}", kind="cpuid", cpuid=table), host, RUN)
    fields = set(problems_of(compare_tables(table, host.capability, RUN.in_guest, RUN.there), RUN.dest))
    problems = [p for p in c.problems if p not in fields]
    if c.amx.get("status") == "not available":
        problems.append("AMX needs this process's guest permission, which `--amx` asks for first")
    if problems:
        raise CompatError(f"{label}: this host cannot run a guest with this CPUID (as `vmm compat {label} "
                          "--host here` says):\n  - " + "\n  - ".join(problems))


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
    unnamed = sum(n.startswith("CPUID.") for n in f["missing"])  # bits without a feature name
    named_missing = len(f["missing"]) - unnamed
    out.append(f"{'CPUID features':<22} {len(f['present'])} of {f['guest']} named present there"
               + (f"; missing: {named_missing} named" if named_missing else "")
               + (f"{'; missing:' if not named_missing else ' and'} {unnamed} unnamed bit{'s' * (unnamed > 1)}"
                  if unnamed else ""))
    for name in f["missing"]:
        out.append(f"  {name:<20} missing there")
    out.append(f"{'CPUID fields':<22} {len(f['fields'])} differ: {f['refused']} refuse, {f['warnings']} "
               f"unknown (warnings), {f['skipped']} skipped, the rest allowed")
    for d in f["fields"]:
        loc = f"CPUID.({d['leaf']},{d['subleaf']}).{d['register'].upper()}[{d['bits']}]"
        mark = {"problem": "NO", "warning": "WARN", "skipped": "skip", "ok": "ok"}[d["verdict"]]
        out.append(f"  {loc:<32} {d['kind']:<17} {mark:<4} {d['text']}")
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
    t = c.tsc
    if t.get("saved_khz"):
        there = (f"{t['destination_khz']} kHz" if t["destination_khz"] is not None else "unknown") + \
            (", TSC scaling" if t["tsc_control"] else ", no TSC scaling" if t["tsc_control"] == 0 else "")
        out.append(f"{'TSC':<22} {', '.join(map(str, t['saved_khz']))} kHz -> {there}  {t['status']}")
    out.append("")
    if c.compatible:
        out.append("verdict: yes: the guest can " + ("be restored" if g.kind == "snapshot" else "run") + " there")
    else:
        out.append("verdict: no: the guest cannot " + ("be restored" if g.kind == "snapshot" else "run") + " there")
        out += [f"  - {p}" for p in c.problems]
    if c.warnings:
        out.append("warnings:")
        out += [f"  - {n}" for n in c.warnings]
    if c.notes:
        out.append("notes:")
        out += [f"  - {n}" for n in c.notes]
    return "\n".join(out) + "\n"
