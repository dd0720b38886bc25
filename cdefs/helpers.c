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
 * For anonymous memory (anon != 0), a page /proc/self/pagemap reports neither present nor swapped
 * (bits 63 and 62, Documentation/admin-guide/mm/pagemap.rst) was never written: it is zero without
 * reading it (touching it would fault in a billion bytes of nothing). A swapped-out page is read:
 * mincore() would call it absent, and its data would be lost. Without pagemap, everything is read.
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>

static unsigned char *vmm_mapped_pages(const unsigned char *p, size_t npages, size_t page)
{
	uint64_t buf[512];
	unsigned char *mapped = malloc(npages ? npages : 1);
	int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
	size_t first = (uintptr_t)p / page;

	if (!mapped || fd < 0)
		goto fail;
	for (size_t i = 0; i < npages; i += 512) {
		size_t n = npages - i < 512 ? npages - i : 512;
		if (pread(fd, buf, n * 8, (off_t)((first + i) * 8)) != (ssize_t)(n * 8))
			goto fail;
		for (size_t j = 0; j < n; j++)
			mapped[i + j] = (buf[j] >> 62) != 0;	/* present or swapped */
	}
	close(fd);
	return mapped;
fail:
	if (fd >= 0)
		close(fd);
	free(mapped);
	return NULL;	/* scan everything */
}

long vmm_nonzero_pages(const unsigned char *p, size_t npages, size_t page, unsigned char *out, int anon)
{
	unsigned char *mapped = anon ? vmm_mapped_pages(p, npages, page) : NULL;
	long n = 0;
	for (size_t i = 0; i < npages; i++) {
		out[i] = 0;
		if (mapped && !mapped[i])
			continue;
		const unsigned long *w = (const unsigned long *)(p + i * page);
		unsigned long acc = 0;
		for (size_t j = 0; j < page / sizeof(*w); j++)
			acc |= w[j];
		out[i] = acc != 0;
		n += out[i];
	}
	free(mapped);
	return n;
}
