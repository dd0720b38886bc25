/* hello: print one line on the console, then DONE. */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	PUTS msg
	DONE
	.section .rodata
msg:	.asciz "Hello from a vmm guest!\n"
