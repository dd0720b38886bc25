"""`vmm probe`: every behaviour check on this host's KVM, the report and its schema, the fresh-process
rule for permission checks, the skip rule for old kernels, and the schema validator itself."""

import copy
import errno
import json
import os
import subprocess
import sys
import time
from importlib import resources

import pytest

from vmm.guest.machine import USER_XSTATE

from vmm import probe
from vmm.kvm import is_pvm
from vmm.probe import ProbeError, ReportError

# What the issue asks the probe to cover, by check name.
REQUIRED = {
    "cap_xsave2_dev_kvm", "cap_xsave2_vm_fd", "cap_xsave2_dev_kvm_after_request", "cap_xsave2_vm_fd_after_request",
    "xcomp_supp", "xcomp_perm", "xcomp_guest_perm", "req_xcomp_guest_perm", "req_xcomp_guest_perm_after_vcpu",
    "set_cpuid2_xtiledata_without_perm", "get_xsave_sizes", "get_xsave_trims_to_guest_xcr0",
    "set_xsave_after_narrow_cpuid", "set_xsave_xcomp_bv", "set_xsave_reserved_header", "one_reg_efer",
    "reg_list", "guest_ssp", "guest_beyond_xcr0", "msr_index_list", "get_cpuid2_matches_set",
    "guest_cpl0_payload",
}


def vmm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """`vmm probe --json -o FILE` in its own process: (stdout report, file report, seconds)."""
    from conftest import _require_kvm
    _require_kvm()
    out = tmp_path_factory.mktemp("probe") / "report.json"
    t0 = time.monotonic()
    r = vmm("probe", "--json", "-o", str(out))
    seconds = time.monotonic() - t0
    report = json.loads(r.stdout)
    # exit 0 only when every check is as upstream or skipped with its reason
    assert r.returncode == (0 if probe.all_as_upstream(report) else 1), r.stderr
    return report, json.loads(out.read_text()), seconds


@pytest.fixture(scope="module")
def checks(probed):
    return {c["name"]: c for c in probed[0]["checks"]}


# --- the report ------------------------------------------------------------------------------------
@pytest.mark.kvm
def test_probe_runs_every_check_and_its_json_validates_against_the_shipped_schema(probed):
    report, written, _ = probed  # its time is a benchmark's business (README), not a test's
    assert written["checks"] == report["checks"] and written["schema"] == "vmm-probe-report/2"
    shipped = json.loads((resources.files("vmm") / "schema" / "probe-report.schema.json").read_text())
    assert probe.validate(report, shipped) == []
    names = [c["name"] for c in report["checks"]]
    assert REQUIRED <= set(names) and len(names) == len(set(names))
    assert [c for c in report["checks"] if c["status"] == "error"] == []
    for c in report["checks"]:  # each says what was set up, the call, both results and a verdict
        if c["status"] != "skipped":
            assert c["setup"] and c["call"] and c["observed"]["text"] and c["upstream"]["text"], c["name"]
        assert c["verdict"] and "\n" not in c["verdict"], c["name"]
    assert report["summary"]["as-upstream"] + report["summary"]["differs"] + report["summary"]["skipped"] \
        == len(names)
    for c in report["checks"]:  # a skip and a difference each give their reason
        assert c["group"] in probe.GROUPS
        if c["status"] == "skipped":
            assert len(c["verdict"]) > len("skipped: ") + 10, c["name"]
    for g, counts in report["summary"]["groups"].items():
        assert sum(counts.values()) == sum(1 for c in report["checks"] if c["group"] == g)


def without_apic_ids(table):
    """KVM_GET_SUPPORTED_CPUID passes through the APIC ID of the CPU the caller runs on (leaf 1 EBX[31:24],
    leaf 0xB/0x1F EDX): two processes on different CPUs read different values there."""
    t = table.copy()
    t.entry(1).ebx &= 0x00FFFFFF
    for e in t:
        if e.function in (0xB, 0x1F):
            e.edx = 0
    return t


