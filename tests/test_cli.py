"""The command line as users run it: a real process each time."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm


def vmm(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_run_default_guest():
    r = vmm("run")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "Hello from a vmm guest!\ndone\n"


def test_run_ud2_reports_ud_and_fails():
    r = vmm("run", "ud2")
    assert r.returncode == 1
    assert r.stdout.startswith("fault #UD at 0x100001")


def test_run_spin_timeout_is_bounded():
    """The guest is stopped at its timeout, not before, and the run ends (vmm's own clock: a
    wall-clock bound would measure the load of the machine, not vmm)."""
    r = vmm("run", "spin", "--timeout", "1")
    assert r.returncode == 3 and r.stdout.startswith("timeout after"), r.stdout + r.stderr
    d = json.loads(vmm("run", "spin", "--timeout", "1", "--json").stdout)
    assert d["exit"]["event"] == "timeout" and 1.0 <= d["exit"]["seconds"] <= d["seconds"]


# a flat binary: mov $0x500,%dx; mov $1,%eax; 1: out %eax,%dx; jmp 1b (a SYNC 1 as fast as it can)
SYNC_FOREVER = bytes.fromhex("66ba0005" "b801000000" "ef" "ebfd")


@pytest.mark.parametrize("command", ["run", "restore"])
def test_timeout_holds_for_a_guest_that_syncs_without_end(tmp_path, command):
    """Each SYNC returns to the host before a timer set for what is left of --timeout can fire, so
    the run itself must end at its deadline (it once ran on for 5-55 s past a 1-2 s timeout). The
    bound is on vmm's own clock, a second past the deadline: one SYNC's round trip, not the load."""
    guest = tmp_path / "sync-forever.bin"
    guest.write_bytes(SYNC_FOREVER)
    if command == "run":
        r = vmm("run", str(guest), "--timeout", "1", "--json")
    else:
        snap = tmp_path / "s.snap"
        made = vmm("snapshot", str(guest), "--at-sync", "1", "-o", str(snap))
        assert made.returncode == 0, made.stdout + made.stderr
        r = vmm("restore", str(snap), "--timeout", "1", "--json")
    assert r.returncode == 3, r.stdout + r.stderr
    d = json.loads(r.stdout)
    run = d if command == "run" else d["vcpus"][0]
    assert run["exit"]["event"] == "timeout" and len(run["syncs"]) > 1
    assert 1.0 <= run["exit"]["seconds"] < 2.0, run["exit"]


def test_run_triple_fault():
    r = vmm("run", "triple-fault")
    assert r.returncode == 1 and "shutdown" in r.stdout


def test_run_json():
    r = vmm("run", "sync", "--json")
    d = json.loads(r.stdout)
    assert d["syncs"] == ["0x11", "0x22", "0x33"] and d["exit"]["event"] == "done"


def test_caps_and_guests():
    d = json.loads(vmm("caps", "--json").stdout)
    assert d["api_version"] == 12 and d["xsave2_size"]["vm_fd"] >= 4096
    assert "KVM_CAP_XSAVE2" in d["capabilities"]
    names = [g["name"] for g in json.loads(vmm("guests", "--json").stdout)]
    assert {"hello", "sync", "ud2", "triple-fault", "spin", "avx512"} <= set(names)


@pytest.mark.parametrize("args, message", [
    (("run", "nope"), "unknown guest 'nope'"),
    (("run", "/nonexistent/g.bin"), "no such file"),
    (("snapshot", "sync", "-o", "/nonexistent/dir/s.snap"), "directory /nonexistent/dir does not exist"),
    (("run", "sync", "--timeout", "-1"), "not in the range"),
    (("restore", "/nonexistent/s.snap"), "/nonexistent/s.snap: no such file"),
])
def test_bad_input_is_one_clear_line(args, message):
    r = vmm(*args)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, message", [
    (("run", "--device", "/nonexistent/kvm"), "no KVM on this host"),
    (("caps", "--device", "/nonexistent/kvm"), "ENOENT"),
])
def test_a_missing_kvm_device_is_a_host_error(args, message):
    r = vmm(*args)
    assert r.returncode == 4
    assert message in r.stderr and "Traceback" not in r.stderr


def test_reg_set_is_seen_by_the_guest(kvm):
    """Through ONE_REG where this kernel has it (Linux 6.18+), else KVM_SET_MSRS: the output names it."""
    from vmm import regs
    from vmm.guest.machine import Machine
    with Machine("sync", kvm=kvm) as m:
        via = "ONE_REG" if regs.RegisterAccess.probe_one_reg(m.vcpu) else "KVM_GET/SET_MSRS"
    r = vmm("reg", "set", "msr-report", "KERNEL_GS_BASE=0x7000abcd0000")
    assert r.returncode == 0, r.stderr
    assert f"set MSR_KERNEL_GS_BASE = 0x7000abcd0000 via {via}; reads back 0x7000abcd0000" in r.stdout
    assert "guest reads MSR 0x00000000c0000102 = 0x00007000abcd0000" in r.stdout


def _one_reg(kvm):
    from vmm import regs
    from vmm.guest.machine import Machine
    with Machine("sync", kvm=kvm) as m:
        return regs.RegisterAccess.probe_one_reg(m.vcpu)


def test_reg_get_and_list_json(kvm):
    """By id on every kernel: ONE_REG where the kernel has it (6.18+), else KVM_GET/SET_MSRS, named
    in `via`; KVM_GET_REG_LIST only where it exists (null elsewhere)."""
    one_reg = _one_reg(kvm)
    d = json.loads(vmm("reg", "get", "sync", "EFER", "0xc0000081", "--json").stdout)
    assert [x["name"] for x in d["registers"]] == ["MSR_EFER", "MSR_STAR"]
    assert int(d["registers"][0]["value"], 16) & 0x500 == 0x500  # LME | LMA: the guest is in long mode
    d = json.loads(vmm("reg", "list", "sync", "--json").stdout)
    assert d["via"] == ("ONE_REG" if one_reg else "KVM_GET/SET_MSRS")
    assert d["reg_list"] == ([] if one_reg else None)  # no SHSTK here: no GUEST_SSP to list
    assert any(x["name"] == "MSR_LSTAR" for x in d["registers"])


def test_reg_get_guest_ssp_says_why(kvm):
    r = vmm("reg", "get", "sync", "GUEST_SSP")
    assert r.returncode == 4
    if _one_reg(kvm):
        assert "EINVAL" in r.stderr and "SHSTK" in r.stderr
    else:
        assert "no x86 ONE_REG" in r.stderr


def test_run_imports_only_what_booting_a_guest_needs():
    """`vmm run` leaves the XSAVE decoder, the CPUID feature names' helpers, the register name tables,
    the probes and the other commands unimported (cold start); --help still lists every command."""
    code = ("import sys; from vmm.cli import main\n"
            "try:\n    main(['run'])\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('vmm') or m in ('json', 'tempfile'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    loaded = set(r.stdout.splitlines()[-1].split())
    assert "vmm.guest.runner" in loaded  # the guest really ran
    for heavy in ("vmm.xsave", "vmm.regs", "vmm.probe", "vmm.amx", "vmm.compat", "vmm.state",
                  "vmm.snapshot", "vmm.commands.cpuid", "vmm.commands.xsave", "vmm.commands.probe",
                  "vmm.guest.elf", "vmm.fastpath", "vmm.cpuid_model", "vmm.msr_features", "vmm.host",
                  "json", "tempfile"):
        assert heavy not in loaded, heavy
    listed = vmm("--help").stdout
    for name in ("amx", "baseline", "caps", "compat", "cpuid", "guest-sdk", "guests", "inspect", "probe",
                 "reg", "restore", "run", "snapshot", "xsave"):
        assert f"\n  {name} " in listed, name


def test_importing_the_cli_leaves_the_guest_machinery_unimported():
    """`import vmm.cli` (what --help, --version and every command pay before they start) imports
    neither the guest machinery nor a command module nor the cffi bindings (and ctypes, which
    ioctl-opt imports); no dataclass is built. `vmm --version` loads no more than that."""
    from vmm import kvm
    from vmm.commands import common
    assert common.DEFAULT_DEVICE == kvm.DEFAULT_DEVICE  # written out there, so the CLI starts without the bindings
    code = ("import sys, vmm.cli\n"
            "if sys.argv[1:]:\n    try:\n        vmm.cli.main(sys.argv[1:])\n    except SystemExit:\n        pass\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('vmm') or m in "
            "('dataclasses', 'ctypes', '_cffi_backend'))))")
    for argv in ([], ["--version"]):
        r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        loaded = set(r.stdout.splitlines()[-1].split())
        assert "vmm.cli" in loaded
        for heavy in ("vmm.guest.machine", "vmm.guest.runner", "vmm.guest.catalog", "vmm.cpuid", "vmm.cstructs",
                      "vmm.xsave_layout", "vmm.vcpu", "vmm.vm", "vmm.records", "dataclasses", "vmm.kvm",
                      "vmm._bindings", "ctypes", "_cffi_backend"):
            assert heavy not in loaded, (argv, heavy)
        assert not any(m.startswith("vmm.commands.") and m != "vmm.commands.common" for m in loaded), loaded


def test_every_command_module_is_in_the_lazy_table():
    """commands.LAZY names each command of each module once, with the module that defines it."""
    import importlib
    import importlib.util

    from vmm import commands
    for module in commands.MODULES:
        if importlib.util.find_spec(f"vmm.commands.{module}") is None:
            continue  # not written yet
        names = {c.name for c in importlib.import_module(f"vmm.commands.{module}").COMMANDS}
        assert names == {n for n, m in commands.LAZY.items() if m == module}, module
