"""Running probe checks: in this process, or in fresh processes (`python -m vmm.probe --check NAME`)
for those that depend on or change this process's XSAVE permissions."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .core import CHILD_TIMEOUT, Context, ProbeError, select, skip, upstream, version_text


# --- running checks --------------------------------------------------------------------------------
def _base(c):
    return {"name": c.name, "title": c.title, "group": c.group, "selftest": c.selftest,
            "process": c.process or "probe"}


def _finish(c, out, seconds):
    base = _base(c)
    if "skip" in out:
        return {**base, "setup": "-", "call": "-",
                "observed": {"ok": False, "value": None, "errno": None, "errno_name": None,
                             "text": "not run"},
                "upstream": upstream("-"), "status": "skipped", "verdict": f"skipped: {out['skip']}",
                "details": {}, "seconds": round(seconds, 4)}
    return {**base, **out, "seconds": round(seconds, 4)}


def _error_result(c, message, seconds=0.0):
    return {**_base(c), "setup": "-", "call": "-",
            "observed": {"ok": False, "value": None, "errno": None, "errno_name": None, "text": message},
            "upstream": upstream("-"), "status": "error", "verdict": f"the check did not complete: {message}",
            "details": {}, "seconds": round(seconds, 4)}


def run_check(ctx, c):
    """Run one check in this process; never raises for the check's own failures."""
    t0 = time.monotonic()
    if c.min_kernel and ctx.kver < c.min_kernel:
        return _finish(c, skip(f"Linux {version_text(ctx.kver)} is older than {version_text(c.min_kernel)}: "
                               f"{c.danger}"), 0.0)
    try:
        out = c.fn(ctx)
    except ProbeError:
        raise
    except Exception as e:  # noqa: BLE001 - one failing check must not cost the others their results
        return _error_result(c, f"{type(e).__name__}: {e}", time.monotonic() - t0)
    return _finish(c, out, time.monotonic() - t0)


def _child_cmd(names, device, kernel):
    cmd = [sys.executable, "-m", "vmm.probe", "--device", device]
    if kernel is not None:
        cmd += ["--kernel", kernel]
    for n in names:
        cmd += ["--check", n]
    return cmd


def _child_env():
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _start_processes(checks, device, kernel):
    groups = {}
    for c in checks:
        if c.process:
            groups.setdefault(c.process, []).append(c)
    procs = []
    for group, members in groups.items():
        p = subprocess.Popen(_child_cmd([c.name for c in members], device, kernel), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_child_env())
        procs.append((group, members, p, time.monotonic()))
    return procs


def _collect(procs):
    out = {}
    for group, members, p, t0 in procs:
        left = max(CHILD_TIMEOUT - (time.monotonic() - t0), 0.1)
        try:
            stdout, stderr = p.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            for c in members:
                out[c.name] = _error_result(c, f"the {group} process did not finish within {CHILD_TIMEOUT:.0f} s")
            continue
        try:
            results = json.loads(stdout) if p.returncode == 0 else None
        except ValueError:
            results = None
        if not isinstance(results, list):
            tail = (stderr.strip().splitlines() or [f"exit status {p.returncode}"])[-1]
            for c in members:
                out[c.name] = _error_result(c, f"the {group} process failed: {tail}")
            continue
        for r in results:
            out[r["name"]] = r
        for c in members:
            out.setdefault(c.name, _error_result(c, f"the {group} process gave no result"))
    return out


def run_checks(device="/dev/kvm", names=None, kernel=None, groups=None):
    """Run the named checks and those of the named groups (default: all) and return their results in
    report order. Checks with a process run in fresh processes, in parallel with the others.
    `kernel` pretends another kernel release for the skip rules (a testing aid). Raises ProbeError
    for an unknown check or group."""
    wanted = select(names, groups)
    order = [c.name for c in wanted]
    procs = _start_processes(wanted, device, kernel)
    results = {}
    try:
        local = [c for c in wanted if not c.process]
        if local:
            ctx = Context(device, kernel=kernel)
            try:
                for c in local:
                    results[c.name] = run_check(ctx, c)
            finally:
                ctx.close()
    finally:
        results.update(_collect(procs))
    return [results[n] for n in order]
