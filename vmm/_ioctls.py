"""The KVM ioctls this project issues, as the uAPI header declares them.

Each row is (name, direction, nr, argument type): the request number is
computed from it by ioctl-opt with the argument size taken from the compiled
cffi module, and a test checks every number against <linux/kvm.h>.
This module is plain data so the cffi builder can read it too.
"""

NONE, R, W, RW = "_IO", "_IOR", "_IOW", "_IOWR"

IOCTLS = [
    # /dev/kvm
    ("KVM_GET_API_VERSION", NONE, 0x00, None),
    ("KVM_CREATE_VM", NONE, 0x01, None),
    ("KVM_GET_MSR_INDEX_LIST", RW, 0x02, "struct kvm_msr_list"),
    ("KVM_CHECK_EXTENSION", NONE, 0x03, None),
    ("KVM_GET_VCPU_MMAP_SIZE", NONE, 0x04, None),
    ("KVM_GET_SUPPORTED_CPUID", RW, 0x05, "struct kvm_cpuid2"),
    ("KVM_GET_MSR_FEATURE_INDEX_LIST", RW, 0x0A, "struct kvm_msr_list"),
    # VM fd
    ("KVM_CREATE_VCPU", NONE, 0x41, None),
    ("KVM_SET_USER_MEMORY_REGION", W, 0x46, "struct kvm_userspace_memory_region"),
    ("KVM_SET_TSS_ADDR", NONE, 0x47, None),
    ("KVM_SET_IDENTITY_MAP_ADDR", W, 0x48, "__u64"),
    ("KVM_CREATE_IRQCHIP", NONE, 0x60, None),
    ("KVM_GET_IRQCHIP", RW, 0x62, "struct kvm_irqchip"),
    ("KVM_SET_IRQCHIP", R, 0x63, "struct kvm_irqchip"),
    ("KVM_CREATE_PIT2", W, 0x77, "struct kvm_pit_config"),
    ("KVM_SET_CLOCK", W, 0x7B, "struct kvm_clock_data"),
    ("KVM_GET_CLOCK", R, 0x7C, "struct kvm_clock_data"),
    ("KVM_GET_PIT2", R, 0x9F, "struct kvm_pit_state2"),
    ("KVM_SET_PIT2", W, 0xA0, "struct kvm_pit_state2"),
    # vCPU fd
    ("KVM_RUN", NONE, 0x80, None),
    ("KVM_GET_REGS", R, 0x81, "struct kvm_regs"),
    ("KVM_SET_REGS", W, 0x82, "struct kvm_regs"),
    ("KVM_GET_SREGS", R, 0x83, "struct kvm_sregs"),
    ("KVM_SET_SREGS", W, 0x84, "struct kvm_sregs"),
    ("KVM_GET_MSRS", RW, 0x88, "struct kvm_msrs"),
    ("KVM_SET_MSRS", W, 0x89, "struct kvm_msrs"),
    ("KVM_GET_FPU", R, 0x8C, "struct kvm_fpu"),
    ("KVM_SET_FPU", W, 0x8D, "struct kvm_fpu"),
    ("KVM_GET_LAPIC", R, 0x8E, "struct kvm_lapic_state"),
    ("KVM_SET_LAPIC", W, 0x8F, "struct kvm_lapic_state"),
    ("KVM_SET_CPUID2", W, 0x90, "struct kvm_cpuid2"),
    ("KVM_GET_CPUID2", RW, 0x91, "struct kvm_cpuid2"),
    ("KVM_GET_MP_STATE", R, 0x98, "struct kvm_mp_state"),
    ("KVM_SET_MP_STATE", W, 0x99, "struct kvm_mp_state"),
    ("KVM_GET_VCPU_EVENTS", R, 0x9F, "struct kvm_vcpu_events"),
    ("KVM_SET_VCPU_EVENTS", W, 0xA0, "struct kvm_vcpu_events"),
    ("KVM_GET_DEBUGREGS", R, 0xA1, "struct kvm_debugregs"),
    ("KVM_SET_DEBUGREGS", W, 0xA2, "struct kvm_debugregs"),
    ("KVM_SET_TSC_KHZ", NONE, 0xA2, None),
    ("KVM_GET_TSC_KHZ", NONE, 0xA3, None),
    ("KVM_GET_XSAVE", R, 0xA4, "struct kvm_xsave"),
    ("KVM_SET_XSAVE", W, 0xA5, "struct kvm_xsave"),
    ("KVM_GET_XCRS", R, 0xA6, "struct kvm_xcrs"),
    ("KVM_SET_XCRS", W, 0xA7, "struct kvm_xcrs"),
    ("KVM_GET_ONE_REG", W, 0xAB, "struct kvm_one_reg"),
    ("KVM_SET_ONE_REG", W, 0xAC, "struct kvm_one_reg"),
    ("KVM_GET_REG_LIST", RW, 0xB0, "struct kvm_reg_list"),
    ("KVM_GET_XSAVE2", R, 0xCF, "struct kvm_xsave"),
]
