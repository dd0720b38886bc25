/*
 * bench: the guest of `make bench`. Loads x87/SSE registers with known values (so the XSAVE area
 * carries real state), SYNC 1 (the save/restore point), then forever: COUNT port writes of 0x42
 * to PORT, then SYNC 2. COUNT (u64) and PORT (u16) are read from SCRATCH and SCRATCH + 8 before
 * each batch; the host writes them. PORT 0x510 is a port the VMM ignores (handled in its run
 * loop); PORT 0x500 makes every write a SYNC event.
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	fninit
	mov $0x3FF8000000000000, %rax		/* 1.5 */
	movq %rax, %xmm0
	mov $0x0123456789ABCDEF, %rax
	movq %rax, %xmm1
	pshufd $0x44, %xmm1, %xmm1
	movdqa %xmm1, %xmm7
	movdqa %xmm1, %xmm15
	mov %rax, SCRATCH + 0x100
	fildq SCRATCH + 0x100
	fld1
	SYNC 1
	.globl batch
batch:
	mov SCRATCH, %rcx
	movzwl SCRATCH + 8, %edx
	mov $0x42, %eax
1:	out %eax, %dx
	dec %rcx
	jnz 1b
	SYNC 2
	jmp batch
