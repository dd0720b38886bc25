"""ffi/lib of the compiled uAPI, the ioctl request numbers, and ioctl()."""

import ioctl_opt

from ._ioctls import IOCTLS
from .errors import KvmError

try:
    from ._kvm import ffi, lib
except ImportError as e:  # pragma: no cover - a build problem, not a runtime one
    raise ImportError(
        "vmm's cffi module is not built: run `make dev` (or `pip install -e .`) in the source tree"
    ) from e

_DIRS = {
    "_IO": ioctl_opt.IOC_NONE,
    "_IOR": ioctl_opt.IOC_READ,
    "_IOW": ioctl_opt.IOC_WRITE,
    "_IOWR": ioctl_opt.IOC_READ | ioctl_opt.IOC_WRITE,
}


def _request(direction, nr, argtype):
    size = ffi.sizeof(argtype) if argtype else 0
    return ioctl_opt.IOC(_DIRS[direction], lib.KVMIO, nr, size)


REQUEST = {name: _request(d, nr, t) for name, d, nr, t in IOCTLS}


def header_requests():
    """{name: value} for every ioctl the installed <linux/kvm.h> defines."""
    out = {}
    for i in range(lib.vmm_hdr_nioctls):
        row = lib.vmm_hdr_ioctls[i]
        if row.defined:
            out[ffi.string(row.name).decode()] = row.value
    return out


def ioctl(fd, name, arg=None, detail=None):
    """Issue ioctl `name` on fd; arg is a cdata pointer or an int. Raises KvmError."""
    req = REQUEST[name]
    if arg is None:
        r = lib.vmm_ioctl_int(fd, req, 0)
    elif isinstance(arg, int):
        r = lib.vmm_ioctl_int(fd, req, arg)
    else:
        r = lib.vmm_ioctl(fd, req, arg)
    if r < 0:
        raise KvmError(name, -r, detail=detail)
    return r