@pytest.mark.kvm
def test_the_report_carries_the_host_fingerprint(probed, kvm):
    from vmm.cpuid import CpuidTable
    from vmm.xsave import XsaveLayout
    h = probed[0]["host"]
    assert h["kernel"] == os.uname().release and h["pvm"] == is_pvm()
    supported = CpuidTable.from_json(h["supported_cpuid"])
    assert without_apic_ids(supported) == without_apic_ids(kvm.get_supported_cpuid())
    assert CpuidTable.from_dump(h["cpuid_dump"]) == supported  # the dump reads back as the same table
    assert XsaveLayout.from_json(h["xsave_layout"]) == XsaveLayout.from_cpuid(supported)
    assert h["capabilities"]["KVM_CAP_XSAVE2"] == kvm.check_extension("KVM_CAP_XSAVE2")
    assert h["msr_index_list"] == [hex(i) for i in kvm.get_msr_index_list()]
    assert h["amx"]["request"] == probed[0]["checks"][[c["name"] for c in probed[0]["checks"]]
                                                      .index("req_xcomp_guest_perm")]["observed"]["text"]


@pytest.mark.kvm
def test_text_output_lists_each_check_with_observed_and_upstream_results(tmp_path):
    out = tmp_path / "r.json"
    r = vmm("probe", "-o", str(out))
    report = probe.load_report(str(out))
    assert r.returncode == (0 if probe.all_as_upstream(report) else 1), r.stderr
    for g in report["summary"]["groups"]:  # a summary line per group
        assert f"\n  {g:<6} " in r.stdout
    for name in REQUIRED:
        assert f"\n{name} " in r.stdout
    assert r.stdout.count("  observed  ") >= len(REQUIRED) - 2 and "  upstream  " in r.stdout
    assert f"report written to {out}" in r.stdout
    probe.load_report(str(out))


# --- what each check observed (upstream answers; this host's differences where it is PVM) -----------
@pytest.mark.kvm
def test_xsave_permissions_and_cap_xsave2_before_and_after_the_request(checks, kvm):
    supp = checks["xcomp_supp"]["observed"]["value"]
    amx = bool(supp >> 18 & 1)
    assert checks["xcomp_perm"]["observed"]["value"] == supp & ~(1 << 18)
    assert checks["xcomp_guest_perm"]["observed"]["value"] == supp & ~(1 << 18)
    cap = checks["cap_xsave2_dev_kvm"]["observed"]["value"]
    assert cap == kvm.check_extension("KVM_CAP_XSAVE2") >= 4096
    assert checks["cap_xsave2_vm_fd"]["observed"]["value"] == cap
    req = checks["req_xcomp_guest_perm"]["observed"]
    late = checks["req_xcomp_guest_perm_after_vcpu"]["observed"]
    after = checks["cap_xsave2_vm_fd_after_request"]["observed"]["value"]
    if amx:
        assert req["ok"] and late["errno"] == errno.EBUSY and after > cap
    else:
        assert req["errno_name"] == late["errno_name"] == "EOPNOTSUPP"
        assert after == checks["cap_xsave2_dev_kvm_after_request"]["observed"]["value"] == cap
    for name in ("xcomp_perm", "xcomp_guest_perm", "cap_xsave2_dev_kvm", "cap_xsave2_vm_fd",
                 "req_xcomp_guest_perm", "req_xcomp_guest_perm_after_vcpu", "cap_xsave2_vm_fd_after_request"):
        assert checks[name]["status"] == "as-upstream", checks[name]


@pytest.mark.kvm
def test_permission_checks_ran_in_fresh_processes(checks):
    for name in ("req_xcomp_guest_perm", "cap_xsave2_dev_kvm_after_request", "cap_xsave2_vm_fd_after_request"):
        assert checks[name]["process"] == "after-request"
    for name in ("req_xcomp_guest_perm_after_vcpu", "set_cpuid2_xtiledata_without_perm", "xcomp_guest_perm"):
        assert checks[name]["process"] == "fresh"
    assert checks["get_xsave_sizes"]["process"] == "probe"


@pytest.mark.kvm
def test_set_cpuid2_with_xtiledata_and_no_permission_is_eperm(checks):
    c = checks["set_cpuid2_xtiledata_without_perm"]
    assert c["observed"]["errno_name"] == "EPERM" and c["status"] == "as-upstream", c


