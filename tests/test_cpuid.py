"""CpuidTable: dump/JSON/KVM round trips, named features, guest CPUID for an XCR0."""

import json
from pathlib import Path

import pytest

from vmm.cpuid import (FEATURES, SIGNIFICANT_INDEX, CpuidEntry, CpuidError,
                       CpuidTable)

DATA = Path(__file__).parent / "data"
SPR_PATH = DATA / "intel-sapphire-rapids-w7-2475x.txt"
GENOA_PATH = DATA / "amd-genoa-epyc-9124.txt"

AVX512_NAMES = {n for n in FEATURES if n.startswith("AVX512")}
AMX_NAMES = {"AMX_TILE", "AMX_INT8", "AMX_BF16"}


@pytest.fixture(scope="module")
def spr():
    return CpuidTable.from_dump(SPR_PATH)


@pytest.fixture(scope="module")
def genoa():
    return CpuidTable.from_dump(GENOA_PATH)


def _cpuid_lines(path):
    return [l for l in path.read_text().splitlines() if l.startswith("CPUID ")]


# -- parsing -------------------------------------------------------------------


def test_parse_fixtures_basic_facts(spr, genoa):
    assert len(spr) == len(_cpuid_lines(SPR_PATH))
    assert len(genoa) == len(_cpuid_lines(GENOA_PATH))
    assert spr.vendor == "GenuineIntel" and genoa.vendor == "AuthenticAMD"
    assert spr.max_leaf == 0x20 and genoa.max_leaf == 0x10
    assert spr.max_extended_leaf == 0x80000008 and genoa.max_extended_leaf == 0x80000028


def test_entry_lookup_honours_significant_index(spr, genoa):
    tiledata = spr.entry(0xD, 0x12)
    assert (tiledata.eax, tiledata.ebx, tiledata.ecx) == (0x2000, 0xB00, 6)
    assert tiledata.flags == SIGNIFICANT_INDEX
    assert spr.entry(0xD, 3) is None  # all-zero sub-leaf omitted by the dump
    # Leaf 1 is not indexed: any index finds the same entry.
    assert spr.entry(1, 5) is spr.entry(1) and spr.entry(1).flags == 0
    assert spr.entry(4, 3).eax == 0xFC1FC163
    assert genoa.entry(0x8000001D, 3).eax == 0x0001C163
    assert genoa.entry(0x80000026, 2).ecx == 0x302
    assert genoa.entry(0x12) is None


def test_indexed_leaf_without_sl_marker_is_still_indexed():
    t = CpuidTable.from_dump("CPUID 00000007: 00000001-00000002-00000003-00000004\n")
    assert t.entry(7, 0).flags == SIGNIFICANT_INDEX
    assert t.entry(7, 1) is None


def test_unflagged_entry_of_an_indexed_leaf_round_trips():
    # KVM_GET_SUPPORTED_CPUID reports leaf 0x80000020 without KVM_CPUID_FLAG_SIGNIFCANT_INDEX.
    t = CpuidTable.from_kvm_entries([(0x80000020, 0, 0, 0, 0, 0, 0), (0xD, 0, 1, 7, 0x340, 0x340, 0)])
    text = t.to_dump()
    assert "CPUID 80000020: 00000000-00000000-00000000-00000000 [not indexed]" in text
    again = CpuidTable.from_dump(text)
    assert again == t and again.entry(0x80000020).flags == 0


def test_from_dump_accepts_path_str_and_text(spr):
    assert CpuidTable.from_dump(str(SPR_PATH)) == spr
    assert CpuidTable.from_dump(SPR_PATH.read_text()) == spr


