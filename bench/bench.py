"""`make bench`: vCPU state save/restore, port-I/O exits, cold start and snapshots, measured in one
run on this machine and printed as one table (or one JSON object with --json).

  (a) the floor: bench/floor.c, a plain C program (compiled here with gcc) that builds its own VM
      from the same guest image, CPUID, entry registers and MSR set as the vmm VM below, and issues
      one ioctl per piece of state, selftests style;
  (b) the C fast path (vmm/fastpath.py, cdefs/fastpath.c);
  (c) the Python paths: the fast path's plan issued from Python, and the general
      vmm.state.save_state / restore_state;
  (d) the port-I/O exit round trip: the floor's C loop, the vmm run loop, SYNC events;
  (e) `vmm run` cold start, process start to the guest's DONE, against `python -c pass` of the same
      interpreter and the guest's own run time (the same Machine built and run warm, in process);
      `python -X importtime -c "import vmm.cli"`;
  (f) snapshot save (MB/s) against a plain C write + fsync of the same bytes (bench/iofloor.c), and
      load + restore (to the guest's first instruction, every stored byte checked before it) against
      a plain read of the file, for 64 MiB to 1 GiB.
The header names the host: CPU model, family/model, PVM or not, and one vCPU ioctl's cost.

Every loop is bounded by a count and by time; the whole run takes about a minute and a half.
"""

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BUILD = HERE / "build"
GUESTS = ROOT / "guests"
SDK = ROOT / "vmm" / "sdk"
sys.path.insert(0, str(ROOT))

from vmm import snapshot, state  # noqa: E402
from vmm._bindings import ffi  # noqa: E402
from vmm.fastpath import FastVcpu  # noqa: E402
from vmm.guest import runtime  # noqa: E402
from vmm.guest.machine import Machine  # noqa: E402
from vmm.guest.runner import Done, Sync  # noqa: E402

COUNT_ADDR = runtime.SCRATCH_BASE          # the bench guest reads its batch size here
PORT_ADDR = runtime.SCRATCH_BASE + 8       # and the port it writes to here
PORT_IGNORED = 0x510                       # a port the vmm run loop handles (ignores) itself
PORT_SYNC = 0x500

# Every target is a ratio to a floor measured in the same run (a fixed time means nothing across hosts)
TARGETS = {
    "fast_vs_floor": 0.75,      # (fast save + fast restore) / (floor save + floor restore)
    "python_vs_floor": 1.3,     # (Python save + Python restore) / floor, the fast path's plan
    "general_vs_floor": 1.0,    # (state.save_state + state.restore_state) / floor
    "pio_vs_c": 1.15,           # vmm run loop port-I/O exit / C loop
    "cold_start_vs_python": 2.0,  # (`vmm run` to DONE - the guest's own run time) / `python -c pass`
    "import_cli_ms": 40.0,      # python -X importtime: vmm.cli, cumulative (click included)
    "save_vs_write": 1.3,       # snapshot.save / plain write + fsync of the same bytes (largest, filled)
    "restore_vs_read": 1.3,     # (load + restore to the 1st instruction - 50 ms) / plain read of the file
}
RESTORE_ALLOWANCE_NS = 50_000_000  # the 50 ms of the restore target


