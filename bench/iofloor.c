/*
 * iofloor: the I/O floors of `make bench`'s snapshot rows. A plain C program (no vmm code):
 *
 *   iofloor write SRC DST   writes the bytes SRC's file system holds as data (SEEK_DATA/SEEK_HOLE),
 *                           at their offsets, to a new file DST (its holes stay holes), in 16 MiB
 *                           write()s straight from a mapping of SRC (no copy through a buffer),
 *                           then fsync(DST): what a snapshot save must at least do with its bytes.
 *   iofloor read FILE       read()s every byte of FILE (16 MiB at a time) and touches nothing
 *                           else: what checking a snapshot must at least do.
 *
 * Output: one JSON object on stdout, {"bytes": N, "ns": T}.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define CHUNK (16u << 20)

static void die(const char *what)
{
	fprintf(stderr, "iofloor: %s: %s\n", what, strerror(errno));
	exit(1);
}

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

static uint64_t do_write(const char *src, const char *dst)
{
	int in = open(src, O_RDONLY);
	struct stat st;
	if (in < 0 || fstat(in, &st) < 0)
		die(src);
	const unsigned char *map = st.st_size ? mmap(NULL, st.st_size, PROT_READ, MAP_SHARED, in, 0) : NULL;
	if (map == MAP_FAILED)
		die("mmap");
	int out = open(dst, O_WRONLY | O_CREAT | O_TRUNC, 0644);
	if (out < 0)
		die(dst);
	uint64_t total = 0;
	off_t pos = 0;
	while (pos < st.st_size) {
		off_t d = lseek(in, pos, SEEK_DATA);
		if (d < 0)
			break;	/* ENXIO: no data after pos */
		off_t h = lseek(in, d, SEEK_HOLE);
		if (h < 0 || h > st.st_size)
			h = st.st_size;
		for (off_t o = d; o < h;) {
			size_t n = (size_t)(h - o) < CHUNK ? (size_t)(h - o) : CHUNK;
			ssize_t w = pwrite(out, map + o, n, o);
			if (w <= 0)
				die("write");
			o += w;
			total += w;
		}
		pos = h;
	}
	if (ftruncate(out, st.st_size) < 0 || fsync(out) < 0)
		die("fsync");
	close(out);
	return total;
}

static uint64_t do_read(const char *path)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		die(path);
	unsigned char *buf = malloc(CHUNK);
	uint64_t total = 0;
	ssize_t r;
	while ((r = read(fd, buf, CHUNK)) > 0)
		total += r;
	if (r < 0)
		die("read");
	free(buf);
	close(fd);
	return total;
}

int main(int argc, char **argv)
{
	uint64_t t0 = now_ns(), n;
	if (argc == 4 && !strcmp(argv[1], "write"))
		n = do_write(argv[2], argv[3]);
	else if (argc == 3 && !strcmp(argv[1], "read"))
		n = do_read(argv[2]);
	else {
		fprintf(stderr, "usage: iofloor write SRC DST | iofloor read FILE\n");
		return 2;
	}
	printf("{\"bytes\": %llu, \"ns\": %llu}\n", (unsigned long long)n, (unsigned long long)(now_ns() - t0));
	return 0;
}
