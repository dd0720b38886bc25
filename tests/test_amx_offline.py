"""AMX without AMX hardware: tile enumeration, the guest CPUID and KVM_CAP_XSAVE2 the AMX flow
builds for a recorded Sapphire Rapids, a tile state through the XSAVE layout, the arch_prctl error
messages, and the amx guest's instruction encodings."""

import errno
import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vmm import amx
from vmm.cpuid import CpuidTable
from vmm.errors import KvmError
from vmm.guest import catalog, runtime
from vmm.xsave import TileConfig, XsaveArea, XsaveError, XsaveLayout, validate_for_set

DATA = Path(__file__).parent / "data"
SPR_PATH = DATA / "intel-sapphire-rapids-w7-2475x.txt"
SPR = CpuidTable.from_dump(SPR_PATH)
GENOA = CpuidTable.from_dump(DATA / "amd-genoa-epyc-9124.txt")
XTILE, XTILEDATA = amx.XFEATURE_MASK_XTILE, amx.XFEATURE_MASK_XTILEDATA


# -- enumeration ------------------------------------------------------------------------------

def test_spr_palette_and_tmul():
    assert amx.palettes(SPR) == [amx.Palette(palette=1, total_tile_bytes=8192, bytes_per_tile=1024,
                                             bytes_per_row=64, max_names=8, max_rows=16)]
    assert amx.tmul(SPR) == amx.Tmul(maxk=16, maxn=64)


def test_genoa_has_no_tiles():
    assert amx.palettes(GENOA) == [] and amx.tmul(GENOA) is None
    problems = " | ".join(amx.host_problems(GENOA, 0x2E7))
    for missing in ("XTILECFG (17) and XTILEDATA (18)", "AMX_TILE, AMX_INT8, AMX_BF16", "XFD",
                    "0xD.0 EAX 0x2e7", "leaf 0x1D"):
        assert missing in problems


def test_xfd_msrs_follow_cpuid_d1_eax_bit4():
    assert amx.xfd_msrs(SPR) == [amx.MSR_IA32_XFD, amx.MSR_IA32_XFD_ERR] == [0x1C4, 0x1C5]
    assert amx.xfd_msrs(GENOA) == []
    no_xfd = SPR.copy()
    no_xfd.entry(0xD, 1).eax &= ~(1 << 4)
    assert amx.xfd_msrs(no_xfd) == []


# -- the guest CPUID the flow would set ------------------------------------------------------

def test_guest_cpuid_on_spr():
    assert amx.host_problems(SPR, 0x602E7) == []
    g = amx.guest_cpuid(SPR)
    d0 = g.entry(0xD, 0)
    assert (d0.eax, d0.edx) == (0x602E7, 0)
    assert d0.ebx == d0.ecx == 11008  # TILEDATA 2816 + 8192
    assert {"AMX_TILE", "AMX_INT8", "AMX_BF16", "XFD"} <= g.features()
    for key in ((0xD, 17), (0xD, 18), (0x1D, 0), (0x1D, 1), (0x1E, 0)):
        assert g.entry(*key) == SPR.entry(*key), key
    assert amx.xfd_msrs(g) == [0x1C4, 0x1C5]


@pytest.mark.parametrize("xcr0", [0x3, 0x7, 0x207, 0xE7])
def test_guest_cpuid_adds_tiles_to_the_other_bits(xcr0):
    g = amx.guest_cpuid(SPR, xcr0)
    assert g.entry(0xD, 0).eax == xcr0 | 0x3 | XTILE
    assert g.entry(0xD, 0).ebx == 11008  # the tile data is the last component
    assert g.has("AMX_TILE") and g.has("XFD")
    assert g.has("AVX512F") == (xcr0 & 0xE0 == 0xE0)


def test_guest_cpuid_refuses_cpus_without_amx():
    with pytest.raises(amx.AmxError, match=r"AMX_TILE.*XFD.*17/18.*0x1D"):
        amx.guest_cpuid(GENOA)