@pytest.mark.parametrize("bad", [
    "hello world",
    "CPUID 0000000D: 000602E7-00002B00-00002B00",  # three registers
    "CPUID 0000000D: 000602E7-00002B00-00002B00-0000000G",  # not hex
    "CPUID 0000000D: 000602E7-00002B00-00002B00-00000000 trailing",  # junk outside [...]
    "CPUID 123456789: 00000000-00000000-00000000-00000000",  # leaf wider than 32 bits
    "CPUID 00000007: 00000000-00000000-00000000-00000000 [SL zz]",
])
def test_garbage_line_names_source_line_and_text(bad):
    text = "# header\nCPUID 00000000: 00000001-756E6547-6C65746E-49656E69\n" + bad + "\n"
    with pytest.raises(CpuidError) as ei:
        CpuidTable.from_dump(text)
    msg = str(ei.value)
    assert "<text>:3:" in msg and bad in msg


def test_missing_file_is_reported_as_such(tmp_path):
    with pytest.raises(CpuidError, match="no such CPUID dump file"):
        CpuidTable.from_dump(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError):
        CpuidTable.from_dump(tmp_path / "missing.txt")


def test_garbage_in_file_names_the_file(tmp_path):
    lines = SPR_PATH.read_text().splitlines()
    lines.insert(10, "CPUID 00000005 garbage")
    p = tmp_path / "broken.txt"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(CpuidError, match=r"broken\.txt:11: .*CPUID 00000005 garbage"):
        CpuidTable.from_dump(p)


def test_duplicate_dump_line_is_an_error():
    line = "CPUID 0000000D: 00000007-00000240-00000240-00000000 [SL 00]\n"
    with pytest.raises(CpuidError, match=r":2: duplicate leaf 0xd sub-leaf 0x0"):
        CpuidTable.from_dump(line + line)
    assert issubclass(CpuidError, ValueError)


# -- round trips -----------------------------------------------------------------


@pytest.mark.parametrize("path", [SPR_PATH, GENOA_PATH])
def test_dump_round_trip(path):
    t = CpuidTable.from_dump(path)
    text = t.to_dump(comment="round trip")
    again = CpuidTable.from_dump(text)
    assert again == t
    assert again.to_dump(comment="round trip") == text
    # The dump keeps the fixture's registers line for line (comments aside).
    original = [l.split(" [")[0] + (" [SL" + l.split("[SL")[1][:4] if "[SL" in l else "")
                for l in _cpuid_lines(path)]
    written = [l for l in text.splitlines() if l.startswith("CPUID")]
    assert written == original


@pytest.mark.parametrize("path", [SPR_PATH, GENOA_PATH])
def test_kvm_entries_round_trip(path):
    t = CpuidTable.from_dump(path)
    entries = t.to_kvm_entries()
    assert all(len(e) == 7 for e in entries)
    assert (0xD, 1, SIGNIFICANT_INDEX) == entries[[e[:2] for e in entries].index((0xD, 1))][:3]
    assert CpuidTable.from_kvm_entries(entries) == t
    assert CpuidTable.from_kvm_entries(reversed(entries)) == t  # order does not matter


def test_kvm_entries_duplicates_and_mixed_flags_rejected():
    e = (0xD, 0, 1, 7, 0, 0, 0)
    with pytest.raises(CpuidError, match="duplicate"):
        CpuidTable.from_kvm_entries([e, e])
    with pytest.raises(CpuidError, match="SIGNIFCANT_INDEX"):
        CpuidTable.from_kvm_entries([e, (0xD, 1, 0, 0, 0, 0, 0)])
    with pytest.raises(CpuidError, match="7 fields"):
        CpuidTable.from_kvm_entries([(1, 2, 3)])


