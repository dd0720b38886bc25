/*
 * compat.h: uAPI pieces that older installed <linux/kvm.h> headers lack.
 * Everything is under #ifndef so a newer header always wins.
 */
#ifndef VMM_COMPAT_H
#define VMM_COMPAT_H

#include <linux/kvm.h>

#ifndef KVM_CAP_XSAVE2
#define KVM_CAP_XSAVE2 208
#endif
#ifndef KVM_GET_XSAVE2
#define KVM_GET_XSAVE2 _IOR(KVMIO, 0xcf, struct kvm_xsave)
#endif
#ifndef KVM_CAP_VM_TSC_CONTROL
#define KVM_CAP_VM_TSC_CONTROL 214
#endif
#ifndef KVM_CAP_SYNC_REGS
#define KVM_CAP_SYNC_REGS 74
#endif

/* x86 ONE_REG encodings, Linux 6.18 (arch/x86/include/uapi/asm/kvm.h). */
#ifndef KVM_X86_REG_TYPE_MSR
#define KVM_X86_REG_TYPE_MSR 2
#endif
#ifndef KVM_X86_REG_TYPE_KVM
#define KVM_X86_REG_TYPE_KVM 3
#endif
#ifndef KVM_REG_GUEST_SSP
#define KVM_REG_GUEST_SSP 0
#endif
#ifndef KVM_X86_REG_ID
/* The 6.18 header sizes only MSRs and GUEST_SSP as U64 (the only registers that exist). */
#define KVM_X86_REG_ID(type, index) \
	(KVM_REG_X86 | KVM_REG_SIZE_U64 | ((__u64)(type) << 32) | (__u64)(index))
#endif
#ifndef KVM_X86_REG_MSR
#define KVM_X86_REG_MSR(index) KVM_X86_REG_ID(KVM_X86_REG_TYPE_MSR, index)
#endif
#ifndef KVM_X86_REG_KVM
#define KVM_X86_REG_KVM(index) KVM_X86_REG_ID(KVM_X86_REG_TYPE_KVM, index)
#endif

#endif
