/*
 * msr-report: SYNC 1 (the host may set registers), then reads MSR_KERNEL_GS_BASE, MSR_STAR,
 * MSR_LSTAR and MSR_EFER through the CPL0 runtime, prints each, and for each stores the value
 * at SCRATCH + 8*i and SYNCs the MSR index; then DONE.
 */
	.include "vmm.inc"
	.include "lib.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	SYNC 1
	xor %r12d, %r12d
next:	lea msrs(%rip), %rax
	mov (%rax, %r12, 4), %r13d
	test %r13d, %r13d
	jz done
	mov %r13d, %esi
	SVC SVC_RDMSR
	mov %rax, SCRATCH(, %r12, 8)
	mov %rax, %r14
	lea label(%rip), %rsi
	PUTS label
	mov %r13, %rax
	PUTHEX
	PUTC ' '
	PUTC '='
	PUTC ' '
	mov %r14, %rax
	PUTHEX
	PUTC '\n'
	SYNC_REG %r13d
	inc %r12
	jmp next
done:	DONE

	.section .rodata
	.balign 4
msrs:	.long 0xC0000102, 0xC0000081, 0xC0000082, 0xC0000080, 0
label:	.asciz "guest reads MSR "