@pytest.mark.parametrize("path", [SPR_PATH, GENOA_PATH])
def test_json_round_trip(path):
    t = CpuidTable.from_dump(path)
    data = json.loads(json.dumps(t.to_json()))
    assert data["vendor"] == t.vendor
    leaf_d = next(e for e in data["entries"] if e["function"] == "0xd" and e["index"] == "0x0")
    assert leaf_d["eax"] == f"{t.entry(0xD).eax:#010x}"
    assert CpuidTable.from_json(data) == t


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("entries"), "'entries' list"),
    (lambda d: d["entries"][1].pop("ecx"), r"entries\[1\]: missing \['ecx'\]"),
    (lambda d: d["entries"][2].update(eax="0xzz"), r"entries\[2\]\.eax: expected a hex string"),
    (lambda d: d["entries"][0].update(ebx="0x1ffffffff"), r"entries\[0\]\.ebx: .* 32 bits"),
    (lambda d: d["entries"][0].update(edx=None), r"entries\[0\]\.edx: expected a hex string or int"),
    (lambda d: d["entries"][0].update(color="red"), r"unknown \['color'\]"),
    (lambda d: d.update(vendor="AuthenticAMD"), "does not match leaf 0"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), "duplicate"),
])
def test_from_json_validation(spr, mutate, message):
    data = json.loads(json.dumps(spr.to_json()))
    mutate(data)
    with pytest.raises(CpuidError, match=message):
        CpuidTable.from_json(data)


def test_from_json_accepts_plain_ints():
    t = CpuidTable.from_json({"entries": [
        {"function": 0xD, "index": 0, "flags": 1, "eax": 7, "ebx": 832, "ecx": 832, "edx": 0}]})
    assert t.xcr0_supported() == 7
    assert t.vendor is None


def test_equality_is_order_insensitive_and_value_sensitive(spr):
    shuffled = CpuidTable.from_kvm_entries(sorted(spr.to_kvm_entries(), reverse=True))
    assert shuffled == spr
    changed = spr.copy()
    changed.set_feature("AVX2", False)
    assert changed != spr
    assert spr.has("AVX2")  # copy() is deep


# -- named features ----------------------------------------------------------------

# Written out from the SDM vol. 2A CPUID table independently of vmm.cpuid.FEATURES.
SDM_BITS = [
    ("FXSR", 1, 0, "edx", 24), ("SSE", 1, 0, "edx", 25), ("SSE2", 1, 0, "edx", 26),
    ("SSE3", 1, 0, "ecx", 0), ("SSSE3", 1, 0, "ecx", 9), ("FMA", 1, 0, "ecx", 12),
    ("SSE4_1", 1, 0, "ecx", 19), ("SSE4_2", 1, 0, "ecx", 20), ("XSAVE", 1, 0, "ecx", 26),
    ("OSXSAVE", 1, 0, "ecx", 27), ("AVX", 1, 0, "ecx", 28), ("F16C", 1, 0, "ecx", 29),
    ("HYPERVISOR", 1, 0, "ecx", 31),
    ("BMI1", 7, 0, "ebx", 3), ("AVX2", 7, 0, "ebx", 5), ("BMI2", 7, 0, "ebx", 8),
    ("AVX512F", 7, 0, "ebx", 16), ("AVX512DQ", 7, 0, "ebx", 17), ("AVX512_IFMA", 7, 0, "ebx", 21),
    ("AVX512CD", 7, 0, "ebx", 28), ("AVX512BW", 7, 0, "ebx", 30), ("AVX512VL", 7, 0, "ebx", 31),
    ("AVX512_VBMI", 7, 0, "ecx", 1), ("PKU", 7, 0, "ecx", 3), ("OSPKE", 7, 0, "ecx", 4),
    ("AVX512_VBMI2", 7, 0, "ecx", 6), ("SHSTK", 7, 0, "ecx", 7), ("AVX512_VNNI", 7, 0, "ecx", 11),
    ("AVX512_BITALG", 7, 0, "ecx", 12), ("AVX512_VPOPCNTDQ", 7, 0, "ecx", 14),
    ("IBT", 7, 0, "edx", 20), ("AMX_BF16", 7, 0, "edx", 22), ("AVX512_FP16", 7, 0, "edx", 23),
    ("AMX_TILE", 7, 0, "edx", 24), ("AMX_INT8", 7, 0, "edx", 25),
    ("AVX512_BF16", 7, 1, "eax", 5),
    ("XSAVEOPT", 0xD, 1, "eax", 0), ("XSAVEC", 0xD, 1, "eax", 1), ("XGETBV1", 0xD, 1, "eax", 2),
    ("XSAVES", 0xD, 1, "eax", 3), ("XFD", 0xD, 1, "eax", 4),
    ("NX", 0x80000001, 0, "edx", 20), ("LM", 0x80000001, 0, "edx", 29),
]


