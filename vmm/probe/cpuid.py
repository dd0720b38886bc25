"""Probe checks on guest CPUID: what KVM holds after KVM_SET_CPUID2, KVM_GET_CPUID2's E2BIG protocol and
KVM_SET_CPUID2 after KVM_RUN (cpuid_test)."""

import errno as _errno

from ..errors import KvmError, errno_name
from .core import (GUEST_TIMEOUT, attempt, check, hex_text, not_in_kernel, observed_ok, pvm_note, result, skip,
                   upstream, version_text)

RUNTIME_FEATURES = {"OSXSAVE", "OSPKE", "APIC"}  # KVM keeps these in step with CR4 / the APIC base


@check("get_cpuid2_matches_set", "KVM_GET_CPUID2 returns the table KVM_SET_CPUID2 gave it", "cpuid")
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
                   + "; a snapshot must record the table it set, not this one" + pvm_note(ctx))
    return result("VM and vCPU; KVM_SET_CPUID2 with the default guest CPUID "
                  f"({len(given.features())} named features)", "KVM_GET_CPUID2", obs, exp, verdict,
                  details={"added": added, "removed": removed, "added_not_supported": unsupported,
                           "xcr0_set": hex_text(given.xcr0_supported()),
                           "xcr0_held": hex_text(held.xcr0_supported())})


def _runtime_masks(function, index):
    """(eax, ebx, ecx, edx) masks of the bits KVM may change at run time in this leaf: OSXSAVE
    (CPUID.1:ECX[27]) and OSPKE (CPUID.7.0:ECX[4]) follow CR4; CPUID.(0DH,0/1).EBX follow XCR0 and
    IA32_XSS (the exceptions the kernel's cpuid_test makes)."""
    m = [0xFFFFFFFF] * 4
    if function == 1:
        m[2] &= ~(1 << 27)
    elif function == 7 and index == 0:
        m[2] &= ~(1 << 4)
    elif function == 0xD and index < 2:
        m[1] = 0
    return m


def _compare(given, held):
    """Entries of two CPUID tables that differ outside the run-time bits: [(leaf text, given, held)]."""
    a = {(e[0], e[1]): e for e in given.to_kvm_entries()}
    b = {(e[0], e[1]): e for e in held.to_kvm_entries()}
    out = []
    for key in sorted(set(a) | set(b)):
        ea, eb = a.get(key), b.get(key)
        name = f"{key[0]:#x}.{key[1]}"
        if ea is None or eb is None:
            out.append((name, "absent" if ea is None else "present", "absent" if eb is None else "present"))
            continue
        mask = _runtime_masks(*key)
        ra = [ea[3 + i] & mask[i] for i in range(4)]
        rb = [eb[3 + i] & mask[i] for i in range(4)]
        if ra != rb or ea[2] != eb[2]:
            out.append((name, ":".join(f"{x:08x}" for x in ra), ":".join(f"{x:08x}" for x in rb)))
    return out


@check("vcpu_cpuid_matches_supported", "KVM_GET_CPUID2 after KVM_SET_CPUID2 of KVM_GET_SUPPORTED_CPUID", "cpuid",
       selftest="cpuid_test")
def _c_vcpu_supported(ctx):
    given = ctx.supported.copy()
    with ctx.vm() as vm:
        v = vm.create_vcpu()
        obs = attempt(lambda: v.set_cpuid2(given) or 0, lambda _: "0 (accepted)")
        if not obs["ok"]:
            return result("VM and vCPU", "KVM_SET_CPUID2 of KVM_GET_SUPPORTED_CPUID as KVM gave it", obs,
                          upstream("0: KVM accepts its own supported CPUID", 0),
                          f"KVM refused its own supported CPUID: {obs['text']}")
        held = v.get_cpuid2()
    diff = _compare(given, held)
    obs = observed_ok([list(d) for d in diff], f"{len(diff)} leaves differ" + (
        ": " + "; ".join(f"{n} {a} -> {b}" for n, a, b in diff[:4]) + ("; ..." if len(diff) > 4 else "")
        if diff else ""))
    exp = upstream("0 leaves differ: the same entries, flags and registers, apart from OSXSAVE, OSPKE and "
                   "CPUID.(0DH,0/1).EBX, which follow CR4, XCR0 and IA32_XSS", [])
    verdict = ("the vCPU holds the supported CPUID it was given" if not diff else
               f"KVM holds a different table: {len(diff)} leaves differ from what KVM_SET_CPUID2 gave it"
               + pvm_note(ctx))
    return result(f"VM and vCPU; KVM_SET_CPUID2 with KVM_GET_SUPPORTED_CPUID unchanged ({len(given)} entries)",
                  "KVM_GET_CPUID2", obs, exp, verdict, details={"given_entries": len(given),
                                                                 "held_entries": len(held)})


