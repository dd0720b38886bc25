/*
 * floor: the C floor of `make bench`. A plain C program (no vmm code) that builds its own VM from
 * a setup file the bench script writes (guest memory image, guest CPUID, entry registers, XCR0,
 * the MSR index set), runs the bench guest to its SYNC 1 and measures, in the style of KVM's
 * selftests (vcpu_save_state / vcpu_load_state), one ioctl per piece of state:
 *
 *   save:    KVM_RUN with immediate_exit (completes the pending port I/O), then KVM_GET_VCPU_EVENTS,
 *            KVM_GET_MP_STATE, KVM_GET_REGS, KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM fd,
 *            KVM_GET_XSAVE2, KVM_GET_XCRS, KVM_GET_SREGS, KVM_GET_MSRS, KVM_GET_DEBUGREGS and, as the
 *            VM has an in-kernel irqchip (VcpuState holds the LAPIC), KVM_GET_LAPIC.
 *   restore: state.py's documented order without the per-vCPU constants (CPUID, TSC kHz):
 *            KVM_SET_SREGS, KVM_SET_LAPIC, KVM_SET_MSRS (TSC deadline last), KVM_SET_XCRS,
 *            KVM_SET_XSAVE, KVM_SET_VCPU_EVENTS, KVM_SET_MP_STATE, KVM_SET_DEBUGREGS, KVM_SET_REGS.
 *   pio:     KVM_RUN round trips of the guest's port-write loop (exit, check the port, re-enter).
 *   ioctl:   one KVM_GET_MP_STATE, the cost of a cheap vCPU ioctl on this host.
 *
 * Every loop is bounded by a count and by time. Output: one JSON object on stdout, times in ns.
 *
 *   floor SETUP ITERATIONS SECONDS PIO_EXITS PIO_BATCHES
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_CAP_XSAVE2
#define KVM_CAP_XSAVE2 208
#endif
#ifndef KVM_GET_XSAVE2
#define KVM_GET_XSAVE2 _IOR(KVMIO, 0xcf, struct kvm_xsave)
#endif

#define PORT_SYNC 0x500
#define MSR_IA32_TSC_DEADLINE 0x6e0

static void die(const char *what)
{
	fprintf(stderr, "floor: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void xioctl(int fd, unsigned long req, void *arg, const char *name)
{
	if (ioctl(fd, req, arg) < 0)
		die(name);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return x < y ? -1 : x > y;
}

static void stats(const char *name, uint64_t *v, size_t n, int last)
{
	qsort(v, n, sizeof(*v), cmp_u64);
	uint64_t med = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
	printf("  \"%s\": {\"n\": %zu, \"min_ns\": %llu, \"median_ns\": %llu}%s\n", name, n,
	       (unsigned long long)v[0], (unsigned long long)med, last ? "" : ",");
}

/* --- the setup file (written by bench/bench.py) ------------------------------------------------ */
struct setup {
	uint64_t mem_size, count_addr, xcr0;
	uint8_t *image;
	uint64_t image_len;
	struct kvm_cpuid2 *cpuid;
	struct kvm_sregs sregs;
	struct kvm_regs regs;
	uint32_t nmsrs;
	uint32_t *msr_index;
};

static void *take(uint8_t **p, uint8_t *end, size_t n)
{
	if ((size_t)(end - *p) < n) {
		fprintf(stderr, "floor: setup file truncated\n");
		exit(1);
	}
	void *r = *p;
	*p += n;
	return r;
}

static void read_setup(const char *path, struct setup *s)
{
	int fd = open(path, O_RDONLY);
	struct stat st;
	if (fd < 0 || fstat(fd, &st) < 0)
		die(path);
	uint8_t *buf = malloc(st.st_size), *p = buf, *end = buf + st.st_size;
	if (!buf || read(fd, buf, st.st_size) != st.st_size)
		die("reading the setup file");
	close(fd);
	if (memcmp(take(&p, end, 8), "VMMFLOOR", 8)) {
		fprintf(stderr, "floor: %s is not a setup file\n", path);
		exit(1);
	}
	uint32_t sz[3];
	memcpy(sz, take(&p, end, sizeof(sz)), sizeof(sz));
	if (sz[0] != sizeof(struct kvm_sregs) || sz[1] != sizeof(struct kvm_regs) ||
	    sz[2] != sizeof(struct kvm_cpuid_entry2)) {
		fprintf(stderr, "floor: struct sizes in the setup file differ from <linux/kvm.h>\n");
		exit(1);
	}
	memcpy(&s->mem_size, take(&p, end, 8), 8);
	memcpy(&s->count_addr, take(&p, end, 8), 8);
	memcpy(&s->xcr0, take(&p, end, 8), 8);
	memcpy(&s->image_len, take(&p, end, 8), 8);
	s->image = take(&p, end, s->image_len);
	uint32_t nent;
	memcpy(&nent, take(&p, end, 4), 4);
	s->cpuid = calloc(1, sizeof(*s->cpuid) + nent * sizeof(s->cpuid->entries[0]));
	s->cpuid->nent = nent;
	memcpy(s->cpuid->entries, take(&p, end, nent * sizeof(s->cpuid->entries[0])),
	       nent * sizeof(s->cpuid->entries[0]));
	memcpy(&s->sregs, take(&p, end, sizeof(s->sregs)), sizeof(s->sregs));
	memcpy(&s->regs, take(&p, end, sizeof(s->regs)), sizeof(s->regs));
	memcpy(&s->nmsrs, take(&p, end, 4), 4);
	s->msr_index = take(&p, end, s->nmsrs * 4);
}

