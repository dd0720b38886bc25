/*
 * xsave-readback: SYNC 1 (the host may set registers with KVM_SET_XSAVE), then SYNCs dwords it reads
 * back: XMM7[31:0], YMM7[159:128], ZMM7[287:256], ZMM23[511:480], K5[31:0], K5[63:32]; then DONE.
 * One dword from each of the SSE, AVX, ZMM_Hi256, Hi16_ZMM and opmask components; %xmm1 is scratch.
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	SYNC 1

	movd %xmm7, %eax			/* SSE: XMM7 bits 31:0 */
	SYNC_REG %eax
	vextracti128 $1, %ymm7, %xmm1		/* AVX: YMM7 bits 159:128 */
	movd %xmm1, %eax
	SYNC_REG %eax
	vextracti32x4 $2, %zmm7, %xmm1		/* ZMM_Hi256: ZMM7 bits 287:256 */
	movd %xmm1, %eax
	SYNC_REG %eax
	vextracti32x4 $3, %zmm23, %xmm1		/* Hi16_ZMM: ZMM23 bits 511:480 */
	pextrd $3, %xmm1, %eax
	SYNC_REG %eax
	kmovq %k5, %rcx				/* opmask: K5, low then high dword */
	SYNC_REG %ecx
	shr $32, %rcx
	SYNC_REG %ecx
	DONE
