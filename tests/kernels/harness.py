#!/usr/bin/env python3
"""`make test-kernels`: vmm on ordinary (non-PVM) KVM, inside Debian's distribution kernels.

QEMU's TCG emulates AMD SVM, so a Debian kernel booted under it loads kvm_amd and offers a /dev/kvm
answered by that kernel's upstream KVM code (real CPL0 execution, XCR0 enforced, XSAVE trimmed at GET).
For each kernel series this script:

1. takes the newest Debian package of the series with `apt-get download` (no install on this host) and
   unpacks it with `dpkg-deb -x` into a cache that outlives the checkout (VMM_KERNELS_CACHE, default
   ~/.cache/vmm-kernels; versions recorded in versions.json there and beside the results);
2. builds an initramfs: busybox-static, the modules kvm_amd (or kvm_intel), 9p, 9pnet_virtio,
   virtio_pci, overlay and their dependencies (resolved with depmod/modprobe --show-depends), and
   tests/kernels/init.sh as /init;
3. boots it under `qemu-system-x86_64 -accel tcg -cpu max -smp 1` with the host's root shared read-only
   over virtio-9p (the project's venv runs inside, on a tmpfs overlay) and a writable results share;
4. inside (tests/kernels/inner.sh): `vmm caps`, `vmm probe --json`, `vmm run` of every built-in guest at
   CPL3 and CPL0, and pytest (the amx process and the main one, as `make test`), each bounded;
5. reads the results back, compares the guests' outcomes with what this CPU must give, prints per
   kernel the boot time, the run time, pytest's counts with skip reasons and failures, and the probe
   verdicts, and exits 1 if anything failed (2 if the harness itself could not run).

Times are taken on the host (the guest clock is not trusted under emulation). With --intel
(`make test-kernels INTEL=1`) Linux 6.12 with kvm_intel under Bochs 3.0 follows (tests/kernels/bochs.py).
"""

import argparse
import concurrent.futures
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import bochs

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# downloads, unpacked packages and initramfs images persist across checkouts (a fresh clone, as CI
# makes, would otherwise fetch ~150 MB again); per-run results stay in the checkout
CACHE = Path(os.environ.get("VMM_KERNELS_CACHE")
             or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vmm-kernels")
RESULTS = ROOT / "build" / "kernels" / "results"

# series -> `apt-cache search --names-only` pattern of Debian bookworm's (signed) kernel image packages
SERIES = {
    "6.1": r"^linux-image-6\.1\.0-[0-9]+-amd64$",
    "6.12": r"^linux-image-6\.12\.[0-9]+\+deb12-amd64$",
}
COMMON_MODULES = ["9p", "9pnet_virtio", "virtio_pci", "overlay"]
# test files that run on the host only, whatever their marks, and why
HOST_ONLY = {
    "tests/test_cli_fuzz.py": "hundreds of vmm processes, each seconds to start under TCG",
    "tests/test_install.py": "pip fetches setuptools from PyPI, and the VM has no network",
}
HOST_TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "depmod": "kmod", "cpio": "cpio"}
MARK = "VMM-KERNELS: "


class HarnessError(Exception):
    """The harness could not do its job (not a test failure): a one-line reason and what to do."""


_print_lock = threading.Lock()


def log(msg, who=""):
    with _print_lock:
        print(f"[test-kernels{' ' + who if who else ''}] {msg}", flush=True)


def run(cmd, timeout, **kw):
    """subprocess.run with a time limit; failures become HarnessError with the command's stderr tail."""
    try:
        r = subprocess.run(cmd, timeout=timeout, capture_output=True, text=True, **kw)
    except subprocess.TimeoutExpired:
        raise HarnessError(f"`{' '.join(map(str, cmd))}` took more than {timeout} s") from None
    if r.returncode:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise HarnessError(f"`{' '.join(map(str, cmd))}` exited {r.returncode}: {' | '.join(tail)}")
    return r.stdout


