/*
 * vmm.h: the guest side of the vmm port protocol for freestanding C payloads (gcc -ffreestanding
 * -nostdlib), the C twin of vmm.inc. Part of the guest SDK (`vmm guest-sdk`).
 *
 * A C payload defines   int vmm_main(unsigned vcpu);
 * crt0.S calls it at CPL3 on a 16-byte aligned stack; returning 0 reports DONE, any other value
 * FAIL(value). Every function here is a port access or an instruction, so it works at CPL3
 * (IOPL=3 and the TSS I/O bitmap let `in`/`out` exit to the host).
 */
#ifndef VMM_H
#define VMM_H

#include <stdint.h>	/* freestanding: provided by the compiler */

#define VMM_COM1_THR	0x3f8	/* console: 16550 transmit holding register */
#define VMM_COM1_LSR	0x3fd	/* line status: bit 5 = THR empty */
#define VMM_PORT_SYNC	0x500	/* out: SYNC(value); the host may inspect/modify state */
#define VMM_PORT_DONE	0x501	/* out: the guest finished */
#define VMM_PORT_FAIL	0x502	/* out: FAIL(code) */
#define VMM_PORT_ARG	0x504	/* out: select host argument n; in: its low 32 bits */
#define VMM_PORT_ARG_HI	0x505	/* in: high 32 bits of the selected argument */
#define VMM_PORT_ARG_COUNT 0x506	/* in: how many arguments the host gave (`vmm run --arg`) */

/* Runtime services of the CPL0 runtime: int3 with %eax = VMM_SVC_MAGIC (see vmm.inc) */
#define VMM_SVC_MAGIC	0x564d4d53u
#define VMM_SVC_RDMSR	0
#define VMM_SVC_WRMSR	1
#define VMM_SVC_READ_CR0 2
#define VMM_SVC_READ_CR4 3

#define VMM_SCRATCH	0x300000UL	/* 1 MiB the payload may use freely */

int vmm_main(unsigned vcpu);

static inline void vmm_outl(uint16_t port, uint32_t value)
{
	__asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

static inline uint32_t vmm_inl(uint16_t port)
{
	uint32_t v;
	__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline uint8_t vmm_inb(uint16_t port)
{
	uint8_t v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory");
	return v;
}

static inline void vmm_outb(uint16_t port, uint8_t value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port) : "memory");
}

/* SYNC(value): the host stops here (vmm run prints it, vmm snapshot/reg act at it) */
static inline void vmm_sync(uint32_t value) { vmm_outl(VMM_PORT_SYNC, value); }

static inline __attribute__((noreturn)) void vmm_done(void)
{
	for (;;)
		vmm_outl(VMM_PORT_DONE, 0);
}

static inline __attribute__((noreturn)) void vmm_fail(uint32_t code)
{
	for (;;)
		vmm_outl(VMM_PORT_FAIL, code);
}

/* Host argument n (`vmm run GUEST --arg V0 --arg V1 ...`); 0 when the host gave fewer. */
static inline uint64_t vmm_arg(uint32_t n)
{
	vmm_outl(VMM_PORT_ARG, n);
	uint64_t lo = vmm_inl(VMM_PORT_ARG);
	return lo | (uint64_t)vmm_inl(VMM_PORT_ARG_HI) << 32;
}

static inline uint32_t vmm_arg_count(void) { return vmm_inl(VMM_PORT_ARG_COUNT); }

static inline void vmm_putc(char c)
{
	while (!(vmm_inb(VMM_COM1_LSR) & 0x20))
		;
	vmm_outb(VMM_COM1_THR, (uint8_t)c);
}

static inline void vmm_puts(const char *s)
{
	while (*s)
		vmm_putc(*s++);
}

static inline void vmm_puthex(uint64_t v)
{
	vmm_puts("0x");
	for (int i = 60; i >= 0; i -= 4)
		vmm_putc("0123456789abcdef"[(v >> i) & 0xf]);
}

/* CPUID as this vCPU sees it (KVM's guest CPUID) */
static inline void vmm_cpuid(uint32_t leaf, uint32_t subleaf, uint32_t r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3])
			 : "a"(leaf), "c"(subleaf));
}

/* XGETBV(0) = XCR0; needs CR4.OSXSAVE (the runtime sets it when the guest CPUID has XSAVE) */
static inline uint64_t vmm_xgetbv(uint32_t xcr)
{
	uint32_t lo, hi;
	__asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(xcr));
	return lo | (uint64_t)hi << 32;
}

/* A service of the CPL0 runtime (RDMSR, WRMSR, READ_CR0, READ_CR4); CPL0 code is emulated on PVM */
static inline uint64_t vmm_svc(uint32_t op, uint64_t index, uint64_t value)
{
	uint64_t r;
	__asm__ volatile("int3" : "=a"(r) : "a"((uint64_t)VMM_SVC_MAGIC), "D"((uint64_t)op), "S"(index),
			 "d"(value) : "memory");
	return r;
}

static inline uint64_t vmm_rdmsr(uint32_t msr) { return vmm_svc(VMM_SVC_RDMSR, msr, 0); }
static inline void vmm_wrmsr(uint32_t msr, uint64_t v) { vmm_svc(VMM_SVC_WRMSR, msr, v); }

#endif /* VMM_H */
