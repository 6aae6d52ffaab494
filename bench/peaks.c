/* The arithmetic peaks of this CPU, each at its real vector width: every core issues
 * independent multiply-accumulate instructions from registers (no memory traffic), so no real
 * kernel of that kind can go faster. One line per kernel the CPU has:
 *
 *   fp32 avx2        8-wide FMA (vfmadd231ps ymm)                          16 FLOP/instruction
 *   fp32 avx512      16-wide FMA (vfmadd231ps zmm)                         32 FLOP/instruction
 *   bf16 avx512bf16  vdpbf16ps zmm: 32 bf16 products summed in pairs       64 FLOP/instruction
 *   int8 avx512vnni  vpdpbusd zmm: 64 u8 x s8 products summed in fours    128 OP/instruction
 *   int8 avxvnni     vpdpbusd ymm (AVX-VNNI)                               64 OP/instruction
 *   int8 avx2        vpmaddubsw ymm: 32 u8 x s8 products summed in pairs   64 OP/instruction
 *
 * (An "OP" of int8 is a multiply or an add, as a FLOP is for floats.) Each kernel is compiled
 * for its own instruction set (function attributes) and run only where the CPU reports it.
 * Built and run by bench/run.py:  cc -O3 -fopenmp peaks.c && ./a.out SECONDS
 * Prints "<precision> <isa> <G(FL)OP/s over all threads>" (OMP_NUM_THREADS, default every core). */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define CHAINS 12 /* independent accumulators: enough to hide latency on two ports */
#define ROUNDS 20000

typedef long (*kernel_fn)(double seconds, float *sink);

#define TIMED_LOOP(BODY)                          \
    long rounds = 0;                              \
    double t0 = omp_get_wtime();                  \
    while (omp_get_wtime() - t0 < seconds) {      \
        for (int r = 0; r < ROUNDS; r++) {        \
            for (int i = 0; i < CHAINS; i++) BODY \
        }                                         \
        rounds += ROUNDS;                         \
    }

__attribute__((target("avx2,fma"))) static long fp32_avx2(double seconds, float *sink) {
    __m256 acc[CHAINS];
    const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    TIMED_LOOP({ acc[i] = _mm256_fmadd_ps(acc[i], a, b); })
    __m256 s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm256_add_ps(s, acc[i]);
    *sink = _mm256_cvtss_f32(s);
    return rounds * CHAINS * 16;
}

__attribute__((target("avx512f"))) static long fp32_avx512(double seconds, float *sink) {
    __m512 acc[CHAINS];
    const __m512 a = _mm512_set1_ps(0.999999f), b = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    TIMED_LOOP({ acc[i] = _mm512_fmadd_ps(acc[i], a, b); })
    __m512 s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm512_add_ps(s, acc[i]);
    *sink = _mm512_reduce_add_ps(s);
    return rounds * CHAINS * 32;
}

__attribute__((target("avx512f,avx512bf16"))) static long bf16_avx512(double seconds, float *sink) {
    __m512 acc[CHAINS];
    const __m512bh a = (__m512bh)_mm512_set1_epi16(0x3f80), b = (__m512bh)_mm512_set1_epi16(0x3380);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    TIMED_LOOP({ acc[i] = _mm512_dpbf16_ps(acc[i], a, b); })
    __m512 s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm512_add_ps(s, acc[i]);
    *sink = _mm512_reduce_add_ps(s);
    return rounds * CHAINS * 64;
}

__attribute__((target("avx512f,avx512vnni"))) static long int8_avx512vnni(double seconds, float *sink) {
    __m512i acc[CHAINS];
    const __m512i a = _mm512_set1_epi8(3), b = _mm512_set1_epi8(-2);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_epi32(i);
    TIMED_LOOP({ acc[i] = _mm512_dpbusd_epi32(acc[i], a, b); })
    __m512i s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm512_add_epi32(s, acc[i]);
    *sink = (float)_mm512_reduce_add_epi32(s);
    return rounds * CHAINS * 128;
}

__attribute__((target("avx2,avxvnni"))) static long int8_avxvnni(double seconds, float *sink) {
    __m256i acc[CHAINS];
    const __m256i a = _mm256_set1_epi8(3), b = _mm256_set1_epi8(-2);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_epi32(i);
    TIMED_LOOP({ acc[i] = _mm256_dpbusd_avx_epi32(acc[i], a, b); })
    __m256i s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm256_add_epi32(s, acc[i]);
    *sink = (float)_mm256_extract_epi32(s, 0);
    return rounds * CHAINS * 64;
}

/* Without VNNI the only instruction that multiplies int8 is vpmaddubsw: 32 u8 x s8 products added
 * in pairs into 16 s16 (64 OP). Kernels then widen with vpmaddwd + vpaddd, or accumulate a few
 * steps in s16 first, so their rate is at most vpmaddubsw's issue rate: that is the ceiling
 * measured here. Each chain feeds its own result back as the next u8 operand (so the products
 * cannot be hoisted out of the loop). */
__attribute__((target("avx2"))) static long int8_avx2(double seconds, float *sink) {
    __m256i acc[CHAINS];
    const __m256i b = _mm256_set1_epi8(1);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_epi8((char)i);
    TIMED_LOOP({ acc[i] = _mm256_maddubs_epi16(acc[i], b); })
    __m256i s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm256_add_epi16(s, acc[i]);
    *sink = (float)_mm256_extract_epi16(s, 0);
    return rounds * CHAINS * 64;
}

static void run(const char *precision, const char *isa, kernel_fn kernel, double seconds) {
    double total = 0.0, start = omp_get_wtime();
    float sink = 0.0f;
#pragma omp parallel reduction(+ : total)
    {
        float mine = 0.0f;
        total += (double)kernel(seconds, &mine);
        if (mine == 12345.0f) sink = mine; /* keep the work observable */
    }
    double wall = omp_get_wtime() - start;
    printf("%s %s %.2f\n", precision, isa, total / wall / 1e9);
    if (sink == 54321.0f) printf("#\n");
    fflush(stdout);
}

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) run("fp32", "avx2", fp32_avx2, seconds);
    if (__builtin_cpu_supports("avx512f")) run("fp32", "avx512", fp32_avx512, seconds);
    if (__builtin_cpu_supports("avx512bf16")) run("bf16", "avx512bf16", bf16_avx512, seconds);
    if (__builtin_cpu_supports("avx512vnni")) run("int8", "avx512vnni", int8_avx512vnni, seconds);
    if (__builtin_cpu_supports("avxvnni")) run("int8", "avxvnni", int8_avxvnni, seconds);
    if (__builtin_cpu_supports("avx2")) run("int8", "avx2", int8_avx2, seconds);
    return 0;
}
