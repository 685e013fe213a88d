/* Normalisation over rows, forward and backward: the CPU kernels of bncourse.fast.torch_norm;
 * and batch norm over the channels of NCHW input, for bncourse.fast.torch_bn and, with x_hat
 * kept, bncourse.fast.numpy_bn (at the end).
 *
 * The input is seen as rows (R, S, L), contiguous: one mean and one 1 / sqrt(var + eps) per
 * row r, over its n = S * L values; the scale w and shift b are constant along L and indexed
 * by (r, s) as w[r * w_stride + s] (w_stride = 0: the same for every row, as in LayerNorm;
 * w_stride = S: one per (row, s), as GroupNorm's weight expanded over the samples).
 *
 *   LayerNorm, RMSNorm  (R = rows, S = D, L = 1, w_stride = 0)
 *   GroupNorm           (R = N * G, S = C / G, L = positions, w_stride = S)
 *   InstanceNorm        (R = N * C, S = 1, L = positions, w_stride = 1)
 *
 * Each row is read from memory once and stays in the cache for the second pass over it:
 * forward, the sums for the mean and variance, then the output; backward, the sums of g * w
 * and g * w * x_hat, then dx. A row's sums run in the vector lanes (omp simd lets the
 * compiler regroup these sums, and no other arithmetic), of values near zero, and are added
 * in double; the mean and rstd of each row are kept in double. x - mean is formed as
 * (x - mf) - mlo, where mf is the mean rounded to scalar_t (x - mf is exact for x near the
 * mean) and mlo what it left out, so a mean of 1e4 costs no digits in float32.
 * The rows are shared among threads with OpenMP (the thread count is an argument).
 *
 * The file is compiled once for float and once for double: it includes itself, with
 * scalar_t and NAME(f) defined for each.
 */
#ifndef NORM_ROWS_BODY
#define NORM_ROWS_BODY

#include <math.h>
#include <omp.h>
#include <stddef.h>
#include <stdint.h>

#define FLUSH_ROWS 32 /* rows summed in scalar_t before they are added to the double sums */

#define scalar_t float
#define NAME(f) f##_f32
#include "norm_rows.c"
#undef scalar_t
#undef NAME

#define scalar_t double
#define NAME(f) f##_f64
#include "norm_rows.c"
#undef scalar_t
#undef NAME

#else /* the body, once per scalar_t */

/* s += sum(t), ss += sum(t * t) for t = x[i] - pivot over x[0 .. n): in scalar_t in the vector
 * lanes (each lane sums n / 16 values or fewer), added to the double sums */
static void NAME(pivot_sums)(const scalar_t *x, int64_t n, scalar_t pivot, double *s, double *ss)
{
    scalar_t a = 0, b = 0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = 0; i < n; i++) {
        const scalar_t t = x[i] - pivot;
        a += t;
        b += t * t;
    }
    *s += a;
    *ss += b;
}

/* mean and biased variance from the sums of count values t = x - pivot (without centring: mean
 * 0 and the mean square, the pivot 0). The pivot is one of the values, so t is of the order of
 * the spread and mean(t * t) - mean(t)**2 loses few digits; constant values give t = 0 and a
 * variance of exactly 0. */
static void NAME(moments)(scalar_t pivot, double s, double ss, double count, int center,
                          double *mean, double *var)
{
    const double shift = center ? s / count : 0.0, v = ss / count - shift * shift;
    *mean = (double)pivot + shift;
    *var = v > 0.0 ? v : 0.0;
}

/* mean and biased variance of the row x[0 .. n), pivot x[0] (see moments) */
static void NAME(row_moments)(const scalar_t *x, int64_t n, int center, double *mean,
                              double *var)
{
    const scalar_t pivot = center ? x[0] : 0;
    double s = 0.0, ss = 0.0;
    NAME(pivot_sums)(x, n, pivot, &s, &ss);
    NAME(moments)(pivot, s, ss, (double)n, center, mean, var);
}

