/*
 * checkpoint: fills GPRs, x87, ZMM0-31 (so XMM/YMM) and K0-7 with patterns distinct per vCPU
 * (index in %rsi at entry), and 64 KiB of memory at SCRATCH + 0x10000 + index * 0x10000; SYNC 1
 * (the snapshot point); then checks every register and the memory and reports DONE, or
 * FAIL(code): 0x1nn GPR n, 0x2nn ZMMn, 0x3nn Kn, 0x4nn x87 ST(n), 0x5nn memory, 0x600 vCPU index.
 * Patterns (v = vCPU index): GPR n = 0xC0DE000000000000 | v << 32 | n;
 * ZMMn qword j = 0xA5A5000000000000 | v << 32 | n << 8 | j; Kn = 0x4B4B000000000000 | v << 32 | n;
 * ST(i) = fild of (8 - i) + 16 * v; memory qword i = i * 0x9E3779B97F4A7C15 ^ v.
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	mov %rsi, %r15				/* vCPU index, kept in r15 and in memory */
	mov %r15, SCRATCH + 0xF000(, %r15, 8)

	/* memory pattern */
	mov %r15, %rdi
	shl $16, %rdi
	add $(SCRATCH + 0x10000), %rdi
	xor %ecx, %ecx
	mov $0x9E3779B97F4A7C15, %rbx
1:	mov %rcx, %rax
	imul %rbx, %rax
	xor %r15, %rax
	mov %rax, (%rdi, %rcx, 8)
	inc %ecx
	cmp $8192, %ecx
	jne 1b

	/* ZMM patterns through a per-vCPU staging area at SCRATCH + 0x40000 + v * 0x800 */
	mov %r15, %rdi
	shl $11, %rdi
	add $(SCRATCH + 0x40000), %rdi
	xor %ecx, %ecx
2:	xor %edx, %edx
3:	mov $0xA5A5000000000000, %rax
	mov %r15, %rbx
	shl $32, %rbx
	or %rbx, %rax
	mov %rcx, %rbx
	shl $8, %rbx
	or %rbx, %rax
	or %rdx, %rax
	mov %rax, (%rdi)
	add $8, %rdi
	inc %edx
	cmp $8, %edx
	jne 3b
	inc %ecx
	cmp $32, %ecx
	jne 2b
	mov %r15, %rdi
	shl $11, %rdi
	add $(SCRATCH + 0x40000), %rdi
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	vmovdqu64 \n * 64(%rdi), %zmm\n
	.endr

	/* K registers */
	mov %r15, %rbx
	shl $32, %rbx
	.irp n, 0,1,2,3,4,5,6,7
	mov $(0x4B4B000000000000 | \n), %rax
	or %rbx, %rax
	kmovq %rax, %k\n
	.endr

	/* x87: push 1..8 (+16 v) so ST(i) = 8 - i + 16 v */
	fninit
	mov %r15, %rbx
	shl $4, %rbx
	.irp n, 1,2,3,4,5,6,7,8
	lea \n(%rbx), %rax
	mov %rax, SCRATCH + 0xE000(, %r15, 8)
	fildq SCRATCH + 0xE000(, %r15, 8)
	.endr

	/* GPRs (not rax/rdx: SYNC uses them; r15 holds the index) */
	.macro GPR reg, n
	mov %r15, %rax
	shl $32, %rax
	mov $(0xC0DE000000000000 | \n), %rdx
	or %rdx, %rax
	mov %rax, \reg
	.endm
	GPR %rbx, 3
	GPR %rcx, 1
	GPR %rsi, 6
	GPR %rdi, 7
	GPR %rbp, 5
	GPR %r8, 8
	GPR %r9, 9
	GPR %r10, 10
	GPR %r11, 11
	GPR %r12, 12
	GPR %r13, 13
	GPR %r14, 14

	SYNC 1

	/* ---- verify ---- */
	.macro CHECK reg, n
	mov %r15, %rax
	shl $32, %rax
	mov $(0xC0DE000000000000 | \n), %rdx
	or %rdx, %rax
	cmp %rax, \reg
	jne fail_gpr_\n
	.endm
	mov SCRATCH + 0xF000(, %r15, 8), %rax
	cmp %rax, %r15
	jne fail_index
	CHECK %rbx, 3
	CHECK %rcx, 1
	CHECK %rsi, 6
	CHECK %rdi, 7
	CHECK %rbp, 5
	CHECK %r8, 8
	CHECK %r9, 9
	CHECK %r10, 10
	CHECK %r11, 11
	CHECK %r12, 12
	CHECK %r13, 13
	CHECK %r14, 14

	/* ZMM: dump, then compare with the formula */
	mov %r15, %rdi
	shl $11, %rdi
	add $(SCRATCH + 0x50000), %rdi
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	vmovdqu64 %zmm\n, \n * 64(%rdi)
	.endr
	xor %ecx, %ecx
4:	xor %edx, %edx
5:	mov $0xA5A5000000000000, %rax
	mov %r15, %rbx
	shl $32, %rbx
	or %rbx, %rax
	mov %rcx, %rbx
	shl $8, %rbx
	or %rbx, %rax
	or %rdx, %rax
	cmp %rax, (%rdi)
	jne fail_zmm
	add $8, %rdi
	inc %edx
	cmp $8, %edx
	jne 5b
	inc %ecx
	cmp $32, %ecx
	jne 4b

	/* K */
	mov %r15, %rbx
	shl $32, %rbx
	.irp n, 0,1,2,3,4,5,6,7
	kmovq %k\n, %rax
	mov $(0x4B4B000000000000 | \n), %rdx
	or %rbx, %rdx
	mov $(0x300 + \n), %ecx
	cmp %rdx, %rax
	jne fail_code
	.endr

	/* x87: pop ST(0..7) as integers */
	mov %r15, %rbx
	shl $4, %rbx
	.irp i, 0,1,2,3,4,5,6,7
	fistpq SCRATCH + 0xE000(, %r15, 8)
	lea (8 - \i)(%rbx), %rax
	mov $(0x400 + \i), %ecx
	cmp %rax, SCRATCH + 0xE000(, %r15, 8)
	jne fail_code
	.endr

	/* memory */
	mov %r15, %rdi
	shl $16, %rdi
	add $(SCRATCH + 0x10000), %rdi
	xor %ecx, %ecx
	mov $0x9E3779B97F4A7C15, %rbx
6:	mov %rcx, %rax
	imul %rbx, %rax
	xor %r15, %rax
	cmp %rax, (%rdi, %rcx, 8)
	jne fail_mem
	inc %ecx
	cmp $8192, %ecx
	jne 6b

	DONE
1:	jmp 1b

	.irp n, 1,3,5,6,7,8,9,10,11,12,13,14
fail_gpr_\n:
	mov $(0x100 + \n), %ecx
	jmp fail_code
	.endr
fail_zmm:
	mov $0x200, %eax
	add %ecx, %eax
	mov %eax, %ecx
	jmp fail_code
fail_mem:
	mov $0x500, %ecx
	jmp fail_code
fail_index:
	mov $0x600, %ecx
fail_code:
	mov %ecx, %eax
	mov $PORT_FAIL, %dx
	out %eax, %dx
1:	jmp 1b
