"""vmm.statediff offline: CPUID differences in the field model, memory extents over guest-physical
addresses (pure functions over recorded CPUID dumps and synthetic memory)."""

import os

from vmm.cpuid import CpuidTable
from vmm.statediff import diff_cpuid, diff_memory, memory_reader

DATA = os.path.join(os.path.dirname(__file__), "data")


def test_cpuid_fields_by_name_and_by_bits():
    genoa = CpuidTable.from_dump(os.path.join(DATA, "amd-genoa-epyc-9124.txt"))
    spr = CpuidTable.from_dump(os.path.join(DATA, "intel-sapphire-rapids-w7-2475x.txt"))
    assert diff_cpuid(genoa, genoa) == []
    d = {x.name: (x.a, x.b) for x in diff_cpuid(genoa, spr)}
    assert d["AMX_TILE"] == (False, True) and d["AMX_INT8"] == (False, True)
    assert not any(name == "AVX512F" for name in d)  # both have it
    leaf0 = [n for n in d if n.startswith("CPUID.(0x0,0).EAX")]
    assert len(leaf0) == 1 and "max basic leaf" in leaf0[0]


def test_memory_extents_differ_by_page_and_unbacked_reads_as_zero():
    a = bytearray(0x4000)
    b = bytearray(0x4000)
    b[0x1004] = 1
    b[0x3FFF] = 2
    ra = memory_reader([(0x100000, len(a), lambda o, n: bytes(a[o:o + n]))])
    rb = memory_reader([(0x100000, len(b), lambda o, n: bytes(b[o:o + n]))])
    ext = [(0x100000, 0x4000)]
    assert diff_memory(ext, ext, ra, rb) == [(0x101000, 0x1000), (0x103000, 0x1000)]
    assert diff_memory(ext, ext, ra, ra) == []
    # B has a slot A lacks: it differs only where it holds data
    c = bytearray(0x2000)
    c[0x1000] = 3
    rc = memory_reader([(0x100000, len(a), lambda o, n: bytes(a[o:o + n])),
                        (0x200000, len(c), lambda o, n: bytes(c[o:o + n]))])
    assert diff_memory(ext, ext + [(0x200000, 0x2000)], ra, rc) == [(0x201000, 0x1000)]
