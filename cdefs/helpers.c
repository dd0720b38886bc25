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