def apt(cmd, timeout=900, tries=3, **kw):
    """An apt command, retried with a pause (mirrors fail transiently)."""
    for attempt in range(1, tries + 1):
        try:
            return run(cmd, timeout, **kw)
        except HarnessError as e:
            if attempt == tries:
                raise HarnessError(f"{e} (tried {tries} times; the Debian mirror must be reachable and "
                                   "apt-get must run as root)") from None
            log(f"{e}; retrying in {10 * attempt} s")
            time.sleep(10 * attempt)


_updated = False


def apt_update():
    global _updated
    if not _updated:
        apt(["apt-get", "update", "-q"], timeout=300)
        _updated = True


def ensure_host_tools(tools):
    missing = sorted({pkg for exe, pkg in tools.items() if not shutil.which(exe)})
    if missing:
        apt_update()
        log(f"installing {' '.join(missing)} with apt-get")
        apt(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    still = [exe for exe in tools if not shutil.which(exe)]
    if still:
        raise HarnessError(f"{', '.join(still)} not found after installing {', '.join(missing)}")


def dpkg_version(pkg):
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", pkg], capture_output=True, text=True)
    return out.stdout.strip() or None


def _version_key(name):
    return tuple(int(n) for n in re.findall(r"\d+", name))


def newest_package(pattern):
    try:
        apt_update()
    except HarnessError as e:  # a mirror that is down must not fail a run the cache can serve
        cached = [d.name.split("_")[0] for d in (CACHE / "debs").glob("*.deb")]
        cached = [n for n in cached if re.match(pattern, n)]
        if not cached:
            raise
        log(f"warning: {e}; using the newest cached package")
        return max(cached, key=_version_key)
    names = [ln.split(" - ")[0] for ln in run(["apt-cache", "search", "--names-only", pattern], 120).splitlines()]
    names = [n for n in names if re.match(pattern, n)]
    if not names:
        raise HarnessError(f"no package matches {pattern} (apt-cache search); check the apt sources")
    return max(names, key=_version_key)


def fetch_package(name):
    """Download NAME (cached in CACHE/debs) and unpack it; returns (unpacked root, version)."""
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        log(f"apt-get download {name}")
        apt(["apt-get", "download", "-q", name], cwd=debs)
        found = sorted(debs.glob(f"{name}_*.deb"))
        if not found:
            raise HarnessError(f"apt-get download {name} left no {name}_*.deb in {debs}")
    deb = found[-1]
    version = run(["dpkg-deb", "-f", str(deb), "Version"], 60).strip()
    root = CACHE / "pkgs" / f"{name}_{version}"
    if not (root / ".unpacked").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        run(["dpkg-deb", "-x", str(deb), str(root)], 600)
        (root / ".unpacked").touch()
    return root, version


class Kernel:
    """An unpacked Debian kernel package: its vmlinuz and module tree."""

    def __init__(self, series):
        self.series = series
        self.package = newest_package(SERIES[series])
        self.root, self.version = fetch_package(self.package)
        releases = [p.name for p in (self.root / "lib" / "modules").iterdir() if p.is_dir()]
        if len(releases) != 1:
            raise HarnessError(f"{self.root}: expected one module tree, found {releases}")
        self.release = releases[0]
        self.vmlinuz = self.root / "boot" / f"vmlinuz-{self.release}"
        if not self.vmlinuz.is_file():
            raise HarnessError(f"{self.vmlinuz} missing from {self.package}")
        self.modtree = self.root / "lib" / "modules" / self.release
        if not (self.modtree / "modules.dep").exists():
            run(["depmod", "-b", str(self.root), self.release], 300)

    def module_files(self, modules):
        """The .ko files to load for MODULES, dependencies first (modprobe --show-depends)."""
        files = []
        for m in modules:
            out = run(["modprobe", "-d", str(self.root), "-S", self.release, "--show-depends", m], 60)
            for ln in out.splitlines():
                parts = ln.split()
                if parts and parts[0] == "insmod" and parts[1] not in files:
                    files.append(parts[1])
        return files


def _decompress(src, dst):
    if src.endswith(".xz"):
        cmd = ["xz", "-dc", src]
    elif src.endswith(".zst"):
        cmd = ["zstd", "-dcq", src]
    elif src.endswith(".gz"):
        cmd = ["gzip", "-dc", src]
    else:
        shutil.copyfile(src, dst)
        return
    with open(dst, "wb") as f:
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.PIPE, timeout=120)
    if r.returncode:
        raise HarnessError(f"{' '.join(cmd)} failed: {r.stderr.decode(errors='replace').strip()}")


