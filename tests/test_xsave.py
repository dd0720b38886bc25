"""XsaveLayout from CPUID leaf 0xD, XsaveArea register views, KVM_SET_XSAVE checks."""

import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm.cpuid import CpuidTable
from vmm.xsave import (TileConfig, XsaveArea, XsaveComponent, XsaveError,
                       XsaveLayout, kvm_xsave_size, mask_names, parse_mask, validate_for_set)

DATA = Path(__file__).parent / "data"
SPR = CpuidTable.from_dump(DATA / "intel-sapphire-rapids-w7-2475x.txt")
GENOA = CpuidTable.from_dump(DATA / "amd-genoa-epyc-9124.txt")
SPR_LAYOUT = XsaveLayout.from_cpuid(SPR)
GENOA_LAYOUT = XsaveLayout.from_cpuid(GENOA)
LAYOUTS = {"spr": SPR_LAYOUT, "genoa": GENOA_LAYOUT}

SETTINGS = settings(max_examples=200, deadline=None)


def _span(layout, index):
    c = layout.components[index]
    return (c.size, c.offset)


# -- layout ---------------------------------------------------------------------


def test_spr_layout():
    L = SPR_LAYOUT
    assert _span(L, 2) == (256, 576)
    assert _span(L, 5) == (64, 1088) and _span(L, 6) == (512, 1152) and _span(L, 7) == (1024, 1664)
    assert _span(L, 9) == (8, 2688)
    cfg, data = L.components[17], L.components[18]
    assert (cfg.name, cfg.size, cfg.offset, cfg.align64, cfg.xfd) == ("XTILECFG", 64, 2752, True, False)
    assert (data.name, data.size, data.offset, data.align64, data.xfd) == ("XTILEDATA", 8192, 2816, True, True)
    assert L.components[8].supervisor and L.components[15].name == "LBR"
    assert L.user_mask == 0x602E7 and L.supervisor_mask == 0xDD00


def test_genoa_layout():
    L = GENOA_LAYOUT
    assert _span(L, 5) == (64, 832)
    assert _span(L, 6) == (512, 896)
    assert _span(L, 7) == (1024, 1408)
    assert _span(L, 9) == (8, 2432)
    assert 17 not in L.components and 18 not in L.components
    assert L.supervisor_mask == 0x1800


@pytest.mark.parametrize("table", [SPR, GENOA], ids=["spr", "genoa"])
def test_standard_size_matches_leaf_d_ecx(table):
    layout = XsaveLayout.from_cpuid(table)
    # ECX: size for every supported XCR0 component.
    assert layout.standard_size(table.xcr0_supported()) == table.entry(0xD, 0).ecx


def test_standard_size_matches_leaf_d_ebx():
    # EBX is for the XCR0 the OS had enabled when the dump was taken.
    assert SPR_LAYOUT.standard_size() == SPR.entry(0xD, 0).ebx == 11008 == 0x2B00
    # The Genoa dump's OS left PKRU (bit 9) out of XCR0: 0x980 = end of Hi16_ZMM.
    assert GENOA_LAYOUT.standard_size() == 0x988
    assert GENOA_LAYOUT.standard_size(0xE7) == GENOA.entry(0xD, 0).ebx == 0x980
    assert SPR_LAYOUT.standard_size(0x7) == 832 and SPR_LAYOUT.standard_size(0x3) == 576
    # Supervisor components have no standard-format place (LBR's 808 bytes would show).
    assert SPR_LAYOUT.standard_size(0x3 | SPR_LAYOUT.supervisor_mask) == 576


