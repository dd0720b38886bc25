"""Shared fixtures. Tests that touch KVM use the `kvm` fixture (or the `kvm` marker): they skip
where /dev/kvm is missing, except under CI=true, where a missing /dev/kvm is a failure."""

import os

import pytest

DEVICE = os.environ.get("VMM_DEVICE", "/dev/kvm")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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
