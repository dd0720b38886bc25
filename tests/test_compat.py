"""`vmm compat` and `vmm baseline`: can a guest move between hosts, and what guest CPUID a pool of hosts
can share. Offline with recorded CPUID dumps for the comparison logic; on real KVM for snapshots taken
here, `here` as a destination, and a baseline that must boot."""

import json
import os
import subprocess
import sys

import pytest

from vmm import baseline, compat, snapshot
from vmm import compat_inputs as sources
from vmm.baseline import BaselineError
from vmm.compat import CompatError, Guest, Host, compare
from vmm.cpuid import CpuidEntry, CpuidTable
from vmm.errors import VmmError

DATA = os.path.join(os.path.dirname(__file__), "data")
SPR_PATH = os.path.join(DATA, "intel-sapphire-rapids-w7-2475x.txt")
GENOA_PATH = os.path.join(DATA, "amd-genoa-epyc-9124.txt")
SPR = CpuidTable.from_dump(SPR_PATH)
GENOA = CpuidTable.from_dump(GENOA_PATH)


def vmm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def host(table, label="host"):
    return Host.from_dump(table, label)


def genoa_variant(pkru_offset=None, drop=(), label="genoa-b"):
    """Another AMD host: Genoa's CPUID with some features cleared and PKRU moved, if asked."""
    t = GENOA.copy()
    for name in drop:
        t.set_feature(name, False)
    if pkru_offset is not None:
        e = t.entry(0xD, 9)
        t.put(CpuidEntry(0xD, 9, e.flags, e.eax, pkru_offset, e.ecx, e.edx))
    return host(t, label)


# --- the comparison, offline ------------------------------------------------------------------------
def test_an_amd_guest_cannot_move_to_intel_and_the_diff_names_vendor_and_offsets():
    c = compare(Guest.from_host(host(GENOA, "genoa")), host(SPR, "spr"))
    assert not c.compatible
    text = "\n".join(c.problems)
    assert "AuthenticAMD" in text and "GenuineIntel" in text
    assert "opmask (5) is 64@832 in the guest, 64@1088 there" in text
    assert "ZMM_Hi256 (6) is 512@896 in the guest, 512@1152 there" in text
    assert "Hi16_ZMM (7) is 1024@1408 in the guest, 1024@1664 there" in text
    assert "PKRU (9) is 8@2432 in the guest, 8@2688 there" in text
    rows = {r["name"]: r for r in c.components}
    assert rows["AVX"]["status"] == "same" and rows["opmask"]["status"] == "differs"
    assert rows["opmask"]["source"] == {"offset": 832, "size": 64}
    assert rows["opmask"]["destination"] == {"offset": 1088, "size": 64}
    out = compat.format_comparison(c)
    assert "64@832 -> 64@1088" in out and "verdict: no" in out and "AuthenticAMD -> GenuineIntel" in out


def test_a_guest_fits_the_host_it_came_from():
    for t in (GENOA, SPR):
        h = host(t)
        c = compare(Guest.from_host(h), h)
        assert c.compatible, c.problems
        assert "verdict: yes" in compat.format_comparison(c)


def test_a_cpu_dump_stands_for_what_kvm_would_give_a_guest_there():
    cap = host(SPR).capability
    # KVM emulates these whatever the CPU has; Intel reports SYSCALL only to 64-bit code
    for name in ("X2APIC", "TSC_DEADLINE", "ARCH_CAPABILITIES", "HYPERVISOR", "SYSCALL"):
        assert cap.has(name), name
    assert not SPR.has("SYSCALL") and not GENOA.has("TSC_DEADLINE")  # what the raw dumps say


def test_features_the_destination_lacks_are_listed_one_by_one():
    guest = Guest.from_host(host(GENOA))
    c = compare(guest, genoa_variant(drop=("AVX512_BF16", "GFNI")))
    assert c.features["missing"] == ["AVX512_BF16", "GFNI"]
    assert c.problems == ["CPUID features the destination lacks: AVX512_BF16, GFNI"]
    out = compat.format_comparison(c)
    assert "  AVX512_BF16          missing there" in out and "  GFNI                 missing there" in out


def test_os_controlled_bits_are_never_a_reason():
    g = GENOA.guest_for_xcr0(GENOA.xcr0_supported())
    for name in ("OSXSAVE", "OSPKE", "HYPERVISOR"):
        g.set_feature(name, True)
    d = genoa_variant()
    for name in ("OSXSAVE", "OSPKE"):
        d.supported.set_feature(name, False)
    assert compare(Guest(label="g", kind="cpuid", cpuid=g), d).compatible


