"""The cffi module against the installed uAPI header: ioctl numbers and layouts."""

from vmm import _bindings, regs
from vmm._bindings import REQUEST, ffi, lib
from vmm._ioctls import IOCTLS


def test_every_ioctl_number_matches_the_header():
    hdr = _bindings.header_requests()
    # the installed header must know (almost) all of them, or this test checks nothing
    assert len(hdr) >= len(IOCTLS) - 2, sorted(set(REQUEST) - set(hdr))
    mismatched = {n: (hex(REQUEST[n]), hex(v)) for n, v in hdr.items() if REQUEST[n] != v}
    assert not mismatched


def test_request_numbers_encode_direction_and_size():
    import ioctl_opt
    r = REQUEST["KVM_GET_XSAVE2"]
    assert ioctl_opt.IOC_DIR(r) == ioctl_opt.IOC_READ
    assert ioctl_opt.IOC_SIZE(r) == 4096 and ioctl_opt.IOC_NR(r) == 0xCF
    assert ioctl_opt.IOC_TYPE(r) == 0xAE  # KVMIO


def test_uapi_struct_sizes():
    # fixed by the ABI: a mismatch here means the bindings are wrong, not the kernel
    assert ffi.sizeof("struct kvm_xsave") == 4096
    assert ffi.sizeof("struct kvm_regs") == 18 * 8
    assert ffi.sizeof("struct kvm_sregs") == 312
    assert ffi.sizeof("struct kvm_lapic_state") == 1024
    assert ffi.sizeof("struct kvm_cpuid_entry2") == 40
    assert ffi.offsetof("struct kvm_run", "s") == 304  # the sync-regs area


def test_one_reg_constants_match_the_compiled_header():
    assert regs.KVM_REG_X86 == lib.KVM_REG_X86
    assert regs.KVM_REG_SIZE_U64 == lib.KVM_REG_SIZE_U64
    assert regs.KVM_REG_ARCH_MASK == lib.KVM_REG_ARCH_MASK
    assert regs.KVM_REG_SIZE_SHIFT == lib.KVM_REG_SIZE_SHIFT
    assert regs.KVM_X86_REG_TYPE_MSR == lib.KVM_X86_REG_TYPE_MSR
    assert regs.KVM_X86_REG_TYPE_KVM == lib.KVM_X86_REG_TYPE_KVM
    assert regs.KVM_REG_GUEST_SSP == lib.KVM_REG_GUEST_SSP
