"""CLI fuzzing: every command driven with random options, paths (regular, missing, directory, FIFO,
device nodes, socket, symlinks, huge, empty, garbage, /proc) and numbers, each run a real `vmm`
process. Whatever the input: no traceback, an exit status from the scheme, no non-regular file
replaced, no partial output left (no temporary file; a failed write to a new path leaves nothing,
to an existing file leaves it as it was).

A deterministic sweep runs each command once with each hostile input and each writing command once
with each kind of output (about 90 s); the hypothesis test draws the rest.
Bounded for `make test` by count and time: VMM_FUZZ_EXAMPLES (default 40) examples, stopping early
after VMM_FUZZ_SECONDS (default 60). A longer run:
    VMM_FUZZ_EXAMPLES=2000 VMM_FUZZ_SECONDS=3600 .venv/bin/python -m pytest -q tests/test_cli_fuzz.py
(about 0.4 s an example on 2 cores; VMM_FUZZ_LOG=FILE appends each command line and its status to FILE).
"""

import os
import shutil
import stat
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hostile import EXIT_SCHEME, kinds, leftovers, make_paths, vmm

pytestmark = pytest.mark.kvm

EXAMPLES = int(os.environ.get("VMM_FUZZ_EXAMPLES", "40"))
SECONDS = float(os.environ.get("VMM_FUZZ_SECONDS", "60"))

INPUTS = ["snap", "cpu_json", "report", "elf", "null", "zero", "full", "fifo", "sock", "dir", "missing", "empty",
          "garbage", "text", "huge", "regular", "link", "devlink", "proc"]
OUTPUTS = ["new", "regular", "link", "null", "full", "fifo", "sock", "dir", "missing", "devlink", "-"]
GUESTS = ["sync", "hello", "spin", "ud2", "nope", "", "elf", "empty", "dir", "garbage", "null", "fifo", "missing"]
NUMBERS = ["1", "2", "4", "0", "-1", "3", "33", "16385", "4.5", "x", "99999999999999999999", "0x10", "nan", "1e9"]
TIMEOUTS = ["0.3", "1", "0", "-1", "x", "nan", "inf", "1e9"]
MASKS = ["0x7", "0x3", "pkru", "x87|AVX", "x87|SSE|AVX|opmask|ZMM_Hi256|Hi16_ZMM", "bogus", "0x" + "f" * 20, ""]
REGS = ["RIP", "CR4", "XMM0", "ZMM31", "PKRU", "TMM0", "bogus", "0xc0000080", "EFER=0"]

# (command words, slots): a slot is drawn from its pool
COMMANDS = [
    (["run"], ["guest"]), (["snapshot"], ["guest", "-o", "out"]), (["restore"], ["in"]), (["inspect"], ["in"]),
    (["cpuid", "--file"], ["in"]), (["cpuid", "--vcpu"], ["guest", "--xcr0", "mask"]),
    (["cpuid", "--feature"], ["reg"]), (["xsave", "--layout", "--file"], ["in"]),
    (["xsave"], ["guest", "--xcr0", "mask", "--at-sync", "num"]), (["compat"], ["in", "--host", "in"]),
    (["baseline"], ["in", "-o", "out"]), (["probe", "--check", "cap_xsave2_dev_kvm", "-o"], ["out"]),
    (["reg", "get"], ["in", "reg"]), (["reg", "set"], ["guest", "reg"]), (["amx", "--file"], ["in"]),
    (["caps", "--device"], ["in"]), (["diff"], ["in", "in"]), (["guests"], []), (["guest-sdk", "--copy"], ["out"]),
]
OPTIONS = {"--json": None, "--timeout": TIMEOUTS, "--memory": NUMBERS, "--at-sync": NUMBERS, "--vcpus": NUMBERS,
           "--cpu": "in", "--device": "in", "--cpl": ["0", "3", "1"], "--amx": None, "--vcpu": NUMBERS,
           "--bogus": None}
# the options each command takes (plus --bogus, which none does), so most runs get past option parsing
ALLOWED = {"run": "--timeout --memory --cpu --device --cpl --amx", "restore": "--timeout --device",
           "snapshot": "--timeout --memory --at-sync --vcpus --cpu --device --amx", "inspect": "--vcpu",
           "cpuid": "--timeout --device --at-sync", "xsave": "--timeout --device --at-sync --amx",
           "compat": "--device", "baseline": "--device", "probe": "--device", "amx": "--device",
           "reg": "--timeout --device --at-sync --vcpu", "caps": "--device", "diff": "--vcpu"}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    p = make_paths(d)
    p["snap"] = d / "good.snap"
    p["cpu_json"] = d / "cpu.json"
    p["report"] = d / "report.json"
    assert vmm("snapshot", "sync", "-o", p["snap"]).returncode == 0
    p["cpu_json"].write_text(vmm("cpuid", "--json").stdout)
    assert vmm("probe", "--check", "cap_xsave2_dev_kvm", "-o", p["report"]).returncode in (0, 1)
    from vmm.guest import catalog
    p["elf"] = catalog.build_dir() / "hello.elf"
    if not p["elf"].exists():
        p["elf"] = p["garbage"]
    p["new"] = d / "new.out"
    yield d, p
    p["_socket"].close()


