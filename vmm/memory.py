"""GuestMemory: an anonymous (or file-backed, private) mapping registered as a KVM memory slot."""

import mmap
import struct

from ._bindings import ffi


class GuestMemory:
    """Host memory backing one guest-physical range [gpa, gpa + size)."""

    def __init__(self, size, gpa=0, fileobj=None, file_offset=0):
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"guest memory size must be a positive multiple of {mmap.PAGESIZE}: {size}")
        self.size = size
        self.gpa = gpa
        self.anonymous = fileobj is None
        if fileobj is None:
            try:
                self._mm = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                                     prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as e:  # ENOMEM: say how much was asked for
                raise MemoryError(f"cannot map {size >> 20} MiB of guest memory: {e.strerror}; "
                                  "give a smaller --memory") from None
        else:
            # Copy-on-write view of a file: pages load lazily on first touch.
            self._mm = mmap.mmap(fileobj.fileno(), size, flags=mmap.MAP_PRIVATE,
                                 prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=file_offset)
        self._buf = ffi.from_buffer(self._mm)
        self.hva = int(ffi.cast("uintptr_t", self._buf))

    @property
    def view(self):
        return memoryview(self._mm)

    def _check(self, gpa, n):
        off = gpa - self.gpa
        if off < 0 or off + n > self.size:
            raise ValueError(f"guest range 0x{gpa:x}+{n} is outside memory 0x{self.gpa:x}+0x{self.size:x}")
        return off

    def read(self, gpa, n):
        off = self._check(gpa, n)
        return bytes(self._mm[off:off + n])

    def write(self, gpa, data):
        off = self._check(gpa, len(data))
        self._mm[off:off + len(data)] = data

    def read_u8(self, gpa):
        return self.read(gpa, 1)[0]

    def read_u32(self, gpa):
        return struct.unpack_from("<I", self._mm, self._check(gpa, 4))[0]

    def read_u64(self, gpa):
        return struct.unpack_from("<Q", self._mm, self._check(gpa, 8))[0]

    def write_u32(self, gpa, v):
        struct.pack_into("<I", self._mm, self._check(gpa, 4), v)

    def write_u64(self, gpa, v):
        struct.pack_into("<Q", self._mm, self._check(gpa, 8), v)

    def close(self):
        if self._mm is not None:
            ffi.release(self._buf)
            self._buf = None
            try:
                self._mm.close()
            except BufferError:
                pass  # a caller still holds a view: the mapping goes when the last view does
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