/* y = (x - mean) * rstd * w + b over rows; mean_out, rstd_out: one per row */
void NAME(norm_forward)(const scalar_t *x, const scalar_t *w, const scalar_t *b, scalar_t *y,
                        double *mean_out, double *rstd_out, int64_t R, int64_t S, int64_t L,
                        int64_t w_stride, int center, double eps, int threads)
{
    const int64_t n = S * L;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < R; r++) {
        const scalar_t *restrict xr = x + r * n;
        scalar_t *restrict yr = y + r * n;
        double m, var;
        NAME(row_moments)(xr, n, center, &m, &var);
        const double rs = 1.0 / sqrt(var + eps);
        mean_out[r] = m;
        rstd_out[r] = rs;
        const scalar_t *wr = w ? w + r * w_stride : NULL;
        const scalar_t *br = b ? b + r * w_stride : NULL;
        if (L == 1) { /* a scale and shift per value of the row */
            /* x - mean as (x - mf) - mlo: mf, the mean rounded, cancels exactly */
            const scalar_t mf = (scalar_t)m, mlo = (scalar_t)(m - mf), rf = (scalar_t)rs;
            if (wr && br)
                for (int64_t s = 0; s < S; s++)
                    yr[s] = ((xr[s] - mf) - mlo) * rf * wr[s] + br[s];
            else if (wr)
                for (int64_t s = 0; s < S; s++)
                    yr[s] = ((xr[s] - mf) - mlo) * rf * wr[s];
            else if (br)
                for (int64_t s = 0; s < S; s++)
                    yr[s] = ((xr[s] - mf) - mlo) * rf + br[s];
            else
                for (int64_t s = 0; s < S; s++)
                    yr[s] = ((xr[s] - mf) - mlo) * rf;
            continue;
        }
        const scalar_t mf = (scalar_t)m, mlo = (scalar_t)(m - mf);
        for (int64_t s = 0; s < S; s++) { /* one scale and shift per block of L values */
            const double a = wr ? rs * wr[s] : rs;
            const scalar_t af = (scalar_t)a;
            const scalar_t cf = (scalar_t)((br ? br[s] : 0.0) - mlo * a);
            const scalar_t *xs = xr + s * L;
            scalar_t *ys = yr + s * L;
            for (int64_t l = 0; l < L; l++)
                ys[l] = (xs[l] - mf) * af + cf;
        }
    }
}

/* acc += blk, and blk = 0 */
static void NAME(flush)(scalar_t *restrict blk, double *restrict acc, int64_t count)
{
    for (int64_t i = 0; i < count; i++) {
        acc[i] += blk[i];
        blk[i] = 0;
    }
}

/* dx of one row of S values with a scale per value (L == 1): rf g w + pf (x - mean) + qf */
static void NAME(row_dx)(const scalar_t *restrict g, const scalar_t *restrict x,
                         const scalar_t *restrict w, scalar_t mf, scalar_t mlo, scalar_t rf,
                         scalar_t pf, scalar_t qf, scalar_t *restrict dx, int64_t S)
{
    if (w)
        for (int64_t s = 0; s < S; s++)
            dx[s] = rf * g[s] * w[s] + pf * ((x[s] - mf) - mlo) + qf;
    else
        for (int64_t s = 0; s < S; s++)
            dx[s] = rf * g[s] + pf * ((x[s] - mf) - mlo) + qf;
}

/* dw += g x_hat and db += g, per value of one row (L == 1) */
static void NAME(row_sums)(const scalar_t *restrict g, const scalar_t *restrict x, scalar_t mf,
                           scalar_t mlo, scalar_t rf, scalar_t *restrict dw,
                           scalar_t *restrict db, int64_t S)
{
    for (int64_t s = 0; s < S; s++) {
        dw[s] += g[s] * (((x[s] - mf) - mlo) * rf);
        db[s] += g[s];
    }
}

/* The gradients of norm_forward for the upstream gradient g, from x and the saved mean and
 * rstd. dx (may be NULL): dx = rstd * (g w - mean(g w) - x_hat * mean(g w x_hat)), without
 * mean(g w) when not centring. The sums for the scale and shift: with L == 1, per thread and
 * per s into acc (threads x 2 x S doubles: sum of g * x_hat, then of g; zeroed by the caller;
 * may be NULL), through blocks (the same size in scalar_t, zeroed too); with L > 1, per
 * (row, s) into dw_rows and db_rows (R x S, may be NULL). */
