/*
 * xcr0: the scenario of the kernel's KVM xcr0_cpuid_test. SYNCs XCR0[31:0] as XGETBV reads it at
 * CPL3, then loops: SYNC 0x100 (the host puts an XCR0 value in %rbx), XSETBV(0, %rbx) through the
 * CPL0 runtime service (a #GP there is reported as a fault), SYNC of XCR0[31:0] read back.
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	xor %ecx, %ecx
	xgetbv
	mov %eax, %ebx
	SYNC_REG %ebx
1:	SYNC 0x100
	mov %rbx, %rdx
	xor %esi, %esi
	SVC SVC_XSETBV
	xor %ecx, %ecx
	xgetbv
	mov %eax, %ecx
	SYNC_REG %ecx
	jmp 1b
