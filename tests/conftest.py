"""Shared fixtures. Tests that touch KVM use the `kvm` fixture (or the `kvm` marker): they skip
where /dev/kvm is missing, except under CI=true, where a missing /dev/kvm is a failure."""

import os

import pytest

DEVICE = os.environ.get("VMM_DEVICE", "/dev/kvm")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The AMX guest permission belongs to the process, cannot be undone, and changes what KVM answers
# (KVM_CAP_XSAVE2, supported CPUID leaf 0xD) for every later test. So tests marked `amx` run in a
# pytest process of their own (`pytest -m amx`), which asks for it at start-up, before any vCPU.
AMX_PROCESS = False
AMX_PERMISSION_ERROR = None  # the KvmError of the request in the AMX process, if it failed
XCOMP_SUPP = DEFAULT_GUEST_PERM = 0


def pytest_configure(config):
    global AMX_PROCESS, AMX_PERMISSION_ERROR, XCOMP_SUPP, DEFAULT_GUEST_PERM
    if (config.getoption("markexpr") or "").replace(" ", "") != "amx":
        return
    from vmm import amx
    from vmm.errors import KvmError
    AMX_PROCESS = True
    XCOMP_SUPP = amx.get_xcomp_supp()
    DEFAULT_GUEST_PERM = amx.get_xcomp_guest_perm()
    try:
        amx.req_xcomp_guest_perm(amx.XFEATURE_XTILEDATA)
    except KvmError as e:  # reported by the tests that need it, with the host's errno
        AMX_PERMISSION_ERROR = e


def required_features():
    """VMM_REQUIRE=AVX512F,AMX,...: features this CI host must have, so tests that need them fail
    instead of skipping (VMM_REQUIRE_AMX=1 is the same as listing AMX)."""
    names = {n.strip().upper() for n in os.environ.get("VMM_REQUIRE", "").split(",") if n.strip()}
    if os.environ.get("VMM_REQUIRE_AMX") == "1":
        names.add("AMX")
    return names


def lacking(feature, reason):
    """The host lacks `feature`: skip with the reason, or fail where VMM_REQUIRE lists it."""
    if feature.upper() in required_features():
        pytest.fail(f"VMM_REQUIRE lists {feature}: {reason}", pytrace=False)
    pytest.skip(reason)


def needs_xcr0(kvm, feature, mask):
    """Skip (or fail, see lacking) unless KVM's supported XCR0 here has every bit of `mask`."""
    supported = kvm.get_supported_cpuid().xcr0_supported()
    if mask & ~supported:
        lacking(feature, f"this host's KVM supports XCR0 {supported:#x}, without {feature} "
                         f"(XCR0 bits {mask & ~supported:#x})")
    return supported


def needs_amx(kvm):
    """Skip (or fail, see lacking) unless this process holds the AMX guest permission (asked for by
    the AMX process before any vCPU) and KVM here offers AMX."""
    from vmm import amx
    if AMX_PERMISSION_ERROR is not None:
        problems = [str(AMX_PERMISSION_ERROR)]
    else:
        problems = amx.host_problems(kvm.get_supported_cpuid(), amx.get_xcomp_supp())
    if problems:
        lacking("AMX", f"no AMX on this host: {problems[0]}")


def _require_kvm():
    if os.path.exists(DEVICE) and os.access(DEVICE, os.R_OK | os.W_OK):
        return
    msg = f"{DEVICE} is missing or not accessible"
    if IN_CI:
        pytest.fail(f"CI=true: {msg}; the KVM tests must run in CI", pytrace=False)
    pytest.skip(msg)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "kvm" in getattr(item, "fixturenames", ()) or "machine" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.kvm)
        if item.get_closest_marker("amx") and not AMX_PROCESS:
            item.add_marker(pytest.mark.skip(
                reason="AMX tests run in a pytest process of their own, which asks for the AMX guest "
                       "permission first: `pytest -m amx` (make test runs both)"))


def pytest_runtest_setup(item):
    if item.get_closest_marker("kvm"):
        _require_kvm()


@pytest.fixture(scope="session")
def kvm():
    from vmm.kvm import Kvm
    _require_kvm()
    with Kvm(DEVICE) as k:
        yield k


@pytest.fixture
def machine(kvm):
    """Factory: machine("guest", **kw) -> a Machine closed at the end of the test."""
    from vmm.guest.machine import Machine
    made = []

    def make(guest="hello", **kw):
        m = Machine(guest, kvm=kvm, **kw)
        made.append(m)
        return m
    yield make
    for m in made:
        m.close()
