/* triple-fault: asks the runtime to load an empty IDT and fault: #UD -> #GP -> #DF -> shutdown. */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	SVC SVC_TRIPLE_FAULT
	FAIL 1