void NAME(norm_backward)(const scalar_t *g, const scalar_t *x, const double *mean,
                         const double *rstd, const scalar_t *w, scalar_t *dx, double *acc,
                         scalar_t *blocks, scalar_t *dw_rows, scalar_t *db_rows, int64_t R,
                         int64_t S, int64_t L, int64_t w_stride, int center, int threads)
{
    const int64_t n = S * L;
#pragma omp parallel num_threads(threads)
    {
        /* this thread's sums for dw and db (L == 1): in blk, FLUSH_ROWS rows at a time,
         * then added to its double sums in acc */
        const int64_t mine = (int64_t)omp_get_thread_num() * 2 * S;
        double *acc_dw = acc ? acc + mine : NULL;
        scalar_t *blk = acc ? blocks + mine : NULL;
        scalar_t *blk_dw = blk, *blk_db = blk ? blk + S : NULL;
        int pending = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < R; r++) {
            const scalar_t *restrict xr = x + r * n, *restrict gr = g + r * n;
            const scalar_t *restrict wr = w ? w + r * w_stride : NULL;
            const double m = mean[r], rs = rstd[r];
            const scalar_t mf = (scalar_t)m, mlo = (scalar_t)(m - mf), rf = (scalar_t)rs;
            double sum_gw = 0.0, sum_gw_xhat = 0.0;
            if (L == 1) {
                scalar_t sg = 0, sgx = 0;
                if (wr)
#pragma omp simd reduction(+ : sg, sgx)
                    for (int64_t s = 0; s < S; s++) {
                        const scalar_t gw = gr[s] * wr[s];
                        sg += gw;
                        sgx += gw * ((xr[s] - mf) - mlo);
                    }
                else
#pragma omp simd reduction(+ : sg, sgx)
                    for (int64_t s = 0; s < S; s++) {
                        sg += gr[s];
                        sgx += gr[s] * ((xr[s] - mf) - mlo);
                    }
                sum_gw = sg;
                sum_gw_xhat = sgx;
            } else {
                for (int64_t s = 0; s < S; s++) {
                    const scalar_t *xs = xr + s * L, *gs = gr + s * L;
                    scalar_t sg = 0, sgx = 0;
#pragma omp simd reduction(+ : sg, sgx)
                    for (int64_t l = 0; l < L; l++) {
                        sg += gs[l];
                        sgx += gs[l] * ((xs[l] - mf) - mlo);
                    }
                    if (dw_rows)
                        dw_rows[r * S + s] = (scalar_t)(sgx * rs);
                    if (db_rows)
                        db_rows[r * S + s] = (scalar_t)sg;
                    const double ws = wr ? wr[s] : 1.0;
                    sum_gw += ws * sg;
                    sum_gw_xhat += ws * sgx;
                }
            }
            sum_gw_xhat *= rs; /* the sums were of g w (x - mean) */
            /* dx = rs * g w + p * (x - mean) + q */
            const double p = -rs * rs * sum_gw_xhat / (double)n;
            const double q = center ? -rs * sum_gw / (double)n : 0.0;
            const scalar_t pf = (scalar_t)p;
            if (L == 1) { /* (x - mf) - mlo, the centred value, is needed for dw too */
                const scalar_t qf = (scalar_t)q;
                scalar_t *dxr = dx ? dx + r * n : NULL;
                if (dxr)
                    NAME(row_dx)(gr, xr, wr, mf, mlo, rf, pf, qf, dxr, S);
                if (blk)
                    NAME(row_sums)(gr, xr, mf, mlo, rf, blk_dw, blk_db, S);
                if (blk && ++pending == FLUSH_ROWS) {
                    NAME(flush)(blk, acc_dw, 2 * S);
                    pending = 0;
                }
            } else if (dx) { /* p (x - mean) + q = p (x - mf) + (q - p mlo) */
                const scalar_t qf = (scalar_t)(q - p * (double)mlo);
                scalar_t *restrict dxr = dx + r * n;
                for (int64_t s = 0; s < S; s++) {
                    const scalar_t af = (scalar_t)(wr ? rs * wr[s] : rs);
                    const scalar_t *xs = xr + s * L, *gs = gr + s * L;
                    scalar_t *dxs = dxr + s * L;
                    for (int64_t l = 0; l < L; l++)
                        dxs[l] = af * gs[l] + pf * (xs[l] - mf) + qf;
                }
            }
        }
        if (blk)
            NAME(flush)(blk, acc_dw, 2 * S);
    }
}

