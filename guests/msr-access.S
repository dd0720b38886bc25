/*
 * msr-access: the guest side of the kernel's KVM msrs_test. Loops: SYNC 0x100 (the host puts an
 * MSR index in %rbx, a value in %r12 and in %r13 1 to write it first, 0 to only read), WRMSR then
 * RDMSR through the CPL0 runtime services (a #GP there is reported as a fault), the value read
 * stored at SCRATCH, SYNC 0x200.
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
1:	SYNC 0x100
	test %r13, %r13
	jz 2f
	mov %ebx, %esi
	mov %r12, %rdx
	SVC SVC_WRMSR
2:	mov %ebx, %esi
	SVC SVC_RDMSR
	mov %rax, SCRATCH
	SYNC 0x200
	jmp 1b
