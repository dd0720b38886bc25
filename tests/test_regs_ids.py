"""vmm.regs: x86 ONE_REG ids, names and parsing.

Expected ids are written out by hand from the uAPI layout
(arch 0x20 | size U64 0x3 << 52 | type << 32 | index) and from
Documentation/virt/kvm/api.rst ("0x2030 0002 <msr number:32>",
SSP = "0x2030 0003 0000 0000"), never computed with the code under test.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmm import regs
from vmm.regs import (
    RegError,
    RegId,
    decode,
    describe,
    kvm_reg,
    msr,
    name_of,
    parse_assignment,
    parse_reg,
)

EFER_ID = 0x20300002C0000080
SSP_ID = 0x2030000300000000
U32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


# --- constants -------------------------------------------------------------


def test_constants_match_uapi():
    assert regs.KVM_REG_X86 == 0x2000000000000000
    assert regs.KVM_REG_SIZE_U64 == 0x0030000000000000
    assert regs.KVM_REG_ARCH_MASK == 0xFF00000000000000
    assert regs.KVM_REG_SIZE_MASK == 0x00F0000000000000
    assert regs.KVM_REG_SIZE_SHIFT == 52
    assert regs.KVM_X86_REG_TYPE_MSR == 2
    assert regs.KVM_X86_REG_TYPE_KVM == 3
    assert regs.KVM_REG_GUEST_SSP == 0
    assert regs.KVM_REG_SIZE_U64 == 3 << regs.KVM_REG_SIZE_SHIFT


def test_masks_partition_all_64_bits():
    masks = [
        regs.KVM_REG_ARCH_MASK,
        regs.KVM_REG_SIZE_MASK,
        regs._RESERVED_MASK,
        regs._TYPE_MASK,
        regs._INDEX_MASK,
    ]
    assert sum(masks) == (1 << 64) - 1
    for i, a in enumerate(masks):
        for b in masks[i + 1:]:
            assert a & b == 0


# --- builders --------------------------------------------------------------


@pytest.mark.parametrize(
    "index, expected",
    [
        (0xC0000080, 0x20300002C0000080),
        (0x0, 0x2030000200000000),
        (0x10, 0x2030000200000010),
        (0x6A4, 0x20300002000006A4),
        (0x4B564D01, 0x203000024B564D01),
        (0xFFFFFFFF, 0x20300002FFFFFFFF),
    ],
)
def test_msr_ids(index, expected):
    assert msr(index) == expected


def test_kvm_reg_ids():
    assert kvm_reg(0) == 0x2030000300000000
    assert kvm_reg(regs.KVM_REG_GUEST_SSP) == SSP_ID
    assert kvm_reg(7) == 0x2030000300000007


@pytest.mark.parametrize("builder", [msr, kvm_reg])
@pytest.mark.parametrize(
    "bad, words",
    [
        (-1, "negative"),
        (0x100000000, "32 bits"),
        (1 << 64, "32 bits"),
        (True, "must be an int"),
        ("0x10", "must be an int"),
        (1.0, "must be an int"),
    ],
)
def test_builders_reject_bad_index(builder, bad, words):
    with pytest.raises(RegError, match=words):
        builder(bad)


# --- decode / encode -------------------------------------------------------


def test_decode_known_ids():
    assert decode(EFER_ID) == RegId(0x2000000000000000, 8, 2, 0xC0000080)
    assert decode(SSP_ID) == RegId(0x2000000000000000, 8, 3, 0)
    assert decode(EFER_ID).kind == "msr"
    assert decode(SSP_ID).kind == "kvm"


def test_encode_known_ids():
    assert RegId(0x2000000000000000, 8, 2, 0xC0000080).encode() == EFER_ID
    assert RegId(0x2000000000000000, 8, 3, 0).encode() == SSP_ID


def test_regid_is_frozen():
    r = decode(EFER_ID)
    with pytest.raises(AttributeError):
        r.index = 1


@pytest.mark.parametrize(
    "reg_id, words",
    [
        (0x60300002C0000080, r"ARM64.*not KVM_REG_X86"),
        (0x00300002C0000080, r"GENERIC.*not KVM_REG_X86"),
        (0x90300002C0000080, r"LOONGARCH"),
        (0xF0300002C0000080, r"unknown arch"),
        (0x20200002C0000080, r"4 bytes \(KVM_REG_SIZE_U32\)"),
        (0x20000002C0000080, r"1 bytes \(KVM_REG_SIZE_U8\)"),
        (0x20400002C0000080, r"16 bytes \(KVM_REG_SIZE_U128\)"),
        (0x20F00002C0000080, r"32768 bytes"),
        (0x2030000000000000, r"unknown register type 0"),
        (0x2030000100000000, r"unknown register type 1"),
        (0x2030000400000000, r"unknown register type 4"),
        (0x203000FF00000000, r"unknown register type 255"),
        (0x2030010200000000, r"reserved bits.*0x0000010000000000"),
        (0x2031000200000000, r"reserved bits.*0x0001000000000000"),
        (0x2038000200000000, r"reserved bits.*0x0008000000000000"),
        (0x203FFF0200000000, r"reserved bits.*0x000fff0000000000"),
        (-1, "negative"),
        (1 << 64, "does not fit in 64 bits"),
        ("0x20300002c0000080", "must be an int"),
        (None, "must be an int"),
        (True, "must be an int"),
    ],
)
def test_decode_rejects(reg_id, words):
    with pytest.raises(RegError, match=words):
        decode(reg_id)


def test_decode_error_names_the_id():
    with pytest.raises(RegError, match="0x2020000200000010"):
        decode(0x2020000200000010)


def test_regid_constructor_validates():
    with pytest.raises(RegError, match="not KVM_REG_X86"):
        RegId(0x6000000000000000, 8, 2, 0)
    with pytest.raises(RegError, match="4 bytes"):
        RegId(0x2000000000000000, 4, 2, 0)
    with pytest.raises(RegError, match="3 bytes"):
        RegId(0x2000000000000000, 3, 2, 0)
    with pytest.raises(RegError, match="type 5"):
        RegId(0x2000000000000000, 8, 5, 0)
    with pytest.raises(RegError, match="32 bits"):
        RegId(0x2000000000000000, 8, 2, 1 << 32)
    with pytest.raises(RegError, match="negative"):
        RegId(0x2000000000000000, 8, 2, -1)


def test_decode_accepts_unknown_kvm_index():
    # KVM rejects unknown KVM-defined registers itself; the encoding is valid.
    assert decode(0x2030000300000009).index == 9
    assert name_of(0x2030000300000009) == "KVM_REG 0x9"


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([2, 3]), U32)
def test_roundtrip_fields(type_, index):
    by_hand = 0x2000000000000000 | 0x0030000000000000 | (type_ << 32) | index
    r = RegId(0x2000000000000000, 8, type_, index)
    assert r.encode() == by_hand
    assert decode(by_hand) == r
    assert (msr if type_ == 2 else kvm_reg)(index) == by_hand


# any u64, and valid ids with one bit flipped (or none, bit 64): uniform u64s are almost never valid
NEAR_VALID = st.builds(lambda t, i, bit: (0x2030000000000000 | t << 32 | i) ^ ((1 << bit) & ((1 << 64) - 1)),
                       st.sampled_from([2, 3]), U32, st.integers(0, 64))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.integers(min_value=0, max_value=(1 << 64) - 1), NEAR_VALID))
def test_any_u64_decodes_exactly_or_raises(reg_id):
    valid = (
        reg_id >> 56 == 0x20
        and (reg_id >> 52) & 0xF == 3
        and (reg_id >> 40) & 0xFFF == 0
        and (reg_id >> 32) & 0xFF in (2, 3)
    )
    if valid:
        assert decode(reg_id).encode() == reg_id
    else:
        with pytest.raises(RegError):
            decode(reg_id)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([2, 3]), U32)
def test_parse_round_trips_name_and_hex(type_, index):
    reg_id = 0x2030000000000000 | (type_ << 32) | index
    assert parse_reg(name_of(reg_id)) == reg_id
    assert parse_reg(hex(reg_id)) == reg_id
    assert parse_reg(describe(reg_id)["id"]) == reg_id


# --- names -----------------------------------------------------------------

# Values copied from the Intel SDM vol. 4 / kernel msr-index.h and
# uapi/asm/kvm_para.h, independently of vmm/regs.py.
EXPECTED_MSRS = {
    "EFER": 0xC0000080,
    "STAR": 0xC0000081,
    "LSTAR": 0xC0000082,
    "CSTAR": 0xC0000083,
    "SYSCALL_MASK": 0xC0000084,
    "FS_BASE": 0xC0000100,
    "GS_BASE": 0xC0000101,
    "KERNEL_GS_BASE": 0xC0000102,
    "TSC_AUX": 0xC0000103,
    "TSC": 0x10,
    "APIC_BASE": 0x1B,
    "FEATURE_CONTROL": 0x3A,
    "TSC_ADJUST": 0x3B,
    "SPEC_CTRL": 0x48,
    "PRED_CMD": 0x49,
    "ARCH_CAPABILITIES": 0x10A,
    "SYSENTER_CS": 0x174,
    "SYSENTER_ESP": 0x175,
    "SYSENTER_EIP": 0x176,
    "MISC_ENABLE": 0x1A0,
    "PAT": 0x277,
    "TSC_DEADLINE": 0x6E0,
    "XSS": 0xDA0,
    "XFD": 0x1C4,
    "XFD_ERR": 0x1C5,
    "U_CET": 0x6A0,
    "S_CET": 0x6A2,
    "PL0_SSP": 0x6A4,
    "PL1_SSP": 0x6A5,
    "PL2_SSP": 0x6A6,
    "PL3_SSP": 0x6A7,
    "INT_SSP_TAB": 0x6A8,
    "MCG_STATUS": 0x17A,
    "MTRR_DEF_TYPE": 0x2FF,
    "KVM_SYSTEM_TIME_NEW": 0x4B564D01,
    "KVM_WALL_CLOCK_NEW": 0x4B564D00,
    "KVM_ASYNC_PF_EN": 0x4B564D02,
    "KVM_STEAL_TIME": 0x4B564D03,
    "KVM_PV_EOI_EN": 0x4B564D04,
    "KVM_POLL_CONTROL": 0x4B564D05,
}


@pytest.mark.parametrize("name, index", sorted(EXPECTED_MSRS.items()))
def test_msr_table(name, index):
    assert regs.MSRS[name] == index


def test_msr_table_is_one_to_one_and_32_bit():
    assert len(set(regs.MSRS.values())) == len(regs.MSRS)
    assert all(0 <= i <= 0xFFFFFFFF for i in regs.MSRS.values())
    assert all(name == name.upper() for name in regs.MSRS)
    assert all(target in regs.MSRS for target in regs.MSR_ALIASES.values())
    assert not set(regs.MSR_ALIASES) & set(regs.MSRS)


def test_kvm_table():
    assert regs.KVM_REGS == {"GUEST_SSP": 0}


@pytest.mark.parametrize(
    "text",
    ["efer", "EFER", "Efer", "MSR_EFER", "msr_efer", "IA32_EFER", "MSR_IA32_EFER",
     "  efer  ", "0xc0000080", "0xC0000080", "3221225600", "0x2030_0002_c000_0080",
     "0x20300002c0000080", "MSR 0xc0000080", "msr 3221225600"],
)
def test_parse_reg_efer_spellings(text):
    assert parse_reg(text) == EFER_ID


@pytest.mark.parametrize(
    "text, index",
    [
        ("SFMASK", 0xC0000084),
        ("syscall_mask", 0xC0000084),
        ("MSR_SYSCALL_MASK", 0xC0000084),
        ("IA32_FMASK", 0xC0000084),
        ("MTRRdefType", 0x2FF),
        ("MSR_MTRRdefType", 0x2FF),
        ("IA32_MTRR_DEF_TYPE", 0x2FF),
        ("IA32_FEATURE_CONTROL", 0x3A),
        ("MSR_IA32_FEAT_CTL", 0x3A),
        ("MSR_IA32_APICBASE", 0x1B),
        ("IA32_APIC_BASE", 0x1B),
        ("MSR_IA32_CR_PAT", 0x277),
        ("IA32_PAT", 0x277),
        ("IA32_TIME_STAMP_COUNTER", 0x10),
        ("MSR_IA32_TSC", 0x10),
        ("MSR_KVM_SYSTEM_TIME_NEW", 0x4B564D01),
        ("kvm_steal_time", 0x4B564D03),
        ("ia32_pl3_ssp", 0x6A7),
        ("MSR_IA32_INT_SSP_TAB", 0x6A8),
        ("16", 0x10),
        ("0x1b", 0x1B),
        ("0", 0x0),
        ("0xffffffff", 0xFFFFFFFF),
    ],
)
def test_parse_reg_msr_names(text, index):
    assert parse_reg(text) == 0x2030000200000000 | index


@pytest.mark.parametrize(
    "text",
    ["GUEST_SSP", "guest_ssp", "KVM_REG_GUEST_SSP", "SSP", "KVM_REG 0", "0x2030000300000000"],
)
def test_parse_reg_kvm_names(text):
    assert parse_reg(text) == SSP_ID


@pytest.mark.parametrize(
    "text, words",
    [
        ("", "empty"),
        ("   ", "empty"),
        ("EFR", r"unknown register 'EFR'; did you mean .*EFER"),
        ("MSR_LSTR", r"did you mean .*LSTAR"),
        ("guest_spp", r"did you mean .*GUEST_SSP"),
        ("xyzzy", r"unknown register 'xyzzy'; expected an MSR"),
        ("-5", "negative"),
        ("-0x10", "negative"),
        ("0xZZ", "not a number"),
        ("12abc", "not a number"),
        ("0x100000000", r"neither a 32-bit MSR index nor a valid register id.*not KVM_REG_X86"),
        ("0x6030000200000010", r"ARM64"),
        ("0x2020000200000010", r"KVM_REG_SIZE_U32"),
        ("0x2030000500000010", r"unknown register type 5"),
        ("0x2030100200000010", r"reserved bits"),
        ("0x10000000000000000", "does not fit in 64 bits"),
        ("MSR 0x100000000", "32 bits"),
        ("MSR -1", "negative"),
        ("KVM_REG zz", "not a number"),
    ],
)
def test_parse_reg_errors(text, words):
    with pytest.raises(RegError, match=words):
        parse_reg(text)


def test_parse_reg_rejects_non_text():
    with pytest.raises(RegError, match="text"):
        parse_reg(0xC0000080)


def test_name_of():
    assert name_of(EFER_ID) == "MSR_EFER"
    assert name_of(SSP_ID) == "GUEST_SSP"
    assert name_of(0x2030000200000010) == "MSR_TSC"
    assert name_of(0x20300002C0000084) == "MSR_SYSCALL_MASK"
    assert name_of(0x203000024B564D03) == "MSR_KVM_STEAL_TIME"
    assert name_of(0x20300002C0010114) == "MSR 0xc0010114"
    with pytest.raises(RegError, match="reserved"):
        name_of(0x2030010200000010)


def test_describe():
    assert describe(EFER_ID) == {
        "id": "0x20300002c0000080",
        "name": "MSR_EFER",
        "type": "msr",
        "index": "0xc0000080",
    }
    assert describe(SSP_ID) == {
        "id": "0x2030000300000000",
        "name": "GUEST_SSP",
        "type": "kvm",
        "index": "0x0",
    }
    assert json.loads(json.dumps(describe(0x20300002000006A4)))["name"] == "MSR_PL0_SSP"
    with pytest.raises(RegError):
        describe(0)


# --- assignments -----------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("EFER=0x500", (EFER_ID, 0x500)),
        ("efer = 1280", (EFER_ID, 1280)),
        ("MSR_IA32_TSC=0", (0x2030000200000010, 0)),
        ("0x10=0xffffffffffffffff", (0x2030000200000010, 0xFFFFFFFFFFFFFFFF)),
        ("GUEST_SSP=0xffff_8000_0000_0000", (SSP_ID, 0xFFFF800000000000)),
        ("0x20300002c0000080=18446744073709551615", (EFER_ID, (1 << 64) - 1)),
        ("MSR 0x1b=0xfee00900", (0x203000020000001B, 0xFEE00900)),
    ],
)
def test_parse_assignment(text, expected):
    assert parse_assignment(text) == expected


@pytest.mark.parametrize(
    "text, words",
    [
        ("EFER", "expected NAME=VALUE"),
        ("=5", "missing register name"),
        ("EFER=", "missing value"),
        ("EFER=  ", "missing value"),
        ("EFER=0x10000000000000000", "does not fit in 64 bits"),
        ("EFER=18446744073709551616", "does not fit in 64 bits"),
        ("EFER=-1", "negative"),
        ("EFER=abc", "not a number"),
        ("EFER=1=2", "not a number"),
        ("EFER=0b101", "not a number"),
        ("NOPE=1", "unknown register 'NOPE'"),
        ("0x6030000000000000=1", "ARM64"),
    ],
)
def test_parse_assignment_errors(text, words):
    with pytest.raises(RegError, match=words):
        parse_assignment(text)


def test_regerror_is_valueerror():
    assert issubclass(RegError, ValueError)


def test_module_is_pure():
    # Load the file on its own so the package __init__ cannot pull anything in.
    path = Path(regs.__file__)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('regs_alone', {str(path)!r})\n"
        "m = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = m  # dataclasses look the module up\n"
        "spec.loader.exec_module(m)\n"
        "bad = [n for n in sys.modules if n == 'cffi' or n.startswith('vmm')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