def test_an_amx_guest_needs_the_permission_and_a_destination_that_can_grant_it():
    guest = Guest(label="spr guest", kind="snapshot", cpuid=SPR.guest_for_xcr0(0x602E7), xsave_sizes=[11008],
                  xstate_bv=0x602E7, xcr0=0x602E7, msrs=set())
    same = compare(guest, host(SPR))
    assert same.compatible, same.problems
    assert same.xsave_size["status"] == "needs AMX permission"
    assert same.amx["status"] == "permission required"
    assert any("ARCH_REQ_XCOMP_GUEST_PERM, 18" in n for n in same.notes)
    amd = compare(guest, host(GENOA))
    text = "\n".join(amd.problems)
    assert "XTILEDATA (18) is not supported there (guest XCR0)" in text
    assert "the XSAVE area is 11008 bytes, the destination's KVM_CAP_XSAVE2 is 4096" in text
    assert "AMX: the guest uses XTILEDATA" in text and "AMX_TILE" in text


def test_state_beyond_the_guest_xcr0_needs_a_kernel_that_accepts_it():
    """A snapshot from a host that does not enforce the guest's XCR0 (PVM): XSTATE_BV has AVX-512 state
    although the guest CPUID allows 0x7."""
    narrow = GENOA.guest_for_xcr0(0x7)
    guest = Guest(label="pvm guest", kind="snapshot", cpuid=narrow, xsave_sizes=[4096], xstate_bv=0xE7,
                  xcr0=0x7, msrs=set(), source_layout=host(GENOA).layout)
    old = genoa_variant()
    old.set_xsave_beyond_cpuid = False  # a destination on 5.17..6.5
    c = compare(guest, old)
    assert any("refuses such state" in p for p in c.problems)
    assert {r["name"]: r["why"] for r in c.components}["opmask"] == "XSTATE_BV beyond the guest's XCR0"
    new = genoa_variant()
    new.set_xsave_beyond_cpuid = True
    assert compare(guest, new).compatible
    unknown = compare(guest, genoa_variant())
    assert unknown.compatible and any("from Linux 6.6" in n for n in unknown.notes)
    moved = genoa_variant()
    moved.set_xsave_beyond_cpuid = True
    moved.supported.entry(0xD, 5).ebx = 1088  # opmask elsewhere: the carried state would land wrong
    assert any("opmask (5) is 64@832" in p for p in compare(guest, moved).problems)


def test_msrs_must_be_listed_there_and_backed_by_the_feature_they_belong_to():
    h = genoa_variant(drop=("RDTSCP", "RDPID"))
    h.msr_index_list = {0x10, 0x174, 0xC0000082}
    guest = Guest(label="g", kind="snapshot", cpuid=GENOA.guest_for_xcr0(0xE7), xsave_sizes=[4096],
                  xstate_bv=0x3, xcr0=0x7, msrs={0x10, 0x174, 0xC0000082, 0x4B564D01, 0xC0000103})
    c = compare(guest, h)
    assert "MSRs the state carries that the destination's KVM does not list: 0x4b564d01 (KVM_SYSTEM_TIME_NEW)" \
        in c.problems
    assert any("0xc0000103 (TSC_AUX) (RDTSCP/RDPID)" in p for p in c.problems)
    dump = genoa_variant()  # a CPUID dump lists no MSRs: not checkable, and said so
    assert dump.msr_index_list is None
    c = compare(Guest(label="g", kind="snapshot", cpuid=GENOA.guest_for_xcr0(0xE7), xsave_sizes=[4096],
                      msrs={0x10}), dump)
    assert c.compatible and c.msrs["status"] == "unknown" and any("not checked" in n for n in c.notes)


# --- the baseline, offline --------------------------------------------------------------------------
def test_baseline_keeps_common_features_and_components_with_identical_layouts():
    a = host(GENOA, "genoa")
    b = genoa_variant(pkru_offset=2496, drop=("AVX512_BF16", "GFNI"))
    base = baseline.compute([a, b])
    t = CpuidTable.from_json(base["cpuid"])
    assert t.xcr0_supported() == 0xE7  # PKRU left out: 8@2432 on one, 8@2496 on the other
    assert [c["name"] for c in base["dropped_components"]] == ["PKRU"]
    assert "8@2432" in base["dropped_components"][0]["why"] and "8@2496" in base["dropped_components"][0]["why"]
    assert not t.has("AVX512_BF16") and not t.has("GFNI") and not t.has("PKU")
    assert t.has("AVX512F") and t.has("AVX2") and t.has("TSC_DEADLINE")
    assert t.entry(0xD, 0).ebx == t.entry(0xD, 0).ecx == 2432
    dropped = {d["feature"]: d["why"] for d in base["dropped_features"]}
    assert dropped["GFNI"] == "missing on genoa-b" and "dropped" in dropped["PKU"]
    for h in (a, b):
        assert compare(Guest(label="b", kind="cpuid", cpuid=t), h).compatible
    assert "dropped PKRU (9)" in baseline.format_baseline(base)