def test_compacted_size_matches_leaf_d1_ebx():
    # CPUID.(0DH,1).EBX is the compacted size for the XCR0 | IA32_XSS *enabled*
    # at dump time, not the supported one. The values below are the masks that
    # reproduce it: Windows with user CET (CET_U) and, on Intel, PT; no PKRU.
    assert GENOA_LAYOUT.compacted_size(0xE7 | 0x800) == GENOA.entry(0xD, 1).ebx == 0x990
    assert SPR_LAYOUT.compacted_size(0x600E7 | 0x900) == SPR.entry(0xD, 1).ebx == 0x2A80
    # Everything supported, worked by hand: 2432 after Hi16_ZMM, PT 128, PKRU 8,
    # PASID 8, CET_U 16, CET_S 24, UINTR 48, LBR 808 -> 3472; TILECFG aligned to
    # 3520, TILEDATA at 3584 + 8192 = 11776.
    assert SPR_LAYOUT.compacted_offsets()[17] == 3520
    assert SPR_LAYOUT.compacted_offsets()[18] == 3584
    assert SPR_LAYOUT.compacted_size() == 11776
    assert GENOA_LAYOUT.compacted_size() == 2432 + 8 + 16 + 24


def test_compacted_alignment_rule():
    comps = {0: SPR_LAYOUT.components[0], 1: SPR_LAYOUT.components[1],
             2: XsaveComponent(2, "AVX", 8, 576),
             3: XsaveComponent(3, "BNDREGS", 8, 584, align64=True)}
    L = XsaveLayout(comps, 0xF)
    assert L.compacted_offsets(0xF) == {2: 576, 3: 640}  # 584 rounded up to 640
    assert L.compacted_size(0xF) == 648
    assert L.compacted_size(0xB) == 584  # 3 alone starts at 576, already aligned
    assert L.compacted_size(0x3) == 576


def test_sizes_reject_components_the_layout_lacks():
    with pytest.raises(XsaveError, match=r"XTILECFG \(17\)"):
        GENOA_LAYOUT.standard_size(1 << 17)
    with pytest.raises(XsaveError, match=r"component20 \(20\)"):
        SPR_LAYOUT.compacted_size(1 << 20)


def test_layout_needs_leaf_d():
    with pytest.raises(XsaveError, match="0xD"):
        XsaveLayout.from_cpuid(CpuidTable())
    broken = SPR.copy()
    broken.remove(0xD, 0x12)
    layout = XsaveLayout.from_cpuid(broken)  # what is enumerated is still laid out
    assert layout.components[17].offset == 2752 and 18 not in layout.components
    assert layout.warnings == ["CPUID.(0DH,0x12) for user component XTILEDATA (18) is missing: "
                               "its offset and size are unknown"]
    with pytest.raises(XsaveError, match=r"XTILEDATA \(18\), whose offset and size are unknown"):
        layout.standard_size()  # what needs the missing component fails, naming it
    assert layout.standard_size(0x2e7) == 2696
    assert kvm_xsave_size(layout, 0x202e7) == 4096


def test_missing_or_zero_sub_leaves_are_warnings_not_refusals():
    t = SPR.copy()
    t.remove(0xD, 0xB)  # a supervisor sub-leaf 0xD.1 ECX still lists (CET_U)
    layout = XsaveLayout.from_cpuid(t)
    assert layout.standard_size() == 11008 and "CET_U (11) is missing" in layout.warnings[0]
    assert layout.to_json()["compacted_size"] is None and layout.to_json()["standard_size"] == 11008
    e9 = t.entry(0xD, 9)
    e9.eax = 0  # PKRU read as zero size, offset kept: the architectural 8 bytes
    layout = XsaveLayout.from_cpuid(t)
    assert (layout.components[9].size, layout.components[9].offset) == (8, 2688)
    assert any("PKRU (9) has size 0: inferred" in w for w in layout.warnings)
    e9.ebx = 0  # nothing left to go on: unknown
    layout = XsaveLayout.from_cpuid(t)
    assert 9 in layout.unknown and layout.standard_size(0x7) == 832
    with pytest.raises(XsaveError, match=r"PKRU \(9\)"):
        layout.standard_size(0x207)


def test_overlapping_components_are_reported_and_sizes_are_the_furthest_end():
    apx = CpuidTable.from_dump(DATA / "apx-overlapping-mpx.txt")
    layout = XsaveLayout.from_cpuid(apx)
    assert layout.overlaps() == [(3, 19), (4, 19)]
    assert layout.overlap_problems()[0] == "APX (19) 128@960 overlaps BNDREGS (3) 64@960"
    assert layout.overlaps(0xE00E7) == []  # APX alone at 960 is valid
    # offsets no longer grow with the index: the size is max(offset + size), not the last one's end
    assert layout.standard_size((1 << 19) | 0x7) == 1088
    assert layout.standard_size((1 << 19) | (1 << 9) | 0x7) == 2696


