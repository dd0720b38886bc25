"""What ordinary (upstream) KVM does, from `vmm probe` reports taken inside Debian's distribution kernels.

The reports in tests/data/probe-debian-SERIES-kvm_amd-tcg.json were written by `make test-kernels
KERNELS_ARGS=--save-probe` (tests/kernels/harness.py): the kernel boots under QEMU's TCG, loads kvm_amd
and answers every ioctl with its own KVM code. This host's /dev/kvm is PVM-backed and cannot show these
behaviours; the reports can, on every host, without KVM.

The CPU inside is QEMU's emulated "max" CPU (AMD, x87/SSE/AVX/PKRU, no AVX-512), so KVM decides what the
ioctls return, while the emulator decides how guest instructions execute. One place where the emulator
and not KVM decides: QEMU 7.2's SVM does not intercept a nested guest's own XSETBV, so after a guest
XSETBV the guest reads its new XCR0 while KVM_GET_XCRS still reports the old one. No check below depends
on a guest's XSETBV; XCR0 reaches the guest through KVM_SET_XCRS, which KVM loads with XSETBV in the
kernel under test before entering the guest, and that the emulator executes as the CPU would.
"""

import json
import os
import subprocess
import sys

import pytest

from vmm import probe

DATA = os.path.join(os.path.dirname(__file__), "data")
SERIES = ("6.1", "6.12")
X87_SSE = 0x3
AVX = 1 << 2


def report_path(series):
    return os.path.join(DATA, f"probe-debian-{series}-kvm_amd-tcg.json")


@pytest.fixture(scope="module", params=SERIES)
def series(request):
    return request.param


@pytest.fixture(scope="module")
def checks(series):
    report = probe.load_report(report_path(series))
    return {c["name"]: c for c in report["checks"]}


def vmm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_the_reports_come_from_ordinary_kvm_on_the_named_kernels(series):
    report = probe.load_report(report_path(series))
    host = report["host"]
    assert host["kernel"].startswith(series + ".") and host["pvm"] is False
    assert host["vendor"] == "AuthenticAMD"
    assert report["summary"]["error"] == 0, [c["name"] for c in report["checks"] if c["status"] == "error"]


def test_get_xsave2_trims_to_the_guest_xcr0_with_fp_and_sse(checks):
    """The vCPU's CPUID allows XCR0 x87|SSE only; KVM_SET_XSAVE accepts a buffer with AVX state (6.6 and
    6.1.60 check against the process's permitted features) and KVM_GET_XSAVE2 gives it back without it."""
    accepted = checks["set_xsave_after_narrow_cpuid"]
    assert accepted["observed"]["value"] == 0 and accepted["status"] == "as-upstream"
    c = checks["get_xsave_trims_to_guest_xcr0"]
    d = c["details"]
    allowed = int(d["guest_xcr0_set"], 16) | X87_SSE
    put, got = int(d["xstate_bv_set"], 16), int(d["xstate_bv_got"], 16)
    assert put & ~allowed, "the check must put state beyond the guest XCR0 in"
    assert got == put & allowed and c["status"] == "as-upstream"
    assert d["guest_xcr0_held"] == d["guest_xcr0_set"]  # KVM kept the narrower guest CPUID


def test_guest_xcr0_is_enforced_for_cpl3_code(checks):
    """The checkpoint guest, told to fill every component KVM supports (AVX among them), with guest XCR0 =
    x87|SSE takes #UD at its first AVX instruction. XCR0 comes from KVM_SET_XCRS, which KVM loads before
    entering the guest; the #UD itself is raised by the emulated CPU running the guest."""
    c = checks["guest_beyond_xcr0"]
    assert int(c["details"]["guest_xcr0"], 16) == X87_SSE and int(c["details"]["filled"], 16) & AVX
    assert c["observed"]["value"] == "#UD" and c["status"] == "as-upstream"
    assert int(c["details"]["xstate_bv"], 16) & ~X87_SSE == 0  # no state beyond XCR0 came from the guest


