/* C helpers compiled into vmm._kvm next to the uAPI declarations. */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

long vmm_ioctl(int fd, unsigned long request, void *arg)
{
	long r = ioctl(fd, request, arg);
	return r < 0 ? -errno : r;
}

long vmm_ioctl_int(int fd, unsigned long request, unsigned long arg)
{
	long r = ioctl(fd, request, arg);
	return r < 0 ? -errno : r;
}

/*
 * The timeout kick: KVM_RUN returns -EINTR when a signal arrives while the
 * guest runs, but a signal that lands just before the ioctl would be lost.
 * Setting immediate_exit from the handler closes that window (the kernel
 * checks it on entry), which a Python-level handler cannot do in time.
 */
static struct kvm_run *volatile vmm_kick_run;

static void vmm_kick_handler(int sig)
{
	(void)sig;
	if (vmm_kick_run)
		vmm_kick_run->immediate_exit = 1;
}

int vmm_kick_install(int signo)
{
	struct sigaction sa;
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = vmm_kick_handler;
	sigemptyset(&sa.sa_mask);
	/* no SA_RESTART: KVM_RUN must come back with EINTR */
	return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

void vmm_kick_target(struct kvm_run *run)
{
	vmm_kick_run = run;
}

long vmm_arch_prctl(int code, unsigned long addr)
{
	long r = syscall(SYS_arch_prctl, code, addr);
	return r < 0 ? -errno : r;
}

/*
 * Snapshot memory scan: out[i] = 1 when page i of p holds any non-zero byte. Zero pages are
 * left as holes in the snapshot file, so a mostly empty 1 GiB guest costs only what it used.
 * For anonymous memory (anon != 0), pages mincore() reports as never faulted in are zero
 * without reading them: touching them would fault in a billion bytes of nothing.
 */
#include <stdlib.h>
#include <sys/mman.h>

long vmm_nonzero_pages(const unsigned char *p, size_t npages, size_t page, unsigned char *out, int anon)
{
	unsigned char *resident = NULL;
	long n = 0;
	if (anon) {
		resident = malloc(npages);
		if (!resident)
			return -ENOMEM;
		if (mincore((void *)p, npages * page, resident) < 0) {
			free(resident);
			resident = NULL;	/* scan everything */
		}
	}
	for (size_t i = 0; i < npages; i++) {
		out[i] = 0;
		if (resident && !(resident[i] & 1))
			continue;
		const unsigned long *w = (const unsigned long *)(p + i * page);
		unsigned long acc = 0;
		for (size_t j = 0; j < page / sizeof(*w); j++)
			acc |= w[j];
		out[i] = acc != 0;
		n += out[i];
	}
	free(resident);
	return n;
}