# --- building ------------------------------------------------------------------------------------
def build():
    BUILD.mkdir(exist_ok=True)
    guest = BUILD / "bench.bin"
    src = HERE / "guests" / "bench.S"
    newest = max(src.stat().st_mtime, (SDK / "vmm.inc").stat().st_mtime)
    if not guest.exists() or guest.stat().st_mtime < newest:
        run(["as", "--64", "-I", str(GUESTS), "-I", str(SDK), "-o", str(BUILD / "bench.o"), str(src)])
        run(["ld", "-static", "-nostdlib", "-T", str(SDK / "guest.ld"), "-o", str(BUILD / "bench.elf"),
             str(BUILD / "bench.o")])
        run(["objcopy", "-O", "binary", str(BUILD / "bench.elf"), str(guest)])
        (BUILD / "bench.sym").write_text(run(["nm", str(BUILD / "bench.elf")]))
    floor = BUILD / "floor"
    if not floor.exists() or floor.stat().st_mtime < (HERE / "floor.c").stat().st_mtime:
        run(["gcc", "-O2", "-Wall", "-o", str(floor), str(HERE / "floor.c")])
    iofloor = BUILD / "iofloor"
    if not iofloor.exists() or iofloor.stat().st_mtime < (HERE / "iofloor.c").stat().st_mtime:
        run(["gcc", "-O2", "-Wall", "-o", str(iofloor), str(HERE / "iofloor.c")])
    return guest, floor


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"bench: {' '.join(cmd)} failed:\n{p.stderr}")
    return p.stdout


# --- measuring -----------------------------------------------------------------------------------
def stats(samples_ns):
    return {"n": len(samples_ns), "min_ns": min(samples_ns), "median_ns": int(statistics.median(samples_ns))}