/* Batch norm of x (N, C, L) contiguous (NCHW, L the positions): channel c is the N blocks of
 * L values at x + (n * C + c) * L, and the threads share the channels. Per channel, one pass
 * for the sums, then one for the output (or dx), while the channel's values are still in the
 * cache. */

/* mean and biased variance (double) of channel c, pivot its first value (see moments) */
static void NAME(channel_moments)(const scalar_t *x, int64_t N, int64_t C, int64_t L, int64_t c,
                                  double *mean, double *var)
{
    const scalar_t pivot = x[c * L];
    double s = 0.0, ss = 0.0;
    for (int64_t n = 0; n < N; n++)
        NAME(pivot_sums)(x + (n * C + c) * L, L, pivot, &s, &ss);
    NAME(moments)(pivot, s, ss, (double)N * (double)L, 1, mean, var);
}

/* sum(g) and sum(g * ((h - hf) - hlo)) over channel c (h: x with hf + hlo its mean, or x_hat
 * with hf = hlo = 0) */
static void NAME(channel_sums)(const scalar_t *g, const scalar_t *h, scalar_t hf, scalar_t hlo,
                               int64_t N, int64_t C, int64_t L, int64_t c, double *sum_g,
                               double *sum_gh)
{
    double sg = 0.0, sgh = 0.0;
    for (int64_t n = 0; n < N; n++) {
        const scalar_t *gb = g + (n * C + c) * L, *hb = h + (n * C + c) * L;
        scalar_t bg = 0, bgh = 0;
#pragma omp simd reduction(+ : bg, bgh)
        for (int64_t l = 0; l < L; l++) {
            bg += gb[l];
            bgh += gb[l] * ((hb[l] - hf) - hlo);
        }
        sg += bg;
        sgh += bgh;
    }
    *sum_g = sg;
    *sum_gh = sgh;
}

/* dx = a g + p (h - hf) + q over channel c */
static void NAME(channel_dx)(const scalar_t *restrict g, const scalar_t *restrict h, scalar_t hf,
                             scalar_t a, scalar_t p, scalar_t q, scalar_t *restrict dx, int64_t N,
                             int64_t C, int64_t L, int64_t c)
{
    for (int64_t n = 0; n < N; n++) {
        const int64_t at = (n * C + c) * L;
        for (int64_t l = 0; l < L; l++)
            dx[at + l] = a * g[at + l] + p * (h[at + l] - hf) + q;
    }
}

/* y = gamma * x_hat + beta with the batch statistics; mean_out and var_out (biased) in
 * double. */
void NAME(bn_forward)(const scalar_t *restrict x, const scalar_t *gamma, const scalar_t *beta,
                      scalar_t *restrict y, double *mean_out, double *var_out, int64_t N,
                      int64_t C, int64_t L, double eps, int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double m, var;
        NAME(channel_moments)(x, N, C, L, c, &m, &var);
        mean_out[c] = m;
        var_out[c] = var;
        /* y = (x - mean) a + beta = (x - mf) a + (beta - mlo a) */
        const double a = (gamma ? gamma[c] : 1.0) / sqrt(var + eps);
        const scalar_t mf = (scalar_t)m, af = (scalar_t)a;
        const scalar_t cf = (scalar_t)((beta ? beta[c] : 0.0) - (m - (double)mf) * a);
        for (int64_t n = 0; n < N; n++) {
            const int64_t at = (n * C + c) * L;
            for (int64_t l = 0; l < L; l++)
                y[at + l] = (x[at + l] - mf) * af + cf;
        }
    }
}