def test_supported_cpuid_before_the_permission_request_is_refused():
    # KVM_GET_SUPPORTED_CPUID as KVM reports it to a process without XTILEDATA permission:
    # leaf 0xD without bits 17/18 (kvm_get_filtered_xcr0) but 7.0 EDX AMX bits and 0x1D/0x1E.
    before = SPR.copy()
    before.entry(0xD, 0).eax = amx.kvm_filtered_xcr0(0x602E7, 0x202E7)
    before.remove(0xD, 17)
    before.remove(0xD, 18)
    problems = amx.host_problems(before)
    assert problems == ["KVM_GET_SUPPORTED_CPUID 0xD.0 EAX 0x2e7 lacks XTILECFG/XTILEDATA (bits 17/18): "
                        "no AMX in KVM, or no XTILEDATA guest permission in this process yet"]


# -- KVM_CAP_XSAVE2 with and without permission --------------------------------------------

@pytest.mark.parametrize("supported, permitted, filtered", [
    (0x602E7, 0x202E7, 0x2E7),    # default guest permission: XTILECFG is dropped with XTILEDATA
    (0x602E7, 0x602E7, 0x602E7),  # after ARCH_REQ_XCOMP_GUEST_PERM(18)
    (0x602E7, 0x2E7, 0x2E7),
    (0xE7, 0xE7, 0xE7),           # no dynamic feature: no filtering (this host)
    (0x202E7, 0x2E7, 0x202E7),    # XTILECFG without XTILEDATA: KVM only filters with XTILEDATA
])
def test_kvm_filtered_xcr0(supported, permitted, filtered):
    assert amx.kvm_filtered_xcr0(supported, permitted) == filtered


def test_xsave2_size_for_spr_with_and_without_permission():
    layout = XsaveLayout.from_cpuid(SPR)
    assert layout.standard_size(0x2E7) == 2696  # PKRU at 2688 + 8: below struct kvm_xsave
    assert amx.xsave2_size_for(SPR, 0x202E7) == 4096
    assert amx.xsave2_size_for(SPR, 0x602E7) == 11008
    assert amx.xsave2_size_for(GENOA, 0x2E7) == amx.xsave2_size_for(GENOA, 0x602E7) == 4096


# -- tile state through the XSAVE layout -------------------------------------------------------

def test_synthetic_tile_state_is_byte_exact_on_spr():
    layout = XsaveLayout.from_cpuid(amx.guest_cpuid(SPR))
    size = amx.xsave2_size_for(SPR, 0x602E7)
    rng = random.Random(18)
    tiles = [bytes(rng.randrange(256) for _ in range(1024)) for _ in range(8)]
    area = XsaveArea.blank(layout, size)
    area.set_tilecfg(amx.GUEST_TILECFG)
    for i, t in enumerate(tiles):
        area.set_tmm(i, t)
    raw = area.encode()

    assert len(raw) == 11008
    assert int.from_bytes(raw[512:520], "little") == XTILE
    cfg = raw[2752:2816]
    assert cfg[0] == 1 and cfg[1:16] == bytes(15)
    assert cfg[16:32] == b"\x40\x00" * 8 and cfg[32:48] == bytes(16)
    assert cfg[48:56] == b"\x10" * 8 and cfg[56:64] == bytes(8)
    for i, t in enumerate(tiles):
        assert raw[2816 + 1024 * i:2816 + 1024 * (i + 1)] == t

    again = XsaveArea.parse(raw, layout)
    assert again.encode() == raw
    assert again.tilecfg == amx.GUEST_TILECFG == TileConfig.from_bytes(cfg)
    assert [again.tmm(i) for i in range(8)] == tiles
    validate_for_set(raw, layout, 0x602E7, expected_size=11008)
    with pytest.raises(XsaveError, match="KVM_SET_XSAVE expects 4096"):
        validate_for_set(raw, layout, 0x602E7, expected_size=amx.xsave2_size_for(SPR, 0x202E7))


