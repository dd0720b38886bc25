/*
 * checkpoint: fills GPRs, memory and every XSAVE component this vCPU has and CPL3 can write
 * (x87, SSE, AVX, AVX-512, PKRU, AMX tiles) with patterns distinct per vCPU, SYNC(mask it filled).
 * At entry %rsi is the vCPU index and %rdx the XCR0 the VMM gave it (xstate.inc).
 * That SYNC is the snapshot point; then it stores what it sees (for the host to read) and checks
 * every register and the memory: DONE, or FAIL(code): 0x1nn GPR n, 0x2nn vector register n,
 * 0x3nn Kn, 0x4nn x87 ST(n), 0x500 memory, 0x600 vCPU index, 0x700 PKRU, 0x8nn TMMn, 0x900 TILECFG.
 * Patterns (v = vCPU index): GPR n = 0xC0DE000000000000 | v << 32 | n;
 * vector register n (XMM/YMM/ZMM by the widest filled) qword j = 0xA5A5000000000000 | v << 32 | n << 8 | j;
 * Kn = 0x4B4B000000000000 | v << 32 | n; ST(i) = fild of (8 - i) + 16 * v; PKRU = 0x5A5A0000 | v << 4;
 * TMMn (palette 1, 16 rows x 64 bytes) qword q = 0x7A7A000000000000 | v << 32 | n << 16 | q;
 * memory qword i of 2048 at SCRATCH + 0x10000 + v * 0x4000 = i * 0x9E3779B97F4A7C15 ^ v.
 * What the guest saw after the SYNC, per vCPU at BLOCK = SCRATCH + 0xC0000 + v * 0x2000:
 * +0 mask filled, +8 PKRU, +0x40 K0-7, +0xC0 TILECFG, +0x100 FXSAVE image, +0x800 + 64 n vector n.
 */
	.include "vmm.inc"
	.code64
	.set BLOCKS, SCRATCH + 0xC0000
	.set MEMORY, SCRATCH + 0x10000
	.set NQWORDS, 2048

	/* BLOCK reg: this vCPU's block (index in %r15) */
	.macro BLOCK reg
	mov %r15, \reg
	shl $13, \reg
	add $BLOCKS, \reg
	.endm

	.section .text.entry
	.globl _start
_start:
	mov %rsi, %r15				/* vCPU index, kept in r15 and in memory */
	mov %rdx, %rdi				/* the VMM's XCR0 */
	call xstate_mask
	BLOCK %r12
	mov %rax, (%r12)
	mov %r15, 0x18(%r12)
	mov %rax, %r14				/* mask */

	/* memory pattern */
	mov %r15, %rdi
	shl $14, %rdi
	add $MEMORY, %rdi
	xor %ecx, %ecx
	mov $0x9E3779B97F4A7C15, %rbx
1:	mov %rcx, %rax
	imul %rbx, %rax
	xor %r15, %rax
	mov %rax, (%rdi, %rcx, 8)
	inc %ecx
	cmp $NQWORDS, %ecx
	jne 1b

	/* vector registers, as wide as the mask allows; pattern built at BLOCK + 0x300 */
	lea 0x300(%r12), %rdi
	test $XSTATE_HI16_ZMM, %r14
	jz 10f
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	mov $\n, %ecx
	call vec_pattern
	vmovdqu64 (%rdi), %zmm\n
	.endr
	jmp 13f
10:	test $XSTATE_AVX, %r14
	jz 11f
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	mov $\n, %ecx
	call vec_pattern
	vmovdqu (%rdi), %ymm\n
	.endr
	jmp 13f
11:	test $XSTATE_SSE, %r14
	jz 13f
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	mov $\n, %ecx
	call vec_pattern
	movdqu (%rdi), %xmm\n
	.endr
13:
	/* opmask */
	test $XSTATE_OPMASK, %r14
	jz 14f
	mov %r15, %rbx
	shl $32, %rbx
	.irp n, 0,1,2,3,4,5,6,7
	mov $(0x4B4B000000000000 | \n), %rax
	or %rbx, %rax
	kmovq %rax, %k\n
	.endr
14:
	/* PKRU: keys 0 and 1 keep full access (the payload's pages use key 0) */
	test $XSTATE_PKRU, %r14
	jz 15f
	mov %r15d, %eax
	shl $4, %eax
	or $0x5A5A0000, %eax
	xor %ecx, %ecx
	xor %edx, %edx
	wrpkru
