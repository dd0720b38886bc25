"""The guest SDK: a freestanding C guest and an assembly guest built with the SDK's Makefile snippet
(vmm.mk found through `vmm guest-sdk --path`), run with `vmm run` to DONE at CPL3; each SYNC value
is checked against the same computation done here on the host."""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm

EXAMPLES_MAKEFILE = """\
VMM_SDK := $(shell {python} -m vmm.cli guest-sdk --path)
include $(VMM_SDK)/vmm.mk
all: dot.elf dot.bin hello-asm.bin
"""


def vmm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def host_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def xorshift32(x):
    x ^= (x << 13) & 0xFFFFFFFF
    x ^= x >> 17
    x ^= (x << 5) & 0xFFFFFFFF
    return x


def dot_on_the_host(seed, n=1024):
    """examples/dot.c's computation: two int32 vectors from xorshift32, dot product mod 2^32."""
    s, total = seed or 1, 0
    for _ in range(n):
        s = xorshift32(s)
        a = s
        s = xorshift32(s)
        total = (total + a * s) & 0xFFFFFFFF
    return total


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    if not shutil.which("gcc") or not shutil.which("make"):
        pytest.skip("gcc and make are needed to build SDK guests")
    d = tmp_path_factory.mktemp("sdk-guests")
    for name in ("dot.c", "hello-asm.S"):
        shutil.copy(os.path.join(os.path.dirname(__file__), "..", "vmm", "sdk", "examples", name), d)
    (d / "Makefile").write_text(EXAMPLES_MAKEFILE.format(python=sys.executable))
    r = subprocess.run(["make", "-C", str(d)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return d


def test_guest_sdk_path_holds_the_sdk():
    r = vmm("guest-sdk", "--path")
    assert r.returncode == 0, r.stderr
    path = r.stdout.strip()
    for name in ("vmm.inc", "vmm.h", "crt0.S", "guest.ld", "vmm.mk", "examples/dot.c", "examples/hello-asm.S"):
        assert os.path.isfile(os.path.join(path, name)), name


def test_c_guest_with_vector_intrinsics_matches_the_host(built):
    flags = host_flags()
    if "avx2" not in flags:
        pytest.skip("this CPU has no AVX2: the example's AVX2 path cannot run")
    for seed in (12345, 0xDEADBEEF):
        r = vmm("run", str(built / "dot.elf"), "--arg", hex(seed), "--json")
        assert r.returncode == 0, r.stdout + r.stderr
        out = json.loads(r.stdout)
        assert out["cpl"] == 3 and out["exit"]["event"] == "done"
        value, paths = (int(s, 16) for s in out["syncs"])
        assert value == dot_on_the_host(seed)
        assert paths & 1, "the AVX2 intrinsics path did not run although the CPU has AVX2"
        if "avx512f" not in flags:
            assert not paths & 2, "an AVX-512 path ran on a CPU without AVX-512F"
        assert out["console"] == f"dot product 0x{value:016x}\n"


def int8_dot_on_the_host(seed, n=1024):
    """dot.c's AMX computation: the same vectors' low bytes as int8, dot product mod 2^32."""
    s, total = seed or 1, 0
    for _ in range(n):
        s = xorshift32(s)
        a = s
        s = xorshift32(s)
        total += _i8(a) * _i8(s)
    return total & 0xFFFFFFFF


def _i8(x):
    x &= 0xFF
    return x - 256 if x > 127 else x


@pytest.mark.amx
def test_c_guest_with_amx_tiles_matches_the_host(built, kvm):
    """On AMX hosts: with --amx the guest also runs TDPBSSD on tiles; its check against plain C must
    pass (else FAIL 0xa8), SYNC 2 says the AMX path ran and SYNC 3 is the int8 dot product."""
    import conftest
    conftest.needs_amx(kvm)
    r = vmm("run", str(built / "dot.elf"), "--amx", "--arg", "99", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    value, paths, int8 = (int(s, 16) for s in out["syncs"])
    assert value == dot_on_the_host(99) and paths & 4 and int8 == int8_dot_on_the_host(99)


def test_the_flat_binary_of_the_c_guest_runs_like_its_elf(built):
    elf = json.loads(vmm("run", str(built / "dot.elf"), "--arg", "7", "--json").stdout)
    flat = json.loads(vmm("run", str(built / "dot.bin"), "--arg", "7", "--json").stdout)
    assert elf["syncs"] == flat["syncs"] and int(elf["syncs"][0], 16) == dot_on_the_host(7)


def test_asm_guest_reads_the_host_argument(built):
    r = vmm("run", str(built / "hello-asm.bin"), "--arg", "0x41", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["syncs"] == ["0x42"] and out["console"] == "hello from an SDK assembly guest\n"
    # no argument given: the guest reads 0
    out = json.loads(vmm("run", str(built / "hello-asm.bin"), "--json").stdout)
    assert out["syncs"] == ["0x1"]


def test_guest_sdk_copy_refuses_a_directory_in_use(tmp_path):
    (tmp_path / "keep").write_text("mine")
    r = vmm("guest-sdk", "--copy", str(tmp_path))
    assert r.returncode == 2 and "not an empty directory" in r.stderr
    assert (tmp_path / "keep").read_text() == "mine"
    r = vmm("guest-sdk", "--copy", str(tmp_path / "new"))
    assert r.returncode == 0 and (tmp_path / "new" / "vmm.mk").is_file()