def test_baseline_takes_the_narrowest_address_widths_and_leaf7_subleaves():
    small = GENOA.copy()
    e = small.entry(0x80000008, 0)
    e.eax = (e.eax & ~0xFFFF) | 48 << 8 | 40
    small.entry(0x7, 0).eax = 0
    t = CpuidTable.from_json(baseline.compute([host(GENOA), host(small)])["cpuid"])
    assert t.entry(0x80000008, 0).eax & 0xFFFF == 48 << 8 | 40
    assert t.entry(0x7, 0).eax == 0


def test_baseline_does_not_depend_on_the_cpu_the_prober_ran_on():
    """KVM_GET_SUPPORTED_CPUID carries the caller's APIC ID (leaf 1 EBX[31:24], leaf 0xB EDX)."""
    other = GENOA.copy()
    other.entry(0x1).ebx |= 0x05 << 24
    for e in other:
        if e.function == 0xB:
            e.edx = 5
    a, b = baseline.compute([host(GENOA)]), baseline.compute([host(other)])
    assert a["cpuid"] == b["cpuid"]
    assert CpuidTable.from_json(a["cpuid"]).entry(0x1).ebx >> 24 == 0


def test_baseline_refuses_hosts_of_different_vendors():
    with pytest.raises(BaselineError, match="disagree on the vendor.*AuthenticAMD.*GenuineIntel"):
        baseline.compute([host(GENOA, "genoa"), host(SPR, "spr")])
    with pytest.raises(BaselineError, match="no hosts"):
        baseline.compute([])


def test_baseline_leaves_amx_out():
    base = baseline.compute([host(SPR)])
    t = CpuidTable.from_json(base["cpuid"])
    assert t.xcr0_supported() == 0x2E7 and not t.has("AMX_TILE")
    assert base["dropped_components"][-1]["name"] == "XTILEDATA"


# --- inputs ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"\x00\x01\x02\xff", "binary data"),
    (b"hello\n", "not a CPUID dump line"),
    (b'{"entries": [', "truncated"),
    (b'{"foo": 1}', "expected an object with an 'entries' list"),
    (b'{"schema": "vmm-probe-report/9"}', "'vmm-probe-report/9' is not one this vmm reads"),
    (b'{"schema": "vmm-baseline/7", "cpuid": {}}', "baseline schema 'vmm-baseline/7'"),
    (b'{"schema": "something-else"}', "not a vmm probe report"),
])
def test_unusable_inputs_are_refused_with_a_reason(tmp_path, content, message):
    p = tmp_path / "input"
    p.write_bytes(content)
    with pytest.raises(VmmError, match=message):
        sources.load_host(str(p))


def test_a_snapshot_or_baseline_is_not_a_destination_and_a_directory_is_nothing(tmp_path):
    (tmp_path / "s.snap").write_bytes(b"VMMSNAP\0" + bytes(100))
    with pytest.raises(CompatError, match="a snapshot is a guest, not a host"):
        sources.load_host(str(tmp_path / "s.snap"))
    (tmp_path / "b.json").write_text(json.dumps(baseline.compute([host(GENOA)])))
    with pytest.raises(CompatError, match="a baseline is a guest CPUID"):
        sources.load_host(str(tmp_path / "b.json"))
    assert sources.load_guest(str(tmp_path / "b.json")).kind == "cpuid"
    with pytest.raises(CompatError, match="is a directory"):
        sources.load_host(str(tmp_path))
    with pytest.raises(CompatError, match="no such file"):
        sources.load_guest(str(tmp_path / "nope"))


# --- on this host ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def here(tmp_path_factory):
    """A probe report and a snapshot of the checkpoint guest, both written by `vmm` processes."""
    from conftest import _require_kvm
    _require_kvm()
    d = tmp_path_factory.mktemp("compat")
    r = vmm("probe", "-o", str(d / "here.json"))
    assert r.returncode in (0, 1) and ", 0 errors" in r.stdout, r.stderr  # 1: a check differs from upstream
    r = vmm("snapshot", "checkpoint", "-o", str(d / "s.snap"))
    assert r.returncode == 0, r.stderr
    return d


