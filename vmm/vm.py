"""Vm: one KVM virtual machine (VM-fd ioctls), its memory slots and vCPUs."""

import os

from ._bindings import ffi, ioctl, lib
from .memory import GuestMemory


class Vm:
    def __init__(self, kvm, fd):
        self.kvm = kvm
        self.fd = fd
        self.memory = []  # GuestMemory per slot, slot number = index
        self.vcpus = []
        self.has_irqchip = False
        self.has_pit = False

    # --- capabilities -------------------------------------------------------------------------
    def check_extension(self, cap):
        """KVM_CHECK_EXTENSION on the VM fd (some answers, e.g. KVM_CAP_XSAVE2, are per VM)."""
        if isinstance(cap, str):
            cap = getattr(lib, cap)
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", cap)

    def get_tsc_khz(self):
        """KVM_GET_TSC_KHZ on the VM fd (Linux 5.19+, KVM_CAP_VM_TSC_CONTROL): the TSC rate (kHz)
        new vCPUs of this VM start with; else that of a new vCPU. Either is the host's rate unless
        KVM_SET_TSC_KHZ changed it (arch/x86/kvm/x86.c)."""
        if self.kvm.check_extension("KVM_CAP_VM_TSC_CONTROL"):
            return ioctl(self.fd, "KVM_GET_TSC_KHZ")
        with self.create_vcpu() as v:
            return v.get_tsc_khz()

    def xsave2_size(self):
        """Bytes KVM_GET_XSAVE2 fills, asked anew each time: it grows after an AMX permission
        request (arch_prctl) and must never be cached across one. 0 means no KVM_CAP_XSAVE2."""
        return self.check_extension(lib.KVM_CAP_XSAVE2)

    # --- memory -------------------------------------------------------------------------------
    def set_user_memory_region(self, slot, gpa, size, hva, flags=0):
        region = ffi.new("struct kvm_userspace_memory_region *",
                         {"slot": slot, "flags": flags, "guest_phys_addr": gpa,
                          "memory_size": size, "userspace_addr": hva})
        ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)

    def add_memory(self, size, gpa=0, fileobj=None, file_offset=0):
        """Map host memory and register it as the next slot; returns the GuestMemory."""
        mem = GuestMemory(size, gpa, fileobj=fileobj, file_offset=file_offset)
        try:
            self.set_user_memory_region(len(self.memory), gpa, size, mem.hva)
        except BaseException:
            mem.close()
            raise
        self.memory.append(mem)
        return mem

    def mem_at(self, gpa, n=1):
        for m in self.memory:
            if m.gpa <= gpa and gpa + n <= m.gpa + m.size:
                return m
        raise ValueError(f"guest address 0x{gpa:x} is not backed by any memory slot")

    def read(self, gpa, n):
        return self.mem_at(gpa, n).read(gpa, n)

    def write(self, gpa, data):
        self.mem_at(gpa, len(data)).write(gpa, data)

    # --- platform -----------------------------------------------------------------------------
    def set_tss_addr(self, addr):
        ioctl(self.fd, "KVM_SET_TSS_ADDR", addr)

    def set_identity_map_addr(self, addr):
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("__u64 *", addr))

    def create_irqchip(self):
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")
        self.has_irqchip = True

    def get_irqchip(self, chip_id):
        c = ffi.new("struct kvm_irqchip *", {"chip_id": chip_id})
        ioctl(self.fd, "KVM_GET_IRQCHIP", c)
        return bytes(ffi.buffer(c))

    def set_irqchip(self, raw):
        c = ffi.new("struct kvm_irqchip *")
        ffi.buffer(c)[:] = raw
        ioctl(self.fd, "KVM_SET_IRQCHIP", c)

    def create_pit2(self):
        ioctl(self.fd, "KVM_CREATE_PIT2", ffi.new("struct kvm_pit_config *"))
        self.has_pit = True

    def get_pit2(self):
        c = ffi.new("struct kvm_pit_state2 *")
        ioctl(self.fd, "KVM_GET_PIT2", c)
        return bytes(ffi.buffer(c))

    def set_pit2(self, raw):
        c = ffi.new("struct kvm_pit_state2 *")
        ffi.buffer(c)[:] = raw
        ioctl(self.fd, "KVM_SET_PIT2", c)

    def get_clock(self):
        c = ffi.new("struct kvm_clock_data *")
        ioctl(self.fd, "KVM_GET_CLOCK", c)
        return c.clock

    def set_clock(self, clock):
        ioctl(self.fd, "KVM_SET_CLOCK", ffi.new("struct kvm_clock_data *", {"clock": clock}))

    # --- vCPUs --------------------------------------------------------------------------------
    def create_vcpu(self, vcpu_id=None):
        from .vcpu import Vcpu
        vcpu_id = len(self.vcpus) if vcpu_id is None else vcpu_id
        fd = ioctl(self.fd, "KVM_CREATE_VCPU", vcpu_id)
        try:
            vcpu = Vcpu(self, fd, vcpu_id)
        except BaseException:
            os.close(fd)
            raise
        self.vcpus.append(vcpu)
        return vcpu

    def close(self):
        for v in self.vcpus:
            v.close()
        self.vcpus = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # KVM drops its references to the memory with the VM fd; only then unmap.
        for m in self.memory:
            m.close()
        self.memory = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
