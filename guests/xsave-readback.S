/*
 * xsave-readback: SYNC(mask) with the XSAVE components this vCPU has (xstate.inc); the host may
 * then set registers with KVM_SET_XSAVE. The guest SYNCs dwords it reads back, one per component
 * the mask holds, in this order: XMM7[31:0] (SSE), YMM7[159:128] (AVX), ZMM7[287:256]
 * (ZMM_Hi256), ZMM23[511:480] (Hi16_ZMM), K5[31:0] and K5[63:32] (opmask), PKRU (PKRU); then DONE.
 * %xmm1 is scratch.
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	mov %rdx, %rdi				/* the VMM's XCR0 */
	call xstate_mask
	mov %rax, %r14
	SYNC_REG %r14d

	test $XSTATE_SSE, %r14
	jz 1f
	movd %xmm7, %eax			/* SSE: XMM7 bits 31:0 */
	SYNC_REG %eax
1:	test $XSTATE_AVX, %r14
	jz 2f
	vextracti128 $1, %ymm7, %xmm1		/* AVX: YMM7 bits 159:128 */
	movd %xmm1, %eax
	SYNC_REG %eax
2:	test $XSTATE_ZMM_HI256, %r14
	jz 3f
	vextracti32x4 $2, %zmm7, %xmm1		/* ZMM_Hi256: ZMM7 bits 287:256 */
	movd %xmm1, %eax
	SYNC_REG %eax
3:	test $XSTATE_HI16_ZMM, %r14
	jz 4f
	vextracti32x4 $3, %zmm23, %xmm1		/* Hi16_ZMM: ZMM23 bits 511:480 */
	pextrd $3, %xmm1, %eax
	SYNC_REG %eax
4:	test $XSTATE_OPMASK, %r14
	jz 5f
	kmovq %k5, %rcx				/* opmask: K5, low then high dword */
	SYNC_REG %ecx
	shr $32, %rcx
	SYNC_REG %ecx
5:	test $XSTATE_PKRU, %r14
	jz 6f
	xor %ecx, %ecx
	rdpkru
	SYNC_REG %eax
6:	DONE

	.include "xstate.inc"