def build_initramfs(kernel, kvm_module, busybox, modules=COMMON_MODULES):
    """CACHE/<release>/initrd-<module>.cpio.gz: busybox, KVM_MODULE and MODULES (decompressed,
    depmod'ed in place) and init.sh as /init."""
    out_dir = CACHE / kernel.release
    tree = out_dir / f"initramfs-{kvm_module}"
    shutil.rmtree(tree, ignore_errors=True)
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        (tree / d).mkdir(parents=True)
    shutil.copy2(busybox, tree / "bin" / "busybox")
    shutil.copy2(HERE / "init.sh", tree / "init")
    modules = [kvm_module, *modules]
    dest_tree = tree / "lib" / "modules" / kernel.release
    for src in kernel.module_files(modules):
        rel = os.path.relpath(src, kernel.modtree)
        dst = dest_tree / re.sub(r"\.(xz|zst|gz)$", "", rel)
        dst.parent.mkdir(parents=True, exist_ok=True)
        _decompress(src, dst)
    for f in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (kernel.modtree / f).exists():
            shutil.copy2(kernel.modtree / f, dest_tree / f)
    run(["depmod", "-b", str(tree), kernel.release], 120)
    (tree / "modules.load").write_text("\n".join(modules) + "\n")
    image = out_dir / f"initrd-{kvm_module}.cpio.gz"
    files = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    with open(image, "wb") as f:
        cpio = subprocess.Popen(["cpio", "-o", "-H", "newc", "--quiet"], cwd=tree, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE)
        gz = subprocess.Popen(["gzip", "-1"], stdin=cpio.stdout, stdout=f)
        cpio.stdout.close()
        cpio.communicate(files, timeout=120)
        gz.wait(timeout=120)
    if cpio.returncode or gz.returncode:
        raise HarnessError(f"building {image} failed (cpio {cpio.returncode}, gzip {gz.returncode})")
    return image


# ---- running a VM and reading its serial console -------------------------------------------------

class ConsoleRun:
    """A VM process whose serial console (stdout) is logged with host timestamps; markers are timed."""

    def __init__(self, cmd, log_path, deadline_s, echo=False, who=""):
        self.cmd, self.log_path, self.deadline_s, self.echo, self.who = cmd, log_path, deadline_s, echo, who
        self.marks = []  # (seconds since start, marker text)
        self.timed_out = False

    def run(self):
        self.start = time.monotonic()
        with open(self.log_path, "w", encoding="utf-8", errors="replace") as logf:
            proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            timer = threading.Timer(self.deadline_s, self._expire, (proc,))
            timer.start()
            try:
                for raw in proc.stdout:
                    t = time.monotonic() - self.start
                    line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                    logf.write(f"{t:8.2f} {line}\n")
                    logf.flush()
                    i = line.find(MARK)
                    if i >= 0:
                        text = line[i + len(MARK):].strip()
                        self.marks.append((t, text))
                        log(f"{t:7.1f} s  {text}", self.who)
                    elif self.echo:
                        print(line, flush=True)
                proc.wait(timeout=60)
            finally:
                timer.cancel()
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        self.seconds = time.monotonic() - self.start
        return proc.returncode

    def _expire(self, proc):
        self.timed_out = True
        log(f"deadline of {self.deadline_s} s reached: killing the VM (pid {proc.pid})", self.who)
        proc.kill()

    def first(self, prefix):
        return next((t for t, m in self.marks if m.startswith(prefix)), None)

    def step_times(self):
        starts, times = {}, {}
        for t, m in self.marks:
            parts = m.split()
            if parts[0] == "step-start":
                starts[parts[1]] = t
            elif parts[0] == "step-end" and parts[1] in starts:
                times[parts[1]] = t - starts[parts[1]]
        return times