@pytest.mark.parametrize("name, leaf, sub, reg, bit", SDM_BITS)
def test_feature_bits_match_the_sdm(name, leaf, sub, reg, bit):
    regs = {"eax": 0, "ebx": 0, "ecx": 0, "edx": 0, reg: 1 << bit}
    flags = SIGNIFICANT_INDEX if leaf in (7, 0xD) else 0
    t = CpuidTable([CpuidEntry(leaf, sub, flags, **regs)])
    assert t.features() == {name}
    # The same bit in another sub-leaf of an indexed leaf is a different feature.
    if flags:
        other = CpuidTable([CpuidEntry(leaf, sub + 2, flags, **regs)])
        assert not other.has(name)


def test_fixture_features(spr, genoa):
    assert genoa.has("AVX512F") and genoa.has("AVX512_BF16") and genoa.has("SHSTK")
    assert not genoa.features() & AMX_NAMES
    assert not genoa.has("XFD") and not genoa.has("IBT") and not genoa.has("AVX512_FP16")
    assert AMX_NAMES <= spr.features()
    assert {"XFD", "XSAVES", "AVX512_FP16", "IBT", "SHSTK", "AVX512_BF16"} <= spr.features()
    for t in (spr, genoa):
        assert {"LM", "NX", "XSAVE", "OSXSAVE", "AVX2", "FXSR"} <= t.features()
        assert not t.has("HYPERVISOR")


def test_feature_names_are_forgiving_about_case_but_not_typos(spr):
    assert spr.has("avx512f") and spr.has("sse4.2") and spr.has("amx-tile")
    with pytest.raises(CpuidError, match=r"unknown CPUID feature 'AVX512FF'.*AVX512F"):
        spr.has("AVX512FF")
    with pytest.raises(CpuidError, match="unknown CPUID feature"):
        spr.has("qwertyuiop")


def test_diff_lists_named_features(spr, genoa):
    d = dict((n, (a, b)) for n, a, b in spr.diff(genoa))
    assert d["AMX_TILE"] == (True, False)
    assert d["SSE4A"] == (False, True)
    assert "AVX512F" not in d  # both have it


def test_xcr0_and_xss_supported(spr, genoa):
    assert spr.xcr0_supported() == 0x602E7 and spr.xss_supported() == 0xDD00
    assert genoa.xcr0_supported() == 0x2E7 and genoa.xss_supported() == 0x1800
    assert CpuidTable().xcr0_supported() == 0


# -- guest CPUID for an XCR0 ---------------------------------------------------------


def _d_subleaves(t):
    return sorted(e.index for e in t if e.function == 0xD)


def test_guest_for_xcr0_avx_only_on_spr(spr):
    g = spr.guest_for_xcr0(0x7)
    d0, d1 = g.entry(0xD, 0), g.entry(0xD, 1)
    assert (d0.eax, d0.edx) == (0x7, 0)
    assert d0.ebx == 832 and d0.ecx == 832  # 576 + AVX 256
    assert d1.ebx == 832  # compacted: no XSS for a fresh guest
    assert (d1.ecx, d1.edx) == (0xDD00, 0)  # supported XSS untouched
    # User sub-leaves 5, 6, 7, 9, 0x11, 0x12 gone; supervisor ones stay.
    assert _d_subleaves(g) == [0, 1, 2, 8, 0xA, 0xB, 0xC, 0xE, 0xF]
    assert g.entry(0x1D, 0) is None and g.entry(0x1E, 0) is None
    assert not g.features() & (AVX512_NAMES | AMX_NAMES | {"PKU", "OSPKE"})
    assert {"AVX", "AVX2", "FMA", "F16C", "AVX_VNNI", "XSAVE"} <= g.features()
    # The source table is untouched.
    assert spr.entry(0xD, 0).ebx == 0x2B00 and spr.has("AMX_TILE") and spr.entry(0x1D, 1)