def _draw(data, pool, p):
    if pool == "in":
        return str(p[data.draw(st.sampled_from(INPUTS))])
    if pool == "out":
        which = data.draw(st.sampled_from(OUTPUTS))
        return "-" if which == "-" else str(p[which])
    if pool == "guest":
        g = data.draw(st.sampled_from(GUESTS))
        return str(p[g]) if g in p else g
    return data.draw(st.sampled_from({"num": NUMBERS, "mask": MASKS, "reg": REGS}[pool]))


_start = []


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.data())
def test_fuzz_the_cli(world, data):
    d, p = world
    if not _start:
        _start.append(time.monotonic())
    if time.monotonic() - _start[0] > SECONDS:  # the time bound: later examples are not run
        return
    words, slots = data.draw(st.sampled_from(COMMANDS))
    argv = list(words)
    for slot in slots:
        argv.append(slot if slot.startswith("-") else _draw(data, slot, p))
    allowed = ["--json", "--bogus", *ALLOWED.get(argv[0], "").split()]
    for opt in data.draw(st.lists(st.sampled_from(allowed), max_size=3, unique=True)):
        pool = OPTIONS[opt]
        argv.append(opt)
        if pool is not None:
            argv.append(_draw(data, pool, p) if isinstance(pool, str) else data.draw(st.sampled_from(pool)))
    if "--timeout" not in argv and argv[0] in ("run", "snapshot", "xsave", "reg", "cpuid"):
        argv += ["--timeout", "2"]  # spin must not hold the run up

    check(d, p, argv, timeout=120)


def check(d, p, argv, timeout):
    """Run `vmm ARGV` and check what must hold for any input (module docstring); then restore the
    fixed paths for the next run."""
    fixed = {k: v for k, v in p.items() if k != "new"}  # "new" may be created; nothing else may change kind
    before_kinds = kinds(fixed)
    before_regular = p["regular"].read_bytes()
    new_existed = os.path.lexists(p["new"])
    r = vmm(*argv, timeout=timeout, cwd=d)  # in the temporary directory: `--copy -` makes ./-
    if os.environ.get("VMM_FUZZ_LOG"):
        with open(os.environ["VMM_FUZZ_LOG"], "a") as log:
            log.write(f"{r.returncode} {argv}\n")

    where = f"vmm {' '.join(argv)} -> {r.returncode}\nstdout: {r.stdout[-500:]}\nstderr: {r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, where
    assert r.returncode in EXIT_SCHEME, where
    if r.returncode in (2, 4):  # an error: its one line (a timeout, status 3, is a result)
        assert r.stderr.startswith("vmm: ") and r.stderr.endswith("\n"), where
    assert kinds(fixed) == before_kinds, where  # nothing replaced: a device is a device, a link a link
    assert leftovers(d) == [], where
    wrote = str(p["new"]) in argv or str(p["regular"]) in argv or str(p["link"]) in argv
    if r.returncode not in (0, 1) or not wrote:
        assert p["regular"].read_bytes() == before_regular, where
        if not new_existed:
            assert not os.path.lexists(p["new"]), where
    if os.path.lexists(p["new"]):  # keep "new" new for the next example
        shutil.rmtree(p["new"]) if stat.S_ISDIR(os.lstat(p["new"]).st_mode) else os.unlink(p["new"])
    if p["regular"].read_bytes() != before_regular:
        p["regular"].write_bytes(before_regular)


SWEEP_INPUTS = ["fifo", "zero", "null", "huge", "proc", "sock", "dir", "devlink", "empty", "garbage", "missing"]
SWEEP_COMMANDS = [["restore", "{0}"], ["inspect", "{0}"], ["cpuid", "--file", "{0}"], ["xsave", "--layout", "--file", "{0}"],
                  ["compat", "{0}"], ["compat", "here", "--host", "{0}"], ["baseline", "{0}", "-o", "{new}"],
                  ["reg", "get", "{0}", "RIP"], ["amx", "--file", "{0}"], ["caps", "--device", "{0}"], ["diff", "{0}", "{0}"],
                  ["run", "--cpu", "{0}"], ["run", "{0}"], ["snapshot", "sync", "--cpu", "{0}", "-o", "{new}"]]
SWEEP_OUTPUTS = ["new", "regular", "link", "null", "full", "fifo", "sock", "dir", "missing", "devlink", "-"]


def test_every_command_meets_every_hostile_input_and_output(world):
    """The deterministic half: each command once with each hostile input, and each writing command
    once with each kind of output (a hang fails: no run may take 30 s)."""
    d, p = world
    for template in SWEEP_COMMANDS:
        for which in SWEEP_INPUTS:
            check(d, p, [w.format(str(p[which]), new=p["new"]) for w in template], timeout=30)
    for template in (["snapshot", "sync", "-o"], ["baseline", "here", "-o"],
                     ["probe", "--check", "cap_xsave2_dev_kvm", "-o"]):
        for which in SWEEP_OUTPUTS:
            check(d, p, [*template, "-" if which == "-" else str(p[which])], timeout=30)