def qemu_command(kernel, initrd, results, memory_mib):
    return ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-m", str(memory_mib), "-smp", "1",
            "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot", "-nic", "none",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initrd),
            "-append", "console=ttyS0 quiet panic=-1 oops=panic",
            "-virtfs", "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            "-virtfs", f"local,path={results},mount_tag=results,security_model=none,multidevs=remap"]


# ---- judging the results ---------------------------------------------------------------------------

FIXED_OUTCOMES = {"spin": "timeout", "ud2": "fault #UD", "triple-fault": "shutdown", "mmio": "mmio"}


def expected_guest_outcome(guest, entry, supported_xcr0):
    """What `vmm run GUEST` must end with on ordinary KVM, at either CPL, from its catalog entry
    (`vmm guests --json`): `refused` when the guest needs XSAVE components KVM does not support here,
    or when only its driver (a probe check) can run it."""
    if entry.get("driven_by"):
        return "refused"
    for req in entry.get("requires", ()):
        need = int(req.get("xcr0", "0"), 0)
        if need & supported_xcr0 != need:
            return "refused"
    return FIXED_OUTCOMES.get(guest, "done")


def guest_outcome(path):
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    if "error" in d:
        return ("refused" if d.get("kind") == "input" else "error"), d["error"]
    ev = d.get("exit", {})
    kind = ev.get("event")
    if kind == "fault":
        kind = "fault #" + {6: "UD", 13: "GP", 14: "PF", 7: "NM"}.get(ev.get("vector"), str(ev.get("vector")))
    return kind, d.get("str")


def junit_counts(path):
    """pytest's JUnit XML -> counts and the failures/skips with their messages."""
    res = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "failures": [], "skips": {}}
    if not path.exists():
        return None
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed" if child.tag == "failure" else "error"
                msg = (child.get("message") or child.text or "").strip().splitlines()
                res["failures"].append((outcome, name, msg[0][:300] if msg else ""))
            elif child.tag == "skipped":
                outcome = "skipped"
                reason = (child.get("message") or "").strip()
                res["skips"][reason] = res["skips"].get(reason, 0) + 1
        res[outcome] += 1
    return res


VERBOSE_LINE = re.compile(r"^(tests/\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b(.*)$")


def verbose_counts(path):
    """Counts from `pytest -v` output, for a process that ended without its JUnit report (a test
    stalled and pytest-timeout ended the process, or the step's own timeout killed it): the test
    that was running is the last one named without an outcome."""
    res = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "failures": [], "skips": {}}
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    running = None
    for ln in lines:
        m = VERBOSE_LINE.match(ln)
        if m:
            name, outcome, rest = m.groups()
            key = {"PASSED": "passed", "XFAIL": "passed", "XPASS": "passed", "FAILED": "failed",
                   "ERROR": "error", "SKIPPED": "skipped"}[outcome]
            res[key] += 1
            if key in ("failed", "error"):
                res["failures"].append((key, name, "(see the -v output)"))
            elif key == "skipped":
                reason = re.sub(r"\s*\[\s*\d+%\]$", "", rest).strip(" ()")
                res["skips"][reason] = res["skips"].get(reason, 0) + 1
            running = None
        elif re.match(r"^tests/\S+::\S+\s*$", ln.split(" +++")[0]):
            running = ln.split()[0]
    if running:
        res["failures"].append(("stalled", running, "the process ended inside this test (pytest-timeout "
                                "or the step's time limit); the rest of the suite did not run"))
    return res


def xsave_layout(cpuid):
    """`vmm cpuid --json` (KVM_GET_SUPPORTED_CPUID) -> {component: "size@offset"} for each XSAVE
    component above SSE that KVM supports: CPUID.(0DH, i).EAX = size, EBX = standard-format offset."""
    leaf_d = {int(e["index"], 0): e for e in cpuid["entries"] if int(e["function"], 0) == 0xD}
    xcr0 = int(leaf_d[0]["eax"], 16) | int(leaf_d[0]["edx"], 16) << 32
    from vmm.xsave_layout import XFEATURE_NAMES  # the harness runs on the project's venv
    return {XFEATURE_NAMES.get(i, str(i)): f"{int(leaf_d[i]['eax'], 16)}@{int(leaf_d[i]['ebx'], 16)}"
            for i in range(2, 64) if xcr0 >> i & 1 and i in leaf_d}


