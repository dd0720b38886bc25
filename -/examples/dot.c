/*
 * dot: a freestanding C guest (guest SDK example). Host argument 0 seeds a xorshift32 generator
 * that fills two int32 vectors; the guest computes their dot product (mod 2^32) in plain C, with
 * AVX2 intrinsics when this vCPU's CPUID and XCR0 allow AVX2, and with AVX-512 when they allow
 * AVX-512F; each vector result must equal the scalar one (else FAIL 0xa2 / 0xa5).
 * SYNC 1 = the dot product, SYNC 2 = the paths that ran (bit 0 AVX2, bit 1 AVX-512), then DONE.
 */
#include <immintrin.h>
#include "vmm.h"

#define N 1024

static int32_t a[N], b[N];

static uint32_t xorshift32(uint32_t *s)
{
	uint32_t x = *s;
	x ^= x << 13;
	x ^= x >> 17;
	x ^= x << 5;
	return *s = x;
}

static uint32_t dot_scalar(void)
{
	uint32_t sum = 0;
	for (int i = 0; i < N; i++)
		sum += (uint32_t)a[i] * (uint32_t)b[i];
	return sum;
}

__attribute__((target("avx2"))) static uint32_t dot_avx2(void)
{
	__m256i acc = _mm256_setzero_si256();
	for (int i = 0; i < N; i += 8) {
		__m256i x = _mm256_loadu_si256((const __m256i *)&a[i]);
		__m256i y = _mm256_loadu_si256((const __m256i *)&b[i]);
		acc = _mm256_add_epi32(acc, _mm256_mullo_epi32(x, y));
	}
	__m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
	s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
	return (uint32_t)_mm_cvtsi128_si32(s);
}

__attribute__((target("avx512f"))) static uint32_t dot_avx512(void)
{
	__m512i acc = _mm512_setzero_si512();
	for (int i = 0; i < N; i += 16) {
		__m512i x = _mm512_loadu_si512(&a[i]);
		__m512i y = _mm512_loadu_si512(&b[i]);
		acc = _mm512_add_epi32(acc, _mm512_mullo_epi32(x, y));
	}
	return (uint32_t)_mm512_reduce_add_epi32(acc);
}

/* CPUID.(7,0):EBX bit `bit`, with OSXSAVE and the XCR0 bits `xcr0` enabled */
static int usable(int bit, uint64_t xcr0)
{
	uint32_t r[4];
	vmm_cpuid(0, 0, r);
	if (r[0] < 7)
		return 0;
	vmm_cpuid(1, 0, r);
	if (!(r[2] & (1u << 27)))	/* OSXSAVE */
		return 0;
	if ((vmm_xgetbv(0) & xcr0) != xcr0)
		return 0;
	vmm_cpuid(7, 0, r);
	return r[1] >> bit & 1;
}

int vmm_main(unsigned vcpu)
{
	uint32_t seed = (uint32_t)vmm_arg(0);
	uint32_t paths = 0;

	(void)vcpu;
	if (!seed)
		seed = 1;	/* xorshift32 never leaves 0 */
	for (int i = 0; i < N; i++) {
		a[i] = (int32_t)xorshift32(&seed);
		b[i] = (int32_t)xorshift32(&seed);
	}
	uint32_t want = dot_scalar();
	if (usable(5, 0x6)) {		/* AVX2; XCR0 SSE|AVX */
		if (dot_avx2() != want)
			return 0xa2;
		paths |= 1;
	}
	if (usable(16, 0xe6)) {		/* AVX512F; XCR0 SSE|AVX|opmask|ZMM_Hi256|Hi16_ZMM */
		if (dot_avx512() != want)
			return 0xa5;
		paths |= 2;
	}
	vmm_puts("dot product ");
	vmm_puthex(want);
	vmm_putc('\n');
	vmm_sync(want);
	vmm_sync(paths);
	return 0;
}
