"""`vmm baseline`: the guest CPUID every host of a pool can provide.

Inputs are hosts (probe reports, CPUID dumps, `here`). The result starts from the default guest
CPUID of the first probed host (the first input when none is probed) and makes every field fit every
host by the CPUID field model (vmm.cpuid_model.merge_tables), the one `vmm compat` judges by:
  * feature flags only when every host has them (OSXSAVE, OSPKE, HYPERVISOR and the other skipped
    fields stay as the base has them); vendor-derived bits as KVM derives them on each host;
  * bounding numbers (max leaves, address widths, leaf 7 sub-leaf count, XSAVE sizes, counters)
    at the smallest; unknown bits that differ cleared, with a warning each;
  * each XSAVE component only when every host supports it at the same standard offset and size,
    and IA32_XSS bits every host supports; AMX never (it needs a permission `vmm run --cpu` does
    not ask for); CPUID leaf 0xD sizes and the feature bits that depend on a dropped component
    follow (CpuidTable.guest_for_xcr0). A host whose XSAVE components overlap is refused;
  * APIC IDs (leaf 1 EBX[31:24], leaf 0xB/0x1F EDX) of vCPU 0, whatever CPU the prober ran on.
Hosts must agree on the vendor. The result is checked with `vmm compat` (compat.compare) against
every input before it is returned, so a guest started anywhere in the pool can be restored anywhere.
"""

from .compat import BASELINE_SCHEMA, XTILE, CompatError, Guest, compare
from .cpuid import FEATURES
from .cpuid_model import SKIP, fields_of, merge_tables
from .xsave import XsaveLayout, bits_of, component_name, mask_names

SCHEMA_ID = BASELINE_SCHEMA


class BaselineError(CompatError):
    """Hosts that have no common guest CPUID (different vendors, overlapping XSAVE layouts), or no hosts."""


def _skipped_names():
    """Named feature bits the field model does not compare (OS- or KVM-maintained)."""
    out = set()
    for n, f in FEATURES.items():
        for fld in fields_of(f.leaf, f.subleaf, f.register):
            if fld.lo <= f.bit <= fld.hi and fld.kind == SKIP:
                out.add(n)
    return out