def judge(series, results, console, report):
    """Adds the findings of one kernel's run to REPORT; returns the list of problems (empty = pass)."""
    problems = []
    if console.timed_out:
        problems.append(f"the VM did not finish within {console.deadline_s} s")
    for t, m in console.marks:
        if m.startswith("fatal"):
            problems.append(f"inside the VM: {m}")
    if console.first("finished") is None and not problems:
        problems.append("the VM stopped before the run finished (see the console log)")
    ended = {m.split()[1] for t, m in console.marks if m.startswith("step-end ")}
    for t, m in console.marks:
        if m.startswith("step-start ") and m.split()[1] not in ended:
            problems.append(f"step {m.split()[1]} did not end (started {t:.0f} s into the VM)")
    steps = {}
    if (results / "steps.tsv").exists():
        for ln in (results / "steps.tsv").read_text().splitlines():
            name, rc, limit = ln.split("\t")
            steps[name] = int(rc)
    report["steps"] = steps
    for name, rc in steps.items():
        if rc in (124, 137):
            problems.append(f"step {name} timed out")

    caps = {}
    try:
        caps = json.loads((results / "caps.out").read_text())
    except (OSError, ValueError):
        if "caps" in steps:
            problems.append("vmm caps gave no JSON")
    report["kvm"] = {k: caps.get(k) for k in ("kernel", "supported_xcr0", "pvm") if k in caps}
    if "cpuid" in steps:
        try:
            report["xsave_layout"] = xsave_layout(json.loads((results / "cpuid.out").read_text()))
        except (OSError, ValueError, KeyError) as e:
            problems.append(f"vmm cpuid gave no usable JSON ({e})")

    probe = None
    if "probe" in steps:
        try:
            probe = json.loads((results / "probe.json").read_text())
        except (OSError, ValueError):
            problems.append(f"vmm probe wrote no report (exit {steps['probe']})")
    if probe:
        report["probe"] = {c["name"]: (c["status"], c.get("verdict", "")) for c in probe["checks"]}
        report["probe_summary"] = probe.get("summary")
        for name, (status, verdict) in report["probe"].items():
            if status == "error":
                problems.append(f"probe check {name}: error: {verdict}")
        if steps.get("probe") not in (0, 1):  # 1: a check differs from upstream, a finding
            problems.append(f"vmm probe exited {steps['probe']}")

    if any(s.startswith("guests/") for s in steps):
        xcr0 = int(caps.get("supported_xcr0", "0"), 0)
        try:
            catalog = {g["name"]: g for g in json.loads((results / "guests.json").read_text())}
        except (OSError, ValueError):
            catalog = {}
            problems.append("vmm guests --json gave no catalog")
        guests = {}
        for name in sorted(s for s in steps if s.startswith("guests/")):
            guest, cpl = name[len("guests/"):].rsplit("-cpl", 1)
            got, text = guest_outcome(results / f"{name}.out")
            want = expected_guest_outcome(guest, catalog.get(guest, {}), xcr0)
            guests[f"{guest} cpl{cpl}"] = (got, want, text)
            if got is None:
                out = (results / f"{name}.out").read_text(errors="replace").strip().splitlines()
                problems.append(f"vmm run {guest} --cpl {cpl}: no result (exit {steps[name]}): "
                                f"{out[-1] if out else ''}")
            elif want is not None and got != want:
                problems.append(f"vmm run {guest} --cpl {cpl}: {text} (expected {want})")
        report["guests"] = guests

    for proc in ("pytest-amx", "pytest"):
        parts = [s for s in steps if s == proc or s.startswith(proc + "/")]
        if not parts:
            continue
        total = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "failures": [], "skips": {}}
        for part in parts:
            counts = junit_counts(results / f"{part}.xml")
            if counts is None:
                counts = verbose_counts(results / f"{part}.out")
            if counts is None:
                problems.append(f"{part}: no JUnit report (exit {steps[part]}); see {results / (part + '.out')}")
                continue
            for k in ("passed", "failed", "error", "skipped"):
                total[k] += counts[k]
            total["failures"] += counts["failures"]
            for reason, n in counts["skips"].items():
                total["skips"][reason] = total["skips"].get(reason, 0) + n
            if steps[part] not in (0, 5) and not counts["failures"]:
                problems.append(f"{part} exited {steps[part]} with no failed test")
        report[proc] = total
        for outcome, name, msg in total["failures"]:
            problems.append(f"{proc}: {outcome.upper()} {name}: {msg}")
    return problems


