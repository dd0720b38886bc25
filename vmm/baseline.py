"""`vmm baseline`: the guest CPUID every host of a pool can provide.

Inputs are hosts (probe reports, CPUID dumps, `here`). The result starts from the default guest
CPUID of the first probed host (the first input when none is probed) and keeps:
  * each feature bit of the feature registers (leaves 1, 7, 0xD.1, 0x80000001, 0x80000007,
    0x80000008 EBX, 0x80000021 EAX) only when every host has it; bits the guest OS or KVM maintain
    (OSXSAVE, OSPKE, HYPERVISOR) stay as the base has them;
  * each XSAVE component only when every host supports it at the same standard offset and size,
    and IA32_XSS bits every host supports; AMX never (it needs a permission `vmm run --cpu` does
    not ask for); CPUID leaf 0xD sizes and the feature bits that depend on a dropped component
    follow (CpuidTable.guest_for_xcr0);
  * the smallest physical and linear address widths (0x80000008 EAX) and leaf 7 sub-leaf count;
  * APIC IDs (leaf 1 EBX[31:24], leaf 0xB/0x1F EDX) of vCPU 0, whatever CPU the prober ran on.
Hosts must agree on the vendor. The result is checked with `vmm compat` logic against every input
before it is returned, so a guest started anywhere in the pool can be restored anywhere in it.
"""

from .compat import OS_CONTROLLED, XTILE, CompatError, Guest, compare, load_host
from .cpuid import CpuidTable
from .xsave import XsaveLayout, bits_of, component_name, mask_names

SCHEMA_ID = "vmm-baseline/1"

# (leaf, subleaf, register) holding feature flags: ANDed over the hosts.
FEATURE_REGISTERS = (
    (0x1, 0, "ecx"), (0x1, 0, "edx"),
    (0x7, 0, "ebx"), (0x7, 0, "ecx"), (0x7, 0, "edx"),
    (0x7, 1, "eax"), (0x7, 1, "ebx"), (0x7, 1, "ecx"), (0x7, 1, "edx"), (0x7, 2, "edx"),
    (0xD, 1, "eax"),
    (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"),
    (0x80000007, 0, "edx"), (0x80000008, 0, "ebx"), (0x80000021, 0, "eax"),
)


class BaselineError(CompatError):
    """Hosts that have no common guest CPUID (different vendors), or no hosts."""


def _reg(table, leaf, sub, reg):
    e = table.entry(leaf, sub)
    return e.reg(reg) if e is not None else 0


def _keep_mask(leaf, sub, reg):
    """Bits of this register that stay as the base has them (OS- or KVM-maintained)."""
    mask = 0
    for name in OS_CONTROLLED:
        f = CpuidTable.feature(name)
        if (f.leaf, f.subleaf, f.register) == (leaf, sub, reg):
            mask |= 1 << f.bit
    return mask


def compute(hosts):
    """The baseline of `hosts` (compat.Host objects): a dict with the guest CPUID under "cpuid"."""
    if not hosts:
        raise BaselineError("baseline: no hosts given")
    vendors = {h.vendor for h in hosts}
    if len(vendors) > 1:
        raise BaselineError("baseline: the hosts disagree on the vendor ("
                            + ", ".join(f"{h.label}: {h.vendor}" for h in hosts)
                            + "); a guest cannot move between CPU vendors, so there is no common guest CPUID")
    base = next((h for h in hosts if h.kind in ("report", "here")), hosts[0])
    caps = [h.guest_cpuid(h.supported.xcr0_supported() & ~XTILE) for h in hosts]
    table = base.guest_cpuid(base.supported.xcr0_supported() & ~XTILE)

    for leaf, sub, reg in FEATURE_REGISTERS:
        e = table.entry(leaf, sub)
        if e is None:
            continue
        keep = _keep_mask(leaf, sub, reg)
        value = e.reg(reg)
        for c in caps:
            value &= _reg(c, leaf, sub, reg) | keep
        setattr(e, reg, value)
    e7 = table.entry(0x7, 0)
    if e7 is not None:
        e7.eax = min(_reg(c, 0x7, 0, "eax") for c in caps)
    e8 = table.entry(0x80000008, 0)
    if e8 is not None and all(c.entry(0x80000008, 0) for c in caps):
        phys = min(c.entry(0x80000008, 0).eax & 0xFF for c in caps)
        virt = min(c.entry(0x80000008, 0).eax >> 8 & 0xFF for c in caps)
        e8.eax = (e8.eax & ~0xFFFF) | virt << 8 | phys

    # XSAVE: components every host has at the same place; IA32_XSS bits every host has
    layouts = [(h, h.layout) for h in hosts]
    xcr0 = table.xcr0_supported() & ~XTILE
    dropped_components = []
    for i in list(bits_of(xcr0 & ~0x3)):
        mine = layouts[hosts.index(base)][1].components[i]
        for h, lay in layouts:
            other = lay.components.get(i)
            if not h.table.xcr0_supported() >> i & 1 or other is None:
                why = f"not supported on {h.label}"
            elif (other.offset, other.size) != (mine.offset, mine.size):
                why = f"{mine.size}@{mine.offset} on {base.label}, {other.size}@{other.offset} on {h.label}"
            else:
                continue
            xcr0 &= ~(1 << i)
            dropped_components.append({"index": i, "name": component_name(i), "why": why})
            break
    d1 = table.entry(0xD, 1)
    if d1 is not None:
        xss = d1.edx << 32 | d1.ecx
        for c in caps:
            xss &= c.xss_supported()
        d1.ecx, d1.edx = xss & 0xFFFFFFFF, xss >> 32
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
    anywhere = set().union(*(c.features() for c in caps)) - OS_CONTROLLED
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
        "cpuid": table.to_json(),
    }




def baseline(specs, device="/dev/kvm"):
    """compute() over the hosts named by `specs` (probe reports, CPUID dumps, 'here')."""
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
    if output:
        lines.append(f"-> {output} (vmm run --cpu {output}, vmm snapshot --cpu {output})")
    return "\n".join(lines) + "\n"
