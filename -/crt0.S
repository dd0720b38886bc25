/*
 * crt0.S: the CPL3 entry of a C payload (guest SDK). The runtime starts the payload at its first
 * byte (guest.ld puts .text.entry first) in 64-bit mode at CPL3, %rsi = vCPU index, %rsp = the
 * vCPU's stack top. Calls vmm_main(vcpu) on a 16-byte aligned stack (SysV ABI); 0 -> DONE,
 * anything else -> FAIL(value). Also the memset/memcpy/memmove/memcmp gcc may emit calls to.
 */
	.include "vmm.inc"
	.code64
	.section .text.entry, "ax"
	.globl _start
_start:
	mov %esi, %edi
	and $-16, %rsp
	xor %ebp, %ebp
	call vmm_main
	test %eax, %eax
	jnz 1f
	DONE
	jmp _start	/* the host does not resume a DONE guest; if it does, start over */
1:	mov $PORT_FAIL, %dx
	out %eax, %dx
	jmp 1b

	.text
	.globl memset, memcpy, memmove, memcmp
memset:			/* (dst, byte, n) -> dst */
	mov %rdi, %r8
	mov %esi, %eax
	mov %rdx, %rcx
	rep stosb
	mov %r8, %rax
	ret
memcpy:			/* (dst, src, n) -> dst */
	mov %rdi, %rax
	mov %rdx, %rcx
	rep movsb
	ret
memmove:		/* (dst, src, n) -> dst, overlapping allowed */
	mov %rdi, %rax
	mov %rdx, %rcx
	cmp %rsi, %rdi
	jbe 1f
	lea -1(%rsi,%rcx), %rsi
	lea -1(%rdi,%rcx), %rdi
	std
	rep movsb
	cld
	ret
1:	rep movsb
	ret
memcmp:			/* (a, b, n) -> <0, 0, >0 */
	xor %eax, %eax
	test %rdx, %rdx
	jz 2f
1:	movzbl (%rdi), %eax
	movzbl (%rsi), %ecx
	sub %ecx, %eax
	jnz 2f
	inc %rdi
	inc %rsi
	dec %rdx
	jnz 1b
2:	ret
	.section .note.GNU-stack, "", @progbits
