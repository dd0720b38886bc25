# cffi_modules needs setup.py: `pip install .` compiles cdefs/ into vmm._kvm. The built-in guests are
# built here too (make -C guests: GNU make, as, ld, objcopy, nm) and installed as package data in
# vmm/guest/builtin/ (vmm.guest.catalog reads them there), so a wheel carries them.
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class build_py_with_guests(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):  # an editable install reads guests/build/ in place
            return
        guests = ROOT / "guests"
        subprocess.run(["make", "-s", "-C", str(guests)], check=True)
        dest = Path(self.build_lib) / "vmm" / "guest" / "builtin"
        dest.mkdir(parents=True, exist_ok=True)
        # the sources give `vmm guests` its descriptions; the binaries and symbols are what runs
        for src in [*guests.glob("*.S"), *(guests / "build").glob("*.bin"), *(guests / "build").glob("*.sym")]:
            shutil.copyfile(src, dest / src.name)


setup(cffi_modules=["vmm/_build.py:ffibuilder"], cmdclass={"build_py": build_py_with_guests})