@pytest.mark.kvm
def test_xsave_sizes_and_buffers_kvm_refuses(checks, kvm):
    sizes = checks["get_xsave_sizes"]
    assert sizes["details"]["xsave2_written"] == sizes["details"]["xsave2_cap"] == kvm.check_extension(
        "KVM_CAP_XSAVE2")
    for name in ("set_xsave_xcomp_bv", "set_xsave_reserved_header", "set_xsave_unpermitted_component"):
        c = checks[name]
        assert c["observed"]["errno_name"] == "EINVAL" and c["details"]["state_unchanged"], c
        assert c["status"] == "as-upstream"
    narrow = checks["set_xsave_after_narrow_cpuid"]
    if probe.core.has_set_xsave_fix(probe.kernel_version()):
        assert narrow["observed"]["ok"] and narrow["status"] == "as-upstream", narrow
    else:  # 5.17 to 6.5: EINVAL, reported as a kernel without the fix
        assert narrow["status"] == "skipped" and "not in this kernel" in narrow["verdict"]
    trim = checks["get_xsave_trims_to_guest_xcr0"]
    if trim["status"] == "skipped":
        assert narrow["status"] == "skipped"
    elif is_pvm():  # PVM widens the guest CPUID (KVM_GET_CPUID2), so nothing is trimmed
        assert trim["status"] == "differs" and "widened the guest CPUID" in trim["verdict"]
        assert trim["details"]["xstate_bv_got"] == trim["details"]["xstate_bv_set"]
    else:
        assert trim["status"] == "as-upstream"
        assert int(trim["details"]["xstate_bv_got"], 16) & ~0x7 == 0


@pytest.mark.kvm
def test_one_reg_reg_list_and_guest_ssp(checks, kvm):
    ctx = probe.Context()
    try:
        has_one_reg = ctx.one_reg()
        efer = probe.core.EFER_SCE | (probe.core.EFER_NXE if ctx.guest_cpuid.has("NX") else 0)
    finally:
        ctx.close()
    if not has_one_reg:  # Linux < 6.18: each says so instead of failing
        for name in ("one_reg_efer", "reg_list", "guest_ssp", "one_reg_agrees_with_msrs"):
            assert checks[name]["status"] == "skipped" and "not in this kernel" in checks[name]["verdict"]
        return
    one = checks["one_reg_efer"]
    assert one["observed"]["value"] == efer and one["details"]["set_one_reg_works"], one
    assert checks["reg_list"]["observed"]["value"] == 0 and checks["reg_list"]["status"] == "as-upstream"
    assert checks["guest_ssp"]["observed"]["errno_name"] == "EINVAL"


@pytest.mark.kvm
def test_guest_beyond_xcr0_and_the_cpuid_kvm_holds(checks, kvm):
    beyond = checks["guest_beyond_xcr0"]
    cpuid2 = checks["get_cpuid2_matches_set"]
    changed = cpuid2["details"]["added"] or cpuid2["details"]["removed"]
    assert cpuid2["status"] == ("differs" if changed else "as-upstream")
    if changed and is_pvm():
        assert "PVM" in cpuid2["verdict"]
    filled = kvm.get_supported_cpuid().xcr0_supported() & USER_XSTATE
    assert int(beyond["details"]["filled"], 16) == filled
    if is_pvm():
        assert beyond["observed"]["value"] == "sync" and beyond["status"] == "differs"
        assert int(beyond["details"]["xstate_bv"], 16) & filled == filled
    else:
        assert beyond["observed"]["value"] == "#UD" and beyond["status"] == "as-upstream"


@pytest.mark.kvm
def test_cpl0_payload_runs_on_standard_kvm_and_is_an_emulation_failure_on_pvm(checks):
    c = checks["guest_cpl0_payload"]
    if is_pvm():
        assert c["observed"]["value"] == "internal-error" and c["status"] == "differs"
        assert "emulates guest CPL0 code" in c["verdict"]
    else:
        assert c["observed"]["value"] == "sync" and c["status"] == "as-upstream"


@pytest.mark.kvm
def test_msr_index_list_reads_back(checks, kvm):
    c = checks["msr_index_list"]
    rows = c["details"]["msrs"]
    assert [r["index"] for r in rows] == [hex(i) for i in kvm.get_msr_index_list()]
    assert c["observed"]["value"] == sum(r["readable"] for r in rows)
    lstar = next(r for r in rows if r["index"] == "0xc0000082")
    assert lstar["name"] == "LSTAR" and lstar["readable"]


# --- fresh processes and old kernels -----------------------------------------------------------------
@pytest.mark.kvm
def test_a_permission_check_refuses_to_run_in_the_calling_process(kvm):
    ctx = probe.Context()
    try:
        for name in ("req_xcomp_guest_perm", "cap_xsave2_vm_fd_after_request", "set_cpuid2_xtiledata_without_perm",
                     "req_xcomp_guest_perm_after_vcpu"):
            with pytest.raises(ProbeError, match="fresh process"):
                probe.run_check(ctx, probe.get_check(name))
    finally:
        ctx.close()


