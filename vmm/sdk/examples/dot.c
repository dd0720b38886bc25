/*
 * dot: a freestanding C guest (guest SDK example). Host argument 0 seeds a xorshift32 generator
 * that fills two int32 vectors; the guest computes their dot product (mod 2^32) in plain C, with
 * AVX2 intrinsics when this vCPU's CPUID and XCR0 allow AVX2, and with AVX-512 when they allow
 * AVX-512F; each vector result must equal the scalar one (else FAIL 0xa2 / 0xa5). Where the vCPU
 * has AMX (CPUID AMX_TILE/AMX_INT8, XCR0 XTILECFG|XTILEDATA: `vmm run --amx` on an AMX host), the
 * dot product of the vectors' low bytes as int8 is also computed with TDPBSSD and checked (FAIL 0xa8).
 * SYNC 1 = the dot product, SYNC 2 = the paths that ran (bit 0 AVX2, bit 1 AVX-512, bit 2 AMX),
 * SYNC 3 (when AMX ran) = the int8 dot product, then DONE.
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

static uint32_t dot_int8_scalar(void)
{
	int32_t sum = 0;
	for (int i = 0; i < N; i++)
		sum += (int8_t)a[i] * (int8_t)b[i];
	return (uint32_t)sum;
}

/*
 * int8 dot product on AMX: A = the 1024 low bytes of a as 16 rows of 64; B row k, dword n holds
 * b's bytes 64n+4k..64n+4k+3 (TDPBSSD's VNNI layout), so C[m][n] = dot(segment m of a, segment n
 * of b) and the diagonal of C sums to the whole dot product.
 */
static struct { uint8_t palette, start_row, rsvd[14]; uint16_t colsb[16]; uint8_t rows[16]; }
	tilecfg __attribute__((aligned(64)));
static int8_t ta[16][64], tb[16][64];
static int32_t tc[16][16];

__attribute__((target("amx-tile,amx-int8"))) static uint32_t dot_int8_amx(void)
{
	for (int i = 0; i < N; i++)
		ta[i / 64][i % 64] = (int8_t)a[i];
	for (int n = 0; n < 16; n++)
		for (int k = 0; k < 16; k++)
			for (int j = 0; j < 4; j++)
				tb[k][4 * n + j] = (int8_t)b[64 * n + 4 * k + j];
	tilecfg.palette = 1;
	for (int t = 0; t < 3; t++) {
		tilecfg.colsb[t] = 64;
		tilecfg.rows[t] = 16;
	}
	_tile_loadconfig(&tilecfg);
	_tile_zero(0);
	_tile_loadd(1, ta, 64);
	_tile_loadd(2, tb, 64);
	_tile_dpbssd(0, 1, 2);
	_tile_stored(0, tc, 64);
	_tile_release();
	int32_t sum = 0;
	for (int m = 0; m < 16; m++)
		sum += tc[m][m];
	return (uint32_t)sum;
}

/* CPUID.(7,0):EDX bits AMX_TILE (24) and AMX_INT8 (25), OSXSAVE, XCR0 XTILECFG|XTILEDATA */
static int amx_usable(void)
{
	uint32_t r[4];
	vmm_cpuid(0, 0, r);
	if (r[0] < 0x1d)
		return 0;
	vmm_cpuid(1, 0, r);
	if (!(r[2] & (1u << 27)))
		return 0;
	if ((vmm_xgetbv(0) & 0x60000) != 0x60000)
		return 0;
	vmm_cpuid(7, 0, r);
	return (r[3] >> 24 & 3) == 3;
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
	uint32_t int8 = 0;
	if (amx_usable()) {
		int8 = dot_int8_amx();
		if (int8 != dot_int8_scalar())
			return 0xa8;
		paths |= 4;
	}
	vmm_puts("dot product ");
	vmm_puthex(want);
	vmm_putc('\n');
	vmm_sync(want);
	vmm_sync(paths);
	if (paths & 4)
		vmm_sync(int8);
	return 0;
}