def compute(hosts):
    """The baseline of `hosts` (vmm.host.Host objects): a dict with the guest CPUID under "cpuid"."""
    if not hosts:
        raise BaselineError("baseline: no hosts given")
    vendors = {h.vendor for h in hosts}
    if len(vendors) > 1:
        raise BaselineError("baseline: the hosts disagree on the vendor ("
                            + ", ".join(f"{h.label}: {h.vendor}" for h in hosts)
                            + "); a guest cannot move between CPU vendors, so there is no common guest CPUID")
    layouts = [(h, h.layout) for h in hosts]
    overlaps = [f"{h.label}: {p}" for h, lay in layouts for p in lay.overlap_problems()]
    if overlaps:
        raise BaselineError("baseline: XSAVE components overlap in the standard format, so no guest "
                            "state can be laid out for every host: " + "; ".join(overlaps))
    layout_warnings = [f"{h.label}: {x}" for h, lay in layouts for x in lay.warnings]
    base = next((h for h in hosts if h.kind in ("report", "here")), hosts[0])
    caps = [h.guest_cpuid(h.supported.xcr0_supported() & ~XTILE) for h in hosts]
    table, warnings = merge_tables(base.guest_cpuid(base.supported.xcr0_supported() & ~XTILE), caps)

    # XSAVE: components every host has at the same place (the flags merge already kept only XCR0
    # bits every host supports)
    xcr0 = table.xcr0_supported() & ~XTILE
    mine_layout = layouts[hosts.index(base)][1]
    dropped_components = []
    for i in list(bits_of(xcr0 & ~0x3)):
        mine = mine_layout.components.get(i)
        for h, lay in layouts:
            other = lay.components.get(i)
            if not h.table.xcr0_supported() >> i & 1:
                why = f"not supported on {h.label}"
            elif mine is None or other is None:
                why = f"its offset is unknown on {base.label if mine is None else h.label}"
            elif (other.offset, other.size) != (mine.offset, mine.size):
                why = f"{mine.size}@{mine.offset} on {base.label}, {other.size}@{other.offset} on {h.label}"
            else:
                continue
            xcr0 &= ~(1 << i)
            dropped_components.append({"index": i, "name": component_name(i), "why": why})
            break
    table = table.guest_for_xcr0(xcr0)
    # KVM_GET_SUPPORTED_CPUID passes through the APIC ID of whichever CPU the prober ran on: give the
    # file vCPU 0's, so the same pool always yields the same file
    e1 = table.entry(0x1)
    if e1 is not None:
        e1.ebx &= 0x00FFFFFF
    for e in table:
        if e.function in (0xB, 0x1F):
            e.edx = 0

    # what was left out, by name, and why
    features = table.features()
    anywhere = set().union(*(c.features() for c in caps)) - _skipped_names()
    dropped = []
    for f in sorted(anywhere - features):
        lacking = [h.label for h, c in zip(hosts, caps) if not c.has(f)]
        dropped.append({"feature": f, "missing_on": lacking,
                        "why": ("missing on " + ", ".join(lacking)) if lacking else
                        "needs an XSAVE component the baseline dropped"})

    guest = Guest(label="the baseline", kind="cpuid", cpuid=table)
    for h in hosts:
        c = compare(guest, h)
        if not c.compatible:  # the construction above is wrong if this happens
            raise BaselineError(f"baseline: the result does not fit {h.label}: " + "; ".join(c.problems))
    lay = XsaveLayout.from_cpuid(table)
    return {
        "schema": SCHEMA_ID,
        "vendor": table.vendor,
        "xcr0": f"{table.xcr0_supported():#x}",
        "xcr0_names": mask_names(table.xcr0_supported()),
        "xsave_size": lay.standard_size(),
        "hosts": [h.describe() for h in hosts],
        "base": base.label,
        "features": sorted(features),
        "dropped_features": dropped,
        "xsave_components": [{"index": i, "name": c.name, "offset": c.offset, "size": c.size}
                             for i, c in sorted(lay.components.items()) if i >= 2 and not c.supervisor],
        "dropped_components": dropped_components + ([{"index": 18, "name": "XTILEDATA",
                                                      "why": "AMX needs a guest permission; left out"}]
                                                    if any(h.table.xcr0_supported() & XTILE for h in hosts) else []),
        "warnings": layout_warnings + warnings,
        "cpuid": table.to_json(),
    }


def baseline(specs, device="/dev/kvm"):
    """compute() over the hosts named by `specs` (probe reports, CPUID dumps, 'here')."""
    from .compat_inputs import load_host
    return compute([load_host(s, device) for s in specs])


def format_baseline(b, output=None):
    lines = [f"baseline of {len(b['hosts'])} hosts ({b['vendor']}), starting from {b['base']}:"]
    for h in b["hosts"]:
        lines.append(f"  {h['label']}: {h['vendor']}" + (f", Linux {h['kernel']}" if h.get("kernel") else "")
                     + (", PVM" if h.get("pvm") else ""))
    lines.append(f"XCR0 {b['xcr0']} ({b['xcr0_names']}), XSAVE area {b['xsave_size']} bytes")
    for c in b["xsave_components"]:
        lines.append(f"  {c['name']} ({c['index']}) {c['size']}@{c['offset']}")
    for c in b["dropped_components"]:
        lines.append(f"  dropped {c['name']} ({c['index']}): {c['why']}")
    lines.append(f"{len(b['features'])} named features: {' '.join(b['features'])}")
    if b["dropped_features"]:
        by_why = {}
        for d in b["dropped_features"]:
            by_why.setdefault(d["why"], []).append(d["feature"])
        lines.append(f"dropped {len(b['dropped_features'])} features:")
        for why, names in by_why.items():
            lines.append(f"  {why}: {' '.join(names)}")
    for w in b.get("warnings", []):
        lines.append(f"warning: {w}")
    if output:
        lines.append(f"-> {output} (vmm run --cpu {output}, vmm snapshot --cpu {output})")
    return "\n".join(lines) + "\n"
