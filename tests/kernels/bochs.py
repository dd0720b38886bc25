"""The kvm_intel target of `make test-kernels INTEL=1`: Debian's 6.12 kernel under Bochs 3.0.

QEMU's TCG emulates AMD SVM only; Bochs emulates VMX. Bochs 3.0's "tigerlake" CPU model gives an
Intel CPU with VMX and AVX-512 (XSAVE components at the Intel offsets), so kvm_intel loads inside and
offers a /dev/kvm answered by that kernel's upstream VMX code. Bochs has no -kernel option and no
virtio-9p, so (unlike the QEMU target) the kernel and initramfs boot from an isolinux CD-ROM, and the
project's checkout, its venv and the Python install it links to travel on an ext4 disk image (IDE)
that the VM mounts read-only under a tmpfs overlay; the results come back on a second, writable ext4
image the host reads with debugfs after the VM has ended. tests/kernels/init.sh and inner.sh are the
QEMU target's, told the difference by run.env and the kernel command line.

Bochs 3.0 is not packaged anywhere CI can reach: it is built from the tarball in ../shared/vendor
(relative to the checkout, or the copy the cache keeps of it; VMM_BOCHS_TARBALL or --bochs-tarball
elsewhere), cached by the tarball's sha256. Its BIOS ROMs come from Debian's bochsbios and vgabios
packages, isolinux from isolinux and syslinux-common.
"""

import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

TARBALL_GLOB = "bochs-3.0.devel-*.tar.xz"
# ../shared/vendor/README.md: the configure line the tarball was checked with
CONFIGURE = ["--enable-x86-64", "--enable-cpu-level=6", "--enable-vmx=2", "--enable-avx", "--enable-evex",
             "--enable-amx", "--enable-cet", "--enable-all-optimizations", "--enable-pci",
             "--disable-plugins", "--with-nogui", "--without-x", "--without-x11", "--without-sdl",
             "--without-sdl2", "--without-wx", "--without-term", "--without-rfb", "--without-vncsrv"]
BUILD_TOOLS = {"g++": "g++", "make": "make", "xz": "xz-utils"}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_tarball(h, root, cache, override=None):
    """The Bochs source tarball: OVERRIDE (--bochs-tarball or VMM_BOCHS_TARBALL), else the one
    ../shared/vendor beside the checkout holds, else the copy CACHE/bochs/vendor keeps of the last one
    found (so a clone elsewhere, such as CI's, still finds it). A tarball found is copied there."""
    override = override or os.environ.get("VMM_BOCHS_TARBALL")
    kept = cache / "bochs" / "vendor"
    if override:
        path = Path(override)
        if not path.is_file():
            raise h.HarnessError(f"Bochs tarball {path} (--bochs-tarball or VMM_BOCHS_TARBALL) is not a file")
        return path
    vendor = (root / ".." / "shared" / "vendor").resolve()
    found = sorted(vendor.glob(TARBALL_GLOB))
    if found:
        copy = kept / found[-1].name
        if not copy.is_file() or copy.stat().st_size != found[-1].stat().st_size:
            tmp = kept / f".{copy.name}.{os.getpid()}"
            try:
                kept.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(found[-1], tmp)
                os.replace(tmp, copy)  # whole or absent
            except OSError as e:  # a convenience for later clones: this run goes on without it
                h.log(f"Bochs: could not keep a copy of {found[-1].name} in {kept}: {e}")
                tmp.unlink(missing_ok=True)
        return found[-1]
    found = sorted(kept.glob(TARBALL_GLOB))
    if found:
        h.log(f"Bochs: no {TARBALL_GLOB} in {vendor}; using the cached copy {found[-1]}")
        return found[-1]
    raise h.HarnessError(
        f"no {TARBALL_GLOB} in {vendor} or {kept}: the Intel target builds Bochs 3.0 from that tarball, "
        f"which no package registry has. Copy bochs-3.0.devel-783b58fd.tar.xz there (from the project's "
        f"shared vendor directory, whose README has the configure line), or name it with --bochs-tarball "
        f"PATH or VMM_BOCHS_TARBALL=PATH")


