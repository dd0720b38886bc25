/* sync: three SYNCs with distinct values (0x11, 0x22, 0x33), then DONE. */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	SYNC 0x11
	SYNC 0x22
	SYNC 0x33
	DONE