def print_report(series, report, problems):
    print(f"\n=== Linux {report['release']} ({report['package']} {report['version']}), "
          f"{report['vm']} ===")
    boot = report.get("boot_s")
    print(f"boot to /dev/kvm  {boot:.1f} s" if boot is not None else "boot to /dev/kvm  (not reached)")
    print(f"run               {report.get('run_s', 0):.1f} s (whole VM {report.get('vm_s', 0):.1f} s)")
    if report.get("kvm"):
        k = report["kvm"]
        print(f"KVM               supported XCR0 {k.get('supported_xcr0')}, pvm {k.get('pvm')}")
    if report.get("xsave_layout"):
        print("XSAVE layout      " + ", ".join(f"{i}: {v}" for i, v in report["xsave_layout"].items())
              + "  (component: size@offset, CPUID.(0DH,i) of KVM_GET_SUPPORTED_CPUID)")
    for step, secs in sorted(report.get("step_s", {}).items()):
        if not step.startswith(("guests/", "pytest/")):
            print(f"  step {step:<12} {secs:7.1f} s  exit {report['steps'].get(step)}")
    files = {k: v for k, v in report.get("step_s", {}).items() if k.startswith("pytest/")}
    if files:
        print(f"  step pytest      {sum(files.values()):7.1f} s  ({len(files)} processes, one per test file)")
    for what, why in report.get("not_run", {}).items():
        print(f"not run           {what}: {why}")
    if "probe" in report:
        print(f"probe             {report.get('probe_summary')}")
        for name, (status, verdict) in report["probe"].items():
            print(f"  {name:<36} {status:<12} {verdict[:110]}")
    if "guests" in report:
        ok = sum(1 for got, want, _ in report["guests"].values() if got == want)
        print(f"guests            {ok}/{len(report['guests'])} ended as expected")
        for name, (got, want, text) in report["guests"].items():
            flag = "ok " if got == want else "BAD"
            print(f"  {flag} {name:<22} {text}")
    for proc in ("pytest-amx", "pytest"):
        c = report.get(proc)
        if c:
            print(f"{proc:<17} {c['passed']} passed, {c['failed']} failed, {c['error']} errors, "
                  f"{c['skipped']} skipped")
            for reason, n in sorted(c["skips"].items(), key=lambda kv: -kv[1]):
                print(f"  skipped {n:3d}: {reason[:140]}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s):")
        for p in problems:
            print(f"  - {p}")
    else:
        print("PASSED")


# ---- main ------------------------------------------------------------------------------------------

def check_project():
    venv_vmm = ROOT / ".venv" / "bin" / "vmm"
    if not venv_vmm.exists() or not (ROOT / "guests" / "build" / "hello.bin").exists():
        raise HarnessError(f"{ROOT}: run `make dev guests` first (the VM runs the project's own venv)")
    try:
        run([str(ROOT / ".venv" / "bin" / "python"), "-c", "import pytest_timeout"], 60)
    except HarnessError:
        raise HarnessError("pytest-timeout is missing from .venv: run `make dev`") from None