def test_layout_diff_amd_vs_intel():
    d = {i: (a, b) for i, _, a, b in GENOA_LAYOUT.diff(SPR_LAYOUT)}
    assert d[5][0].offset == 832 and d[5][1].offset == 1088
    assert d[9][0].offset == 2432 and d[9][1].offset == 2688
    assert d[18][0] is None and d[18][1].size == 8192
    assert 2 not in d and 0 not in d  # AVX sits at 576 on both
    assert GENOA_LAYOUT.diff(GENOA_LAYOUT) == []


def test_layout_json_and_table():
    data = json.loads(json.dumps(SPR_LAYOUT.to_json()))
    assert data["standard_size"] == 11008 and data["xcr0_supported"] == "0x602e7"
    assert XsaveLayout.from_json(data) == SPR_LAYOUT
    with pytest.raises(XsaveError, match="layout JSON"):
        XsaveLayout.from_json({"components": []})
    table = SPR_LAYOUT.format_table()
    row = next(l for l in table.splitlines() if "XTILEDATA" in l)
    assert row.split()[:6] == ["18", "XTILEDATA", "user", "2816", "8192", "11008"]
    assert "xfd" in row and "align64" in row


def test_guest_layout_follows_guest_cpuid():
    g = XsaveLayout.from_cpuid(SPR.guest_for_xcr0(0x7))
    assert sorted(i for i, c in g.components.items() if not c.supervisor) == [0, 1, 2]
    assert g.standard_size() == 832


def test_kvm_xsave_size():
    assert kvm_xsave_size(GENOA_LAYOUT) == 4096
    assert kvm_xsave_size(SPR_LAYOUT) == 11008
    assert kvm_xsave_size(SPR_LAYOUT, 0xE7) == 4096


# -- XsaveArea: round trips on random buffers -----------------------------------------


@st.composite
def random_buffers(draw, layout):
    size = kvm_xsave_size(layout) + draw(st.sampled_from([0, 0, 1, 64]))
    raw = bytearray(random.Random(draw(st.integers(0, 2**32))).randbytes(size))
    bv = draw(st.integers(0, 2**64 - 1)) & layout.user_mask
    raw[512:520] = bv.to_bytes(8, "little")
    raw[520:528] = draw(st.integers(0, 2**63 - 1)).to_bytes(8, "little")
    return bytes(raw)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_parse_encode_round_trip(name):
    layout = LAYOUTS[name]

    @SETTINGS
    @given(random_buffers(layout))
    def check(buf):
        area = XsaveArea.parse(buf, layout)
        assert area.encode() == buf
        assert area.xstate_bv == int.from_bytes(buf[512:520], "little")
        json.dumps(area.to_json())

    check()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_zmm_view_matches_raw_slices(name):
    """zmm(i) is assembled from XMM, YMM_Hi128 and ZMM_Hi256 (or Hi16_ZMM) by XSTATE_BV."""
    layout = LAYOUTS[name]
    off = {i: layout.components[i].offset for i in (2, 6, 7)}

    def le(buf, start, n):
        return int.from_bytes(buf[start:start + n], "little")

    @SETTINGS
    @given(random_buffers(layout), st.integers(0, 31))
    def check(buf, i):
        area = XsaveArea.parse(buf, layout)
        bv = area.xstate_bv
        if i < 16:
            xmm = le(buf, 160 + 16 * i, 16) if bv & 2 else 0
            hi128 = le(buf, off[2] + 16 * i, 16) if bv & 4 else 0
            hi256 = le(buf, off[6] + 32 * i, 32) if bv & 0x40 else 0
            expected = xmm | hi128 << 128 | hi256 << 256
            assert area.xmm(i) == xmm
        else:
            expected = le(buf, off[7] + 64 * (i - 16), 64) if bv & 0x80 else 0
        assert area.zmm(i) == expected

    check()


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_setters_round_trip(name):
    layout = LAYOUTS[name]

    @SETTINGS
    @given(st.integers(0, 31), st.integers(0, 2**512 - 1), st.integers(0, 7), st.integers(0, 2**64 - 1))
    def check(i, zmm, k, kval):
        area = XsaveArea.blank(layout)
        area.set_zmm(i, zmm)
        area.set_k(k, kval)
        assert area.zmm(i) == zmm and area.k(k) == kval
        again = XsaveArea.parse(area.encode(), layout)
        assert again.zmm(i) == zmm and again.k(k) == kval
        assert again.registers() == area.registers()

    check()


