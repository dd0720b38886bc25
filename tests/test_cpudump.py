"""CPUID dump files of every accepted format, told apart by content; bounded reads; clear errors.
Offline: recorded dumps only (tests/data, copied from ../shared)."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.cpudump import FORMATS, read_cpuid_file
from vmm.cpuid import CpuidError, CpuidTable
from vmm.xsave import XsaveLayout

DATA = Path(__file__).parent / "data"
MILAN = DATA / "amd-milan-cpuid-r.txt"
SPR = DATA / "intel-sapphire-rapids-w7-2475x.txt"


def vmm(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True, timeout=60)


def test_cpuid_r_of_a_milan_host_reads_as_that_cpu():
    d = read_cpuid_file(MILAN)
    assert d.format == "cpuid-r" and d.notes == []
    t = d.table
    assert t.vendor == "AuthenticAMD" and t.max_extended_leaf == 0x80000022
    assert t.xcr0_supported() == 0x207  # the README of cases/: XCR0 0x207, PKRU 8@2432
    pkru = XsaveLayout.from_cpuid(t).components[9]
    assert (pkru.size, pkru.offset) == (8, 2432)
    # indexed leaves keep their sub-leaves; a plain leaf is one entry
    assert t.entry(0x8000001D, 3).eax == 0x4163 and t.entry(0xB, 1).eax == 5
    assert not t.entry(0x80000008).indexed


def test_cpuid_r_of_all_cpus_takes_cpu_0_and_says_so(tmp_path):
    body = MILAN.read_text().splitlines()[1:]
    p = tmp_path / "all.txt"
    cpu1 = [line.replace("eax=0x00a00f11", "eax=0x00a00f12") for line in body]
    p.write_text("\n".join(["CPU 0:"] + body + ["CPU 1:"] + cpu1) + "\n")
    d = read_cpuid_file(p)
    assert d.table == read_cpuid_file(MILAN).table
    assert d.notes == ["2 CPUs in the file: the first, CPU 0, is used"]
    r = vmm("compat", str(p), "--host", str(p))  # compat says which CPU stands for the host
    assert r.returncode == 0, r.stderr
    assert "destination  CPUID dump all.txt (2 CPUs in the file: the first, CPU 0, is used)" in r.stdout


def test_aida64_with_several_cpus_takes_the_first(tmp_path):
    lines = SPR.read_text().splitlines()
    p = tmp_path / "instlat.txt"
    p.write_text("\n".join(["CPU#000 AffMask: 0x1"] + lines + ["CPU#001 AffMask: 0x2"]
                           + [line.replace("000806F8", "000806F9") for line in lines]) + "\n")
    d = read_cpuid_file(p)
    assert d.format == "aida64" and d.table == CpuidTable.from_dump(SPR)
    assert "CPU #0" in d.notes[0]


def test_json_and_probe_report_are_read_by_content(tmp_path):
    t = CpuidTable.from_dump(SPR)
    a = tmp_path / "a.dump"  # the name says nothing: the content does
    a.write_text(json.dumps(t.to_json()))
    assert read_cpuid_file(a).format == "json" and read_cpuid_file(a).table == t
    b = tmp_path / "b.txt"
    b.write_text(json.dumps({"schema": "vmm-probe-report/1", "host": {"supported_cpuid": t.to_json()}}))
    d = read_cpuid_file(b)
    assert d.format == "probe-report" and d.table == t


@pytest.mark.parametrize("text,line", [
    ("# header\nhello world\n", 2),
    ("CPU:\n   0x00000000 0x00: eax=0x00000010 ebx=0x1\n", 2),
    ("CPUID 00000000: 00000010-68747541-444D4163\n", 1),
])
def test_unreadable_files_name_the_file_line_and_formats(tmp_path, text, line):
    p = tmp_path / "bad.txt"
    p.write_text(text)
    with pytest.raises(CpuidError) as e:
        read_cpuid_file(p)
    msg = str(e.value)
    assert f"{p}:{line}:" in msg
    assert all(f in msg for f in FORMATS.values())


def test_reads_are_bounded(tmp_path):
    zero = tmp_path / "zero"
    os.mknod(zero, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # a private /dev/zero
    with pytest.raises(CpuidError, match="character device"):
        read_cpuid_file(zero)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(CpuidError, match="FIFO"):
        read_cpuid_file(fifo)
    big = tmp_path / "big.txt"
    big.write_text(SPR.read_text() * 3)
    with pytest.raises(CpuidError, match="more than"):
        read_cpuid_file(big, limit=SPR.stat().st_size)
    with pytest.raises(CpuidError, match="is a directory"):
        read_cpuid_file(tmp_path)
    with pytest.raises(CpuidError, match="no such file"):
        read_cpuid_file(tmp_path / "missing.txt")


def test_cli_reads_cpuid_r_and_refuses_binary_and_endless_input(tmp_path):
    r = vmm("cpuid", "--file", str(MILAN))
    assert r.returncode == 0, r.stderr
    assert "(cpuid-r)" in r.stdout and "XCR0 supported 0x207" in r.stdout
    zero = tmp_path / "zero"
    os.mknod(zero, stat.S_IFCHR | 0o600, os.makedev(1, 5))
    r = vmm("cpuid", "--file", str(zero))
    assert r.returncode == 2 and "character device" in r.stderr and r.stderr.count("\n") == 1
    r = vmm("xsave", "--layout", "--file", str(MILAN))
    assert r.returncode == 0, r.stderr
    assert "  9  PKRU       user         2432      8   2440" in r.stdout
