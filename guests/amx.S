/*
 * amx: AMX tiles and the XFD #NM at CPL3, the scenario of the kernel's KVM amx_test (needs --amx);
 * checks the tile enumeration (CPUID 0xD.17/18, 0x1D) and XCR0, sets XFD = 0, LDTILECFG palette 1,
 * TILELOADD TMM0, SYNC 1; TILERELEASE, SYNC 2; arms XFD for XTILEDATA, and TILELOADD at nm_load
 * raises #NM: the host checks XFD_ERR, clears XFD_ERR and XFD and resumes, the load is retried and
 * succeeds; SYNC 3, DONE. Without a host that clears XFD at the #NM (plain vmm run), the guest stops
 * at that fault. TMM0 data at TILEDATA: dword k = 0x414d5800 | k (k = 0..255), rows of 64 bytes.
 * FAIL codes (0xa1..0xb0, value seen in %rsi) are listed in vmm/amx.py (GUEST_FAILS).
 */
	.include "vmm.inc"
	.code64

	.set MSR_IA32_XFD,     0x1c4
	.set MSR_IA32_XFD_ERR, 0x1c5
	.set XTILE,            0x60000	/* XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA) */
	.set XTILEDATA,        0x40000
	.set TILECFG,  SCRATCH		/* the 64-byte LDTILECFG operand */
	.set TILEDATA, SCRATCH + 0x1000	/* 16 rows x 64 bytes */
	.set ROW_BYTES, 64

	/* EXPECT reg, value, code: FAIL code (reg in %rsi) unless the 64-bit reg equals value */
	.macro EXPECT reg, value, code
	cmp $\value, \reg
	je 8f
	mov \reg, %rsi
	FAIL \code
8:
	.endm

	.macro READ_MSR index
	mov $\index, %esi
	SVC SVC_RDMSR
	.endm

	.macro WRITE_MSR index, value
	mov $\index, %esi
	mov $\value, %edx
	SVC SVC_WRMSR
	.endm

	.macro CPUID_LEAF leaf, subleaf
	mov $\leaf, %eax
	mov $\subleaf, %ecx
	cpuid
	.endm

	.section .text.entry
	.globl _start
_start:
	/* 1. enumeration, as amx_test's check_xtile_info() */
	CPUID_LEAF 1, 0
	and $(1 << 27), %ecx		/* OSXSAVE: XGETBV below needs CR4.OSXSAVE */
	EXPECT %rcx, 1 << 27, 0xa1
	CPUID_LEAF 0xd, 17
	EXPECT %rax, 64, 0xa2		/* XTILECFG size */
	CPUID_LEAF 0xd, 18
	EXPECT %rax, 8192, 0xa3		/* XTILEDATA size */
	EXPECT %rbx, 2816, 0xa4		/* XTILEDATA offset */
	CPUID_LEAF 0x1d, 0
	test %eax, %eax			/* max palette: palette 1 must exist */
	jnz 1f
	FAIL 0xa5
1:	CPUID_LEAF 0x1d, 1
	mov %eax, %r8d
	shr $16, %r8d
	EXPECT %r8, 1024, 0xa6		/* bytes_per_tile */
	movzwl %ax, %eax
	EXPECT %rax, 8192, 0xa7		/* total_tile_bytes */
	mov %ebx, %r8d
	shr $16, %r8d
	EXPECT %r8, 8, 0xa8		/* max_names */
	movzwl %bx, %ebx
	EXPECT %rbx, 64, 0xa9		/* bytes_per_row */
	movzwl %cx, %ecx
	EXPECT %rcx, 16, 0xaa		/* max_rows */
	xor %ecx, %ecx
	xgetbv
	and $XTILE, %eax
	EXPECT %rax, XTILE, 0xab	/* XCR0 enables XTILECFG and XTILEDATA */
	CPUID_LEAF 0xd, 0
	cmp $(2816 + 8192), %ebx	/* size for the current XCR0 covers the tile data */
	jae 2f
	mov %rbx, %rsi
	FAIL 0xac
2:
	/* 2. XFD = 0: tiles enabled */
	WRITE_MSR MSR_IA32_XFD, 0
	READ_MSR MSR_IA32_XFD
	EXPECT %rax, 0, 0xad

	/* 3. TMM0 data and palette 1 with TMM0-7 at 16 rows x 64 bytes (other bytes stay 0) */
	mov $TILEDATA, %rdi
	xor %ecx, %ecx
3:	mov %ecx, %eax
	or $0x414d5800, %eax
	mov %eax, (%rdi, %rcx, 4)
	inc %ecx
	cmp $256, %ecx
	jne 3b
	mov $TILECFG, %rdi
	.irp q, 0, 8, 16, 24, 32, 40, 48, 56
	movq $0, \q(%rdi)
	.endr
	movb $1, (%rdi)			/* palette_id */
	.irp n, 0, 1, 2, 3, 4, 5, 6, 7
	movw $ROW_BYTES, 16 + 2 * \n(%rdi)	/* colsb[n] */
	movb $16, 48 + \n(%rdi)		/* rows[n] */
	.endr

	mov $TILECFG, %rax
	ldtilecfg (%rax)
	mov $TILEDATA, %rax
	mov $ROW_BYTES, %rdx
	.globl first_load
first_load:
	tileloadd (%rax, %rdx, 1), %tmm0
	SYNC 1				/* host: TILECFG and TMM0 in the XSAVE area */

	.globl release
release:
	tilerelease
	SYNC 2				/* host: tile state back in its init configuration */

	/* 4. #NM: configure (XFD still 0), arm XFD for XTILEDATA, load */
	mov $TILECFG, %rax
	ldtilecfg (%rax)
	WRITE_MSR MSR_IA32_XFD, XTILEDATA
	READ_MSR MSR_IA32_XFD
	EXPECT %rax, XTILEDATA, 0xae
	mov $TILEDATA, %rax
	mov $ROW_BYTES, %rdx
	.globl nm_load
nm_load:
	tileloadd (%rax, %rdx, 1), %tmm0	/* #NM; retried after the host clears XFD */
	READ_MSR MSR_IA32_XFD
	EXPECT %rax, 0, 0xaf
	READ_MSR MSR_IA32_XFD_ERR
	EXPECT %rax, 0, 0xb0
	SYNC 3				/* host: TMM0 loaded again */
	tilerelease
	DONE