@check("get_cpuid2_e2big", "KVM_GET_CPUID2 with too small an nent", "cpuid", selftest="cpuid_test")
def _c_get_cpuid2_e2big(ctx):
    from .._bindings import ffi, ioctl
    given = ctx.guest_cpuid
    n = len(given)
    with ctx.vm() as vm:
        v = ctx.vcpu(vm, given)
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": n + 1, "entries": n + 1})
        full = attempt(lambda: ioctl(v.fd, "KVM_GET_CPUID2", buf) or buf.nent)
        wrong = []
        for i in range(n):
            buf.nent = i
            try:
                ioctl(v.fd, "KVM_GET_CPUID2", buf)
                wrong.append((i, "0 (accepted)", buf.nent))
            except KvmError as e:
                if e.errno != _errno.E2BIG or buf.nent != i:
                    wrong.append((i, errno_name(e.errno), buf.nent))
    if full["ok"] and full["value"] == n + 1:  # nent left as given on success
        return not_in_kernel(ctx, f"KVM_GET_CPUID2 left nent at {n + 1} for a vCPU holding {n} entries: this "
                             "kernel writes nent only on E2BIG (Linux 6.1 kvm_vcpu_ioctl_get_cpuid2); the "
                             "kernel's cpuid_test asserts the later ABI, nent set on success and kept on E2BIG")
    ok = full["ok"] and full["value"] == n and not wrong
    obs = observed_ok({"nent_after_success": full["value"], "wrong": [list(w) for w in wrong]},
                      f"nent {n + 1}: {full['text']} (nent now {full['value']}); nent 0..{n - 1}: "
                      + ("E2BIG with nent unchanged for each" if not wrong else
                         "; ".join(f"nent {i}: {e}, nent now {after}" for i, e, after in wrong[:4])))
    exp = upstream(f"with room for {n + 1}: success and nent set to {n}; with nent 0..{n - 1}: E2BIG and nent "
                   "left as it was", {"nent_after_success": n, "wrong": []})
    verdict = ("KVM_GET_CPUID2 reports the entry count on success and refuses short buffers untouched" if ok else
               "KVM_GET_CPUID2 does not follow the E2BIG protocol: " + obs["text"])
    return result(f"VM and vCPU with the default guest CPUID ({n} entries)", "KVM_GET_CPUID2 with nent "
                  f"{n + 1}, then with each nent from 0 to {n - 1}", obs, exp, verdict,
                  status="as-upstream" if ok else "differs")


@check("set_cpuid2_after_run", "KVM_SET_CPUID2 after KVM_RUN: the same table only", "cpuid",
       selftest="cpuid_test")
def _c_set_after_run(ctx):
    from ..guest.machine import Machine
    from ..guest.runner import Sync
    given = ctx.guest_cpuid
    steps = {}
    with Machine("sync", kvm=ctx.kvm, cpuid=given) as m:
        v = m.vcpu
        ev = m.run(timeout=GUEST_TIMEOUT)
        if not isinstance(ev, Sync):
            return skip(f"the sync guest did not reach its first SYNC ({ev})")
        table = given.with_apic_id(0)  # what Machine gave vCPU 0

        def answer(t):
            try:
                v.set_cpuid2(t)
                return "0"
            except KvmError as e:
                return errno_name(e.errno)
        steps["the same table"] = answer(table)
        s = v.get_sregs()
        toggled = []
        if given.has("XSAVE"):
            s.cr4 ^= 1 << 18  # OSXSAVE
            toggled.append("OSXSAVE")
        if given.has("PKU"):
            s.cr4 ^= 1 << 22  # PKE
            toggled.append("PKE")
        if toggled:
            v.set_sregs(s)
            steps[f"the same table after toggling CR4.{'/'.join(toggled)}"] = answer(table)
        changed = table.copy()
        changed.entry(7, 0).ebx -= 1
        steps["leaf 7 EBX changed"] = answer(changed)
        changed = table.copy()
        e = changed.entry(0x80000008)
        if e is not None:
            e.eax = (e.eax & ~0xFF) | ((e.eax & 0xFF) - 1)
            steps["MAXPHYADDR one less"] = answer(changed)
        held = v.get_cpuid2()
        steps["the table KVM_GET_CPUID2 gives"] = answer(held)
    # kvm_cpuid_check_equal() (Linux 5.16+, arch/x86/kvm/cpuid.c): -EINVAL for any difference
    want = {k: ("0" if k.startswith("the same") or k == "the table KVM_GET_CPUID2 gives" else "EINVAL")
            for k in steps}
    bad = [k for k, w in want.items() if steps[k] != w]
    toggle = next((k for k in steps if k.startswith("the same table after")), None)
    older = toggle in bad and steps["the same table"] == "0" and steps["the table KVM_GET_CPUID2 gives"] == "0"
    if older:  # the held table changed with CR4 and is compared bit for bit: a kernel before the fix
        bad.remove(toggle)
        want[toggle] = steps[toggle]
    obs = observed_ok(steps, "; ".join(f"{k}: {a}" for k, a in steps.items()))
    exp = upstream("0 for the unchanged table (also after CR4 changes the run-time bits); an error (EINVAL) for "
                   "any change of features or MAXPHYADDR", want)
    verdict = ("after KVM_RUN, KVM_SET_CPUID2 accepts only the table the vCPU has"
               + (f"; {toggle}: not in this kernel (Linux {version_text(ctx.kver)}): it compares the run-time "
                  "bits too (before 'KVM: x86: Apply runtime updates to current CPUID during KVM_SET_CPUID{,2}')"
                  if older else "") if not bad else
               f"after KVM_RUN, {len(bad)} answers differ: {', '.join(bad)}"
               + (f"; KVM accepts the table it holds, which is not the one it was given{pvm_note(ctx)}"
                  if steps["the table KVM_GET_CPUID2 gives"] == "0" and steps["the same table"] != "0" else ""))
    return result("the sync guest at CPL3 run to its first SYNC, with the default guest CPUID",
                  "KVM_SET_CPUID2 with the same table, after CR4 changes, with leaf 7 EBX - 1, with "
                  "MAXPHYADDR - 1, and with KVM_GET_CPUID2's table", obs, exp, verdict,
                  status="as-upstream" if not bad else "differs")
