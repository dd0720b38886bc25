"""The package as users install it: a wheel built from this tree carries the built guests (and the
probe package, the schemas, the SDK), building it prints no setuptools warnings, and the installed
`vmm` of a fresh venv (`pip install <project dir>`) runs the hello guest from another directory."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    # as `pip install .` does: build isolation (setuptools, wheel and cffi from PyPI, or pip's cache)
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(out), str(ROOT)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = out.glob("vmm-*.whl")
    return whl, r.stdout + r.stderr


def test_the_wheel_carries_the_guests_and_every_package(wheel):
    whl, _ = wheel
    names = set(zipfile.ZipFile(whl).namelist())
    for needed in ("vmm/guest/builtin/hello.bin", "vmm/guest/builtin/runtime.bin", "vmm/guest/builtin/hello.S",
                   "vmm/guest/builtin/amx.sym", "vmm/probe/__init__.py", "vmm/schema/probe-report.schema.json",
                   "vmm/sdk/vmm.h", "vmm/sdk/vmm.inc", "vmm/sdk/crt0.S", "vmm/sdk/guest.ld", "vmm/sdk/vmm.mk",
                   "vmm/sdk/examples/dot.c", "vmm/sdk/examples/hello-asm.S", "vmm/sdk/examples/Makefile",
                   "vmm/cli.py"):
        assert needed in names, needed
    assert any(n.startswith("vmm/_kvm") and n.endswith(".so") for n in names)


def test_building_it_prints_no_setuptools_warnings(wheel):
    _, log = wheel
    for noise in ("is absent from the `packages` configuration", "Package would be ignored",
                  "SetuptoolsDeprecationWarning", "BuildBackendWarning"):
        assert noise not in log, noise


@pytest.mark.kvm
def test_a_fresh_venv_pip_install_runs_hello_from_another_directory(tmp_path):
    """What a user does: a new venv, `pip install <project dir>` (the dependencies from PyPI or
    pip's cache), then `vmm run` and `vmm guests` somewhere else."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VMM_GUESTS_DIR", "PYTHONPATH", "VIRTUAL_ENV")}
    vmm = str(venv / "bin" / "vmm")
    r = subprocess.run([vmm, "run"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
    assert (r.returncode, r.stdout) == (0, "Hello from a vmm guest!\ndone\n"), r.stderr
    r = subprocess.run([vmm, "guests"], capture_output=True, text=True, cwd=elsewhere, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("amx ") and "\nhello " in r.stdout, r.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import vmm.guest.catalog as c; print(c.SOURCE_DIR)"],
                           capture_output=True, text=True, cwd=elsewhere, env=env, check=True).stdout.strip()
    assert where.startswith(str(venv)) and where.endswith("vmm/guest/builtin"), where  # the installed guests
    # the guest SDK of the installation builds a guest elsewhere, through its own Makefile snippet
    sdk = subprocess.run([vmm, "guest-sdk", "--path"], capture_output=True, text=True, cwd=elsewhere, env=env,
                         check=True).stdout.strip()
    assert sdk.startswith(str(venv)), sdk
    (elsewhere / "hello-asm.S").write_text((Path(sdk) / "examples" / "hello-asm.S").read_text())
    (elsewhere / "Makefile").write_text("VMM_SDK := $(shell vmm guest-sdk --path)\ninclude $(VMM_SDK)/vmm.mk\n"
                                        "all: hello-asm.elf\n")
    env_path = dict(env, PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    r = subprocess.run(["make", "-s"], capture_output=True, text=True, cwd=elsewhere, env=env_path, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([vmm, "run", "./hello-asm.elf", "--arg", "1"], capture_output=True, text=True,
                       cwd=elsewhere, env=env, timeout=60)
    assert (r.returncode, r.stdout) == (0, "hello from an SDK assembly guest\nsync 0x2\ndone\n"), r.stderr
