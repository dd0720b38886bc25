"""`vmm guest-sdk`: where the guest SDK is (vmm/sdk: vmm.inc, vmm.h, crt0.S, guest.ld, vmm.mk,
examples), or a copy of it to start a guest from."""

import os
import shutil
from pathlib import Path

import click

from .common import _emit, handle_errors, json_option

SDK_DIR = Path(__file__).resolve().parents[1] / "sdk"

FILES = {
    "vmm.inc": "assembler include: port protocol macros (SYNC, DONE, FAIL, PUTS, ARG, SVC)",
    "vmm.h": "C header: vmm_sync, vmm_done, vmm_fail, vmm_puts, vmm_arg, vmm_cpuid, vmm_rdmsr",
    "crt0.S": "CPL3 entry for C guests: calls vmm_main(vcpu); 0 -> DONE, else FAIL(value)",
    "guest.ld": "linker script: payload linked at 1 MiB, entry first",
    "vmm.mk": "Makefile snippet: NAME.elf from NAME.c or NAME.S, NAME.bin (flat) from NAME.elf",
    "examples/": "hello-asm.S (assembly), dot.c (C with AVX2/AVX-512 intrinsics), Makefile",
}


@click.command("guest-sdk")
@click.option("--path", "path_only", is_flag=True, help="Print only the SDK directory (for Makefiles).")
@click.option("--copy", "copy_to", metavar="DIR", type=click.Path(file_okay=False),
              help="Copy the SDK into DIR (a new or empty directory) to start a guest there.")
@json_option
@handle_errors
def guest_sdk(path_only, copy_to, as_json):
    """The guest SDK for writing your own guests in assembly or freestanding C.

    \b
    In a Makefile:
        VMM_SDK := $(shell vmm guest-sdk --path)
        include $(VMM_SDK)/vmm.mk
        all: myguest.bin
    then `vmm run ./myguest.bin --arg 42`."""
    if not (SDK_DIR / "vmm.mk").is_file():
        raise FileNotFoundError(f"the guest SDK is missing from this installation ({SDK_DIR})")
    if copy_to is not None:
        _copy(Path(copy_to))
    if path_only:
        click.echo(str(SDK_DIR))
        return
    if as_json:
        _emit({"path": str(SDK_DIR), "files": FILES, "copied_to": copy_to})
        return
    if copy_to is not None:
        click.echo(f"guest SDK copied to {copy_to} (build the examples there: make -C {copy_to}/examples "
                   f"VMM_SDK={os.path.abspath(copy_to)})")
        return
    click.echo(f"guest SDK: {SDK_DIR}")
    for name, what in FILES.items():
        click.echo(f"  {name:<10} {what}")
    click.echo("use: VMM_SDK := $(shell vmm guest-sdk --path) / include $(VMM_SDK)/vmm.mk in your Makefile")


def _copy(dest):
    """Copy the SDK; refuses a DIR that is not a directory or not empty (nothing is overwritten)."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise FileExistsError(f"{dest} exists and is not an empty directory: give a new one")
    parent = dest.resolve().parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot copy to {dest}: directory {parent} does not exist")
    shutil.copytree(SDK_DIR, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__", "*.o", "*.elf", "*.bin", "*.sym"))


COMMANDS = [guest_sdk]