# -- XsaveArea: register views on constructed buffers -------------------------------


def test_set_zmm20_lands_in_hi16_zmm():
    v = int.from_bytes(bytes(range(1, 65)), "little")
    for layout in (SPR_LAYOUT, GENOA_LAYOUT):
        area = XsaveArea.blank(layout)
        area.set_zmm(20, v)
        base = layout.components[7].offset + 4 * 64
        raw = area.encode()
        assert raw[base:base + 64] == bytes(range(1, 65))
        assert area.xstate_bv == 1 << 7
        assert area.registers() == {"zmm20": v}
        assert [c.name for c in area.components_present()] == ["Hi16_ZMM"]


def test_set_zmm_low_registers_spread_over_three_components():
    v = int.from_bytes(bytes(range(64)), "little")
    area = XsaveArea.blank(GENOA_LAYOUT)
    area.set_zmm(3, v)
    raw = area.encode()
    assert raw[160 + 48:160 + 64] == bytes(range(0, 16))  # XMM3
    assert raw[576 + 48:576 + 64] == bytes(range(16, 32))  # YMM_Hi128[3]
    assert raw[896 + 96:896 + 128] == bytes(range(32, 64))  # ZMM_Hi256[3]
    assert area.xstate_bv == 0b0100_0110  # SSE, AVX, ZMM_Hi256
    assert area.xmm(3) == v & (1 << 128) - 1
    assert area.ymm(3) == v & (1 << 256) - 1
    assert area.mxcsr == 0x1F80


def test_clear_xstate_bv_reads_as_init_and_setters_materialize():
    raw = bytearray(random.Random(7).randbytes(4096))
    raw[512:576] = bytes(64)  # XSTATE_BV = 0: everything is init, the bytes are stale
    area = XsaveArea.parse(raw, GENOA_LAYOUT)
    assert area.xmm(5) == 0 and area.zmm(20) == 0 and area.k(1) == 0
    assert area.fcw == 0x37F and area.mxcsr == 0x1F80
    assert area.registers() == {}
    full = area.registers(include_zero=True)
    assert full["fcw"] == 0x37F and full["mxcsr"] == 0x1F80 and full["xmm5"] == 0
    assert len(full) == 14 + 1 + 16 + 16 + 8 + 16 + 16 + 1
    area.set_xmm(0, 0xABC)
    assert area.xstate_bv == 0b10
    assert area.xmm(0) == 0xABC and area.xmm(1) == 0  # the stale bytes were reset
    assert area.encode()[160 + 16:160 + 32] == bytes(16)
    assert area.mxcsr == 0x1F80
    assert area.fcw == 0x37F  # x87 still init
    area.set_k(6, 0xF0)
    assert area.k(6) == 0xF0 and area.k(0) == 0 and area.k(7) == 0
    opmask = GENOA_LAYOUT.components[5]
    assert area.encode()[opmask.offset:opmask.offset + 48] == bytes(48)
    assert area.zmm(16) == 0 and area.zmm(31) == 0  # Hi16_ZMM still init, bytes still stale
    assert area.xstate_bv == 0b10_0010


def test_mxcsr_is_live_with_avx_alone():
    area = XsaveArea.blank(GENOA_LAYOUT)
    area.raw[24:28] = (0x1FA0).to_bytes(4, "little")
    area.raw[160:176] = b"\xff" * 16  # stale XMM0
    area.xstate_bv = 1 << 2
    assert area.mxcsr == 0x1FA0 and area.xmm(0) == 0
    area.xstate_bv = 0
    assert area.mxcsr == 0x1F80