def test_guest_tile_data_is_rows_of_dwords():
    assert len(amx.GUEST_TILE_DATA) == 16 * 64
    assert amx.GUEST_TILE_DATA[:8].hex() == "00584d4101584d41"  # 0x414d5800, 0x414d5801
    assert amx.GUEST_TILE_DATA[-4:].hex() == "ff584d41"


# -- arch_prctl errors ----------------------------------------------------------------------

@pytest.mark.parametrize("err, name, says", [
    (errno.EOPNOTSUPP, "EOPNOTSUPP", "no AMX/XFD (ARCH_GET_XCOMP_SUPP = 0xe7)"),
    (errno.EBUSY, "EBUSY", "request AMX before the first vCPU"),
    (errno.ENOSPC, "ENOSPC", "sigaltstack"),
    (errno.EINVAL, "EINVAL", "beyond the last XSAVE component"),
])
def test_prctl_errors_name_the_call_errno_and_what_to_do(err, name, says):
    e = amx.prctl_error(amx.ARCH_REQ_XCOMP_GUEST_PERM, 18, err, 0xE7)
    assert isinstance(e, KvmError) and e.errno == err and e.errno_name == name
    assert str(e).startswith(f"arch_prctl (ARCH_REQ_XCOMP_GUEST_PERM, 18) failed: {name} (")
    assert says in str(e)


# -- the amx guest ----------------------------------------------------------------------------

def test_amx_guest_encodings():
    """GNU as assembles the AMX mnemonics to the SDM encodings (the bytes amx_test emits)."""
    img = catalog.load("amx")
    tileloadd_tmm0 = bytes.fromhex("c4e27b4b0410")  # tileloadd (%rax,%rdx,1), %tmm0
    tilerelease = bytes.fromhex("c4e27849c0")
    ldtilecfg = bytes.fromhex("c4e2784900")  # ldtilecfg (%rax)

    def at(label, n):
        off = img.symbols[label] - runtime.PAYLOAD_BASE
        return img.code[off:off + n]
    assert at("first_load", 6) == tileloadd_tmm0 and at("nm_load", 6) == tileloadd_tmm0
    assert at("release", 5) == tilerelease
    assert img.code.count(ldtilecfg) == 2
    assert img.symbols["TILEDATA"] == runtime.SCRATCH_BASE + 0x1000


def test_every_guest_fail_code_is_described():
    src = (catalog.SOURCE_DIR / "amx.S").read_text()
    used = {int(c, 16) for c in re.findall(r"^\s*(?:EXPECT .*|FAIL) (0x[0-9a-f]+)\s*(?:/\*.*)?$", src, re.M)}
    assert used == set(amx.GUEST_FAILS)


# -- vmm amx --file -------------------------------------------------------------------------

def _vmm(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_vmm_amx_on_a_recorded_spr():
    r = _vmm("amx", "--file", str(SPR_PATH), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["available"] and d["problems"] == []
    assert d["xsave2_size"] == {"without_permission": 4096, "with_permission": 11008}
    assert d["palettes"] == [{"palette": 1, "total_tile_bytes": 8192, "bytes_per_tile": 1024,
                              "bytes_per_row": 64, "max_names": 8, "max_rows": 16}]
    assert d["tmul"] == {"maxk": 16, "maxn": 64}
    assert d["guest_cpuid"] == {"xcr0": "0x602e7", "xsave_size": 11008, "xfd_msrs": ["0x1c4", "0x1c5"]}
    text = _vmm("amx", "--file", str(SPR_PATH))
    assert text.returncode == 0 and "palette 1" in text.stdout and "4096 without" in text.stdout


def test_vmm_amx_file_errors_are_one_line():
    r = _vmm("amx", "--file", "/nonexistent/cpuid.txt")
    assert r.returncode == 2 and r.stderr == "vmm: error: /nonexistent/cpuid.txt: no such file (expected a CPUID dump)\n"
    r = _vmm("amx", "--file", str(DATA / "amd-genoa-epyc-9124.txt"))
    assert r.returncode == 1 and "CPUID 7.0 EDX lacks AMX_TILE" in r.stdout and "Traceback" not in r.stderr