@pytest.mark.kvm
def test_a_snapshot_taken_here_cannot_go_to_sapphire_rapids(here, kvm):
    """The snapshot's guest has this host's XSAVE components; each one whose offset differs on
    Sapphire Rapids (AMD and Intel place opmask and PKRU differently) is named, and the vendor
    alone already makes the answer no."""
    from vmm.xsave import XsaveLayout, component_name
    ours = XsaveLayout.from_cpuid(kvm.get_supported_cpuid()).components
    theirs = XsaveLayout.from_cpuid(SPR).components
    guest_xcr0 = snapshot.load(str(here / "s.snap")).guest_cpuid().xcr0_supported()
    moved = {component_name(i) for i in ours if guest_xcr0 >> i & 1 and i > 1 and i in theirs
             and (ours[i].offset, ours[i].size) != (theirs[i].offset, theirs[i].size)}
    r = vmm("compat", str(here / "s.snap"), "--host", SPR_PATH)
    assert r.returncode == 1, r.stderr
    vendor = kvm.get_supported_cpuid().vendor
    assert f"{vendor} -> GenuineIntel" in r.stdout and "verdict: no" in r.stdout
    assert ("DIFFERS" in r.stdout) == (vendor != "GenuineIntel" or bool(moved))
    for name in moved:
        i = next(i for i in ours if component_name(i) == name)
        assert (f"XSAVE component {name} ({i}) is {ours[i].size}@{ours[i].offset} in the guest, "
                f"{theirs[i].size}@{theirs[i].offset} there") in r.stdout
    d = json.loads(vmm("compat", str(here / "s.snap"), "--host", SPR_PATH, "--json").stdout)
    assert d["compatible"] is False
    assert d["vendor"] == {"source": vendor, "destination": "GenuineIntel", "same": vendor == "GenuineIntel"}
    assert {c["name"] for c in d["xsave_components"] if c["status"] == "differs"} == moved


@pytest.mark.kvm
def test_a_snapshot_taken_here_can_be_restored_here_and_on_a_host_probed_like_this_one(here, kvm):
    for target in ("here", str(here / "here.json")):
        r = vmm("compat", str(here / "s.snap"), "--host", target)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "verdict: yes" in r.stdout and "MSRs" in r.stdout and "all listed there" in r.stdout
    # the same answer as the check `vmm restore` makes
    assert snapshot.host_problems(snapshot.load(str(here / "s.snap")), kvm) == []
    assert vmm("restore", str(here / "s.snap")).returncode == 0


@pytest.mark.kvm
def test_compat_here_agrees_with_restore_on_a_snapshot_this_host_cannot_take(tmp_path, kvm):
    from vmm import state
    from vmm.guest.machine import Machine
    with Machine("sync", kvm=kvm) as m:
        m.run(timeout=5)
        s = state.save_state(m.vcpu)
        s.cpuid = SPR.guest_for_xcr0(0x2E7)
        path = tmp_path / "spr.snap"
        snapshot.save(str(path), kvm, m.vm, m.vcpus, [s])
    c = compare(sources.load_guest(str(path)), sources.here())
    assert not c.compatible and snapshot.host_problems(snapshot.load(str(path)), kvm) != []
    assert any("GenuineIntel" in p for p in c.problems)


@pytest.mark.kvm
def test_a_baseline_of_this_host_and_genoa_boots_here_and_restores_anywhere_in_the_pool(here, tmp_path, kvm):
    if kvm.get_supported_cpuid().vendor != "AuthenticAMD":
        pytest.skip("the pool is this host and an AMD Genoa: this host is not AMD")
    cpu = tmp_path / "cpu.json"
    r = vmm("baseline", str(here / "here.json"), GENOA_PATH, "-o", str(cpu))
    assert r.returncode == 0, r.stderr
    # the components both have at the same offset and size (PKRU is 8@2432 on AMD, 8@2688 where a CPU
    # lays it out as Intel does, e.g. QEMU's: a baseline leaves a component out when its layouts differ)
    from vmm.xsave import XsaveLayout
    ours = XsaveLayout.from_cpuid(kvm.get_supported_cpuid()).components
    theirs = XsaveLayout.from_cpuid(GENOA).components
    common = sum(1 << i for i in ours if i in theirs and
                 (i < 2 or (ours[i].offset, ours[i].size) == (theirs[i].offset, theirs[i].size)))
    common &= kvm.get_supported_cpuid().xcr0_supported() & GENOA.xcr0_supported()
    assert f"XCR0 {common:#x}" in r.stdout and f"-> {cpu}" in r.stdout
    b = json.loads(cpu.read_text())
    assert b["schema"] == "vmm-baseline/1" and b["vendor"] == "AuthenticAMD"
    r = vmm("run", "--cpu", str(cpu))
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "done", r.stdout + r.stderr
    snap = tmp_path / "b.snap"
    assert vmm("snapshot", "checkpoint", "--cpu", str(cpu), "-o", str(snap)).returncode == 0
    assert vmm("restore", str(snap)).returncode == 0
    for target in (GENOA_PATH, str(here / "here.json"), "here"):
        r = vmm("compat", str(snap), "--host", target)
        assert r.returncode == 0, (target, r.stdout)
    r = vmm("compat", str(cpu), "--host", GENOA_PATH)
    assert r.returncode == 0 and "verdict: yes: the guest can run there" in r.stdout