/* --- one VM, one vCPU, set up as vmm's Machine does ------------------------------------------ */
struct vm {
	int kvm, vm, vcpu;
	struct kvm_run *run;
	uint8_t *mem;
};

static void build_vm(struct vm *v, const struct setup *s)
{
	v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (v->kvm < 0)
		die("/dev/kvm");
	v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
	if (v->vm < 0)
		die("KVM_CREATE_VM");
	if (ioctl(v->vm, KVM_CREATE_IRQCHIP, 0) < 0)
		die("KVM_CREATE_IRQCHIP");
	v->mem = mmap(NULL, s->mem_size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (v->mem == MAP_FAILED)
		die("mmap guest memory");
	memcpy(v->mem, s->image, s->image_len);
	struct kvm_userspace_memory_region region = {
		.slot = 0, .guest_phys_addr = 0, .memory_size = s->mem_size,
		.userspace_addr = (uintptr_t)v->mem,
	};
	xioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");
	v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
	if (v->vcpu < 0)
		die("KVM_CREATE_VCPU");
	int mmap_size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	v->run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
	if (v->run == MAP_FAILED)
		die("mmap kvm_run");
	xioctl(v->vcpu, KVM_SET_CPUID2, s->cpuid, "KVM_SET_CPUID2");
	xioctl(v->vcpu, KVM_SET_SREGS, (void *)&s->sregs, "KVM_SET_SREGS");
	xioctl(v->vcpu, KVM_SET_REGS, (void *)&s->regs, "KVM_SET_REGS");
	if (s->xcr0) {
		struct kvm_xcrs x = {.nr_xcrs = 1, .xcrs = {{.xcr = 0, .value = s->xcr0}}};
		xioctl(v->vcpu, KVM_SET_XCRS, &x, "KVM_SET_XCRS");
	}
}

/* KVM_RUN until a port write to PORT_SYNC; returns the number of exits. */
static uint64_t run_to_sync(struct vm *v)
{
	for (uint64_t n = 1;; n++) {
		if (ioctl(v->vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN");
		if (v->run->exit_reason != KVM_EXIT_IO) {
			fprintf(stderr, "floor: unexpected exit %u\n", v->run->exit_reason);
			exit(1);
		}
		if (v->run->io.port == PORT_SYNC && v->run->io.direction == KVM_EXIT_IO_OUT)
			return n;
	}
}

/* --- the state, one buffer per piece, as selftests keep it --------------------------------- */
struct state {
	struct kvm_vcpu_events events;
	struct kvm_mp_state mp_state;
	struct kvm_regs regs;
	void *xsave;
	struct kvm_xcrs xcrs;
	struct kvm_sregs sregs;
	struct kvm_msrs *msrs;
	struct kvm_debugregs debugregs;
	struct kvm_lapic_state lapic;
};

static void complete_io(struct vm *v)
{
	v->run->immediate_exit = 1;
	if (ioctl(v->vcpu, KVM_RUN, 0) >= 0 || errno != EINTR)
		die("KVM_RUN with immediate_exit");
	v->run->immediate_exit = 0;
}

static void save(struct vm *v, struct state *s, uint32_t nmsrs)
{
	complete_io(v);
	xioctl(v->vcpu, KVM_GET_VCPU_EVENTS, &s->events, "KVM_GET_VCPU_EVENTS");
	xioctl(v->vcpu, KVM_GET_MP_STATE, &s->mp_state, "KVM_GET_MP_STATE");
	xioctl(v->vcpu, KVM_GET_REGS, &s->regs, "KVM_GET_REGS");
	int size = ioctl(v->vm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	if (size < (int)sizeof(struct kvm_xsave) || size > 65536) {
		fprintf(stderr, "floor: KVM_CAP_XSAVE2 = %d\n", size);
		exit(1);
	}
	xioctl(v->vcpu, KVM_GET_XSAVE2, s->xsave, "KVM_GET_XSAVE2");
	xioctl(v->vcpu, KVM_GET_XCRS, &s->xcrs, "KVM_GET_XCRS");
	xioctl(v->vcpu, KVM_GET_SREGS, &s->sregs, "KVM_GET_SREGS");
	s->msrs->nmsrs = nmsrs;
	if (ioctl(v->vcpu, KVM_GET_MSRS, s->msrs) != (int)nmsrs)
		die("KVM_GET_MSRS");
	xioctl(v->vcpu, KVM_GET_DEBUGREGS, &s->debugregs, "KVM_GET_DEBUGREGS");
	xioctl(v->vcpu, KVM_GET_LAPIC, &s->lapic, "KVM_GET_LAPIC");
}

static void restore(struct vm *v, struct state *s, uint32_t nmsrs)
{
	xioctl(v->vcpu, KVM_SET_SREGS, &s->sregs, "KVM_SET_SREGS");
	xioctl(v->vcpu, KVM_SET_LAPIC, &s->lapic, "KVM_SET_LAPIC");
	s->msrs->nmsrs = nmsrs;
	if (ioctl(v->vcpu, KVM_SET_MSRS, s->msrs) != (int)nmsrs)
		die("KVM_SET_MSRS");
	xioctl(v->vcpu, KVM_SET_XCRS, &s->xcrs, "KVM_SET_XCRS");
	xioctl(v->vcpu, KVM_SET_XSAVE, s->xsave, "KVM_SET_XSAVE");
	xioctl(v->vcpu, KVM_SET_VCPU_EVENTS, &s->events, "KVM_SET_VCPU_EVENTS");
	xioctl(v->vcpu, KVM_SET_MP_STATE, &s->mp_state, "KVM_SET_MP_STATE");
	xioctl(v->vcpu, KVM_SET_DEBUGREGS, &s->debugregs, "KVM_SET_DEBUGREGS");
	xioctl(v->vcpu, KVM_SET_REGS, &s->regs, "KVM_SET_REGS");
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: floor SETUP ITERATIONS SECONDS PIO_EXITS PIO_BATCHES\n");
		return 2;
	}
	struct setup s;
	read_setup(argv[1], &s);
	size_t iters = strtoul(argv[2], NULL, 0);
	double seconds = strtod(argv[3], NULL);
	uint64_t pio_exits = strtoull(argv[4], NULL, 0);
	size_t pio_batches = strtoul(argv[5], NULL, 0);
	uint64_t budget = (uint64_t)(seconds * 1e9);

	struct vm v;
	build_vm(&v, &s);
	run_to_sync(&v);	/* SYNC 1: the guest is in its save/restore state */

	/* the MSR set in the order the bench gives it (TSC deadline last) */
	struct state st;
	memset(&st, 0, sizeof(st));
	int xsave_size = ioctl(v.vm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
	if (xsave_size < (int)sizeof(struct kvm_xsave))
		xsave_size = sizeof(struct kvm_xsave);
	st.xsave = calloc(1, xsave_size);
	st.msrs = calloc(1, sizeof(*st.msrs) + s.nmsrs * sizeof(st.msrs->entries[0]));
	for (uint32_t i = 0; i < s.nmsrs; i++)
		st.msrs->entries[i].index = s.msr_index[i];

	uint64_t *t_save = calloc(iters, 8), *t_restore = calloc(iters, 8), *t_cycle = calloc(iters, 8);
	size_t n = 0;
	uint64_t start = now_ns();
	for (size_t i = 0; i < iters / 10 + 1 && now_ns() - start < budget / 10; i++) {	/* warm-up */
		save(&v, &st, s.nmsrs);
		restore(&v, &st, s.nmsrs);
	}
	start = now_ns();
	while (n < iters && now_ns() - start < budget) {
		uint64_t t0 = now_ns();
		save(&v, &st, s.nmsrs);
		uint64_t t1 = now_ns();
		restore(&v, &st, s.nmsrs);
		uint64_t t2 = now_ns();
		t_save[n] = t1 - t0;
		t_restore[n] = t2 - t1;
		t_cycle[n] = t2 - t0;
		n++;
	}

	/* the cost of one cheap vCPU ioctl on this host (KVM_GET_MP_STATE), for comparing hosts */
	size_t nio = iters < 1000 ? 1000 : iters;
	uint64_t *t_ioctl = calloc(nio, 8);
	struct kvm_mp_state mp;
	for (size_t i = 0; i < nio; i++) {
		uint64_t t0 = now_ns();
		xioctl(v.vcpu, KVM_GET_MP_STATE, &mp, "KVM_GET_MP_STATE");
		t_ioctl[i] = now_ns() - t0;
	}

	/* port I/O: the guest writes pio_exits times to port 0x510, then SYNC 2 */
	uint64_t *t_pio = calloc(pio_batches + 1, 8);
	size_t nb = 0;
	memcpy(v.mem + s.count_addr, &pio_exits, 8);
	uint16_t port = 0x510;
	memcpy(v.mem + s.count_addr + 8, &port, 2);
	run_to_sync(&v);	/* warm-up batch */
	start = now_ns();
	while (nb < pio_batches && now_ns() - start < budget) {
		uint64_t t0 = now_ns();
		uint64_t exits = run_to_sync(&v);
		t_pio[nb++] = (now_ns() - t0) / exits;
	}

	printf("{\n  \"xsave_size\": %d,\n  \"nmsrs\": %u,\n  \"pio_exits_per_batch\": %llu,\n", xsave_size,
	       s.nmsrs, (unsigned long long)pio_exits + 1);
	stats("save", t_save, n, 0);
	stats("restore", t_restore, n, 0);
	stats("cycle", t_cycle, n, 0);
	stats("ioctl", t_ioctl, nio, 0);
	stats("pio_exit", t_pio, nb, 1);
	printf("}\n");
	return 0;
}
