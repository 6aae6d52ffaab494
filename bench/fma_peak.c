/* Peak fp32 FMA throughput of this CPU: every core issues independent 8-wide fused
 * multiply-adds from registers (no memory traffic), so no real kernel can go faster.
 * Built and run by bench/run.py:  cc -O3 -mavx2 -mfma -fopenmp fma_peak.c && ./a.out SECONDS
 * (-O3: at -O2 gcc keeps the accumulators in memory and measures store latency instead).
 * Prints GFLOP/s over all threads (OMP_NUM_THREADS, default: every core). */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define CHAINS 12 /* independent accumulators: enough to hide FMA latency on two ports */

static double now(void) { return omp_get_wtime(); }

int main(int argc, char **argv) {
    double seconds = argc > 1 ? atof(argv[1]) : 1.0;
    double total = 0.0, wall = 0.0;
    double start = now();
#pragma omp parallel reduction(+ : total)
    {
        __m256 acc[CHAINS];
        const __m256 a = _mm256_set1_ps(0.999999f), b = _mm256_set1_ps(1e-7f);
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
        long rounds = 0;
        double t0 = now();
        while (now() - t0 < seconds) {
            for (int r = 0; r < 100000; r++)
                for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], a, b);
            rounds += 100000;
        }
        float sink[8];
        __m256 s = acc[0];
        for (int i = 1; i < CHAINS; i++) s = _mm256_add_ps(s, acc[i]);
        _mm256_storeu_ps(sink, s);
        if (sink[0] == 12345.0f) printf("#"); /* keep the work observable */
        total += (double)rounds * CHAINS * 8 * 2;
    }
    wall = now() - start;
    printf("%.2f\n", total / wall / 1e9);
    return 0;
}