def test_x87_fields_and_st():
    area = XsaveArea.blank(GENOA_LAYOUT)
    raw = area.raw
    raw[0:2] = (0x027F).to_bytes(2, "little")
    raw[2:4] = (0x3800).to_bytes(2, "little")
    raw[4] = 0x80
    raw[6:8] = (0x1D9).to_bytes(2, "little")
    raw[8:16] = (0x401000).to_bytes(8, "little")
    raw[16:24] = (0x7FF000).to_bytes(8, "little")
    st7 = 0x3FFF_8000_0000_0000_0000  # 1.0 as an 80-bit extended real
    raw[32 + 7 * 16:32 + 7 * 16 + 10] = st7.to_bytes(10, "little")
    raw[32 + 7 * 16 + 10:32 + 8 * 16] = b"\xee" * 6  # slot padding is not ST7
    assert area.fcw == 0x37F  # x87 bit still clear
    area.xstate_bv = 1
    assert (area.fcw, area.fsw, area.ftw, area.fop, area.fip, area.fdp) == (
        0x27F, 0x3800, 0x80, 0x1D9, 0x401000, 0x7FF000)
    assert area.st(7) == st7 and area.st(0) == 0


def test_amx_registers_on_spr():
    area = XsaveArea.blank(SPR_LAYOUT)
    cfg = TileConfig(palette=1, start_row=0, colsb=(64,) * 8 + (0,) * 8, rows=(16,) * 8 + (0,) * 8)
    area.set_tilecfg(cfg)
    tile = bytes(range(256)) * 4
    area.set_tmm(2, tile)
    area.set_pkru(0x55555554)
    raw = area.encode()
    assert raw[2752] == 1 and raw[2752 + 16:2752 + 18] == (64).to_bytes(2, "little")
    assert raw[2752 + 48] == 16
    assert raw[2816 + 2048:2816 + 3072] == tile
    assert raw[2688:2692] == (0x55555554).to_bytes(4, "little")
    assert area.xstate_bv == (1 << 17) | (1 << 18) | (1 << 9)
    again = XsaveArea.parse(raw, SPR_LAYOUT)
    assert again.tilecfg == cfg and again.tmm(2) == tile and again.tmm(0) == bytes(1024)
    regs = again.registers()
    assert regs["tmm2"] == tile and "tmm0" not in regs
    assert regs["tilecfg.palette"] == 1 and regs["tilecfg.colsb7"] == 64 and regs["tilecfg.rows0"] == 16
    assert again.to_json()["registers"]["tmm2"] == tile.hex()
    assert again.to_json()["components"] == ["PKRU", "XTILECFG", "XTILEDATA"]


def test_setters_validate():
    area = XsaveArea.blank(GENOA_LAYOUT)
    with pytest.raises(XsaveError, match="out of range"):
        area.set_zmm(32, 0)
    with pytest.raises(XsaveError, match="does not fit"):
        area.set_k(0, 1 << 64)
    with pytest.raises(XsaveError, match="not in this XSAVE layout"):
        area.set_tmm(0, bytes(1024))
    with pytest.raises(XsaveError, match="1024 bytes"):
        XsaveArea.blank(SPR_LAYOUT).set_tmm(0, b"short")
    legacy_only = XsaveLayout({0: SPR_LAYOUT.components[0], 1: SPR_LAYOUT.components[1]}, 0x3)
    small = XsaveArea.blank(legacy_only, 576)
    small.set_xmm(15, 1)
    assert small.xmm(15) == 1
    with pytest.raises(XsaveError, match="ymm0h"):
        small.ymm(0)
    assert area.xstate_bv == 0  # failed setters changed nothing