def timed(fn, iterations, seconds, between=None):
    """Times fn() per call, at most `iterations` calls and `seconds` seconds; `between` runs
    untimed after each call."""
    out = []
    clock = time.perf_counter_ns
    end = clock() + int(seconds * 1e8)
    for _ in range(iterations // 10 + 1):  # warm-up, as the floor does
        if clock() >= end:
            break
        fn()
        if between:
            between()
    end = clock() + int(seconds * 1e9)
    while len(out) < iterations and clock() < end:
        t0 = clock()
        fn()
        out.append(clock() - t0)
        if between:
            between()
    return out


def write_setup(path, m, msr_indices):
    """The floor's setup file: guest image, CPUID, entry sregs/regs, XCR0, MSR set (bench/floor.c)."""
    v = m.vcpu
    sregs = bytes(ffi.buffer(v.get_sregs().to_c()))
    regs = bytes(ffi.buffer(v.get_regs().to_c()))
    xcr0 = v.get_xcrs().get(0, 0)
    image = m.vm.read(0, runtime.SCRATCH_BASE)
    ents = m.cpuid.to_kvm_entries()
    c = ffi.new("struct kvm_cpuid_entry2[]", max(len(ents), 1))
    for i, (fn, idx, fl, a, b, cc, d) in enumerate(ents):
        e = c[i]
        e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx = fn, idx, fl, a, b, cc, d
    out = b"VMMFLOOR" + struct.pack("<III", ffi.sizeof("struct kvm_sregs"), ffi.sizeof("struct kvm_regs"),
                                    ffi.sizeof("struct kvm_cpuid_entry2"))
    out += struct.pack("<QQQQ", m.memory.size, COUNT_ADDR, xcr0, len(image)) + image
    out += struct.pack("<I", len(ents)) + bytes(ffi.buffer(c))[:len(ents) * ffi.sizeof(c[0])]
    out += sregs + regs
    out += struct.pack("<I", len(msr_indices)) + struct.pack(f"<{len(msr_indices)}I", *msr_indices)
    Path(path).write_bytes(out)


def set_batch(m, count, port):
    m.memory.write_u64(COUNT_ADDR, count)
    m.vm.write(PORT_ADDR, port.to_bytes(2, "little"))


def merge_floor(runs):
    """One result from several floor runs: the lowest min, the median of the medians."""
    out = dict(runs[0])
    for k, v in runs[0].items():
        if isinstance(v, dict) and "min_ns" in v:
            out[k] = {"n": sum(r[k]["n"] for r in runs), "min_ns": min(r[k]["min_ns"] for r in runs),
                      "median_ns": int(statistics.median(r[k]["median_ns"] for r in runs))}
    out["runs"] = len(runs)
    return out


def bench_state_and_pio(guest, floor, quick):
    """(a)-(d). The floor and the two fast-path plans are measured in interleaved rounds, so that
    load from other processes on the machine falls on all of them alike."""
    rounds = 3
    iters, secs = (600, 0.6) if quick else (3000, 3.0)
    iters, secs = iters // rounds, secs / rounds
    pio_exits, pio_batches = (2000, 6) if quick else (10000, 15)
    res = {}
    with Machine(str(guest)) as m, tempfile.TemporaryDirectory() as tmp:
        # the floor's set-up is this VM's, before it runs
        fp_msrs = FastVcpu(m.vcpu).msr_indices
        setup = os.path.join(tmp, "setup.bin")
        write_setup(setup, m, fp_msrs)
        ev = m.run(timeout=10)
        assert ev == Sync(0, 1), ev
        fp = FastVcpu(m.vcpu)
        assert fp.msr_indices == fp_msrs
        st = fp.save()
        res["ioctls"] = {}
        flush = fp.flush
        plans = (("fast", fp.save, fp.restore), ("python", fp.save_py, fp.restore_py))
        for name, save, restore in plans:
            save(st)
            save_n = fp.vcpu_ioctls
            restore(st)
            res["ioctls"][name] = {"save": save_n, "restore": fp.vcpu_ioctls, "deferred": fp.deferred}
            flush()
        # (a) the floor, (b) the C fast path, (c) the same plan in Python. The restore's deferred
        # pieces are loaded by an untimed KVM_RUN (immediate_exit) after each timed restore; in the
        # cycle, the next save's KVM_RUN loads them, inside the timing.
        floors, samples = [], {n: {"save": [], "restore": [], "cycle": []} for n, _, _ in plans}
        for _ in range(rounds):
            floors.append(json.loads(run([str(floor), setup, str(iters), str(secs), str(pio_exits),
                                          str(pio_batches // rounds)])))
            for name, save, restore in plans:
                samples[name]["save"] += timed(lambda: save(st), iters, secs)
                samples[name]["restore"] += timed(lambda: restore(st), iters, secs, between=flush)
                samples[name]["cycle"] += timed(lambda: (save(st), restore(st)), iters, secs)
        res["floor"] = merge_floor(floors)
        for name in samples:
            res[name] = {k: stats(v) for k, v in samples[name].items()}
        # the general path: save_state (MSR set given, as above) and restore_state (the state's CPUID
        # is the one the vCPU holds, so no KVM_SET_CPUID2, which KVM refuses after the first KVM_RUN)
        s = state.save_state(m.vcpu, list(fp_msrs))
        gi, gs = (50, 0.3) if quick else (300, 1.5)
        res["general"] = {
            "save": stats(timed(lambda: state.save_state(m.vcpu, list(fp_msrs)), gi, gs)),
            "restore": stats(timed(lambda: state.restore_state(m.vcpu, s), gi, gs)),
        }
        fp.restore(st)
        fp.flush()

        # (d) port I/O: COUNT writes to a port the run loop handles itself, then SYNC 2
        set_batch(m, pio_exits, PORT_IGNORED)
        assert m.run(timeout=10) == Sync(0, 2)
        per_exit = []
        for _ in range(pio_batches):
            t0 = time.perf_counter_ns()
            ev = m.run(timeout=10)
            per_exit.append((time.perf_counter_ns() - t0) // (pio_exits + 1))
            assert ev == Sync(0, 2), ev
        res["pio_loop"] = stats(per_exit)
        # every exit a SYNC event returned to the caller (Machine.run per exit)
        n_events = pio_exits // 2
        set_batch(m, n_events, PORT_SYNC)
        while m.run(timeout=10) != Sync(0, 2):
            pass
        for label, timeout in (("pio_events", 10), ("pio_events_no_timeout", None)):
            per_event = []
            for _ in range(max(pio_batches // 2, 3)):
                t0 = time.perf_counter_ns()
                k = 0
                while True:
                    ev = m.run(timeout=timeout)
                    k += 1
                    if ev == Sync(0, 2):
                        break
                per_event.append((time.perf_counter_ns() - t0) // k)
            res[label] = stats(per_event)
    return res


def bench_cold_start(quick):
    """`vmm run` (the hello guest) from process start to "done" on its stdout, against `python -c
    pass` of the same interpreter, interleaved; the guest's own run time (Machine("hello") built and
    run to DONE in this, warm, process); and `python -X importtime -c "import vmm.cli"`. Runs with
    the bytecode cache on, as an installed vmm has it (PYTHONDONTWRITEBYTECODE is dropped; the
    warm-up run writes the cache)."""
    vmm = ROOT / ".venv" / "bin" / "vmm"
    py = ROOT / ".venv" / "bin" / "python"
    py = str(py) if py.exists() else sys.executable
    cmd = [str(vmm), "run"] if vmm.exists() else [py, "-m", "vmm.cli", "run"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    to_done, to_exit, bare, imports, guest = [], [], [], [], []
    subprocess.run(cmd, stdout=subprocess.DEVNULL, cwd=ROOT, env=env)  # warm-up: page cache, bytecode
    for _ in range(5 if quick else 15):
        t0 = time.perf_counter_ns()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, cwd=ROOT, env=env)
        t_done = None
        for line in p.stdout:
            if line.strip() == b"done":
                t_done = time.perf_counter_ns()
        p.wait()
        t_exit = time.perf_counter_ns()
        if p.returncode or t_done is None:
            sys.exit(f"bench: {' '.join(cmd)} failed (status {p.returncode})")
        to_done.append(t_done - t0)
        to_exit.append(t_exit - t0)
        t0 = time.perf_counter_ns()
        subprocess.run([py, "-c", "pass"], cwd=ROOT, env=env, check=True)
        bare.append(time.perf_counter_ns() - t0)
        out = subprocess.run([py, "-X", "importtime", "-c", "import vmm.cli"], cwd=ROOT, env=env,
                             capture_output=True, text=True).stderr
        cum = [int(line.split("|")[1]) for line in out.splitlines() if line.rstrip().endswith("| vmm.cli")]
        imports.extend(c * 1000 for c in cum)
        t0 = time.perf_counter_ns()
        with Machine("hello") as m:
            assert isinstance(m.run(timeout=10), Done)
        guest.append(time.perf_counter_ns() - t0)
    return {"cmd": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
            "to_done": stats(to_done), "to_exit": stats(to_exit), "python_pass": stats(bare),
            "guest_run": stats(guest), "import_cli": stats(imports)}


def warm_page_cache(directory, nbytes):
    """Write `nbytes` to a scratch file and drop it (no fsync, no disk I/O): the timed write that
    follows reuses page-cache pages this process just had, so neither a save nor its floor pays for
    first-touched memory (a VM host that takes back free guest pages makes that cost seconds)."""
    scratch = os.path.join(directory, "warm.tmp")
    zeros = bytes(16 << 20)
    with open(scratch, "wb") as f:
        for _ in range(0, nbytes, len(zeros)):
            f.write(zeros)
    os.unlink(scratch)


def iofloor(*args):
    return json.loads(run([str(BUILD / "iofloor"), *map(str, args)]))["ns"]


def bench_snapshots(quick, directory):
    """`sync` guest at SYNC 0x11 with 64 MiB..1 GiB of RAM, in two fillings: every page non-zero
    (the guest's own pages, a pattern everywhere else) and as booted (only what the guest wrote).
    snapshot.save (MB/s of guest RAM) against the write floor (bench/iofloor.c: the same bytes
    written and fsynced by plain C), then snapshot.load + Machine.from_snapshot up to the guest's
    first exit (its next SYNC, right after its first instructions; every stored byte is checked
    before it) against the read floor (a plain read of the file, in the page cache). Snapshot files
    are written to `directory` and deleted."""
    sizes = [64 << 20, 256 << 20] if quick else [64 << 20, 256 << 20, 1 << 30]
    chunk = (bytes(range(1, 256)) * ((16 << 20) // 255 + 1))[:16 << 20]
    out = []
    for filled in (True, False):
        for size in sizes:
            path = os.path.join(directory, f"snap-{size >> 20}.vmmsnap")
            row = {"ram_bytes": size, "filled": filled}
            with Machine("sync", memory=size) as m:
                assert m.run(timeout=10) == Sync(0, 0x11)
                if filled:
                    with m.memory.view as view:
                        for off in range(runtime.MIN_MEMORY, size, len(chunk)):
                            view[off:off + len(chunk)] = chunk[:size - off]
                # save and its floor alternate (twice for filled memory): the disk is shared, and
                # its write-back state drifts; each keeps its best
                saves, floors = [], []
                for _ in range(2 if filled else 1):
                    warm_page_cache(directory, size)
                    t0 = time.perf_counter_ns()
                    states = [state.save_state(v) for v in m.vcpus]
                    snapshot.save(path, m.kvm, m.vm, m.vcpus, states, guest={"name": "sync", "cpl": 3},
                                  extra_meta={"at_sync": 1})
                    saves.append(time.perf_counter_ns() - t0)
                    copy = path + ".floor"
                    warm_page_cache(directory, size)
                    floors.append(iofloor("write", path, copy))
                    os.unlink(copy)
                row["save_ns"], row["write_floor_ns"] = min(saves), min(floors)
            row["save_mb_s"] = size / (1 << 20) / (row["save_ns"] / 1e9)
            row["stored_bytes"] = os.stat(path).st_blocks * 512
            loads, restores, totals, reads = [], [], [], []
            for _ in range(2 if (filled and size >= (1 << 30)) or quick else 3):
                reads.append(iofloor("read", path))
                t0 = time.perf_counter_ns()
                snap = snapshot.load(path, check_memory=False)  # as `vmm restore` does
                t1 = time.perf_counter_ns()
                with Machine.from_snapshot(snap) as r:
                    ev = r.run(timeout=10)
                    t2 = time.perf_counter_ns()
                    assert ev == Sync(0, 0x22), ev
                    assert r.run(timeout=10) == Sync(0, 0x33) and isinstance(r.run(timeout=10), Done)
                loads.append(t1 - t0)
                restores.append(t2 - t1)
                totals.append(t2 - t0)
            row["load"] = stats(loads)
            row["restore_to_first_insn"] = stats(restores)
            row["load_and_restore"] = stats(totals)
            row["read_floor"] = stats(reads)
            os.unlink(path)
            out.append(row)
    return out


# --- report --------------------------------------------------------------------------------------
def host_info():
    cpu = {}
    try:
        for line in open("/proc/cpuinfo"):
            k, _, v = line.partition(":")
            k = k.strip()
            if k in ("model name", "cpu family", "model", "stepping", "vendor_id") and k not in cpu:
                cpu[k] = v.strip()
            if not line.strip() and cpu:
                break
    except OSError:
        pass
    kvm = ("kvm_pvm" if os.path.isdir("/sys/module/kvm_pvm") else
           "kvm_amd" if os.path.isdir("/sys/module/kvm_amd") else
           "kvm_intel" if os.path.isdir("/sys/module/kvm_intel") else "kvm")
    family = int(cpu.get("cpu family", "0") or 0)
    model = int(cpu.get("model", "0") or 0)
    return {
        "kernel": platform.release(),
        "cpu": cpu.get("model name", ""),
        "vendor": cpu.get("vendor_id", ""),
        "family_model": f"family 0x{family:x} model 0x{model:x} stepping {cpu.get('stepping', '?')}",
        "cpus": os.cpu_count(),
        "kvm": kvm,
        "pvm": kvm == "kvm_pvm",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def evaluate(r):
    """Each target: the ratio to its floor in this run (mins where noise only adds; medians for
    the one-shot process and file timings)."""
    f = r["floor"]
    floor_sr = f["save"]["min_ns"] + f["restore"]["min_ns"]
    t = {}

    def add(name, value, limit, unit="x"):
        t[name] = {"value": round(value, 3), "target": limit, "unit": unit, "met": value <= limit}
    add("fast_vs_floor", (r["fast"]["save"]["min_ns"] + r["fast"]["restore"]["min_ns"]) / floor_sr,
        TARGETS["fast_vs_floor"])
    add("python_vs_floor", (r["python"]["save"]["min_ns"] + r["python"]["restore"]["min_ns"]) / floor_sr,
        TARGETS["python_vs_floor"])
    add("general_vs_floor", (r["general"]["save"]["min_ns"] + r["general"]["restore"]["min_ns"]) / floor_sr,
        TARGETS["general_vs_floor"])
    add("pio_vs_c", r["pio_loop"]["min_ns"] / f["pio_exit"]["min_ns"], TARGETS["pio_vs_c"])
    cs = r["cold_start"]
    add("cold_start_vs_python", (cs["to_done"]["median_ns"] - cs["guest_run"]["median_ns"])
        / cs["python_pass"]["median_ns"], TARGETS["cold_start_vs_python"])
    add("import_cli_ms", cs["import_cli"]["median_ns"] / 1e6, TARGETS["import_cli_ms"], "ms")
    top = max(s["ram_bytes"] for s in r["snapshots"])
    big = next(s for s in r["snapshots"] if s["ram_bytes"] == top and s["filled"])
    add("save_vs_write", big["save_ns"] / big["write_floor_ns"], TARGETS["save_vs_write"])
    add("restore_vs_read", (big["load_and_restore"]["median_ns"] - RESTORE_ALLOWANCE_NS)
        / big["read_floor"]["median_ns"], TARGETS["restore_vs_read"])
    return t


def us(ns):
    return f"{ns / 1000:.1f} us"


def size_str(n):
    return f"{n / (1 << 20):.0f} MiB" if n >= (10 << 20) else f"{n / 1024:.0f} KiB"


def ms(ns):
    return f"{ns / 1e6:.1f} ms"


def table(r):
    f = r["floor"]
    h = r["host"]
    io = r["ioctls"]
    lines = [f"vmm bench: {h['cpu']} ({h['vendor']} {h['family_model']}, {h['cpus']} CPUs), "
             f"Linux {h['kernel']}, {h['kvm']} ({'PVM' if h['pvm'] else 'not PVM'}), Python {h['python']}, "
             f"{h['date']}",
             f"one vCPU ioctl (KVM_GET_MP_STATE) here: {us(f['ioctl']['min_ns'])} min, "
             f"{us(f['ioctl']['median_ns'])} median",
             f"vCPU state of the bench guest at SYNC 1: {f['nmsrs']} MSRs, XSAVE {f['xsave_size']} bytes, "
             "LAPIC (in-kernel irqchip); CPUID and TSC kHz are per-vCPU constants, in no row",
             "",
             f"{'':44} {'min':>12} {'median':>12} {'vs floor':>9}"]

    def row(label, s, base=None, fmt=us):
        ratio = f"{s['min_ns'] / base['min_ns']:8.2f}x" if base else ""
        lines.append(f"{label:44} {fmt(s['min_ns']):>12} {fmt(s['median_ns']):>12} {ratio:>9}")

    for what in ("save", "restore", "cycle"):
        title = {"save": "save", "restore": "restore", "cycle": "save + restore (one cycle)"}[what]
        lines.append(title)
        n_floor = {"save": "10", "restore": "9", "cycle": "19"}[what]
        n_fast = {"save": str(io["fast"]["save"]), "restore": str(io["fast"]["restore"]),
                  "cycle": str(io["fast"]["save"] + io["fast"]["restore"])}[what]
        row(f"  (a) C floor, selftests style ({n_floor} ioctls)", f[what], f[what])
        row(f"  (b) C fast path ({n_fast} ioctls + sync regs)", r["fast"][what], f[what])
        row(f"  (c) Python, fast-path plan ({n_fast} ioctls)", r["python"][what], f[what])
        if what in r["general"]:
            row(f"  (c) Python, state.{what}_state", r["general"][what], f[what])
    lines.append("port-I/O exit round trip (CPL3 `out`, KVM_EXIT_IO, re-enter)")
    row("  (d) C loop (floor)", f["pio_exit"], f["pio_exit"])
    row("  (d) vmm run loop (exit handled inside)", r["pio_loop"], f["pio_exit"])
    row("  (d) vmm SYNC event per exit, Machine.run", r["pio_events"], f["pio_exit"])
    row("  (d)   the same, run(timeout=None)", r["pio_events_no_timeout"], f["pio_exit"])
    cs = r["cold_start"]
    lines.append(f"cold start: `{cs['cmd']}`")
    row("  (e) process start to \"done\" on stdout", cs["to_done"], fmt=ms)
    row("  (e) process start to exit", cs["to_exit"], fmt=ms)
    row("  (e) floor: `python -c pass`", cs["python_pass"], fmt=ms)
    row("  (e) the guest's own run time (warm, in process)", cs["guest_run"], fmt=ms)
    row("  (e) python -X importtime: vmm.cli", cs["import_cli"], fmt=ms)
    lines.append("snapshots (`sync` guest at SYNC 0x11; MB/s of guest RAM; write floor = the same bytes "
                 "written + fsynced by C; restore = snapshot.load + Machine.from_snapshot to the guest's "
                 "first exit, every stored byte checked; read floor = plain read of the file, cached)")
    lines.append(f"  {'RAM':>8} {'filling':<10} {'stored':>8} {'save':>9} {'MB/s':>6} {'write fl.':>9} "
                 f"{'load':>8} {'restore':>9} {'read fl.':>9}")
    for s in r["snapshots"]:
        lines.append(f"  {s['ram_bytes'] >> 20:>4} MiB {'all pages' if s['filled'] else 'as booted':<10} "
                     f"{size_str(s['stored_bytes']):>8} {ms(s['save_ns']):>9} {s['save_mb_s']:>6.0f} "
                     f"{ms(s['write_floor_ns']):>9} {ms(s['load']['median_ns']):>8} "
                     f"{ms(s['load_and_restore']['median_ns']):>9} {ms(s['read_floor']['median_ns']):>9}")
    lines.append("targets (ratios within this run)")
    names = {"fast_vs_floor": "fast path save + restore vs floor (min)",
             "python_vs_floor": "Python (fast-path plan) save + restore vs floor",
             "general_vs_floor": "state.save_state + restore_state vs floor (min)",
             "pio_vs_c": "vmm run loop port-I/O exit vs C loop (min)",
             "cold_start_vs_python": "`vmm run` to done - guest run, vs python -c pass",
             "import_cli_ms": "import vmm.cli (-X importtime, median)",
             "save_vs_write": "largest filled snapshot save vs write floor",
             "restore_vs_read": "its load + restore - 50 ms, vs read floor"}
    for k, t in r["targets"].items():
        label = names[k]
        lines.append(f"  {label:52} {t['value']:8.2f} {t['unit']:<2} (target <= {t['target']}{t['unit']})  "
                     f"{'met' if t['met'] else 'MISSED'}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, snapshots up to 256 MiB")
    args = ap.parse_args()
    t_start = time.monotonic()
    guest, floor = build()
    res = {"host": host_info()}
    res.update(bench_state_and_pio(guest, floor, args.quick))
    res["cold_start"] = bench_cold_start(args.quick)
    snapdir = tempfile.mkdtemp(prefix="vmm-bench-", dir=os.environ.get("TMPDIR", "/tmp"))
    try:
        res["snapshots"] = bench_snapshots(args.quick, snapdir)
    finally:
        shutil.rmtree(snapdir, ignore_errors=True)
    res["targets"] = evaluate(res)
    res["seconds"] = round(time.monotonic() - t_start, 1)
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(table(res))
        print(f"({res['seconds']} s)")


if __name__ == "__main__":
    main()