def test_get_cpuid2_returns_what_set_cpuid2_was_given(checks):
    """Apart from the fields KVM keeps in step at run time (OSXSAVE, OSPKE, APIC, CPUID.(0DH,0/1).EBX),
    which the check leaves out."""
    c = checks["get_cpuid2_matches_set"]
    assert c["observed"]["value"] == {"added": [], "removed": []} and c["status"] == "as-upstream"
    assert c["details"]["xcr0_held"] == c["details"]["xcr0_set"]


def test_cpl0_payloads_run(checks):
    c = checks["guest_cpl0_payload"]
    assert c["observed"]["value"] == "sync" and c["status"] == "as-upstream", c["verdict"]


def test_kernels_before_6_18_have_no_x86_one_reg(checks, series):
    """x86 KVM_GET/SET_ONE_REG came with 6.18: the probe says so instead of calling it a difference."""
    for name in ("one_reg_efer", "reg_list", "guest_ssp"):
        assert checks[name]["status"] == "skipped" and "6.18" in checks[name]["verdict"], name


def test_kvm_get_cpuid2_reports_nent_only_from_6_12(checks, series):
    """Linux 6.1 leaves kvm_cpuid2.nent as the caller gave it (vmm.kvm.read_vcpu_cpuid2 finds the
    table's size from E2BIG instead); 6.12 writes the count back as the selftests expect."""
    c = checks["get_cpuid2_e2big"]
    assert c["status"] == ("differs" if series == "6.1" else "as-upstream"), c["verdict"]


# --- vmm compat between the two kernels and this host ----------------------------------------------------
def compat(source, dest):
    r = vmm("compat", source, "--host", dest, "--json")
    assert r.returncode in (0, 1), r.stderr
    out = json.loads(r.stdout)
    assert out["compatible"] is (r.returncode == 0)
    return out


@pytest.fixture(scope="module")
def here_report(tmp_path_factory, kvm):
    path = tmp_path_factory.mktemp("probe") / "here.json"
    r = vmm("probe", "-o", str(path), "--json")
    assert path.exists(), r.stderr
    return str(path)


def _layout(report):
    """{component index: (offset, size)} of a probe report's XSAVE layout."""
    layout = report["host"]["xsave_layout"]
    return {int(c["index"]): (c.get("offset"), c.get("size")) for c in layout["components"]}


@pytest.mark.parametrize("source,dest", [("6.1", "6.12"), ("6.12", "6.1"), ("6.1", "here"), ("here", "6.1"),
                                         ("6.12", "here"), ("here", "6.12")])
def test_compat_between_the_kernels_and_this_host(source, dest, here_report):
    """The two kernels ran on the same emulated CPU, so their XSAVE layouts agree, but each KVM lists MSRs
    the other does not (6.1 the Intel and AMD PMU counters, 6.12 DEBUGCTL and the LBR MSRs, and one more
    SVM feature bit in CPUID 0x8000000A EDX): a guest's saved MSRs stop the move both ways. Between
    them and this host every XSAVE component of the source guest is compared at its offset and size: PKRU
    sits at 2688 (QEMU's Intel-style offset), so a host with PKRU elsewhere, or without it, is a no."""
    paths = {"6.1": report_path("6.1"), "6.12": report_path("6.12"), "here": here_report}
    out = compat(paths[source], paths[dest])
    assert out["compatible"] is (out["problems"] == [])
    for comp in out["xsave_components"]:
        if comp["status"] != "same":
            assert not out["compatible"] and any(comp["name"] in p for p in out["problems"]), comp
    if out["features"]["missing"]:
        assert any("CPUID features the destination lacks" in p for p in out["problems"])
    if {source, dest} == {"6.1", "6.12"}:
        assert out["vendor"]["same"] and all(c["status"] == "same" for c in out["xsave_components"])
        assert not out["compatible"]
        assert any(p.startswith("MSRs the state carries that the destination's KVM does not list")
                   for p in out["problems"])
        return
    src, dst = (probe.load_report(paths[x]) for x in (source, dest))
    src_layout, dst_layout = _layout(src), _layout(dst)
    guest_xcr0 = int(out["source"]["guest_cpuid_xcr0"], 16)
    for i in range(2, 64):
        if guest_xcr0 >> i & 1 and src_layout.get(i) != dst_layout.get(i):
            assert not out["compatible"]
            assert any(c["index"] == i and c["status"] != "same" for c in out["xsave_components"])