def test_components_outside_guest_xcr0():
    # What a host that does not enforce XCR0 = 0x7 produced: XSTATE_BV 0xa6.
    area = XsaveArea.blank(GENOA_LAYOUT)
    area.set_ymm(0, 1 << 200)
    area.set_k(3, 1)
    area.set_zmm(20, 1)
    assert area.xstate_bv == 0xA6
    assert [c.name for c in area.components_outside(0x7)] == ["opmask", "Hi16_ZMM"]
    assert area.components_outside(0xE7) == []
    guest_layout = XsaveLayout.from_cpuid(GENOA.guest_for_xcr0(0x7))
    with pytest.raises(XsaveError, match=r"opmask \(5\), Hi16_ZMM \(7\)"):
        XsaveArea.parse(area.encode(), guest_layout)


def test_diff_by_register():
    a, b = XsaveArea.blank(GENOA_LAYOUT), XsaveArea.blank(GENOA_LAYOUT)
    assert a.diff(b) == []
    b.set_k(3, 5)
    b.set_zmm(17, 1 << 511)
    assert a.diff(b) == [("xstate_bv", 0, 0xA0), ("k3", 0, 5), ("zmm17", 0, 1 << 511)]
    assert b.diff(a) == [("xstate_bv", 0xA0, 0), ("k3", 5, 0), ("zmm17", 1 << 511, 0)]


def test_diff_across_layouts_compares_architectural_state():
    amd, intel = XsaveArea.blank(GENOA_LAYOUT), XsaveArea.blank(SPR_LAYOUT)
    for area in (amd, intel):
        area.set_zmm(20, 0x1234)
        area.set_k(3, 0xFF)
    assert amd.encode()[:2432] != intel.encode()[:2432]  # different offsets...
    assert amd.diff(intel) == []  # ...same registers; AMX init on Intel is no difference
    intel.set_tmm(1, b"\x01" * 1024)
    assert intel.diff(amd) == [("xstate_bv", 0x400A0, 0xA0), ("tmm1", b"\x01" * 1024, None)]


# -- parse errors ----------------------------------------------------------------------


def test_parse_rejects_short_and_compacted_buffers():
    with pytest.raises(XsaveError, match="at least 576"):
        XsaveArea.parse(bytes(575), GENOA_LAYOUT)
    buf = bytearray(4096)
    buf[512:520] = (1 << 18 | 3).to_bytes(8, "little")
    with pytest.raises(XsaveError, match=r"4096 bytes .*XTILEDATA \(18\) at 2816\+8192: needs 11008"):
        XsaveArea.parse(buf, SPR_LAYOUT)
    buf[512:520] = (1 << 8).to_bytes(8, "little")
    with pytest.raises(XsaveError, match=r"PT \(8\)"):
        XsaveArea.parse(buf, SPR_LAYOUT)
    buf[512:520] = (1 << 17).to_bytes(8, "little")
    with pytest.raises(XsaveError, match=r"XTILECFG \(17\)"):
        XsaveArea.parse(buf, GENOA_LAYOUT)
    buf[512:520] = bytes(8)
    buf[520:528] = (1 << 63 | 3).to_bytes(8, "little")
    with pytest.raises(XsaveError, match="compacted"):
        XsaveArea.parse(buf, GENOA_LAYOUT)


# -- validate_for_set ---------------------------------------------------------------------


def _good(layout, size=None):
    area = XsaveArea.blank(layout, size)
    area.set_zmm(20, 7)
    return bytearray(area.encode())


def test_validate_for_set_accepts_a_good_buffer():
    validate_for_set(_good(GENOA_LAYOUT), GENOA_LAYOUT, 0x2E7)
    validate_for_set(_good(SPR_LAYOUT), SPR_LAYOUT, 0x602E7)
    validate_for_set(_good(GENOA_LAYOUT, 8192), GENOA_LAYOUT, 0x2E7, expected_size=8192)


def test_validate_for_set_wrong_size():
    with pytest.raises(XsaveError, match="4095 bytes; KVM_SET_XSAVE expects 4096"):
        validate_for_set(_good(GENOA_LAYOUT)[:4095], GENOA_LAYOUT, 0x2E7)
    with pytest.raises(XsaveError, match="4096 bytes; KVM_SET_XSAVE expects 11008"):
        validate_for_set(_good(GENOA_LAYOUT), SPR_LAYOUT, 0x602E7)


