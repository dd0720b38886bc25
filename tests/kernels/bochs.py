"""kvm_intel for test-kernels: Bochs 3.0 (built from the vendored source) emulates an Intel CPU with VMX.

QEMU's TCG emulates SVM but not VMX, so kvm_intel needs another emulator. Debian's bochs 2.7 is no use:
on its models Linux disables XSAVE ("misordered xstate") and KVM offers XCR0 0. The vendored Bochs 3.0
"tigerlake" model gives an Intel CPU with VMX and AVX-512 (XCR0 0xe7 at Intel offsets, opmask 64@1088,
no PKU), on which Debian's 6.12 kernel boots (6.1 prints nothing under it). AMX is out of reach: the
"sapphire_rapids" model enumerates AMX without XFD, Linux drops XTILEDATA and then takes #GP on
XSETBV 0x200e7 during boot.

Bochs has no -kernel option: the kernel and initramfs boot from an isolinux ISO, with the serial console
on stdout. The BIOS ROMs come from Debian's bochsbios and vgabios packages.
"""

import os
import shutil
import subprocess
from pathlib import Path

VENDOR = Path(os.environ.get("VMM_VENDOR_DIR", "/work/shared/vendor"))
TARBALL = "bochs-3.0.devel-783b58fd.tar.xz"
CONFIGURE = ["--enable-x86-64", "--enable-cpu-level=6", "--enable-vmx=2", "--enable-avx", "--enable-evex",
             "--enable-amx", "--enable-cet", "--enable-all-optimizations", "--enable-pci",
             "--disable-plugins", "--with-nogui", "--without-x", "--without-x11", "--without-sdl",
             "--without-sdl2", "--without-wx", "--without-term", "--without-rfb", "--without-vncsrv"]
HOST_TOOLS = {"xorriso": "xorriso", "g++": "g++", "make": "make"}
ISO_PACKAGES = ("isolinux", "syslinux-common", "bochsbios", "vgabios")
MODEL = "tigerlake"


def build(build_dir, run, log):
    """Bochs from the vendored tarball, configured as the vendor README says; cached in build_dir/bochs.
    Returns the path of the bochs binary."""
    out = build_dir / "bochs"
    binary = out / "bochs" / "bochs"
    if binary.exists():
        return binary
    tar = VENDOR / TARBALL
    if not tar.is_file():
        raise FileNotFoundError(f"{tar} is missing: the Bochs source is vendored there (set VMM_VENDOR_DIR)")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run(["tar", "-xJf", str(tar), "-C", str(out)], 300)
    src = out / "bochs"
    log(f"configuring Bochs in {src}")
    run(["sh", "./configure", *CONFIGURE], 600, cwd=src)
    log("building Bochs (about 9 minutes on one core)")
    run(["nice", "make", "-j1"], 3600, cwd=src)
    if not binary.exists():
        raise FileNotFoundError(f"the Bochs build left no {binary}")
    return binary


def make_iso(kernel, initrd, pkgs, out_dir, run):
    """An isolinux ISO that boots KERNEL with INITRD and a serial console."""
    tree = out_dir / "iso"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "isolinux").mkdir(parents=True)
    isolinux = pkgs["isolinux"] / "usr/lib/ISOLINUX/isolinux.bin"
    ldlinux = pkgs["syslinux-common"] / "usr/lib/syslinux/modules/bios/ldlinux.c32"
    for f in (isolinux, ldlinux):
        shutil.copy2(f, tree / "isolinux" / f.name)
    shutil.copy2(kernel.vmlinuz, tree / "vmlinuz")
    shutil.copy2(initrd, tree / "initrd.gz")
    (tree / "isolinux" / "isolinux.cfg").write_text(
        "SERIAL 0 115200\nDEFAULT linux\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /vmlinuz\n"
        "  APPEND initrd=/initrd.gz console=ttyS0,115200 quiet panic=-1 oops=panic\n")
    iso = out_dir / "boot.iso"
    run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-b", "isolinux/isolinux.bin",
         "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table", str(tree)],
        300)
    return iso


def command(binary, iso, pkgs, results, out_dir, memory_mib):
    """The bochs command line: config file written next to the ISO; serial port 1 on stdout."""
    bios = pkgs["bochsbios"] / "usr/share/bochs/BIOS-bochs-latest"
    vga = pkgs["vgabios"] / "usr/share/vgabios/vgabios.bin"
    cfg = out_dir / "bochsrc"
    cfg.write_text(f"""megs: {memory_mib}
cpu: model={MODEL}, count=1, ips=200000000, reset_on_triple_fault=0
romimage: file={bios}
vgaromimage: file={vga}
ata0-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=/dev/stdout
display_library: nogui
log: -
panic: action=fatal
error: action=report
info: action=ignore
debug: action=ignore
clock: sync=none, time0=local
""")
    return [str(binary), "-q", "-f", str(cfg)]