def run_env(args, **override):
    """The text of run.env, which tells inner.sh what to run: args' settings, each replaceable by
    OVERRIDE (steps, test_timeout; pytest_files and skip_guests have no default)."""
    v = {"steps": " ".join(args.steps), "pytest_args": args.pytest_args, "pytest_timeout": args.pytest_timeout,
         "test_timeout": args.test_timeout, "probe_timeout": args.probe_timeout,
         "guest_timeout": args.guest_timeout, "cmd": args.cmd, **override}
    return f"PROJECT={shlex.quote(str(ROOT))}\n" + "".join(f"{k.upper()}={shlex.quote(str(x))}\n" for k, x in v.items())


def finish_run(series, kernel, vm, results, console, rc):
    """The report of one VM run that has ended (judged from RESULTS), also saved as summary.json, and
    its problems."""
    report = {"series": series, "package": kernel.package, "version": kernel.version,
              "release": kernel.release, "vm": vm, "vm_exit": rc}
    ready, done = console.first("kvm-ready"), console.first("finished")
    report["boot_s"] = ready
    report["run_s"] = (done or console.seconds) - (ready or 0)
    report["vm_s"] = console.seconds
    report["step_s"] = console.step_times()
    problems = judge(series, results, console, report)
    report["problems"] = problems
    (results / "summary.json").write_text(json.dumps(report, indent=2) + "\n")
    return report, problems


def select_tests(mark):
    """The test files holding tests of pytest mark expression `mark` (collected here, on the host),
    less HOST_ONLY, and how many tests they hold: (files, tests)."""
    out = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "pytest", "-q", "--co",
                          "-p", "no:cacheprovider", "-m", mark, "tests"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    ids = [ln for ln in out.stdout.splitlines() if "::" in ln]
    if out.returncode or not ids:
        raise HarnessError(f"collecting `pytest -m '{mark}'` found no tests (exit {out.returncode}): "
                           f"{(out.stderr or out.stdout).strip().splitlines()[-1:]}")
    files = sorted({i.split("::")[0] for i in ids} - set(HOST_ONLY))
    return files, sum(1 for i in ids if i.split("::")[0] in files)


def prepare_kernel(series, busybox):
    """The kernel package and its initramfs (downloads and builds, so run these one at a time)."""
    kernel = Kernel(series)
    return kernel, build_initramfs(kernel, "kvm_amd", busybox)


def run_kernel(series, kernel, initrd, args):
    """Boot one kernel, run the steps inside, judge; returns (report, problems). Prints nothing but
    progress lines, so several can run at once."""
    results = RESULTS / f"{series}-kvm_amd"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    (results / "run.env").write_text(run_env(args, pytest_mark=args.pytest_mark,
                                             pytest_files=" ".join(args.pytest_files)))
    cmd = qemu_command(kernel, initrd, results, args.memory)
    log(f"Linux {kernel.release} ({kernel.package} {kernel.version}) under QEMU TCG; "
        f"console log {results / 'console.log'}", series)
    console = ConsoleRun(cmd, results / "console.log", args.deadline, echo=args.verbose, who=series)
    rc = console.run()
    report, problems = finish_run(series, kernel, "QEMU TCG -cpu max, kvm_amd", results, console, rc)
    if args.save_probe and (results / "probe.json").exists():
        dest = ROOT / "tests" / "data" / f"probe-debian-{series}-kvm_amd-tcg.json"
        shutil.copyfile(results / "probe.json", dest)
        log(f"probe report saved as {dest.relative_to(ROOT)}", series)
    return report, problems


