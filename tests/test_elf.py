"""ELF guests: a static ELF64 executable runs with `vmm run guest.elf` (PT_LOAD segments at their
addresses, .bss zero, the entry point), snapshots of it restore like built-ins, and unusable ELFs
(dynamic, PIE, 32-bit, another machine, beyond guest memory, below the runtime) are one-line refusals."""

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from vmm.errors import GuestError
from vmm.guest import catalog, elf

SDK = Path(__file__).resolve().parents[1] / "vmm" / "sdk"  # vmm.inc: the port protocol

# Two segments far apart (code at 4 MiB, data at 6 MiB) and a .bss the guest checks is zero.
SOURCE = """
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	PUTS msg
	mov counter(%rip), %eax
	SYNC_REG %eax
	incl counter(%rip)
	mov counter(%rip), %eax
	SYNC_REG %eax
	cmpq $0, zeros+4088(%rip)
	jne 1f
	DONE
1:	FAIL 1
	.section .rodata
msg:	.asciz "ELF guest\\n"
	.data
counter: .long 0x41
	.bss
zeros: .space 8192
"""
LINKER = """
ENTRY(_start)
SECTIONS {{
  . = {code:#x};
  .text : {{ *(.text.entry) *(.text*) }}
  .rodata : {{ *(.rodata*) }}
  . = {data:#x};
  .data : {{ *(.data*) }}
  .bss : {{ *(.bss*) }}
}}
"""


def vmm(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vmm.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def build(tmp_path, name="g", code=0x400000, data=0x600000, as_flags=("--64",), ld_flags=()):
    src, ld = tmp_path / f"{name}.S", tmp_path / f"{name}.ld"
    src.write_text(SOURCE)
    ld.write_text(LINKER.format(code=code, data=data))
    obj, out = tmp_path / f"{name}.o", tmp_path / f"{name}.elf"
    subprocess.run(["as", *as_flags, "-I", str(SDK), "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", *ld_flags, "-static", "-nostdlib", "-T", str(ld), "-o", str(out), str(obj)],
                   check=True)
    return out


@pytest.mark.kvm
def test_an_elf_guest_runs_with_its_segments_at_their_addresses(tmp_path):
    g = build(tmp_path)
    img = catalog.load(str(g))
    assert img.entry == 0x400000 and [a for a, _ in img.segments] == [0x400000, 0x600000]
    r = vmm("run", "g.elf", "--memory", "8", cwd=tmp_path)  # a path without a slash
    assert (r.returncode, r.stdout) == (0, "ELF guest\nsync 0x41\nsync 0x42\ndone\n"), r.stderr


@pytest.mark.kvm
def test_a_snapshot_of_an_elf_guest_restores_like_a_builtin(tmp_path):
    g = build(tmp_path)
    r = vmm("snapshot", g, "--memory", "8", "-o", tmp_path / "g.snap")
    assert r.returncode == 0, r.stderr
    r = vmm("restore", tmp_path / "g.snap")
    assert (r.returncode, r.stdout) == (0, "sync 0x42\ndone\n"), r.stderr


@pytest.mark.kvm
def test_the_built_in_guests_elf_files_run_like_their_flat_binaries():
    elf_file = catalog.build_dir() / "hello.elf"
    if not elf_file.exists():
        pytest.skip("packaged guests carry flat binaries only")
    r = vmm("run", elf_file)
    assert (r.returncode, r.stdout) == (0, "Hello from a vmm guest!\ndone\n"), r.stderr


def test_segments_are_checked_against_guest_memory_before_any_vm(tmp_path):
    img = catalog.load(str(build(tmp_path)))
    with pytest.raises(GuestError, match=r"0x600000\.\.0x602004 lies beyond guest memory \(6 MiB\); "
                                         r"give --memory 7 or more"):
        img.check_fits(6 << 20)
    img.check_fits(7 << 20)
    low = catalog.load(str(build(tmp_path, "low", code=0x8000, data=0x200000)))
    with pytest.raises(GuestError, match="below 0x100000, where the runtime keeps its tables"):
        low.check_fits(8 << 20)
    stack = catalog.load(str(build(tmp_path, "stack", code=0x100000, data=0x2f8000)))
    with pytest.raises(GuestError, match="overlaps the vCPU user stacks"):
        stack.check_fits(8 << 20)


def _cc(tmp_path, name, *flags):
    if not shutil.which("gcc"):
        pytest.skip("no gcc")
    c = tmp_path / "main.c"
    c.write_text("int main(void) { return 0; }\n")
    out = tmp_path / name
    subprocess.run(["gcc", *flags, "-o", str(out), str(c)], check=True)
    return out


@pytest.mark.parametrize("make, message", [
    (lambda t: _cc(t, "pie"), "position-independent or shared ELF (ET_DYN)"),
    (lambda t: _cc(t, "dyn", "-no-pie"), "dynamically linked ELF (PT_INTERP)"),
    (lambda t: build(t, "i386", code=0x400000, as_flags=("--32",), ld_flags=("-m", "elf_i386")),
     "32-bit or big-endian ELF"),
    (lambda t: _machine(build(t), 183), "an ELF for AArch64 (e_machine 183), not x86-64"),
    (lambda t: _truncated(build(t)), "bad program header table"),
])
def test_unusable_elfs_are_refused_in_one_line(tmp_path, make, message):
    try:
        path = make(tmp_path)
    except subprocess.CalledProcessError as e:
        pytest.skip(f"toolchain cannot build this case: {e}")
    r = vmm("run", path)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and str(path) in r.stderr and r.stdout == ""


def _machine(path, machine):
    data = bytearray(path.read_bytes())
    struct.pack_into("<H", data, 18, machine)
    path.write_bytes(data)
    return path


def _truncated(path):
    path.write_bytes(path.read_bytes()[:80])
    return path


def test_parse_refuses_overlaps_and_an_entry_outside_code():
    def image(entry, segs):
        eh = struct.pack("<16sHHIQQQIHHHHHH", b"\x7fELF\x02\x01\x01" + bytes(9), elf.ET_EXEC,
                         elf.EM_X86_64, 1, entry, 64, 0, 0, 64, 56, len(segs), 64, 0, 0)
        ph = b"".join(struct.pack("<IIQQQQQQ", elf.PT_LOAD, flags, 0, addr, addr, 0, size, 0x1000)
                      for addr, size, flags in segs)
        return eh + ph
    entry, segs = elf.parse(image(0x100000, [(0x100000, 0x100, elf.PF_X)]), "ok")
    assert entry == 0x100000 and segs[0].memsz == 0x100 and segs[0].data == b""
    with pytest.raises(GuestError, match="overlap"):
        elf.parse(image(0x100000, [(0x100000, 0x2000, elf.PF_X), (0x101000, 0x10, 0)]), "x")
    with pytest.raises(GuestError, match="entry point 0x200000 is not inside an executable"):
        elf.parse(image(0x200000, [(0x100000, 0x100, elf.PF_X), (0x200000, 0x100, 0)]), "x")