@pytest.mark.kvm
def test_bad_reports_and_mixed_vendors_are_clear_errors(here, tmp_path):
    report = json.loads((here / "here.json").read_text())
    newer = tmp_path / "newer.json"
    newer.write_text(json.dumps(dict(report, schema="vmm-probe-report/99")))
    cut = tmp_path / "cut.json"
    cut.write_text((here / "here.json").read_text()[:3000])
    cases = [
        (("compat", str(here / "s.snap"), "--host", str(newer)), "'vmm-probe-report/99' is not one this vmm reads"),
        (("compat", str(here / "s.snap"), "--host", str(cut)), f"{cut}: truncated"),
        (("baseline", str(cut), GENOA_PATH, "-o", str(tmp_path / "x.json")), "truncated"),
        (("baseline", str(here / "here.json"), SPR_PATH, "-o", str(tmp_path / "x.json")),
         "disagree on the vendor"),
        (("compat", str(here / "s.snap"), "--host", str(here / "s.snap")), "a snapshot is a guest, not a host"),
    ]
    for args, message in cases:
        r = vmm(*args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("vmm: error: ") and message in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.kvm
def test_compat_of_a_snapshot_taken_here_lists_every_differing_cpuid_field_with_its_kind(tmp_path):
    """Against the Genoa dump and against this host: each register where the guest's CPUID and what
    the destination gives differ is listed field by field, each with its kind; the verdict is the
    field model's (no field refuses and nothing else refuses -> yes). Here, the guest fits."""
    from vmm.cpuid_model import FLAGS, FLAGS_INVERTED, MAX, EXACT, SKIP, XSAVE, UNKNOWN, normalized
    path = tmp_path / "s.snap"
    r = vmm("snapshot", "sync", "-o", str(path))
    assert r.returncode == 0, r.stderr
    guest = normalized(snapshot.load(str(path)).guest_cpuid())
    for target in (GENOA_PATH, "here"):
        r = vmm("compat", str(path), "--host", target, "--json")
        assert r.returncode in (0, 1), r.stderr
        d = json.loads(r.stdout)
        there = normalized(sources.load_host(target).capability)
        differing = set()
        for e in list(guest) + list(there):
            for reg in ("eax", "ebx", "ecx", "edx"):
                a, b = guest.entry(e.function, e.index), there.entry(e.function, e.index)
                if (a.reg(reg) if a else 0) != (b.reg(reg) if b else 0):
                    differing.add((e.function, e.index if e.indexed else 0, reg))
        fields = d["features"]["fields"]
        listed = {(int(f["leaf"], 16), f["subleaf"], f["register"]) for f in fields}
        if target == "here":  # the APIC ID of whichever CPU ran KVM_GET_SUPPORTED_CPUID in each process
            per_cpu = {k for k in listed | differing if k[:2] == (1, 0) and k[2] == "ebx" or k[0] in (0xB, 0x1F)}
            listed, differing = listed - per_cpu, differing - per_cpu
        assert listed == differing
        assert all(f["kind"] in (FLAGS, FLAGS_INVERTED, MAX, EXACT, SKIP, XSAVE, UNKNOWN) for f in fields)
        refused = [f for f in fields if f["verdict"] == "problem"]
        assert (r.returncode == 1) == bool(d["problems"])
        assert bool(refused) <= (not d["compatible"])
        text = vmm("compat", str(path), "--host", target).stdout
        for f in fields:
            if (int(f["leaf"], 16), f["subleaf"], f["register"]) in listed:
                assert f"CPUID.({f['leaf']},{f['subleaf']}).{f['register'].upper()}[{f['bits']}]" in text
        if target == "here":
            # what may differ here: per-CPU fields (the APIC ID of the CPU KVM_GET_SUPPORTED_CPUID ran on)
            assert d["compatible"] and r.returncode == 0 and not refused
            assert all(f["verdict"] in ("skipped", "ok") for f in fields)