def run_intel(args, target):
    """The kvm_intel run under Bochs (tests/kernels/bochs.py), judged and printed as the others."""
    results = RESULTS / f"{bochs.SERIES}-kvm_intel"
    shutil.rmtree(results, ignore_errors=True)
    results.mkdir(parents=True)
    console, rc = bochs.run(sys.modules[__name__], target, args, results)
    report, problems = finish_run(bochs.SERIES, target.kernel, f"Bochs 3.0 cpu {bochs.CPU_MODEL}, kvm_intel",
                                  results, console, rc)
    report["not_run"] = bochs.not_run(args)
    print_report(bochs.SERIES, report, problems)
    return report, problems


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kernel", action="append", choices=sorted(SERIES), help="series (default: all)")
    ap.add_argument("--steps", default="caps probe guests pytest-amx pytest",
                    help="what to run inside, in order (default: %(default)s)")
    ap.add_argument("--cmd", default="", help="the command of the `cmd` step (by hand: --steps cmd)")
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. a -k subset")
    ap.add_argument("--pytest-mark", default="kvm and not amx",
                    help="the tests run inside, as a pytest -m expression (default: %(default)s: the tests "
                         "that use /dev/kvm; the others do not touch it and run on the host in `make test`)")
    ap.add_argument("--pytest-timeout", type=int, default=1500, help="seconds for each pytest process")
    ap.add_argument("--test-timeout", type=int, default=300, help="seconds for each test (pytest-timeout)")
    ap.add_argument("--probe-timeout", type=int, default=600, help="seconds for vmm probe")
    ap.add_argument("--guest-timeout", type=int, default=30, help="--timeout of each vmm run")
    ap.add_argument("--deadline", type=int, default=3600, help="seconds for the whole VM of one kernel")
    ap.add_argument("--memory", type=int, default=3072, help="VM RAM in MiB")
    ap.add_argument("--save-probe", action="store_true",
                    help="copy each probe report to tests/data/probe-debian-SERIES-kvm_amd-tcg.json")
    ap.add_argument("--jobs", type=int, default=0,
                    help="kernels booted at once (default: one per CPU, at most one per kernel)")
    ap.add_argument("--verbose", action="store_true", help="echo the VM's console")
    bochs.add_arguments(ap)
    args = ap.parse_args(argv)
    args.steps = args.steps.split()
    t0 = time.monotonic()
    try:
        if os.geteuid() != 0:
            raise HarnessError("run as root (apt-get, and QEMU's 9p export of / with security_model=none)")
        check_project()
        args.pytest_files, n_tests = select_tests(args.pytest_mark)
        log(f"pytest inside: `-m '{args.pytest_mark}'`: {n_tests} tests in {len(args.pytest_files)} files "
            f"(one process each); host only: " + "; ".join(f"{os.path.basename(f)} ({why})"
                                                            for f, why in HOST_ONLY.items()))
        ensure_host_tools(HOST_TOOLS)
        busybox_root, bb_version = fetch_package("busybox-static")
        busybox = busybox_root / "bin" / "busybox"
        versions = {"qemu-system-x86": dpkg_version("qemu-system-x86"), "busybox-static": bb_version}
        kernels = [] if args.no_amd else args.kernel or sorted(SERIES, key=_version_key)
        prepared = {series: prepare_kernel(series, busybox) for series in kernels}
        intel = None
        if args.intel:  # built before any VM boots: a Bochs build takes minutes
            intel, intel_versions = bochs.prepare(sys.modules[__name__], args, busybox, CACHE)
            versions.update(intel_versions)
        outcomes = {}
        if kernels:
            jobs = max(1, min(args.jobs or os.cpu_count() or 1, len(kernels)))
            log(f"booting {', '.join(kernels)} ({jobs} at a time; each VM has one vCPU)")
            with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
                futures = {series: pool.submit(run_kernel, series, *prepared[series], args) for series in kernels}
                outcomes = {series: f.result() for series, f in futures.items()}
        failed = {}
        for series, (report, problems) in outcomes.items():
            print_report(series, report, problems)
            versions[report["package"]] = report["version"]
            if problems:
                failed[series] = len(problems)
        if intel:  # after the AMD VMs: the cores are theirs until then
            report, problems = run_intel(args, intel)
            if problems:
                failed[f"{bochs.SERIES} kvm_intel"] = len(problems)
        for d in (CACHE, RESULTS):
            (d / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    except HarnessError as e:
        print(f"test-kernels: error: {e}", file=sys.stderr)
        return 2
    log(f"versions: {', '.join(f'{k} {v}' for k, v in versions.items())}")
    log(f"total {time.monotonic() - t0:.0f} s")
    if failed:
        log("FAILED: " + ", ".join(f"Linux {s}: {n} problem(s)" for s, n in failed.items()))
        return 1
    log("all kernels passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