def test_guest_for_xcr0_full_mask_keeps_amx(spr):
    g = spr.guest_for_xcr0(0x602E7)
    assert g.entry(0xD, 0).eax == 0x602E7
    assert g.entry(0xD, 0).ebx == g.entry(0xD, 0).ecx == 11008
    # 576+256+64+512+1024 = 2432, PKRU +8 = 2440, TILECFG aligned to 2496 +64 = 2560,
    # TILEDATA at 2560 +8192 = 10752.
    assert g.entry(0xD, 1).ebx == 10752
    assert g.entry(0x1D, 1) == spr.entry(0x1D, 1) and g.entry(0x1E, 0) is not None
    assert (AMX_NAMES | (AVX512_NAMES & spr.features())) <= g.features()
    assert spr.diff(g) == []


def test_guest_for_xcr0_sse_only_clears_avx_family(spr):
    g = spr.guest_for_xcr0(0)  # x87|SSE are always kept
    assert g.entry(0xD, 0).eax == 0x3 and g.entry(0xD, 0).ebx == 576
    assert not g.features() & {"AVX", "AVX2", "FMA", "F16C", "VAES", "VPCLMULQDQ", "AVX_VNNI"}
    assert g.has("SSE4_2") and g.has("AES")


def test_guest_for_xcr0_partial_avx512_group(genoa):
    g = genoa.guest_for_xcr0(0x67)  # opmask + ZMM_Hi256, no Hi16_ZMM
    assert g.entry(0xD, 0).eax == 0x67
    assert g.entry(0xD, 0).ebx == 1408  # end of ZMM_Hi256 at 896+512
    assert _d_subleaves(g) == [0, 1, 2, 5, 6, 0xB, 0xC]
    assert not g.features() & AVX512_NAMES
    assert g.has("AVX2")


def test_guest_for_xcr0_masks_unsupported_bits(genoa):
    g = genoa.guest_for_xcr0(0x602E7)  # AMX requested on a CPU without it
    assert g.entry(0xD, 0).eax == 0x2E7
    assert g.entry(0xD, 0).ebx == 0x988
    assert g.entry(0xD, 1).ebx == 2440  # compacted, XSS = 0
    assert g.has("PKU") and g.has("AVX512F")


def test_guest_for_xcr0_sets_xsave_when_host_hides_it(genoa):
    host = genoa.copy()
    host.set_feature("XSAVE", False)  # what KVM_GET_SUPPORTED_CPUID reports on PVM
    assert host.guest_for_xcr0(0xE7).has("XSAVE")
    assert not host.guest_for_xcr0(0xE7, ensure_xsave=False).has("XSAVE")
    assert not host.guest_for_xcr0(0x3).has("XSAVE")  # nothing beyond x87|SSE
    assert host.with_xsave_enabled().has("XSAVE") and not host.has("XSAVE")


def test_guest_for_xcr0_without_leaf_d():
    t = CpuidTable([CpuidEntry(1, 0, 0, 0, 0, 0, 0)])
    with pytest.raises(CpuidError, match="leaf 0xD"):
        t.guest_for_xcr0(0x7)


def test_with_apic_id_sets_leaf_1_and_the_topology_leaves():
    t = CpuidTable.from_dump(DATA / "intel-sapphire-rapids-w7-2475x.txt")
    v = t.with_apic_id(3)
    assert v.entry(1).ebx >> 24 == 3 and v.entry(1).ebx & 0xFFFFFF == t.entry(1).ebx & 0xFFFFFF
    assert all(e.edx == 3 for e in v if e.function == 0xB)
    assert t.entry(1).ebx >> 24 == 0  # the original is untouched
