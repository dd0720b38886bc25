"""AMX on real KVM, in the AMX process (`pytest -m amx`; make test runs it first). The tests that
need AMX hardware use the `amx_host` fixture and skip elsewhere with the host's reason
(VMM_REQUIRE_AMX=1 makes that a failure). The others run on every host and check what it does: the
permission request, KVM_CAP_XSAVE2, the EPERM of KVM_SET_CPUID2 without permission, XFD/XFD_ERR
gating, and the CLI."""

import errno
import json
import subprocess
import sys

import conftest
import pytest

from vmm import amx
from vmm.errors import KvmError
from vmm.guest.machine import default_guest_cpuid
from vmm.guest.runner import Done, Fail, Fault, Sync
from vmm.kvm import is_pvm
from vmm.xsave import XsaveArea, XsaveLayout

XFD, XFD_ERR = amx.MSR_IA32_XFD, amx.MSR_IA32_XFD_ERR
XTILE, XTILEDATA = amx.XFEATURE_MASK_XTILE, amx.XFEATURE_MASK_XTILEDATA
CR0_TS = 1 << 3
NM_VECTOR = 7

# The AMX guest permission is per process, and the first vCPU locks it (later requests: EBUSY).
# Every test here runs in the AMX process (`pytest -m amx`), which conftest.py has asked for it
# before any vCPU existed; these are the host's answers.
pytestmark = pytest.mark.amx
XCOMP_SUPP = conftest.XCOMP_SUPP
DEFAULT_GUEST_PERM = conftest.DEFAULT_GUEST_PERM
PERMISSION_ERROR = conftest.AMX_PERMISSION_ERROR


def _vmm(*args):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=60)


def _amx_problems(kvm):
    return ([str(PERMISSION_ERROR)] if PERMISSION_ERROR else []) + \
        amx.host_problems(kvm.get_supported_cpuid(), XCOMP_SUPP)


@pytest.fixture
def amx_host(kvm):
    problems = _amx_problems(kvm)
    if problems:
        conftest.lacking("AMX", "no AMX on this host: " + problems[0])  # the request's errno when it failed


# -- every host --------------------------------------------------------------------------------

def test_permission_request_gives_the_hosts_answer(kvm):
    if XCOMP_SUPP & XTILE == XTILE:
        assert PERMISSION_ERROR is None
        assert amx.get_xcomp_guest_perm() & XTILE == XTILE
    else:  # here: EOPNOTSUPP, and nothing changed
        assert PERMISSION_ERROR.errno == errno.EOPNOTSUPP
        assert str(PERMISSION_ERROR).startswith(
            "arch_prctl (ARCH_REQ_XCOMP_GUEST_PERM, 18) failed: EOPNOTSUPP (Operation not supported); ")
        assert f"ARCH_GET_XCOMP_SUPP = {XCOMP_SUPP:#x}" in str(PERMISSION_ERROR)
        assert amx.get_xcomp_guest_perm() == DEFAULT_GUEST_PERM
    # only XTILEDATA can be requested; numbers past the last component are invalid
    with pytest.raises(KvmError, match=r"GUEST_PERM, 1\) failed: EOPNOTSUPP .*only XTILEDATA \(18\)"):
        amx.req_xcomp_guest_perm(1)
    with pytest.raises(KvmError, match=r"ARCH_REQ_XCOMP_GUEST_PERM, 64\) failed: EINVAL .*beyond the last"):
        amx.req_xcomp_guest_perm(64)


def test_permissions_bound_what_kvm_offers(kvm):
    perm, guest_perm = amx.get_xcomp_perm(), amx.get_xcomp_guest_perm()
    assert perm & ~XCOMP_SUPP == 0 and guest_perm & ~XCOMP_SUPP == 0
    supported = kvm.get_supported_cpuid().xcr0_supported()
    assert amx.kvm_filtered_xcr0(supported, guest_perm) == supported  # already filtered by KVM


