"""The CPUID field model (vmm.cpuid_model) and the MSR table (vmm.msr_features): every field has a kind,
the judge and the baseline follow it. Offline on recorded CPUID, plus the MSR table against this
host's KVM_GET_MSR_INDEX_LIST."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from vmm import baseline, msr_features
from vmm.compat import Guest, Host, compare
from vmm.cpudump import read_cpuid_file
from vmm.cpuid import FEATURES, REGISTERS, CpuidEntry, CpuidTable
from vmm.cpuid_model import (EXACT, FLAGS, MAX, SKIP, UNKNOWN, XSAVE, compare_tables, fields_of,
                             kvm_derived, merge_tables)

DATA = Path(__file__).parent / "data"
TABLES = {n: read_cpuid_file(DATA / f).table for n, f in (
    ("genoa", "amd-genoa-epyc-9124.txt"), ("milan", "amd-milan-cpuid-r.txt"),
    ("spr", "intel-sapphire-rapids-w7-2475x.txt"), ("spr-cleared", "spr-leaf7-subleaf2-cleared.txt"))}
BY_VENDOR = [("genoa", "milan"), ("spr", "spr-cleared")]


def test_every_bit_of_every_register_has_exactly_one_kind():
    for t in TABLES.values():
        for e in t:
            for reg in REGISTERS:
                covered = 0
                for f in fields_of(e.function, e.index, reg):
                    assert covered & f.mask == 0, (hex(e.function), e.index, reg, f)
                    covered |= f.mask
                assert covered == 0xFFFFFFFF


@pytest.mark.parametrize("leaf, sub, reg, bit, kind", [
    (0x1, 0, "ebx", 24, SKIP),  # initial APIC ID
    (0x1, 0, "ecx", 27, SKIP),  # OSXSAVE inside the flags of leaf 1 ECX
    (0x1, 0, "ecx", 28, FLAGS),  # AVX
    (0x7, 2, "edx", 0, FLAGS),  # PSFD
    (0x7, 0, "eax", 0, MAX),  # max sub-leaf
    (0x80000008, 0, "eax", 3, MAX),  # physical address bits
    (0x1D, 1, "eax", 0, EXACT),  # AMX palette
    (0xD, 9, "ebx", 0, XSAVE),  # a component's offset
    (0x40000001, 0, "eax", 0, SKIP),  # hypervisor leaves
    (0x80000002, 0, "eax", 0, SKIP),  # brand string
    (0x4, 1, "eax", 0, SKIP),  # cache parameters
    (0x14, 1, "ebx", 5, UNKNOWN),
    (0x12, 2, "eax", 0, SKIP),  # SGX EPC sections
])
def test_kinds(leaf, sub, reg, bit, kind):
    f = next(f for f in fields_of(leaf, sub, reg) if f.lo <= bit <= f.hi)
    assert f.kind == kind
    if kind == SKIP:
        assert f.why


def test_numbers_bound_and_skipped_fields_never_refuse():
    g = TABLES["genoa"].copy()
    small = g.copy()
    small.entry(0x80000008, 0).eax = (small.entry(0x80000008, 0).eax & ~0xFF) | 40
    small.entry(0x1, 0).ebx ^= 0x7F << 24  # another APIC ID
    d = {(x.field.name, x.verdict) for x in compare_tables(g, small)}
    assert ("physical address bits", "problem") in d and ("initial APIC ID", "skipped") in d
    assert all(x.verdict != "problem" for x in compare_tables(small, g))  # fewer bits fit more


def test_kvm_derives_the_other_vendors_spelling_of_speculation_controls():
    genoa = kvm_derived(TABLES["genoa"])
    assert genoa.has("SSBD") and genoa.has("STIBP") and genoa.has("IBRS_IBPB") and genoa.has("VIRT_SSBD")
    spr = kvm_derived(TABLES["spr"])
    assert spr.has("AMD_SSBD") and spr.has("AMD_IBRS") and spr.has("AMD_STIBP") and spr.has("AMD_IBPB")
    assert not kvm_derived(CpuidTable()).features()  # nothing to derive from, nothing created


def test_merge_takes_the_smallest_numbers_and_clears_unknown_bits_that_differ():
    a, b = TABLES["spr"].copy(), TABLES["spr"].copy()
    b.entry(0x14, 1).ebx ^= 1 << 7
    b.entry(0x0, 0).eax = 0x1F
    m, warnings = merge_tables(a, [a, b])
    assert m.max_leaf == 0x1F and m.entry(0x20, 0) is None  # leaves beyond the smaller max go
    assert not m.entry(0x14, 1).ebx >> 7 & 1 and "CPUID.(0x14,1).EBX[7]" in warnings[0]


# --- the property: baseline fits every host it was made from; a guest fits its own host ---------------
_FLAG_REGS = [(0x1, 0, "ecx"), (0x1, 0, "edx"), (0x7, 0, "ebx"), (0x7, 0, "ecx"), (0x7, 0, "edx"),
              (0x7, 1, "eax"), (0x7, 2, "edx"), (0x80000001, 0, "ecx"), (0x80000001, 0, "edx"),
              (0x80000008, 0, "ebx"), (0x80000021, 0, "eax")]


@st.composite
def hosts_of_one_vendor(draw):
    names = draw(st.sampled_from(BY_VENDOR))
    out = []
    for n in range(2):
        t = TABLES[draw(st.sampled_from(names))].copy()
        for _ in range(draw(st.integers(0, 6))):  # clear some feature bits, named or not
            leaf, sub, reg = draw(st.sampled_from(_FLAG_REGS))
            e = t.entry(leaf, sub)
            if e is not None:
                setattr(e, reg, e.reg(reg) & ~(1 << draw(st.integers(0, 31))))
        if draw(st.booleans()):  # a narrower physical address width
            e = t.entry(0x80000008, 0)
            e.eax = (e.eax & ~0xFF) | draw(st.integers(36, e.eax & 0xFF))
        if draw(st.booleans()):  # a bit no rule covers
            e = t.entry(0x80000008, 0)
            e.eax ^= 1 << draw(st.integers(24, 31))
        out.append(Host.from_dump(t, f"host{n}"))
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hosts_of_one_vendor())
def test_baseline_fits_both_hosts_and_a_guest_fits_its_own_host(hosts):
    b = baseline.compute(hosts)
    guest = Guest(label="baseline", kind="cpuid", cpuid=CpuidTable.from_json(b["cpuid"]))
    for h in hosts:
        c = compare(guest, h)
        assert c.compatible, c.problems
        own = compare(Guest.from_host(h), h)
        assert own.compatible, own.problems


# --- MSRs gated by guest CPUID ----------------------------------------------------------------------
def test_the_msr_table_names_real_features():
    for index, feats in msr_features.GATED.items():
        assert feats and all(f in FEATURES or f in msr_features.CONDITIONS for f in feats), hex(index)
        assert index not in msr_features.EVERY_GUEST
    # ranges built from counts must not reach a neighbour (a dict spread would silently overwrite it)
    assert msr_features.features_of(0xE1) == ("WAITPKG",)
    assert {0xCE, 0x1A0, 0x1D9} <= set(msr_features.EVERY_GUEST)


def test_bndcfgs_needs_mpx_and_tsc_aux_rdtscp_or_rdpid():
    spr = TABLES["spr"]
    assert not spr.has("MPX") and not msr_features.given(0xD90, spr)  # Sapphire Rapids has no MPX
    skylake_like = spr.copy()
    skylake_like.set_feature("MPX", True)
    assert msr_features.given(0xD90, skylake_like)
    t = spr.copy()
    t.set_feature("RDTSCP", False)
    assert msr_features.given(0xC0000103, t)  # RDPID still gives TSC_AUX
    t.set_feature("RDPID", False)
    assert msr_features.withheld([0xC0000103, 0x10], t) == [0xC0000103]


@pytest.mark.parametrize("kernel", ["6.1", "6.12"])
def test_every_msr_the_recorded_real_kvm_lists_is_in_the_table(kernel):
    """The MSR index lists of Debian's kvm_amd (probe reports recorded in nested KVM, tests/data): 6.1
    lists the Intel PMU MSRs, the AMD legacy counters and 27 Hyper-V MSRs besides PVM's. Each is known,
    and a guest with the CPUID that KVM supports there (no Hyper-V signature, no CPUID leaf 0AH) is
    not given the Hyper-V or Intel PMU ones; the AMD legacy counters belong to every guest of AMD."""
    report = json.loads((DATA / f"probe-debian-{kernel}-kvm_amd-tcg.json").read_text())
    listed = [int(i, 16) for i in report["host"]["msr_index_list"]]
    unknown = [hex(i) for i in listed if i not in msr_features.GATED and i not in msr_features.EVERY_GUEST]
    assert unknown == []
    supported = CpuidTable.from_json(report["host"]["supported_cpuid"])
    withheld = msr_features.withheld(listed, supported)
    hyperv = [i for i in listed if 0x40000000 <= i < 0x40000200]
    assert len(hyperv) >= 20 and set(hyperv) <= set(withheld)
    assert not set(range(0xC0010000, 0xC0010008)) & set(withheld)
    if kernel == "6.1":
        assert {0x309, 0x30A, 0x30B, 0x38D, 0x38E, 0x38F, 0x390, 0x3F1, 0x3F2, 0x600} <= set(withheld)
    # with the Hyper-V signature and an Intel PMU of version 2, 4 + 3 counters, they are given
    t = supported.copy()
    t.put(CpuidEntry(0x40000001, 0, 0, 0x31237648, 0, 0, 0), replace=True)  # "Hv#1"
    t.put(CpuidEntry(0xA, 0, 0, 0x07300402, 0, 0, 0x603), replace=True)  # v2, 4 GP, 3 fixed
    given = set(listed) - set(msr_features.withheld(listed, t))
    assert set(hyperv) <= given
    if kernel == "6.1":
        assert {0x309, 0x30A, 0x30B, 0x38D, 0x38E, 0x38F, 0x390} <= given
        assert {0x3F1, 0x3F2, 0x600} & given == set()  # PEBS and DS_AREA need DS
    assert msr_features.given(0xC1 + 3, t) and not msr_features.given(0xC1 + 4, t)  # IA32_PMC3, not PMC4
    assert msr_features.given(0x30B, t) and not msr_features.given(0x30C, t)  # fixed 2, not fixed 3


@pytest.mark.kvm
def test_every_msr_this_hosts_kvm_lists_is_in_the_table(kvm):
    """KVM_GET_MSR_INDEX_LIST here: each MSR is either gated by a CPUID feature or given to every
    guest; an MSR the table does not know would be saved for guests that were never given it."""
    listed = kvm.get_msr_index_list()
    unknown = [hex(i) for i in listed if i not in msr_features.GATED and i not in msr_features.EVERY_GUEST]
    assert unknown == [], f"MSRs KVM lists here that vmm.msr_features does not know: {unknown}"
    supported = kvm.supported_cpuid()
    for i in listed:  # the table's features for what KVM lists here are features KVM could give
        feats = msr_features.features_of(i)
        assert not feats or all(f in FEATURES or f in msr_features.CONDITIONS for f in feats)
    # the guest vmm runs by default carries exactly the listed MSRs its CPUID gives it
    from vmm.guest.machine import Machine
    from vmm import state
    with Machine("sync", kvm=kvm) as m:
        m.run(timeout=5)
        s = state.save_state(m.vcpu)
    assert msr_features.withheld(s.msrs, m.vcpu.cpuid) == []
    assert [i for i in listed if not msr_features.given(i, m.vcpu.cpuid) and i in s.msrs] == []
    assert supported is not None


def test_compat_refuses_state_with_an_msr_its_own_cpuid_does_not_give_and_one_the_destination_lacks():
    with_mpx = read_cpuid_file(DATA / "apx-overlapping-mpx.txt").table  # MPX with its XSAVE state
    host = Host.from_dump(TABLES["spr"], "spr")
    g = Guest(label="g", kind="snapshot", cpuid=TABLES["spr"].guest_for_xcr0(0xE7), msrs={0x10, 0xD90})
    c = compare(g, host)
    assert "MSRs the state carries that the guest's CPUID does not give it: 0xd90 (BNDCFGS) (MPX)" in c.problems
    g2 = Guest(label="g", kind="snapshot", cpuid=with_mpx.guest_for_xcr0(0x1F), msrs={0x10, 0xD90})
    assert g2.cpuid.has("MPX")
    c2 = compare(g2, host)  # given to the guest, but Sapphire Rapids has no MPX to back it
    assert "MSRs the state carries for features the destination lacks: 0xd90 (BNDCFGS) (MPX)" in c2.problems
