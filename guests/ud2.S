/* ud2: executes an undefined opcode; the host reports #UD with the RIP of the ud2. */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	nop
	.globl ud2_here
ud2_here:
	ud2
	FAIL 1