def test_xsave2_size_follows_the_guest_permission(kvm):
    model = amx.xsave2_size_for(kvm.get_supported_cpuid(), amx.get_xcomp_guest_perm())
    with kvm.create_vm() as vm:
        assert kvm.check_extension("KVM_CAP_XSAVE2") == vm.xsave2_size() == model
    if PERMISSION_ERROR is not None:
        assert model == 4096  # no tile data: struct kvm_xsave is enough


def test_set_cpuid2_with_xtiledata_needs_permission(kvm, tmp_path):
    """A fresh process has no XTILEDATA guest permission on any host: KVM_SET_CPUID2 with bit 18
    in CPUID.(0DH,0).EAX is EPERM, and vmm says why and what to do. `vmm run --cpu` refuses such a
    file before any VM (the compat judge: this process holds no AMX permission; --amx asks for it)."""
    cpuid = default_guest_cpuid(kvm)
    cpuid.entry(0xD, 0).eax |= XTILEDATA
    path = tmp_path / "xtiledata.json"
    path.write_text(json.dumps(cpuid.to_json()))
    r = _vmm("run", "--cpu", str(path))
    assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "AMX: the guest uses XTILEDATA, this host cannot grant it" in r.stderr and "--amx" in r.stderr
    code = ("import json, sys; from vmm.cpuid import CpuidTable; from vmm.errors import KvmError\n"
            "from vmm.guest.machine import Machine\n"
            "try:\n    Machine('hello', cpuid=CpuidTable.from_json(json.load(open(sys.argv[1])))).close()\n"
            "except KvmError as e:\n    print(e)\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert r.stdout.startswith("KVM_SET_CPUID2 failed: EPERM (Operation not permitted); "), r.stdout + r.stderr
    assert "arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM, 18) before creating vCPUs" in r.stdout


def test_vmm_run_amx(kvm):
    r = _vmm("run", "--amx")
    if not _amx_problems(kvm):
        assert r.returncode == 0 and r.stdout.endswith("done\n"), r.stderr
    elif PERMISSION_ERROR is not None:  # here
        assert r.returncode == 4 and r.stdout == ""
        assert r.stderr == f"vmm: error: {PERMISSION_ERROR}\n"
    else:
        assert r.returncode == 4 and "AMX is not available to guests" in r.stderr


def test_vmm_amx_report(kvm):
    r = _vmm("amx", "--json")
    d = json.loads(r.stdout)
    problems = _amx_problems(kvm)
    assert r.returncode == (0 if not problems else 1)
    assert d["available"] == (not problems)
    assert d["xcomp_supp"] == hex(XCOMP_SUPP)
    assert d["xcomp_guest_perm"]["before"] == hex(DEFAULT_GUEST_PERM)  # a fresh process
    assert d["xcomp_guest_perm"]["after"] == hex(amx.get_xcomp_guest_perm())  # same request here
    assert d["xcomp_perm"]["before"] == d["xcomp_perm"]["after"]  # only the guest permission
    assert d["request"]["ok"] == (PERMISSION_ERROR is None)
    if PERMISSION_ERROR is not None:
        assert d["request"]["errno"] == PERMISSION_ERROR.errno
        assert d["request"]["errno_name"] == PERMISSION_ERROR.errno_name
        assert d["problems"][0] == str(PERMISSION_ERROR)
    supported = kvm.get_supported_cpuid()
    before = amx.xsave2_size_for(supported, DEFAULT_GUEST_PERM)
    after = amx.xsave2_size_for(supported, amx.get_xcomp_guest_perm())
    assert d["xsave2_size"] == {"before": {"dev_kvm": before, "vm_fd": before},
                                "after": {"dev_kvm": after, "vm_fd": after}}
    text = _vmm("amx")
    assert text.returncode == r.returncode and "Traceback" not in text.stderr
    assert text.stdout.startswith(f"AMX for guests               {'no' if problems else 'yes'}\n")


def test_amx_is_hidden_without_amx(machine):
    """Without amx=True no AMX reaches the guest, even where this process holds the permission:
    vmm refuses the amx guest before its VM (it needs AMX-TILE), and run anyway (its requirement
    dropped) it finds no XTILECFG in CPUID.(0DH,17) and fails its first tile check."""
    import dataclasses
    from vmm.errors import GuestError
    from vmm.guest import catalog
    with pytest.raises(GuestError, match="guest 'amx' needs AMX-TILE"):
        machine("amx")
    m = machine(dataclasses.replace(catalog.load("amx"), requires=()))
    held = m.vcpu.get_cpuid2()
    for table in (m.cpuid, held):
        assert table.xcr0_supported() & XTILE == 0
        assert not table.features() & set(amx.AMX_FEATURES)
        assert table.entry(0x1D, 0) is None and table.entry(0x1E, 0) is None
    assert m.vcpu.get_xcrs()[0] & XTILE == 0
    ev = m.run(timeout=10)
    assert isinstance(ev, Fail) and ev.code == 0xA2, ev
    assert m.vcpu.get_regs().rsi == 0  # what the guest read: no XTILECFG
    assert amx.GUEST_FAILS[ev.code].startswith("CPUID.(0DH,17).EAX")


@pytest.mark.parametrize("xfd", [False, True], ids=["no-xfd", "xfd"])
def test_xfd_msrs_without_amx(machine, kvm, xfd):
    """XFD/XFD_ERR belong to the vCPU state exactly when the guest CPUID has XFD. Measured KVM
    behaviour for host-initiated access when the guest has no XFD-capable component (no AMX in
    its XCR0): reads give 0 with or without XFD in its CPUID, writing 0 is accepted, any other
    value is rejected (kvm_guest_supported_xfd() is 0). KVM lists the MSRs for save/restore in
    KVM_GET_MSR_INDEX_LIST only when the host has XFD."""
    host_xfd = kvm.get_supported_cpuid().has("XFD")
    cpuid = default_guest_cpuid(kvm)
    cpuid.set_feature("XFD", xfd)
    m = machine("hello", cpuid=cpuid)
    assert amx.xfd_msrs(m.cpuid) == ([XFD, XFD_ERR] if xfd else [])
    held = m.vcpu.get_cpuid2()
    assert not held.has("XFD") or xfd
    if is_pvm() and not host_xfd:  # kvm_pvm drops from the CPUID it holds what the host CPU lacks
        assert not held.has("XFD") and amx.xfd_msrs(held) == []
    assert m.vcpu.get_msrs([XFD, XFD_ERR]) == {XFD: 0, XFD_ERR: 0}
    m.vcpu.set_msrs({XFD: 0, XFD_ERR: 0})
    for msr in (XFD, XFD_ERR):
        with pytest.raises(KvmError, match=f"KVM wrote 0 of 1 MSRs and rejected MSR 0x{msr:x} = 0x40000"):
            m.vcpu.set_msrs({msr: XTILEDATA})
    assert m.vcpu.get_msrs([XFD, XFD_ERR]) == {XFD: 0, XFD_ERR: 0}
    listed = set(kvm.get_msr_index_list())
    assert ({XFD, XFD_ERR} <= listed) == host_xfd
    assert isinstance(m.run(timeout=10), Done)


# -- AMX hosts ---------------------------------------------------------------------------------

@pytest.mark.amx
def test_enable_builds_the_amx_guest_cpuid(kvm, amx_host):
    setup = amx.enable(kvm)
    assert setup.guest_perm & XTILE == XTILE and setup.xcomp_supp & XTILE == XTILE
    assert setup.supported.xcr0_supported() & XTILE == XTILE
    g = setup.guest_cpuid
    layout = XsaveLayout.from_cpuid(g)
    tiles = layout.components[amx.XFEATURE_XTILEDATA]
    assert tiles.size == 8192 and tiles.xfd
    assert setup.xsave2_size == amx.xsave2_size_for(setup.supported, setup.guest_perm) >= tiles.end
    assert g.entry(0xD, 0).eax & XTILE == XTILE
    assert g.entry(0xD, 0).ebx == g.entry(0xD, 0).ecx == layout.standard_size(g.xcr0_supported())
    assert {"AMX_TILE", "XFD"} <= g.features()
    assert amx.xfd_msrs(g) == [XFD, XFD_ERR]
    p = amx.palettes(g)[0]  # the geometry the amx guest (and amx_test) relies on
    assert (p.palette, p.total_tile_bytes, p.bytes_per_tile, p.bytes_per_row, p.max_names, p.max_rows) == \
        (1, 8192, 1024, 64, 8, 16)


@pytest.mark.amx
def test_amx_guest_tiles_and_xfd_nm(machine, amx_host):
    """The amx_test scenario: TILELOADD, TILERELEASE, then #NM from XFD handled by the host."""
    m = machine("amx", amx=True)
    assert m.amx is not None and amx.xfd_msrs(m.cpuid) == [XFD, XFD_ERR]
    assert m.vcpu.get_xcrs()[0] & XTILE == XTILE
    layout = XsaveLayout.from_cpuid(m.cpuid)
    tiledata = m.image.symbols["TILEDATA"]

    def xsave():
        raw = m.vcpu.get_xsave()
        assert len(raw) == m.vm.xsave2_size() >= layout.components[amx.XFEATURE_XTILEDATA].end
        return XsaveArea.parse(raw, layout)

    # enumeration checked in the guest, XFD = 0, LDTILECFG palette 1, TILELOADD TMM0
    ev = m.run(timeout=10)
    assert isinstance(ev, Sync) and ev.value == 1, (ev, amx.GUEST_FAILS.get(getattr(ev, "code", None)))
    data = m.vm.read(tiledata, 1024)
    assert data == amx.GUEST_TILE_DATA
    area = xsave()
    assert area.xstate_bv & XTILE == XTILE
    assert area.tilecfg == amx.GUEST_TILECFG
    assert area.tmm(0) == data

    # TILERELEASE: the tile state is back in its init configuration
    ev = m.run(timeout=10)
    assert isinstance(ev, Sync) and ev.value == 2, ev
    area = xsave()
    assert area.xstate_bv & XTILE == 0 and area.tmm(0) == bytes(1024)

    # XFD armed for XTILEDATA: TILELOADD raises #NM, XFD_ERR says why, CR0.TS is not involved
    ev = m.run(timeout=10)
    assert isinstance(ev, Fault) and ev.vector == NM_VECTOR, ev
    assert ev.rip == m.image.symbols["nm_load"] and ev.cs & 3 == 3
    assert m.vcpu.get_msrs([XFD, XFD_ERR]) == {XFD: XTILEDATA, XFD_ERR: XTILEDATA}
    assert not m.vcpu.get_sregs().cr0 & CR0_TS
    m.vcpu.set_msrs({XFD_ERR: 0, XFD: 0})
    assert m.vcpu.get_msrs([XFD, XFD_ERR]) == {XFD: 0, XFD_ERR: 0}

    # the stub returns to the TILELOADD, which now loads; the guest sees XFD and XFD_ERR at 0
    ev = m.run(timeout=10)
    assert isinstance(ev, Sync) and ev.value == 3, (ev, amx.GUEST_FAILS.get(getattr(ev, "code", None)))
    area = xsave()
    assert area.xstate_bv & XTILE == XTILE and area.tmm(0) == data
    assert isinstance(m.run(timeout=10), Done)


@pytest.mark.amx
def test_xfd_msrs_with_amx(machine, amx_host):
    """With AMX in the guest, host-initiated XFD/XFD_ERR writes of XTILEDATA (the one component
    with XFD support) are accepted and read back; XTILECFG's bit is not."""
    m = machine("hello", amx=True)
    m.vcpu.set_msrs({XFD: XTILEDATA, XFD_ERR: XTILEDATA})
    assert m.vcpu.get_msrs([XFD, XFD_ERR]) == {XFD: XTILEDATA, XFD_ERR: XTILEDATA}
    with pytest.raises(KvmError, match="rejected MSR 0x1c4"):
        m.vcpu.set_msrs({XFD: amx.XFEATURE_MASK_XTILECFG})
    m.vcpu.set_msrs({XFD: 0, XFD_ERR: 0})
    assert isinstance(m.run(timeout=10), Done)