def test_validate_for_set_xcomp_bv():
    buf = _good(GENOA_LAYOUT)
    buf[520:528] = (1 << 63 | 0xE7).to_bytes(8, "little")
    with pytest.raises(XsaveError, match="XCOMP_BV is 0x80000000000000e7"):
        validate_for_set(buf, GENOA_LAYOUT, 0x2E7)


def test_validate_for_set_reserved_header_bytes():
    buf = _good(GENOA_LAYOUT)
    buf[530] = 1
    buf[575] = 0x80
    with pytest.raises(XsaveError, match=r"528\.\.575 must be zero; nonzero at 530, 575"):
        validate_for_set(buf, GENOA_LAYOUT, 0x2E7)


def test_validate_for_set_names_unsupported_components():
    area = XsaveArea.blank(SPR_LAYOUT)
    area.set_tmm(0, bytes(1024))
    area.set_tilecfg(TileConfig(palette=1))
    area.set_k(0, 1)
    with pytest.raises(XsaveError) as ei:
        validate_for_set(area.encode(), SPR_LAYOUT, 0xE7, expected_size=11008)
    msg = str(ei.value)
    assert "XSTATE_BV 0x60020 has components outside supported XCR0 0xe7" in msg
    assert "XTILECFG (17), XTILEDATA (18)" in msg
    assert "opmask" not in msg


def test_validate_for_set_reports_every_problem():
    buf = _good(GENOA_LAYOUT)
    buf[24:28] = (0x1F80 | 1 << 20).to_bytes(4, "little")
    buf[512:520] = (0x2E7 | 1 << 17).to_bytes(8, "little")
    buf[520] = 1
    buf[540] = 1
    with pytest.raises(XsaveError) as ei:
        validate_for_set(buf + b"\0", GENOA_LAYOUT, 0x2E7)
    problems = ei.value.problems
    assert len(problems) == 5
    assert [p.split()[0] for p in problems] == ["buffer", "XCOMP_BV", "reserved", "XSTATE_BV", "MXCSR"]
    assert "reserved bits 0x100000" in problems[4]


@pytest.mark.parametrize("bv", [0x0, 0x1, 0x2, 0x4])
def test_validate_for_set_checks_mxcsr(bv):
    # Some kernels check MXCSR whenever SSE/AVX may be used, whatever XSTATE_BV says.
    buf = bytearray(XsaveArea.blank(GENOA_LAYOUT).encode())
    buf[512:520] = bv.to_bytes(8, "little")
    validate_for_set(buf, GENOA_LAYOUT, 0x2E7)
    buf[24:28] = (0x1F80 | 1 << 16).to_bytes(4, "little")
    with pytest.raises(XsaveError, match="MXCSR 0x11f80 sets reserved bits 0x10000"):
        validate_for_set(buf, GENOA_LAYOUT, 0x2E7)
    validate_for_set(buf, GENOA_LAYOUT, 0x2E7, mxcsr_feature_mask=0x3FFFF)


# -- masks by name -------------------------------------------------------------------------


@pytest.mark.parametrize("text, mask", [
    ("0x7", 0x7), ("231", 0xE7), ("x87|SSE|AVX", 0x7), ("x87, sse, avx", 0x7),
    ("x87+SSE+AVX+opmask+zmm_hi256+HI16_ZMM", 0xE7), ("XTILECFG|XTILEDATA", 0x60000),
])
def test_parse_mask(text, mask):
    assert parse_mask(text) == mask


@pytest.mark.parametrize("text, message", [
    ("x87|avx512", "unknown XSAVE component 'avx512' in 'x87|avx512'"),
    ("x87||SSE", "unknown XSAVE component ''"),
    (hex(1 << 64), "does not fit in 64 bits"),
    ("-1", "does not fit in 64 bits"),
])
def test_parse_mask_rejects(text, message):
    with pytest.raises(XsaveError, match=message):
        parse_mask(text)


def test_mask_names():
    assert mask_names(0xE7) == "x87 SSE AVX opmask ZMM_Hi256 Hi16_ZMM"
    assert mask_names(1 << 62 | 1 << 9) == "PKRU component62"
    assert mask_names(0) == "none"