/* The gradients of bn_forward from x and the batch mean (double) and rstd of each channel:
 * dgamma = sum(g * x_hat), dbeta = sum(g), dx = a * (g - mean(g) - x_hat * mean(g * x_hat))
 * with a = gamma * rstd (dx may be NULL). */
void NAME(bn_backward)(const scalar_t *g, const scalar_t *x, const double *mean,
                       const double *rstd, const scalar_t *gamma, scalar_t *dx,
                       scalar_t *dgamma, scalar_t *dbeta, int64_t N, int64_t C, int64_t L,
                       int threads)
{
    const double count = (double)N * (double)L;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        const double m = mean[c], rs = rstd[c];
        const scalar_t mf = (scalar_t)m, mlo = (scalar_t)(m - mf);
        double sg, sgx; /* sum(g), sum(g * (x - mean)) */
        NAME(channel_sums)(g, x, mf, mlo, N, C, L, c, &sg, &sgx);
        dbeta[c] = (scalar_t)sg;
        dgamma[c] = (scalar_t)(sgx * rs);
        if (!dx)
            continue;
        /* dx = a g + p (x - mean) + q = a g + p (x - mf) + (q - p mlo) */
        const double a = (gamma ? gamma[c] : 1.0) * rs;
        const double p = -a * rs * rs * sgx / count, q = -a * sg / count;
        NAME(channel_dx)(g, x, mf, (scalar_t)a, (scalar_t)p, (scalar_t)(q - p * mlo), dx, N, C,
                         L, c);
    }
}

/* For bncourse.fast.numpy_bn, whose cache keeps x_hat: bn_forward that also writes x_hat, with
 * gamma and beta in double (either may be NULL). */
void NAME(bn_forward_xhat)(const scalar_t *restrict x, const double *gamma, const double *beta,
                           scalar_t *restrict y, scalar_t *restrict x_hat, double *mean_out,
                           double *var_out, int64_t N, int64_t C, int64_t L, double eps,
                           int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double m, var;
        NAME(channel_moments)(x, N, C, L, c, &m, &var);
        mean_out[c] = m;
        var_out[c] = var;
        const scalar_t mf = (scalar_t)m, mlo = (scalar_t)(m - mf);
        const scalar_t rf = (scalar_t)(1.0 / sqrt(var + eps));
        const scalar_t gf = (scalar_t)(gamma ? gamma[c] : 1.0);
        const scalar_t bf = (scalar_t)(beta ? beta[c] : 0.0);
        for (int64_t n = 0; n < N; n++) {
            const int64_t at = (n * C + c) * L;
            for (int64_t l = 0; l < L; l++) {
                const scalar_t h = ((x[at + l] - mf) - mlo) * rf;
                x_hat[at + l] = h;
                y[at + l] = h * gf + bf;
            }
        }
    }
}

/* The gradients from x_hat, for bncourse.fast.numpy_bn: dgamma = sum(g * x_hat) and
 * dbeta = sum(g) in double, dx = a * (g - mean(g) - x_hat * mean(g * x_hat)) with
 * a = gamma * inv_std (both double, per channel). */
void NAME(bn_backward_xhat)(const scalar_t *g, const scalar_t *x_hat, const double *gamma,
                            const double *inv_std, scalar_t *dx, double *dgamma, double *dbeta,
                            int64_t N, int64_t C, int64_t L, int threads)
{
    const double count = (double)N * (double)L;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t c = 0; c < C; c++) {
        double sg, sgh;
        NAME(channel_sums)(g, x_hat, 0, 0, N, C, L, c, &sg, &sgh);
        dgamma[c] = sgh;
        dbeta[c] = sg;
        const double a = gamma[c] * inv_std[c];
        NAME(channel_dx)(g, x_hat, 0, (scalar_t)a, (scalar_t)(-a * sgh / count),
                         (scalar_t)(-a * sg / count), dx, N, C, L, c);
    }
}

#endif
