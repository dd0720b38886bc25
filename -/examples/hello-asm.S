/* hello-asm: print a line, SYNC host argument 0 plus 1 (checked by the host), then DONE. */
	.include "vmm.inc"
	.code64
	.section .text.entry, "ax"
	.globl _start
_start:
	PUTS msg
	ARG 0
	inc %rax
	SYNC_REG %eax
	DONE
	.section .rodata
msg:	.asciz "hello from an SDK assembly guest\n"
