"""The test-kernels harness's own pure parts (tests/kernels/): where the Intel target finds Bochs."""

import importlib.util
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

HERE = Path(__file__).resolve().parent


def load_bochs():
    spec = importlib.util.spec_from_file_location("kernels_bochs", HERE / "kernels" / "bochs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class HarnessError(Exception):
    pass


def test_the_bochs_tarball_is_found_beside_the_checkout_then_in_the_cache(tmp_path, monkeypatch):
    bochs = load_bochs()
    monkeypatch.delenv("VMM_BOCHS_TARBALL", raising=False)
    logged = []
    h = SimpleNamespace(HarnessError=HarnessError, log=logged.append)
    cache = tmp_path / "cache"
    vendor = tmp_path / "a" / "shared" / "vendor"
    vendor.mkdir(parents=True)
    tarball = vendor / "bochs-3.0.devel-783b58fd.tar.xz"
    tarball.write_bytes(b"source" * 1000)
    checkout = tmp_path / "a" / "vmm"
    checkout.mkdir()

    # beside the checkout: that one, and the cache keeps a whole copy of it
    assert bochs.find_tarball(h, checkout, cache) == tarball
    kept = cache / "bochs" / "vendor" / tarball.name
    assert kept.read_bytes() == tarball.read_bytes()
    assert os.listdir(kept.parent) == [tarball.name]  # no temporary file left

    # a clone elsewhere (CI's) finds the kept copy and says so
    elsewhere = tmp_path / "b" / "vmm"
    elsewhere.mkdir(parents=True)
    assert bochs.find_tarball(h, elsewhere, cache) == kept
    assert "cached copy" in logged[-1]

    # nowhere: a one-line reason that names both places
    with pytest.raises(HarnessError, match="shared/vendor.*or.*bochs/vendor"):
        bochs.find_tarball(h, elsewhere, tmp_path / "empty-cache")

    # an override that is not a file is refused, not replaced by the cache
    monkeypatch.setenv("VMM_BOCHS_TARBALL", str(tmp_path / "missing.tar.xz"))
    with pytest.raises(HarnessError, match="not a file"):
        bochs.find_tarball(h, elsewhere, cache)
