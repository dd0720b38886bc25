/*
 * runtime.S: the CPL0 part of every guest, loaded at RUNTIME_BASE (vmm/guest/runtime.py).
 * 256 exception/interrupt stubs, 16 bytes each, then the common handler and the
 * int $0x80 service handler. Kept tiny: on PVM hosts CPL0 code is emulated.
 */
	.include "vmm.inc"
	.code64
	.text
	.globl _start
_start:
stubs:
	.set vec, 0
	.rept 256
	.balign 16
	/* CPU pushes an error code for #DF #TS #NP #SS #GP #PF #AC #CP; others get a 0 */
	.if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21)
	.else
	pushq $0
	.endif
	pushq $vec
	jmp common
	.set vec, vec + 1
	.endr

	.balign 16
common:
	/* frame at %rsp: vector, error code, RIP, CS, RFLAGS, RSP, SS */
	cmpq $3, (%rsp)
	jne report
	cmp $SVC_MAGIC, %eax
	je svc
report:
	mov $PORT_EXC, %dx
	out %al, %dx
	/* the host resumes only when it chose to: drop vector/error code, return */
	add $16, %rsp
	iretq

	/* #BP is a trap: the saved RIP is already past the int3 */
	.globl svc
svc:
	push %rcx
	cmp $SVC_RDMSR, %edi
	jne 1f
	mov %esi, %ecx
	rdmsr
	shl $32, %rdx
	or %rdx, %rax
	jmp 9f
1:	cmp $SVC_WRMSR, %edi
	jne 2f
	mov %esi, %ecx
	mov %rdx, %rax
	shr $32, %rdx
	wrmsr
	jmp 9f
2:	cmp $SVC_READ_CR0, %edi
	jne 3f
	mov %cr0, %rax
	jmp 9f
3:	cmp $SVC_READ_CR4, %edi
	jne 4f
	mov %cr4, %rax
	jmp 9f
4:	cmp $SVC_TRIPLE_FAULT, %edi
	jne 5f
	lidt null_idtr(%rip)
	ud2
5:	cmp $SVC_XSETBV, %edi
	jne 6f
	mov %esi, %ecx
	mov %rdx, %rax
	shr $32, %rdx
	xsetbv
	jmp 9f
6:	mov $-1, %rax
9:	pop %rcx
	add $16, %rsp
	iretq

	.balign 16
null_idtr:
	.word 0
	.quad 0
