/*
 * mmio: writes 0x1234abcd to guest-physical 0xd0000000, which no memory slot backs, so the
 * access exits to the host as MMIO (the runtime maps every address of the first 4 GiB).
 */
	.include "vmm.inc"
	.code64
	.section .text.entry
	.globl _start
_start:
	mov $0xd0000000, %rdi
	.globl mmio_store
mmio_store:
	movl $0x1234abcd, (%rdi)
	DONE