def build_bochs(h, cache, tarball, jobs=None):
    """CACHE/bochs/<sha256 of TARBALL>/bochs: Bochs built with CONFIGURE, once per tarball (a build
    takes 9-15 minutes on one core). Returns (binary path, sha256)."""
    digest = sha256(tarball)
    home = cache / "bochs" / digest
    binary = home / "bochs"
    if binary.is_file():
        h.log(f"Bochs: cached build {binary} (tarball sha256 {digest[:16]}…)")
        return binary, digest
    h.ensure_host_tools(BUILD_TOOLS)
    work = cache / "bochs" / f"{digest}.building-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    jobs = jobs or os.cpu_count() or 1
    h.log(f"Bochs: building {tarball.name} (sha256 {digest[:16]}…) with make -j{jobs}; "
          f"9-15 minutes on one core; log {work / 'build.log'}")
    t0 = time.monotonic()
    (work / "src").mkdir()
    h.run(["tar", "-xJf", str(tarball), "-C", str(work / "src")], 300)
    src = work / "src" / "bochs"
    if not (src / "configure").is_file():
        raise h.HarnessError(f"{tarball} holds no bochs/configure")
    with open(work / "build.log", "w") as logf:
        for cmd, limit in ((["./configure", *CONFIGURE], 600), (["make", f"-j{jobs}"], 3600)):
            logf.write(f"$ {' '.join(cmd)}\n")
            logf.flush()
            try:
                r = subprocess.run(cmd, cwd=src, stdout=logf, stderr=subprocess.STDOUT, timeout=limit)
            except subprocess.TimeoutExpired:
                raise h.HarnessError(f"Bochs: `{cmd[0]}` took more than {limit} s; see {work / 'build.log'}") \
                    from None
            if r.returncode:
                raise h.HarnessError(f"Bochs: `{' '.join(cmd[:2])}` exited {r.returncode}; "
                                     f"see {work / 'build.log'}")
    if not (src / "bochs").is_file():
        raise h.HarnessError(f"Bochs: make left no bochs binary; see {work / 'build.log'}")
    # keep the binary and the log, not the 300 MB tree; the rename makes the cache entry appear whole
    shutil.move(str(src / "bochs"), work / "bochs")
    shutil.rmtree(work / "src")
    shutil.rmtree(home, ignore_errors=True)
    os.rename(work, home)
    h.log(f"Bochs: built in {time.monotonic() - t0:.0f} s: {binary}")
    return binary, digest


# ---- what the VM boots from and reads -------------------------------------------------------------

# the initramfs of this target: the IDE disks and ext4 instead of virtio-9p (crc32c named: busybox
# modprobe does not follow ext4's softdep on it)
MODULES = ["ata_piix", "sd_mod", "crc32c_generic", "ext4", "overlay"]
ROOT_LABEL, RESULTS_LABEL = "vmm-root", "vmm-results"
# Bochs computes a flat image's CHS geometry from its size: keep sizes whole cylinders (16 heads x 63)
CYLINDER = 16 * 63 * 512
# what inner.sh and the tests run besides Python (the rest of the host is not on the disk)
COMMANDS = ["bash", "sh", "env", "timeout", "basename", "dirname", "mkdir", "rm", "ls", "cat", "sync",
            "uname", "sleep", "id"]
ETC = ["passwd", "group", "nsswitch.conf", "ld.so.cache"]
# parts of a Python install no test imports (its own test suite alone is 120 MB)
STDLIB_SKIP = {"test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "site-packages",
               "dist-packages"}


def iso_image(h, out_dir, kernel, initrd, cmdline):
    """OUT_DIR/boot.iso: isolinux booting KERNEL's vmlinuz with INITRD and CMDLINE (Bochs has no
    -kernel). Returns the path and the versions of the packages used."""
    isolinux, v_iso = h.fetch_package("isolinux")
    syslinux, v_sys = h.fetch_package("syslinux-common")
    tree = out_dir / "iso"
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "isolinux").mkdir(parents=True)
    shutil.copy2(isolinux / "usr/lib/ISOLINUX/isolinux.bin", tree / "isolinux")
    shutil.copy2(syslinux / "usr/lib/syslinux/modules/bios/ldlinux.c32", tree / "isolinux")
    shutil.copy2(kernel.vmlinuz, tree / "vmlinuz")
    shutil.copy2(initrd, tree / "initrd.gz")
    (tree / "isolinux" / "isolinux.cfg").write_text(
        f"DEFAULT vmm\nPROMPT 0\nTIMEOUT 0\nLABEL vmm\n  KERNEL /vmlinuz\n  APPEND initrd=/initrd.gz {cmdline}\n")
    iso = out_dir / "boot.iso"
    h.run(["xorriso", "-as", "mkisofs", "-quiet", "-o", str(iso), "-b", "isolinux/isolinux.bin",
           "-c", "isolinux/boot.cat", "-no-emul-boot", "-boot-load-size", "4", "-boot-info-table",
           "-R", "-J", str(tree)], 300)
    shutil.rmtree(tree)
    return iso, {"isolinux": v_iso, "syslinux-common": v_sys}