15:
	/* AMX: palette 1, eight tiles of 16 rows x 64 bytes */
	test $XSTATE_AMX, %r14
	jz 16f
	lea 0x80(%r12), %rdi
	xor %eax, %eax
	mov $8, %ecx
	rep stosq
	movb $1, 0x80(%r12)			/* palette 1 */
	.irp n, 0,1,2,3,4,5,6,7
	movw $64, 0x80 + 16 + 2 * \n(%r12)	/* colsb */
	movb $16, 0x80 + 48 + \n(%r12)		/* rows */
	.endr
	ldtilecfg 0x80(%r12)
	lea 0x400(%r12), %rsi
	mov $64, %edx
	.irp n, 0,1,2,3,4,5,6,7
	mov $\n, %ecx
	call tile_pattern
	tileloadd (%rsi, %rdx, 1), %tmm\n
	.endr
16:
	/* x87: push 1..8 (+16 v) so ST(i) = 8 - i + 16 v */
	fninit
	mov %r15, %rbx
	shl $4, %rbx
	.irp n, 1,2,3,4,5,6,7,8
	lea \n(%rbx), %rax
	mov %rax, 0x10(%r12)
	fildq 0x10(%r12)
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

	mov %r15, %rax
	shl $13, %rax
	mov BLOCKS(%rax), %eax			/* SYNC(mask) */
	mov $PORT_SYNC, %dx
	out %eax, %dx

	/* ---- verify: GPRs first (they are needed below) ---- */
	.macro CHECK reg, n
	mov %r15, %rax
	shl $32, %rax
	mov $(0xC0DE000000000000 | \n), %rdx
	or %rdx, %rax
	cmp %rax, \reg
	jne fail_gpr_\n
	.endm
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
	BLOCK %r12
	cmp 0x18(%r12), %r15
	jne fail_index
	mov (%r12), %r14			/* mask */

	/* ---- store what the guest sees ---- */
	lea 0x800(%r12), %rdi
	test $XSTATE_HI16_ZMM, %r14
	jz 20f
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	vmovdqu64 %zmm\n, \n * 64(%rdi)
	.endr
	jmp 23f
20:	test $XSTATE_AVX, %r14
	jz 21f
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	vmovdqu %ymm\n, \n * 64(%rdi)
	.endr
	jmp 23f
21:	test $XSTATE_SSE, %r14
	jz 23f
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
	movdqu %xmm\n, \n * 64(%rdi)
	.endr
23:	test $XSTATE_OPMASK, %r14
	jz 24f
	.irp n, 0,1,2,3,4,5,6,7
	kmovq %k\n, 0x40 + 8 * \n(%r12)
	.endr
24:	test $XSTATE_PKRU, %r14
	jz 25f
	xor %ecx, %ecx
	rdpkru
	mov %rax, 8(%r12)
25:	test $XSTATE_AMX, %r14
	jz 26f
	sttilecfg 0xC0(%r12)
26:	fxsave64 0x100(%r12)

	/* ---- compare with the patterns ---- */
	/* vector registers: 32 x 8 qwords (AVX-512), 16 x 4 (AVX), 16 x 2 (SSE) */
	mov $32, %r8d
	mov $8, %r9d
	test $XSTATE_HI16_ZMM, %r14
	jnz 30f
	mov $16, %r8d
	mov $4, %r9d
	test $XSTATE_AVX, %r14
	jnz 30f
	mov $2, %r9d
	test $XSTATE_SSE, %r14
	jnz 30f
	xor %r8d, %r8d
30:	xor %ecx, %ecx				/* n */
31:	cmp %r8d, %ecx
	je 35f
	lea 0x300(%r12), %rdi
	call vec_pattern
	mov %rcx, %rsi
	shl $6, %rsi
	lea 0x800(%r12, %rsi), %rsi
	xor %edx, %edx				/* j */
32:	mov (%rdi, %rdx, 8), %rax
	cmp %rax, (%rsi, %rdx, 8)
	jne fail_vec
	inc %edx
	cmp %r9d, %edx
	jne 32b
	inc %ecx
	jmp 31b
35:
	/* K */
	test $XSTATE_OPMASK, %r14
	jz 36f
	mov %r15, %rbx
	shl $32, %rbx
	xor %ecx, %ecx
1:	mov $0x4B4B000000000000, %rax
	or %rbx, %rax
	or %rcx, %rax
	cmp %rax, 0x40(%r12, %rcx, 8)
	jne fail_k
	inc %ecx
	cmp $8, %ecx
	jne 1b
