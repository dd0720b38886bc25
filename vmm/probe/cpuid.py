"""Probe checks on guest CPUID: what KVM holds after KVM_SET_CPUID2."""

from .core import check, hex_text, observed_ok, result, upstream

RUNTIME_FEATURES = {"OSXSAVE", "OSPKE", "APIC"}  # KVM keeps these in step with CR4 / the APIC base


@check("get_cpuid2_matches_set", "KVM_GET_CPUID2 returns the table KVM_SET_CPUID2 gave it")
def _c_cpuid2(ctx):
    given = ctx.guest_cpuid
    with ctx.vm() as vm:
        v = ctx.vcpu(vm, given)
        held = v.get_cpuid2()
    supported = ctx.supported.features()
    added = sorted(held.features() - given.features() - RUNTIME_FEATURES)
    removed = sorted(given.features() - held.features() - RUNTIME_FEATURES)
    unsupported = [f for f in added if f not in supported]
    text = (f"+{len(added)} features ({', '.join(added[:6])}{', ...' if len(added) > 6 else ''}), "
            f"-{len(removed)}" + (f" ({', '.join(removed)})" if removed else "")) if added or removed \
        else "the same named features"
    obs = observed_ok({"added": added, "removed": removed}, text)
    exp = upstream("the same table, apart from bits KVM keeps in step at run time (OSXSAVE, OSPKE, APIC, "
                   "CPUID.(0DH,0/1).EBX)", {"added": [], "removed": []})
    if not added and not removed:
        verdict = "KVM holds the guest CPUID it was given"
    else:
        verdict = (f"KVM holds a different guest CPUID: {len(added)} features added"
                   + (f", {len(unsupported)} of them not in KVM_GET_SUPPORTED_CPUID" if unsupported else "")
                   + (f", {len(removed)} removed" if removed else "")
                   + "; a snapshot must record the table it set, not this one")
    return result("VM and vCPU; KVM_SET_CPUID2 with the default guest CPUID "
                  f"({len(given.features())} named features)", "KVM_GET_CPUID2", obs, exp, verdict,
                  details={"added": added, "removed": removed, "added_not_supported": unsupported,
                           "xcr0_set": hex_text(given.xcr0_supported()),
                           "xcr0_held": hex_text(held.xcr0_supported())})
