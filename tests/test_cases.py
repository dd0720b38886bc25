"""The inputs vmm once got wrong (../shared/cases, copied to tests/data), each with its right answer
(the first line of each edited file says it). Offline: recorded CPUID only, through the CLI as users
run it where the answer is the command's."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import baseline, compat
from vmm.baseline import BaselineError
from vmm.compat import Guest, Host, compare
from vmm.cpudump import read_cpuid_file
from vmm.cpuid import CpuidTable
from vmm.xsave import XsaveLayout

DATA = Path(__file__).parent / "data"
SPR = DATA / "intel-sapphire-rapids-w7-2475x.txt"
SPR_CLEARED = DATA / "spr-leaf7-subleaf2-cleared.txt"
APX = DATA / "apx-overlapping-mpx.txt"
MILAN = DATA / "amd-milan-cpuid-r.txt"
GENOA = DATA / "amd-genoa-epyc-9124.txt"


def vmm(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True, timeout=60)


def host_of(path):
    return Host.from_dump(read_cpuid_file(path).table, path.name)


# --- spr-leaf7-subleaf2-cleared.txt: every bit is compared, named or not --------------------------------
def test_a_sapphire_rapids_guest_cannot_go_where_leaf7_subleaf2_edx_is_cleared():
    c = compare(Guest.from_host(host_of(SPR)), host_of(SPR_CLEARED))
    assert not c.compatible
    assert c.features["missing"] == ["BHI_CTRL", "IPRED_CTRL", "PSFD", "RRSBA_CTRL"]
    row = [f for f in c.features["fields"] if f["leaf"] == "0x7" and f["subleaf"] == 2]
    assert [(f["register"], f["kind"], f["verdict"]) for f in row] == [("edx", "flags", "problem")]
    r = vmm("compat", str(SPR), "--host", str(SPR_CLEARED))
    assert r.returncode == 1, r.stderr
    assert "verdict: no" in r.stdout
    for name in ("PSFD", "IPRED_CTRL", "RRSBA_CTRL", "BHI_CTRL"):
        assert f"  {name:<20} missing there" in r.stdout
    assert "CPUID.(0x7,2).EDX[31:0]" in r.stdout


def test_an_unnamed_bit_counts_like_a_named_one():
    """Clear an unnamed bit of a flags register (leaf 7.1 EAX bit 3): refused, named by location."""
    cleared = read_cpuid_file(SPR).table
    cleared.entry(0x7, 1).eax |= 1 << 3  # the guest has a bit vmm has no name for
    guest = Guest(label="g", kind="cpuid", cpuid=cleared.guest_for_xcr0(0x2E7))
    c = compare(guest, host_of(SPR))
    assert c.problems == ["CPUID features the destination lacks: CPUID.(0x7,1).EAX[3]"]


def test_an_unknown_differing_bit_is_a_warning_with_its_place():
    t = read_cpuid_file(SPR).table
    t.entry(0x14, 1).ebx ^= 1 << 5  # leaf 0x14 sub-leaf 1: no rule covers it
    c = compare(Guest(label="g", kind="cpuid", cpuid=t.guest_for_xcr0(0x2E7)), host_of(SPR))
    assert c.compatible
    assert any("CPUID.(0x14,1).EBX[5]" in w for w in c.warnings)
    assert "warnings:" in compat.format_comparison(c)


# --- apx-overlapping-mpx.txt: overlapping XSAVE components --------------------------------------------
def test_overlapping_components_are_reported_and_refused_by_compat_and_baseline():
    layout = XsaveLayout.from_cpuid(read_cpuid_file(APX).table)
    assert [(i, j) for i, j in layout.overlaps()] == [(3, 19), (4, 19)]
    r = vmm("xsave", "--layout", "--file", str(APX))
    assert r.returncode == 0, r.stderr
    assert "OVERLAP: APX (19) 128@960 overlaps BNDREGS (3) 64@960" in r.stdout
    assert "OVERLAP: APX (19) 128@960 overlaps BNDCSR (4) 64@1024" in r.stdout
    assert json.loads(vmm("xsave", "--layout", "--file", str(APX), "--json").stdout)["overlaps"]
    apx = host_of(APX)
    c = compare(Guest.from_host(apx), apx)
    assert not c.compatible and any("overlaps BNDREGS (3)" in p for p in c.problems)
    with pytest.raises(BaselineError, match="overlap"):
        baseline.compute([apx])
    r = vmm("compat", str(APX), "--host", str(APX))
    assert r.returncode == 1 and "overlaps" in r.stdout


def test_apx_alone_at_960_is_valid():
    t = read_cpuid_file(APX).table
    d0 = t.entry(0xD, 0)
    d0.eax &= ~((1 << 3) | (1 << 4))  # no MPX: APX has the old MPX area to itself
    t.remove(0xD, 3)
    t.remove(0xD, 4)
    t.set_feature("MPX", False)
    h = Host.from_dump(t, "apx-only")
    assert h.layout.overlaps() == []
    assert compare(Guest.from_host(h), h).compatible


# --- amd-milan-cpuid-r.txt: `cpuid -r` is read by every command that reads a dump ------------------------
def test_every_command_that_reads_a_dump_reads_cpuid_r(tmp_path):
    for args in (("cpuid", "--file", str(MILAN)), ("xsave", "--layout", "--file", str(MILAN)),
                 ("compat", str(MILAN), "--host", str(MILAN)),
                 ("baseline", str(MILAN), str(GENOA), "-o", str(tmp_path / "b.json"))):
        r = vmm(*args)
        assert r.returncode == 0, (args, r.stdout, r.stderr)
    r = vmm("amx", "--file", str(MILAN))  # read; its answer is "no AMX" (exit 1)
    assert r.returncode == 1 and r.stderr == "" and "lacks XTILECFG/XTILEDATA" in r.stdout
    assert "XCR0 supported 0x207" in vmm("cpuid", "--file", str(MILAN)).stdout
    assert "  9  PKRU       user         2432      8   2440" in vmm("xsave", "--layout", "--file", str(MILAN)).stdout


# --- vendor-derived bits: a Zen 3 guest and the Genoa dump --------------------------------------------
def test_ssbd_and_stibp_are_derived_from_the_amd_bits_as_kvm_does():
    genoa = host_of(GENOA)
    raw = read_cpuid_file(GENOA).table
    assert not raw.has("SSBD") and not raw.has("STIBP") and raw.has("AMD_SSBD") and raw.has("AMD_STIBP")
    assert genoa.capability.has("SSBD") and genoa.capability.has("STIBP") and genoa.capability.has("IBRS_IBPB")
    milan = Guest(label="zen3", kind="cpuid", cpuid=read_cpuid_file(MILAN).table)
    assert milan.cpuid.has("SSBD") and milan.cpuid.has("STIBP")
    c = compare(milan, genoa)
    assert "SSBD" not in c.features["missing"] and "STIBP" not in c.features["missing"]
    b = CpuidTable.from_json(baseline.compute([host_of(MILAN), genoa])["cpuid"])
    assert b.has("SSBD") and b.has("STIBP")


def test_a_dump_missing_sub_leaves_is_judged_with_warnings_and_named_unknowns():
    """Supervisor sub-leaf missing: nothing refused, a warning names the leaf. A user sub-leaf of a
    component the guest uses missing: compat says which component's offset is unknown there."""
    t = read_cpuid_file(SPR).table
    t.remove(0xD, 0xB)  # CET_U (supervisor)
    h = Host.from_dump(t, "spr-no-cet-u")
    c = compare(Guest.from_host(host_of(SPR)), h)
    assert c.compatible, c.problems
    assert any("CPUID.(0DH,0xb)" in w and "CET_U (11)" in w for w in c.warnings)
    t.remove(0xD, 9)  # PKRU (user, in the guest's XCR0)
    c = compare(Guest.from_host(host_of(SPR)), Host.from_dump(t, "spr-no-pkru"))
    assert "XSAVE component PKRU (9) (guest XCR0): its offset there is unknown (CPUID.(0DH,0x9) is missing)" \
        in c.problems
