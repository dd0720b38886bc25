"""cffi API-mode builder: compiles cdefs/ against the system <linux/kvm.h>.

The compiler checks every struct layout declared in cdefs/kvm.cdef, and
vmm_hdr_ioctls[] records each ioctl number as the installed header defines
it, for the test that compares our computed numbers with the header.
"""

import os
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
CDEFS = os.path.join(os.path.dirname(HERE), "cdefs")
sys.path.insert(0, HERE)
from _ioctls import IOCTLS  # noqa: E402  (plain data, no package import at build time)

sys.path.pop(0)


def _read(name):
    with open(os.path.join(CDEFS, name)) as f:
        return f.read()


def _hdr_table():
    rows = []
    for name, *_ in IOCTLS:
        rows.append(
            f"#ifdef {name}\n\t{{\"{name}\", {name}, 1}},\n#else\n\t{{\"{name}\", 0, 0}},\n#endif"
        )
    return (
        "const struct vmm_hdr_ioctl vmm_hdr_ioctls[] = {\n"
        + "\n".join(rows)
        + "\n};\nconst int vmm_hdr_nioctls = sizeof(vmm_hdr_ioctls) / sizeof(vmm_hdr_ioctls[0]);\n"
    )


ffibuilder = FFI()
ffibuilder.cdef(_read("kvm.cdef"))
ffibuilder.set_source(
    "vmm._kvm",
    "#include <stdint.h>\n"
    "#include <linux/kvm.h>\n"
    '#include "compat.h"\n'
    "struct vmm_hdr_ioctl { const char *name; unsigned long value; int defined; };\n"
    + _hdr_table()
    + _read("helpers.c")
    + _read("fastpath.c")
    + _read("runloop.c"),
    include_dirs=[CDEFS],
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=os.path.dirname(HERE), verbose=False)
