/*
 * avx512: fills x87 ST0-7, ZMM0-31 (and so XMM/YMM) and K0-7 with known patterns at CPL3,
 * SYNC 1; then stores every register it sees to SCRATCH+0x8000 (ZMM0-31, 64 bytes each),
 * +0x8800 (K0-7), +0x8840 (x87 FXSAVE image, 512 bytes) and SYNC 2, DONE.
 * Patterns: qword j of ZMMn = 0xA5A5000000000000 | n << 8 | j; Kn = 0x4B4B000000000000 | n;
 * x87 stack from `fild` of 1..8 (ST0 = 8.0 ... ST7 = 1.0).
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	/* build the ZMM patterns in scratch memory: 32 registers x 8 qwords */
	mov $SCRATCH, %rdi
	xor %ecx, %ecx				/* n */
1:	xor %edx, %edx				/* j */
2:	mov $0xA5A5000000000000, %rax
	mov %rcx, %rbx
	shl $8, %rbx
	or %rbx, %rax
	or %rdx, %rax
	mov %rax, (%rdi)
	add $8, %rdi
	inc %edx
	cmp $8, %edx
	jne 2b
	inc %ecx
	cmp $32, %ecx
	jne 1b

	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	vmovdqu64 SCRATCH + \n * 64, %zmm\n
	.endr

	.irp n, 0,1,2,3,4,5,6,7
	mov $(0x4B4B000000000000 | \n), %rax
	kmovq %rax, %k\n
	.endr

	fninit
	.irp n, 1,2,3,4,5,6,7,8
	movq $\n, SCRATCH + 0x7000
	fildq SCRATCH + 0x7000
	.endr

	SYNC 1

	/* what the guest sees now (the host may have changed it with KVM_SET_XSAVE) */
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	vmovdqu64 %zmm\n, SCRATCH + 0x8000 + \n * 64
	.endr
	.irp n, 0,1,2,3,4,5,6,7
	kmovq %k\n, SCRATCH + 0x8800 + \n * 8
	.endr
	fxsave64 SCRATCH + 0x8840

	SYNC 2
	DONE