@pytest.mark.kvm
def test_one_check_in_a_fresh_process_from_the_command_line():
    r = subprocess.run([sys.executable, "-m", "vmm.probe", "--check", "req_xcomp_guest_perm_after_vcpu"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    (res,) = json.loads(r.stdout)
    assert res["name"] == "req_xcomp_guest_perm_after_vcpu" and res["status"] == "as-upstream"
    r = subprocess.run([sys.executable, "-m", "vmm.probe", "--check", "no_such_check"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "unknown check 'no_such_check'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.kvm
def test_checks_known_to_be_dangerous_on_old_kernels_are_skipped_there(kvm):
    names = ["guest_beyond_xcr0", "set_xsave_xcomp_bv", "get_xsave_sizes", "req_xcomp_guest_perm"]
    res = {r["name"]: r for r in probe.run_checks(names=names, kernel="3.10.0-1160.el7")}
    assert res["guest_beyond_xcr0"]["status"] == "skipped" and "5.1" in res["guest_beyond_xcr0"]["verdict"]
    assert res["set_xsave_xcomp_bv"]["status"] == "skipped" and "3.18" in res["set_xsave_xcomp_bv"]["verdict"]
    assert res["get_xsave_sizes"]["status"] != "skipped"  # harmless everywhere: runs
    assert res["req_xcomp_guest_perm"]["status"] != "skipped"  # the pretended kernel reaches the child too
    res = {r["name"]: r for r in probe.run_checks(names=names[:1], kernel="5.4.0")}
    assert "older than" not in res["guest_beyond_xcr0"]["verdict"]  # may still skip: a host without AVX-512
    report = probe.make_report(names=names, kernel="4.19.0")
    assert report["summary"]["skipped"] == 1 and probe.validate(report, probe.load_schema()) == []


def test_kernel_versions_parse():
    assert probe.kernel_version("6.18.44-fc-v657") == (6, 18, 44)
    assert probe.kernel_version("6.1") == (6, 1, 0)
    assert probe.kernel_version("5.15.0-91-generic") < (6, 6) <= probe.kernel_version("6.6.1")
    assert probe.kernel_version("weird") == (0, 0, 0)
    # distribution kernels: the stable version is beside the release string (found inside Debian's 6.1)
    dv = probe.core.distro_version
    assert dv("", "Linux version 6.1.0-57-amd64 (debian-kernel@lists.debian.org) (gcc-12 (Debian 12.2.0-14"
                  "+deb12u1) 12.2.0, GNU ld (GNU Binutils for Debian) 2.40) #1 SMP PREEMPT_DYNAMIC Debian "
                  "6.1.192-3 (2026-10-01)") == (6, 1, 192)
    assert dv("Ubuntu 5.15.0-91.101-generic 5.15.131\n", "Linux version 5.15.0-91-generic") == (5, 15, 131)
    assert dv("", "Linux version 6.18.44-fc-v657 (builder@sandboxing) #1 SMP PREEMPT_DYNAMIC @0") is None
    assert probe.core.has_set_xsave_fix((6, 1, 192)) and not probe.core.has_set_xsave_fix((6, 1, 0))
    # the KVM_SET_XSAVE-after-a-narrower-KVM_SET_CPUID2 fix: 6.6, and 6.1.60 in the 6.1 series
    fixed = probe.core.has_set_xsave_fix
    assert fixed((6, 1, 60)) and fixed((6, 6, 0)) and fixed((6, 18, 44)) and fixed((6, 12, 0))
    assert not fixed((6, 1, 59)) and not fixed((6, 5, 13)) and not fixed((5, 17, 0))


# --- reading reports ---------------------------------------------------------------------------------
@pytest.mark.kvm
def test_bad_reports_are_refused_with_what_is_wrong(probed, tmp_path):
    report = probed[0]
    text = json.dumps(report)

    def write(name, content):
        p = tmp_path / name
        p.write_text(content)
        return str(p)

    newer = dict(report, schema="vmm-probe-report/99")
    with pytest.raises(ReportError, match=r"schema 'vmm-probe-report/99' is not one this vmm reads"):
        probe.load_report(write("newer.json", json.dumps(newer)))
    with pytest.raises(ReportError, match="truncated"):
        probe.load_report(write("cut.json", text[:len(text) // 2]))
    with pytest.raises(ReportError, match="no 'schema' field"):
        probe.load_report(write("noschema.json", json.dumps({k: v for k, v in report.items() if k != "schema"})))
    with pytest.raises(ReportError, match="not an object"):
        probe.load_report(write("list.json", "[1, 2]"))
    broken = copy.deepcopy(report)
    broken["checks"][0]["status"] = "fine"
    del broken["host"]["xsave2"]
    with pytest.raises(ReportError, match=r"\$\.checks\[0\]\.status: 'fine' is not one of .*; "
                                          r"\$\.host: 'xsave2' is a required property"):
        probe.load_report(write("broken.json", json.dumps(broken)))
    with pytest.raises(ReportError, match="missing.json: no such file"):
        probe.load_report(str(tmp_path / "missing.json"))
    assert probe.load_report(write("good.json", text))["schema"] == "vmm-probe-report/2"
    # a report of schema version 1 (no group, selftest or per-group summary) still reads: compat and
    # baseline take reports written by older vmm versions
    old = copy.deepcopy(report)
    old["schema"] = "vmm-probe-report/1"
    del old["summary"]["groups"], old["host"]["tsc_khz"]
    for c in old["checks"]:
        del c["group"], c["selftest"]
    assert probe.load_report(write("v1.json", json.dumps(old)))["schema"] == "vmm-probe-report/1"
    with pytest.raises(ReportError, match=r"\$\.checks\[0\]: 'group' is a required property"):
        probe.load_report(write("v2-without-group.json", json.dumps(dict(old, schema="vmm-probe-report/2"))))


# --- the validator -----------------------------------------------------------------------------------
SCHEMA = {
    "type": "object",
    "required": ["v", "kind"],
    "properties": {
        "v": {"const": 1},
        "kind": {"type": "string", "enum": ["a", "b"]},
        "n": {"type": ["integer", "null"]},
        "xs": {"type": "array", "items": {"type": "object", "required": ["k"], "additionalProperties": False,
                                          "properties": {"k": {"type": "boolean"}}}},
        "m": {"type": "object", "additionalProperties": {"type": "number"}},
    },
    "additionalProperties": False,
}


def test_validator_accepts_what_the_schema_allows():
    assert probe.validate({"v": 1, "kind": "a", "n": None, "xs": [{"k": True}], "m": {"x": 1.5, "y": 2}},
                          SCHEMA) == []


@pytest.mark.parametrize("doc, message", [
    ([], "$: [] is not of type 'object'"),
    ({"kind": "a"}, "$: 'v' is a required property"),
    ({"v": 2, "kind": "a"}, "$.v: 1 was expected"),
    ({"v": True, "kind": "a"}, "$.v: 1 was expected"),  # true is not 1 in JSON
    ({"v": 1, "kind": "c"}, "$.kind: 'c' is not one of ['a', 'b']"),
    ({"v": 1, "kind": 3}, "$.kind: 3 is not of type 'string'"),
    ({"v": 1, "kind": "a", "n": False}, "$.n: False is not of type 'integer', 'null'"),
    ({"v": 1, "kind": "a", "n": 1.5}, "$.n: 1.5 is not of type 'integer', 'null'"),
    ({"v": 1, "kind": "a", "xs": [{"k": True}, {}]}, "$.xs[1]: 'k' is a required property"),
    ({"v": 1, "kind": "a", "xs": [{"k": 1}]}, "$.xs[0].k: 1 is not of type 'boolean'"),
    ({"v": 1, "kind": "a", "xs": [{"k": True, "j": 1}]}, "$.xs[0]: Additional properties are not allowed ('j'"),
    ({"v": 1, "kind": "a", "m": {"x": "1"}}, "$.m.x: '1' is not of type 'number'"),
    ({"v": 1, "kind": "a", "extra": 0}, "$: Additional properties are not allowed ('extra'"),
])
def test_validator_names_each_problem_with_its_path(doc, message):
    errors = probe.validate(doc, SCHEMA)
    assert any(e.startswith(message) for e in errors), errors


def test_the_shipped_schema_is_a_valid_json_schema_naming_this_version():
    import jsonschema
    schema = probe.load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    with pytest.raises(jsonschema.SchemaError):
        probe.validate(3, {"type": "int"})
    assert schema["properties"]["schema"]["const"] == probe.SCHEMA_ID
    assert set(schema["properties"]["checks"]["items"]["properties"]["status"]["enum"]) == set(probe.STATUSES)