36:
	/* PKRU */
	test $XSTATE_PKRU, %r14
	jz 37f
	mov %r15d, %eax
	shl $4, %eax
	or $0x5A5A0000, %eax
	cmp %rax, 8(%r12)
	jne fail_pkru
37:
	/* AMX: TILECFG as loaded, then every tile through the tile buffer */
	test $XSTATE_AMX, %r14
	jz 38f
	xor %ecx, %ecx
1:	mov 0x80(%r12, %rcx, 8), %rax
	cmp %rax, 0xC0(%r12, %rcx, 8)
	jne fail_tilecfg
	inc %ecx
	cmp $8, %ecx
	jne 1b
	lea 0x400(%r12), %rsi
	mov $64, %edx
	.irp n, 0,1,2,3,4,5,6,7
	tilestored %tmm\n, (%rsi, %rdx, 1)
	mov $\n, %ecx
	call tile_check
	.endr
38:
	/* x87: pop ST(0..7) as integers */
	mov %r15, %rbx
	shl $4, %rbx
	.irp i, 0,1,2,3,4,5,6,7
	fistpq 0x10(%r12)
	lea (8 - \i)(%rbx), %rax
	mov $(0x400 + \i), %ecx
	cmp %rax, 0x10(%r12)
	jne fail_code
	.endr

	/* memory */
	mov %r15, %rdi
	shl $14, %rdi
	add $MEMORY, %rdi
	xor %ecx, %ecx
	mov $0x9E3779B97F4A7C15, %rbx
6:	mov %rcx, %rax
	imul %rbx, %rax
	xor %r15, %rax
	cmp %rax, (%rdi, %rcx, 8)
	jne fail_mem
	inc %ecx
	cmp $NQWORDS, %ecx
	jne 6b

	DONE
1:	jmp 1b

/* vec_pattern: %ecx = n, %rdi = 64-byte buffer <- qword j = 0xA5A5... | v << 32 | n << 8 | j */
vec_pattern:
	xor %edx, %edx
1:	mov $0xA5A5000000000000, %rax
	mov %r15, %rbx
	shl $32, %rbx
	or %rbx, %rax
	mov %rcx, %rbx
	shl $8, %rbx
	or %rbx, %rax
	or %rdx, %rax
	mov %rax, (%rdi, %rdx, 8)
	inc %edx
	cmp $8, %edx
	jne 1b
	ret

/* tile_pattern: %ecx = n, %rsi = 1 KiB buffer <- qword q = 0x7A7A... | v << 32 | n << 16 | q */
tile_pattern:
	push %rdx
	xor %edx, %edx
1:	call tile_qword
	mov %rax, (%rsi, %rdx, 8)
	inc %edx
	cmp $128, %edx
	jne 1b
	pop %rdx
	ret

/* tile_check: %ecx = n, %rsi = the stored tile; FAIL 0x8nn on the first wrong qword */
tile_check:
	push %rdx
	xor %edx, %edx
1:	call tile_qword
	cmp %rax, (%rsi, %rdx, 8)
	jne fail_tmm
	inc %edx
	cmp $128, %edx
	jne 1b
	pop %rdx
	ret

tile_qword:	/* %ecx = n, %edx = q -> %rax; clobbers rbx */
	mov $0x7A7A000000000000, %rax
	mov %r15, %rbx
	shl $32, %rbx
	or %rbx, %rax
	mov %rcx, %rbx
	shl $16, %rbx
	or %rbx, %rax
	or %rdx, %rax
	ret

	.irp n, 1,3,5,6,7,8,9,10,11,12,13,14
fail_gpr_\n:
	mov $(0x100 + \n), %ecx
	jmp fail_code
	.endr
fail_vec:
	add $0x200, %ecx
	jmp fail_code
fail_k:
	add $0x300, %ecx
	jmp fail_code
fail_mem:
	mov $0x500, %ecx
	jmp fail_code
fail_index:
	mov $0x600, %ecx
	jmp fail_code
fail_pkru:
	mov $0x700, %ecx
	jmp fail_code
fail_tmm:
	add $0x800, %ecx
	jmp fail_code
fail_tilecfg:
	mov $0x900, %ecx
fail_code:
	mov %ecx, %eax
	mov $PORT_FAIL, %dx
	out %eax, %dx
1:	jmp 1b

	.include "xstate.inc"