class Stage:
    """A directory tree that mirrors chosen host paths at the same absolute paths (symlinks kept,
    symlinked parents such as /lib -> usr/lib recreated), for `mkfs.ext4 -d`."""

    def __init__(self, top):
        self.top = top

    def _dest(self, path):
        return self.top / str(path).lstrip("/")

    def _parents(self, path):
        """Recreates PATH's parent directories, symlinks as symlinks; returns PATH with its parents
        resolved."""
        real = Path("/")
        for part in path.parts[1:-1]:
            real = real / part
            if real.is_symlink():
                self.add(real)
                real = real.resolve()
        return real / path.name

    def add(self, path, ignore=None):
        path = Path(os.path.abspath(path))
        if not os.path.lexists(path):
            return
        path = self._parents(path)
        dest = self._dest(path)
        if os.path.lexists(dest):
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            target = os.readlink(path)
            os.symlink(target, dest)
            target = path.parent / target
            if target.is_dir():  # a parent such as /lib -> usr/lib: the directory, not its contents
                self._dest(self._parents(Path(os.path.abspath(target)))).mkdir(parents=True, exist_ok=True)
            else:
                self.add(target)
        elif path.is_dir():
            shutil.copytree(path, dest, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(path, dest)

    def add_libraries(self, h):
        """Every shared library an ELF file in the tree needs (ldd), at its host path."""
        needed = set()
        for f in self.top.rglob("*"):
            if f.is_symlink() or not f.is_file() or (not os.access(f, os.X_OK) and ".so" not in f.name):
                continue
            with open(f, "rb") as fh:
                if fh.read(4) != b"\x7fELF":
                    continue
            r = subprocess.run(["ldd", str(f)], capture_output=True, text=True, timeout=60)
            for ln in r.stdout.splitlines():
                parts = ln.split()
                if "=>" in parts and len(parts) > parts.index("=>") + 1 and parts[parts.index("=>") + 1].startswith("/"):
                    needed.add(parts[parts.index("=>") + 1])
                elif parts and parts[0].startswith("/"):
                    needed.add(parts[0])  # the dynamic loader
        for lib in sorted(needed):
            self.add(lib)
        return len(needed)


def python_paths(h, venv_python):
    """The interpreter the venv's python resolves to and its standard library directories."""
    out = h.run([str(venv_python), "-c", "import sys, sysconfig; print(sys.base_prefix); "
                 "print(sysconfig.get_path('stdlib')); print(sysconfig.get_path('platstdlib'))"], 60)
    prefix, *stdlibs = out.split("\n")[:3]
    return Path(os.path.realpath(venv_python)), prefix, sorted(set(stdlibs))


def _ext4(h, image, tree, label, size):
    size = -(-size // CYLINDER) * CYLINDER
    image.unlink(missing_ok=True)
    h.run(["mkfs.ext4", "-q", "-F", "-L", label, "-d", str(tree), "-E", "root_owner=0:0", "-m", "0", "-b", "4096",
           str(image), f"{size // 1024}k"], 600)
    return image


def root_image(h, out_dir, project):
    """OUT_DIR/root.img (ext4, label vmm-root): the project checkout (with .venv and the built
    guests, without .git and build/), the Python install its venv links to, COMMANDS, the shared
    libraries of everything there, and a few /etc files; all at their host paths, so the venv's
    absolute paths hold inside. Rebuilt each run (it holds the checkout); about 200 MB."""
    tree = out_dir / "root"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    stage = Stage(tree)
    for d in ("proc", "sys", "dev", "tmp", "run"):
        (tree / d).mkdir()
    os.chmod(tree / "tmp", 0o1777)
    stage.add(project, ignore=lambda d, names: [n for n in names if Path(d) == project and n in (".git", "build")])
    # the venv's links out of the checkout (.venv/bin/python3 -> the interpreter it was made with)
    for link in (tree / str(project).lstrip("/")).rglob("*"):
        if link.is_symlink() and os.readlink(link).startswith("/"):
            stage.add(os.readlink(link))
    exe, prefix, stdlibs = python_paths(h, project / ".venv" / "bin" / "python")
    stage.add(exe)
    for lib in stdlibs:
        stage.add(lib, ignore=lambda d, names: [n for n in names if Path(d) == Path(lib) and
                                                (n in STDLIB_SKIP or n.startswith("config-"))])
    for top in ("bin", "sbin", "lib", "lib64"):  # merged-/usr links (chroot runs /bin/bash)
        if Path("/", top).is_symlink():
            stage.add(Path("/", top))
    for cmd in COMMANDS:
        found = shutil.which(cmd)
        if not found:
            raise h.HarnessError(f"{cmd} not found on this host (the Intel VM's disk takes it from here)")
        stage.add(found)
    for name in ETC:
        stage.add(Path("/etc") / name)
    nlibs = stage.add_libraries(h)
    # byte-code compiled on the host: compiling under Bochs costs ~100x what it does here
    h.run([str(exe), "-m", "compileall", "-q", "-j", "0", "-s", str(tree), "-p", "/",
           str(tree / str(project).lstrip("/") / "vmm"), str(tree / str(project).lstrip("/") / "tests")], 600)
    used = int(h.run(["du", "-sb", str(tree)], 120).split()[0])
    image = _ext4(h, out_dir / "root.img", tree, ROOT_LABEL, used * 5 // 4 + (64 << 20))
    shutil.rmtree(tree)
    h.log(f"root disk {image} ({used >> 20} MiB: {project}, Python {exe} ({prefix}), "
          f"{len(COMMANDS)} commands, {nlibs} libraries)", "intel")
    return image


def results_image(h, out_dir, run_env, size=64 << 20):
    """OUT_DIR/results.img (ext4, label vmm-results) holding run.env; the VM writes its results there."""
    tree = out_dir / "results-init"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir(parents=True)
    (tree / "run.env").write_text(run_env)
    image = _ext4(h, out_dir / "results.img", tree, RESULTS_LABEL, size)
    shutil.rmtree(tree)
    return image


def read_results(h, image, dest):
    """Copies the results image's files to DEST (debugfs: no loop device or mount needed)."""
    h.run(["debugfs", "-R", f"rdump / {dest}", str(image)], 300)
    shutil.rmtree(dest / "lost+found", ignore_errors=True)


# ---- the VM ----------------------------------------------------------------------------------------

CPU_MODEL = "tigerlake"  # VMX, AVX-512, XSAVE at the Intel offsets; "sapphire_rapids" panics Linux (AMX without XFD)
CMDLINE = "console=ttyS0 quiet panic=-1 oops=panic vmm_media=disk"


def bochsrc(bios, vgabios, iso, root_img, results_img, memory_mib, log_path):
    # no GUI, nothing interactive (a panic ends Bochs), COM1 to stdout (flushed per byte), IDE
    # disks: ata0 the two images, ata1 the boot CD-ROM
    return f"""\
display_library: nogui
config_interface: textconfig
romimage: file={bios}
vgaromimage: file={vgabios}
cpu: model={CPU_MODEL}, count=1, ips=50000000, reset_on_triple_fault=0, ignore_bad_msrs=1
memory: guest={memory_mib}, host={memory_mib}
pci: enabled=1, chipset=i440fx
clock: sync=none, time0=utc
ata0: enabled=1, ioaddr1=0x1f0, ioaddr2=0x3f0, irq=14
ata1: enabled=1, ioaddr1=0x170, ioaddr2=0x370, irq=15
ata0-master: type=disk, mode=flat, path={root_img}
ata0-slave: type=disk, mode=flat, path={results_img}
ata1-master: type=cdrom, path={iso}, status=inserted
boot: cdrom
com1: enabled=1, mode=file, dev=/dev/stdout
log: {log_path}
panic: action=fatal
error: action=report
info: action=report
debug: action=ignore
"""


SERIES = "6.12"  # 6.1 prints nothing on the console under Bochs (stops after "LSM: Security Framework")
# the pytest subset (Python runs 25-70 times slower than on the host there): the XSAVE tests against KVM
# and the AVX-512 guest's, the ones whose answers depend on the Intel layout
PYTEST_FILES = "tests/test_xsave_kvm.py tests/test_guests.py::test_avx512_guest_syncs_at_cpl3_with_its_patterns"


# A nested guest that never exits (`pause; jmp` at CPL3) is never stopped under Bochs: the L1 kernel
# does not get control back (neither vmm's --timeout nor timeout(1) fire within minutes), whatever
# kvm_intel's preemption_timer, ple_gap or enable_apicv, lapic=notscdeadline or Bochs's clock sync
SKIP_GUESTS = {"spin": "never stopped under Bochs: while the nested guest spins the L1 kernel does not "
                       "get control back (vmm's --timeout and timeout(1) do not fire); an emulator limit"}


def not_run(args):
    """What the Intel run leaves out, and why."""
    out = {f"vmm run {g}": why for g, why in SKIP_GUESTS.items() if "guests" in args.intel_steps.split()}
    if "pytest" in args.intel_steps.split():
        out["pytest"] = f"all but {args.intel_pytest} (Python runs 25-70 times slower there)"
    return out


def add_arguments(ap):
    g = ap.add_argument_group("kvm_intel under Bochs 3.0 (--intel)")
    g.add_argument("--intel", action="store_true",
                   help=f"also run Linux {SERIES} with kvm_intel under Bochs (`make test-kernels INTEL=1`)")
    g.add_argument("--no-amd", action="store_true", help="skip the kvm_amd kernels (with --intel)")
    g.add_argument("--bochs-tarball", help="the Bochs 3.0 source tarball (default: VMM_BOCHS_TARBALL, "
                   "else ../shared/vendor/bochs-3.0.devel-*.tar.xz beside the checkout)")
    g.add_argument("--intel-steps", default="caps cpuid probe guests pytest",
                   help="what to run inside the Bochs VM (default: %(default)s)")
    g.add_argument("--intel-pytest", default=PYTEST_FILES,
                   help="test files or node ids run there, one pytest process each (default: %(default)s)")
    g.add_argument("--intel-deadline", type=int, default=3600, help="seconds for the whole Bochs VM")
    g.add_argument("--intel-memory", type=int, default=2048, help="Bochs VM RAM in MiB")
    g.add_argument("--intel-test-timeout", type=int, default=60,
                   help="seconds of the VM's clock for each test there (pytest-timeout); that clock "
                   "runs about 10 times slower than the host's")


class Target:
    """What the Intel run boots: filled by prepare(), used by run()."""


def prepare(h, args, busybox, cache):
    """Builds (or finds cached) everything before any VM starts: Bochs, the ROMs, the 6.12 kernel, its
    kvm_intel initramfs and boot ISO. Returns a Target and the versions used."""
    t = Target()
    tarball = find_tarball(h, h.ROOT, cache, args.bochs_tarball)
    t.bochs, digest = build_bochs(h, cache, tarball)
    h.ensure_host_tools({"xorriso": "xorriso", "mkfs.ext4": "e2fsprogs", "debugfs": "e2fsprogs",
                         "ldd": "libc-bin"})
    bios_root, v_bios = h.fetch_package("bochsbios")
    vga_root, v_vga = h.fetch_package("vgabios")
    t.bios = bios_root / "usr/share/bochs/BIOS-bochs-latest"
    t.vgabios = vga_root / "usr/share/vgabios/vgabios.bin"
    t.kernel = h.Kernel(SERIES)
    initrd = h.build_initramfs(t.kernel, "kvm_intel", busybox, MODULES)
    # images hold this checkout: one directory per checkout, so two checkouts never share one
    t.dir = cache / "intel" / hashlib.sha256(str(h.ROOT).encode()).hexdigest()[:12]
    t.dir.mkdir(parents=True, exist_ok=True)
    t.iso, v_iso = iso_image(h, t.dir, t.kernel, initrd, CMDLINE)
    versions = {"bochs": f"{tarball.name} sha256 {digest}", "bochsbios": v_bios, "vgabios": v_vga,
                **v_iso, t.kernel.package: t.kernel.version}
    return t, versions


def run(h, t, args, results):
    """Boots the Bochs VM, runs the steps inside, reads the results disk back into RESULTS;
    returns the console run (ConsoleRun) and Bochs's exit status."""
    t0 = time.monotonic()
    for lock in t.dir.glob("*.lock"):  # Bochs's image locks, left behind when a deadline killed it
        lock.unlink()
    root_img = root_image(h, t.dir, h.ROOT)
    results_img = results_image(h, t.dir, h.run_env(args, steps=args.intel_steps, pytest_files=args.intel_pytest,
                                                    test_timeout=args.intel_test_timeout,
                                                    skip_guests=" ".join(SKIP_GUESTS)))
    h.log(f"disk images ready in {time.monotonic() - t0:.0f} s", "intel")
    rc_path = t.dir / "bochsrc"
    rc_path.write_text(bochsrc(t.bios, t.vgabios, t.iso, root_img, results_img, args.intel_memory,
                               results / "bochs.log"))
    h.log(f"Linux {t.kernel.release} ({t.kernel.package} {t.kernel.version}) under Bochs, cpu {CPU_MODEL}; "
          f"console log {results / 'console.log'}", "intel")
    console = h.ConsoleRun([str(t.bochs), "-q", "-f", str(rc_path)], results / "console.log",
                           args.intel_deadline, echo=args.verbose, who="intel")
    rc = console.run()
    read_results(h, results_img, results)
    return console, rc
