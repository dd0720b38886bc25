/*
 * rep-ins: the scenario of the kernel's KVM userspace_io_test at CPL3: SYNC 1, then `rep insb` of
 * 8192 bytes from port 0x80 into SCRATCH; SYNCs the count left in %rcx, the bytes %rdi advanced and
 * how many of the 8192 bytes are 0xaa (the host fills each port 0x80 read with 0xaa); then DONE.
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	SYNC 1
	cld
	mov $SCRATCH, %rdi
	mov $8192, %ecx
	mov $0x80, %dx
	rep insb
	mov %rdi, %rbx
	SYNC_REG %ecx			/* count left: 0 */
	sub $SCRATCH, %rbx
	SYNC_REG %ebx			/* bytes advanced: 8192 */
	mov $SCRATCH, %rsi
	mov $8192, %ecx
	xor %ebx, %ebx
1:	cmpb $0xaa, (%rsi)
	jne 2f
	inc %ebx
2:	inc %rsi
	dec %ecx
	jnz 1b
	SYNC_REG %ebx			/* bytes that are 0xaa: 8192 */
	DONE
