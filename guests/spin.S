/* spin: never ends; the host's wall-clock timeout must stop it. */
	.code64
	.section .text.entry
	.globl _start
_start:
1:	pause
	jmp 1b
