"""Defects a reviewer found using vmm as a hostile new user, each run again: the right behaviour now."""

import json

import pytest

from hostile import vmm

pytestmark = pytest.mark.kvm


def _one_line_error(r, code=2):
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert r.stderr.startswith("vmm: ") and r.stderr.count("\n") == 1, r.stderr
    assert "Traceback" not in r.stderr
    return r.stderr


# -- a command whose guest ends (DONE) before the SYNC it needs could not do its job: not exit 0 -----------
@pytest.mark.parametrize("args", [
    ("snapshot", "sync", "--at-sync", "4", "-o", "{tmp}/x.snap"),
    ("xsave", "hello"),
    ("reg", "set", "hello", "RAX=1"),
    ("reg", "list", "hello"),
    ("reg", "get", "sync", "RIP", "--at-sync", "4"),
    ("diff", "sync", "hello"),
])
def test_a_guest_ending_done_before_the_sync_a_command_needs_is_a_guest_failure(tmp_path, args):
    args = [a.format(tmp=tmp_path) for a in args]
    err = _one_line_error(vmm(*args), 1)
    assert "ended with 'done' before reaching SYNC" in err
    assert not (tmp_path / "x.snap").exists()
    d = json.loads(vmm(*args, "--json").stdout)
    assert d["exit_status"] == 1 and d["kind"] == "guest"


# -- JSON nested deeper than the parser follows: one line, exit 2 (vmm.files.parse_json) ---------------------
@pytest.mark.parametrize("args", [
    ("cpuid", "--file", "{f}"), ("xsave", "--layout", "--file", "{f}"), ("compat", "{f}"),
    ("compat", "here", "--host", "{f}"), ("baseline", "{f}", "-o", "{tmp}/b.json"), ("amx", "--file", "{f}"),
    ("run", "hello", "--cpu", "{f}"),
])
def test_deeply_nested_json_is_an_input_error(tmp_path, args):
    f = tmp_path / "deep.json"
    f.write_text("[" * 100000 + "]" * 100000)
    err = _one_line_error(vmm(*[a.format(f=f, tmp=tmp_path) for a in args]))
    assert "nested too deeply" in err and not (tmp_path / "b.json").exists()
