/* polyprompt's native CPU kernels (AVX-512F/BW), built at runtime by server/cpu_kernels.py
 * with the machine's compiler and loaded with ctypes.
 *
 * decode_attention_*: one query per row over its own slot of the KV cache.
 *
 * For each decode row b and head h: scores over the row's own keys 0..len-1 (nothing
 * past its length is read, unlike a padded SDPA call with a mask), softmax in float32,
 * then the weighted sum of its values. K and V are read straight from the cache in
 * whatever memory order it has (strides in elements), in float32 or bfloat16 with float32
 * accumulation. A row's heads are read position by position, prefetched a few positions
 * ahead: decode attention is a stream through the cache, bound by memory bandwidth.
 * prefill_attention_*: causal attention of prefill rows over their own slots (below).
 * write_kv: a step's keys and values into the cache, a row copy per token.
 * argmax_rows_bf16: torch.argmax over the last dim of bf16 logits, in one pass.
 * screen_pick: the int8 greedy screen's candidates, rescored exactly, and each row's winner.
 * linear_amx_bf16: bf16 matmul (+ bias, tanh-GELU) of decode-sized steps on AMX tiles, built
 * only with -mamx-tile -mamx-bf16 (at the end of the file).
 * linear_int8 (AVX512-VNNI) and linear_int8_amx (AMX-INT8, built with -mamx-int8): the int8
 * matmul of --quantize int8; linear_bf16 (AVX512-BF16): bf16 matmuls on CPUs without AMX.
 *
 * Work is split over OpenMP threads: torch's own runtime, since the library is loaded into
 * a process that already has libgomp.so.1, and the caller passes torch's thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_HEADS 256
#define MAX_LEN 8192

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* the lanes of `live` from p (nothing else is read), the others 0 */
static inline __m512 load_bf16_masked(const uint16_t *p, __mmask16 live) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p)), 16));
}

/* float32 -> bfloat16, round to nearest even (as PyTorch's .to(bfloat16)); NaN stays NaN */
static inline void store_bf16(uint16_t *p, __m512 x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    _mm256_storeu_si256((__m256i *)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
}

static inline __m512 load_f32(const float *p) { return _mm512_loadu_ps(p); }
static inline void store_f32(float *p, __m512 x) { _mm512_storeu_ps(p, x); }

/* exp(x) for x <= 0, within ~2 ulp (Cephes expf's range reduction and polynomial) */
static inline __m512 exp_nonpos(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x); /* a NaN x stays NaN (max returns its 2nd operand) */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* The first min(left, 16) lanes */
static inline __mmask16 live_lanes(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* Softmax numerators in place: s[t] = exp(s[t] - mx) for t < n (16 lanes at a time);
 * returns their sum. */
static inline float exp_sum(float *s, int64_t n, float mx) {
    const __m512 m = _mm512_set1_ps(mx);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; t += 16) {
        const __mmask16 live = live_lanes(n - t);
        const __m512 e = _mm512_maskz_mov_ps(live, exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), m)));
        _mm512_mask_storeu_ps(s + t, live, e);
        sum = _mm512_add_ps(sum, e);
    }
    return _mm512_reduce_add_ps(sum);
}

/* Per (row, head) bodies take `nd` = D / 16 as an argument and are always inlined: the
 * kernels call them with a literal 4 for GPT-2's D = 64, so the loops over nd unroll and
 * the accumulators stay in registers, and with D / 16 for any other head size. */
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Software prefetch distances of the decode kernel, in positions: DECODE_PREFETCH ahead into
 * L1, DECODE_PREFETCH_L2 ahead into L2, neither past the row's last position (whatever lies
 * there is another slot's). The cache is read at ~8 GB/s without any: a row's keys of one head
 * are a short strided run (128 B a position in a token-major bf16 cache) that the hardware
 * prefetcher picks up too late. L1 prefetches alone are bounded by the core's few L1 fill
 * buffers; the L2 ones, further ahead, keep more lines in flight (a 64-row bf16 decode step's
 * attention 10.1 -> 8.5 ms on Sapphire Rapids, 16.4 -> 19.5 GB/s of cache read). The keys'
 * last L2 prefetches reach into the row's first values, read right after. */
#define DECODE_PREFETCH 4
#define DECODE_PREFETCH_L2 16

ALWAYS_INLINE void prefetch_lines(const void *p, int bytes) {
    for (int c = 0; c < bytes; c += 64) _mm_prefetch((const char *)p + c, _MM_HINT_T0);
}
ALWAYS_INLINE void prefetch_lines_l2(const void *p, int bytes) {
    for (int c = 0; c < bytes; c += 64) _mm_prefetch((const char *)p + c, _MM_HINT_T1);
}

/* One decode row, every head: keys/values of head h at position t are at kp, vp + h * sh +
 * t * st, n positions; query head h at qp + h * q_sh. Positions are the outer loop (each
 * position's heads are read together, prefetched DECODE_PREFETCH and _L2 positions ahead), heads the
 * inner one. Scratch: s (H * ls floats: scores, then softmax numerators), o (H * D floats:
 * first the scaled query, then the value accumulators), inv (H floats). Per head the
 * arithmetic and its order are exactly those of one (row, head) at a time. */
#define DECODE_ROW(NAME, T, KT, LOAD, KLOAD, STORE, SCALED)                                         \
    ALWAYS_INLINE void NAME(const T *qp, int64_t q_sh, const KT *kp, const KT *vp, int64_t sh,     \
                            int64_t st, const float *ks, const float *vs, int64_t c_sh,            \
                            int64_t c_st, int64_t n, T *op, int64_t o_sh, int H, float scale,      \
                            float *s, int64_t ls, float *o, float *inv, const int nd) {            \
        const int D = nd * 16, bytes = D * (int)sizeof(KT);                                        \
        float *qf = o;                                                                             \
        for (int h = 0; h < H; h++)                                                                \
            for (int j = 0; j < nd; j++)                                                           \
                _mm512_store_ps(qf + h * D + 16 * j,                                               \
                                _mm512_mul_ps(LOAD(qp + h * q_sh + 16 * j), _mm512_set1_ps(scale))); \
        for (int64_t t = 0; t < n && t < DECODE_PREFETCH_L2; t++)                                  \
            for (int h = 0; h < H; h++) {                                                          \
                if (t < DECODE_PREFETCH) prefetch_lines(kp + t * st + h * sh, bytes);              \
                else prefetch_lines_l2(kp + t * st + h * sh, bytes);                               \
            }                                                                                      \
        for (int64_t t = 0; t < n; t++) {                                                          \
            const KT *kt = kp + t * st;                                                            \
            for (int h = 0; h < H; h++) {                                                          \
                const KT *kh = kt + h * sh;                                                        \
                const float *qh = qf + h * D;                                                      \
                if (t + DECODE_PREFETCH < n) prefetch_lines(kh + DECODE_PREFETCH * st, bytes);     \
                if (t + DECODE_PREFETCH_L2 < n) prefetch_lines_l2(kh + DECODE_PREFETCH_L2 * st, bytes); \
                else if (t + DECODE_PREFETCH_L2 - n < n)                                           \
                    prefetch_lines_l2(vp + (t + DECODE_PREFETCH_L2 - n) * st + h * sh, bytes);     \
                __m512 acc = _mm512_mul_ps(_mm512_load_ps(qh), KLOAD(kh));                         \
                for (int j = 1; j < nd; j++)                                                       \
                    acc = _mm512_fmadd_ps(_mm512_load_ps(qh + 16 * j), KLOAD(kh + 16 * j), acc);   \
                s[h * ls + t] = SCALED(_mm512_reduce_add_ps(acc), ks[h * c_sh + t * c_st]);        \
            }                                                                                      \
        }                                                                                          \
        for (int64_t t = 0; t < n && t < DECODE_PREFETCH; t++)                                     \
            for (int h = 0; h < H; h++) prefetch_lines(vp + t * st + h * sh, bytes);               \
        for (int h = 0; h < H; h++) {                                                              \
            float *sh_ = s + h * ls, mx = -INFINITY;                                               \
            for (int64_t t = 0; t < n; t++) mx = sh_[t] > mx ? sh_[t] : mx;                        \
            inv[h] = 1.0f / exp_sum(sh_, n, mx);                                                   \
        }                                                                                          \
        for (int i = 0; i < H * D; i += 16) _mm512_store_ps(o + i, _mm512_setzero_ps());           \
        for (int64_t t = 0; t < n; t++) {                                                          \
            const KT *vt = vp + t * st;                                                            \
            for (int h = 0; h < H; h++) {                                                          \
                const __m512 p = _mm512_set1_ps(SCALED(s[h * ls + t], vs[h * c_sh + t * c_st]));   \
                const KT *vh = vt + h * sh;                                                        \
                float *oh = o + h * D;                                                             \
                if (t + DECODE_PREFETCH < n) prefetch_lines(vh + DECODE_PREFETCH * st, bytes);     \
                if (t + DECODE_PREFETCH_L2 < n) prefetch_lines_l2(vh + DECODE_PREFETCH_L2 * st, bytes); \
                for (int j = 0; j < nd; j++)                                                       \
                    _mm512_store_ps(oh + 16 * j, _mm512_fmadd_ps(p, KLOAD(vh + 16 * j), _mm512_load_ps(oh + 16 * j))); \
            }                                                                                      \
        }                                                                                          \
        for (int h = 0; h < H; h++) {                                                              \
            const __m512 iv = _mm512_set1_ps(inv[h]);                                              \
            for (int j = 0; j < nd; j++)                                                           \
                STORE(op + h * o_sh + 16 * j, _mm512_mul_ps(_mm512_load_ps(o + h * D + 16 * j), iv)); \
        }                                                                                          \
    }

/* q: [B, H, D] (strides q_sb, q_sh; unit stride in D); row b reads slot slots[b] of the
 * cache, keys/values at positions 0..lens[b]-1: element (slot, h, t, d) of K (and of V)
 * is at k[slot*sb + h*sh + t*st + d]; out: [B, H, D] (strides o_sb, o_sh). D % 16 == 0,
 * D <= MAX_HEAD_DIM, H <= MAX_HEADS, 1 <= lens[b] <= MAX_LEN (checked by the caller).
 * Rows are split over threads; each thread allocates its scratch once. Returns 1 when a
 * scratch allocation failed (out is then incomplete), else 0. */
#define DECODE_ATTENTION(NAME, ROW, T, KT)                                                         \
    int NAME(const T *q, int64_t q_sb, int64_t q_sh, const KT *k, const KT *v, int64_t sb,         \
             int64_t sh, int64_t st, const float *ks, const float *vs, int64_t c_sb, int64_t c_sh, \
             int64_t c_st, const int64_t *slots, const int64_t *lens, T *out, int64_t o_sb,        \
             int64_t o_sh, int B, int H, int D, float scale, int threads) {                        \
        int64_t maxn = 1;                                                                          \
        for (int b = 0; b < B; b++) maxn = lens[b] > maxn ? lens[b] : maxn;                        \
        const int64_t ls = (maxn + 15) / 16 * 16;                                                  \
        int failed = 0;                                                                            \
        _Pragma("omp parallel num_threads(threads)")                                               \
        {                                                                                          \
            float *s = aligned_alloc(64, (size_t)H * ls * sizeof(float));                          \
            float *o = aligned_alloc(64, ((size_t)H * D * sizeof(float) + 63) / 64 * 64);          \
            float inv[MAX_HEADS];                                                                  \
            if (!s || !o) {                                                                        \
                _Pragma("omp atomic write")                                                        \
                failed = 1;                                                                        \
            }                                                                                      \
            _Pragma("omp for schedule(static)")                                                    \
            for (int b = 0; b < B; b++) {                                                          \
                if (!s || !o) continue;                                                            \
                const KT *kp = k + slots[b] * sb, *vp = v + slots[b] * sb;                         \
                const float *ksb = ks ? ks + slots[b] * c_sb : NULL, *vsb = vs ? vs + slots[b] * c_sb : NULL; \
                if (D == 64)                                                                       \
                    ROW(q + b * q_sb, q_sh, kp, vp, sh, st, ksb, vsb, c_sh, c_st, lens[b], out + b * o_sb, o_sh, H, \
                        scale, s, ls, o, inv, 4);                                                  \
                else                                                                               \
                    ROW(q + b * q_sb, q_sh, kp, vp, sh, st, ksb, vsb, c_sh, c_st, lens[b], out + b * o_sb, o_sh, H, \
                        scale, s, ls, o, inv, D / 16);                                             \
            }                                                                                      \
            free(s);                                                                               \
            free(o);                                                                               \
        }                                                                                          \
        return failed;                                                                             \
    }

/* The int8 cache (--kv-cache-dtype int8, `write_kv_i8`): a key or value of one head at one
 * position is its int8 vector times its float32 scale. A score is the dot product with the
 * int8 key times the key's scale; a softmax numerator is multiplied by the value's scale
 * before it weights the int8 value. The unscaled caches multiply by nothing (NO_SCALE). */
#define NO_SCALE(x, sc) (x)
#define BY_SCALE(x, sc) ((x) * (sc))
static inline __m512 load_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
DECODE_ROW(decode_row_f32, float, float, load_f32, load_f32, store_f32, NO_SCALE)
DECODE_ROW(decode_row_bf16, uint16_t, uint16_t, load_bf16, load_bf16, store_bf16, NO_SCALE)
DECODE_ROW(decode_row_f32_i8, float, int8_t, load_f32, load_i8, store_f32, BY_SCALE)
DECODE_ROW(decode_row_bf16_i8, uint16_t, int8_t, load_bf16, load_i8, store_bf16, BY_SCALE)
DECODE_ATTENTION(decode_attention_f32, decode_row_f32, float, float)
DECODE_ATTENTION(decode_attention_bf16, decode_row_bf16, uint16_t, uint16_t)
DECODE_ATTENTION(decode_attention_f32_i8, decode_row_f32_i8, float, int8_t)
DECODE_ATTENTION(decode_attention_bf16_i8, decode_row_bf16_i8, uint16_t, int8_t)

/* out[r] = torch.argmax(x[r, :V]): the first index of the row's maximum, a NaN counting as
 * the maximum (its first index wins). x: bf16 rows with stride rs (elements). */
void argmax_rows_bf16(const uint16_t *x, int64_t rs, int64_t V, int R, int64_t *out, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int r = 0; r < R; r++) {
        const uint16_t *p = x + r * rs;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i best_idx = _mm512_setzero_si512();
        __m512i idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        const __m512i step = _mm512_set1_epi32(16);
        __mmask16 nan = 0;
        int64_t v = 0;
        for (; v + 16 <= V; v += 16) {  /* per lane: strictly greater keeps the first */
            const __m512 y = load_bf16(p + v);
            const __mmask16 gt = _mm512_cmp_ps_mask(y, best, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, gt, y);
            best_idx = _mm512_mask_mov_epi32(best_idx, gt, idx);
            idx = _mm512_add_epi32(idx, step);
        }
        if (v < V) {
            const __mmask16 live = live_lanes(V - v);
            const __m512 y = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), load_bf16_masked(p + v, live));
            const __mmask16 gt = _mm512_cmp_ps_mask(y, best, _CMP_GT_OQ);
            nan |= _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q);
            best = _mm512_mask_mov_ps(best, gt, y);
            best_idx = _mm512_mask_mov_epi32(best_idx, gt, idx);
        }
        if (nan) {  /* rare: the first NaN is the answer */
            int64_t i = 0;
            while (i < V && (p[i] & 0x7fff) <= 0x7f80) i++;
            out[r] = i;
            continue;
        }
        /* across lanes: the lowest index among the lanes holding the maximum */
        const float m = _mm512_reduce_max_ps(best);
        const __mmask16 eq = _mm512_cmp_ps_mask(best, _mm512_set1_ps(m), _CMP_EQ_OQ);
        out[r] = _mm512_mask_reduce_min_epi32(eq, best_idx);
    }
}

/* The int8 greedy screen's pick (server/model/greedy.py, Int8Screen), one row per thread:
 * y[r, :V] are the row's int8 logits over the vocabulary in the screen's sorted order (bf16: each
 * within Y_ROUNDING |y| of the kernel's float value), bound[r, b] (float64) bounds
 * |float value - exact| over block b of 64 tokens (the last one partial). The
 * exact best logit is at least low = max_b (max y in b - bound[b]); every token whose y reaches
 * low - bound[b] is rescored exactly: float64 dot of h[r] (float32) and its head row w[perm[j]]
 * (float32, or bf16 if w_bf16), rounded to float32 (and to bf16 if round_bf16, as a bf16
 * head's logits are; low is then lowered by slack * |low| so ties in bf16 are all kept). The
 * best score wins, the lowest token id on ties. tok[r] = -1 where the row cannot be decided
 * here (a non-finite bound or score, or more than max_cand candidates); count[r] = its
 * candidates. */
static inline float round_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    u = (u + 0x7fff + ((u >> 16) & 1)) & 0xffff0000u;
    memcpy(&x, &u, 4);
    return x;
}

/* float64 dot of K float32 values and K float32 (or bf16) values, in 16 float64 lanes */
static inline double dot_f64(const float *a, const void *b, int b_bf16, int64_t K) {
    __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 live = live_lanes(K - k);
        const __m512 x = _mm512_maskz_loadu_ps(live, a + k);
        const __m512 w = b_bf16 ? load_bf16_masked((const uint16_t *)b + k, live)
                                : _mm512_maskz_loadu_ps(live, (const float *)b + k);
        s0 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(x)), _mm512_cvtps_pd(_mm512_castps512_ps256(w)), s0);
        s1 = _mm512_fmadd_pd(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1))),
                             _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(w), 1))), s1);
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
}

#define Y_ROUNDING 0.0078125 /* 2^-7 > a bf16 value's rounding error relative to it */
#define SCREEN_PREFETCH 4 /* candidates ahead */
void screen_pick(const uint16_t *y, int64_t R, int64_t V, const double *bound, int64_t nblk,
                 const int64_t *perm, const float *h, int64_t K, const void *w, int w_bf16,
                 int round_bf16_out, double slack, int64_t max_cand, int64_t *tok, int64_t *count,
                 int threads) {
    _Pragma("omp parallel num_threads(threads)")
    {
        /* scratch once per thread: block maxima, and the candidates' ids (scored after they are all
         * known, with their head rows prefetched a few ahead: random rows, from memory, ~40 a row) */
        float *bmax = malloc((size_t)(nblk > 0 ? nblk : 1) * sizeof(float));
        int64_t *cand = malloc((size_t)(max_cand > 0 ? max_cand : 1) * sizeof(int64_t));
        _Pragma("omp for schedule(static)")
        for (int64_t r = 0; r < R; r++) {
            const uint16_t *yr = y + r * V;
            const double *br = bound + r * nblk;
            const float *hr = h + r * K;
            double low = -INFINITY;
            int ok = bmax != NULL && cand != NULL;
            for (int64_t b = 0; ok && b < nblk; b++) {
                const int64_t v0 = b * 64, n = V - v0 < 64 ? V - v0 : 64;
                __m512 m = _mm512_set1_ps(-INFINITY);
                for (int64_t t = 0; t < n; t += 16)
                    m = _mm512_max_ps(m, _mm512_mask_blend_ps(live_lanes(n - t), _mm512_set1_ps(-INFINITY),
                                                              load_bf16_masked(yr + v0 + t, live_lanes(n - t))));
                bmax[b] = _mm512_reduce_max_ps(m);
                const double lb = (double)bmax[b] - fabs((double)bmax[b]) * Y_ROUNDING - br[b];
                if (!isfinite(br[b]) || !isfinite(lb)) ok = 0;
                if (lb > low) low = lb;
            }
            if (round_bf16_out) low -= fabs(low) * slack;
            int64_t best_tok = -1, n_cand = 0;
            float best = -INFINITY;
            for (int64_t b = 0; ok && b < nblk; b++) {
                const double thr = low - br[b];
                if ((double)bmax[b] + fabs((double)bmax[b]) * Y_ROUNDING < thr) continue;
                const int64_t v0 = b * 64, n = V - v0 < 64 ? V - v0 : 64;
                for (int64_t t = 0; t < n; t++) {
                    uint32_t u = (uint32_t)yr[v0 + t] << 16;
                    float yv;
                    memcpy(&yv, &u, 4);
                    if ((double)yv + fabs((double)yv) * Y_ROUNDING < thr) continue;
                    if (++n_cand > max_cand) { ok = 0; break; }
                    cand[n_cand - 1] = perm[v0 + t];
                }
            }
            const int64_t esz = w_bf16 ? 2 : 4;
            for (int64_t i = 0; ok && i < n_cand && i < SCREEN_PREFETCH; i++)
                prefetch_lines((const char *)w + cand[i] * K * esz, (int)(K * esz));
            for (int64_t i = 0; ok && i < n_cand; i++) {
                if (i + SCREEN_PREFETCH < n_cand)
                    prefetch_lines((const char *)w + cand[i + SCREEN_PREFETCH] * K * esz, (int)(K * esz));
                const int64_t id = cand[i];
                float score = (float)dot_f64(hr, (const char *)w + id * K * esz, w_bf16, K);
                if (round_bf16_out) score = round_bf16(score);
                if (!isfinite(score)) { ok = 0; break; }
                if (score > best || (score == best && id < best_tok)) { best = score; best_tok = id; }
            }
            tok[r] = ok ? best_tok : -1;
            count[r] = n_cand;
        }
        free(cand);
        free(bmax);
    }
}

/* The K/V cache write of a step: for token i, K (kv=0) and V (kv=1) of every head go to
 * position pos[i] of slot slots[i]. src element (i, kv, h, d) is at
 * src[i*s_i + kv*s_kv + h*s_h + d], dst element (kv, slot, h, t, d) at
 * dst[kv*d_kv + slot*d_slot + h*d_h + t*d_t + d]; strides in elements of `elem` bytes. Where
 * the heads of one position are contiguous on both sides (the token-major cache), each
 * K or V row is a single copy. */
void write_kv(const char *src, int64_t s_i, int64_t s_kv, int64_t s_h, char *dst, int64_t d_kv,
              int64_t d_slot, int64_t d_h, int64_t d_t, const int64_t *slots, const int64_t *pos,
              int N, int H, int D, int elem, int threads) {
    const int whole = (s_h == D && d_h == D);
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(N >= 256)")
    for (int i = 0; i < N; i++) {
        for (int kv = 0; kv < 2; kv++) {
            const char *s = src + (i * s_i + kv * s_kv) * elem;
            char *d = dst + (kv * d_kv + slots[i] * d_slot + pos[i] * d_t) * elem;
            if (whole) {
                memcpy(d, s, (size_t)H * D * elem);
            } else {
                for (int h = 0; h < H; h++) memcpy(d + h * d_h * elem, s + h * s_h * elem, (size_t)D * elem);
            }
        }
    }
}

/* Prefill attention: row b's qlens[b] queries (rows start_b.. of q, start_b the sum of the
 * earlier rows' qlens) sit at positions pasts[b].. of slot slots[b]; query i attends to
 * keys 0..pasts[b]+i (causal; its own key is already in the cache). Per (row, head) the
 * row's keys and values are converted once to a float32 scratch, keys transposed so a
 * query scores 16 keys with D broadcast FMAs and no horizontal sums. Cache strides as in
 * decode_attention; q and out: [N, H, D] with strides (s_i, s_h). */
#define PREFILL_ONE(NAME, T, KT, LOAD, KLOAD, STORE, TO_F32, SCALED, VSCALED)                      \
    ALWAYS_INLINE void NAME(const T *q, int64_t q_si, const KT *kp, const KT *vp, int64_t st,      \
                            const float *ks, const float *vs, int64_t c_st, int64_t past,          \
                            int64_t nq, T *out, int64_t o_si, float scale, float *kt, float *vf,   \
                            float *s, int64_t lpad, const int nd) {                                \
        const int D = 16 * nd;                                                                     \
        const int64_t len = past + nq;                                                             \
        for (int d = 0; d < D; d++) {                                                              \
            float *row = kt + d * lpad;                                                            \
            for (int64_t t = 0; t < len; t++) row[t] = SCALED(TO_F32(kp[t * st + d]), ks[t * c_st]); \
            for (int64_t t = len; t < lpad; t++) row[t] = 0.0f;                                    \
        }                                                                                          \
        for (int64_t t = 0; t < len; t++)                                                          \
            for (int j = 0; j < nd; j++)                                                           \
                _mm512_storeu_ps(vf + t * D + 16 * j, VSCALED(KLOAD(vp + t * st + 16 * j), vs[t * c_st])); \
        for (int64_t i = 0; i < nq; i++) {                                                         \
            const T *qp = q + i * q_si;                                                            \
            float qs[MAX_HEAD_DIM];                                                                \
            for (int j = 0; j < nd; j++)                                                           \
                _mm512_storeu_ps(qs + 16 * j, _mm512_mul_ps(LOAD(qp + 16 * j), _mm512_set1_ps(scale))); \
            const int64_t n = past + i + 1; /* keys 0..n-1 */                                      \
            __m512 mx = _mm512_set1_ps(-INFINITY);                                                 \
            for (int64_t t0 = 0; t0 < n; t0 += 16) {                                               \
                __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                        \
                const float *kc = kt + t0;                                                         \
                for (int d = 0; d < D; d += 4) {                                                   \
                    a0 = _mm512_fmadd_ps(_mm512_set1_ps(qs[d]), _mm512_loadu_ps(kc + d * lpad), a0); \
                    a1 = _mm512_fmadd_ps(_mm512_set1_ps(qs[d + 1]), _mm512_loadu_ps(kc + (d + 1) * lpad), a1); \
                    a2 = _mm512_fmadd_ps(_mm512_set1_ps(qs[d + 2]), _mm512_loadu_ps(kc + (d + 2) * lpad), a2); \
                    a3 = _mm512_fmadd_ps(_mm512_set1_ps(qs[d + 3]), _mm512_loadu_ps(kc + (d + 3) * lpad), a3); \
                }                                                                                  \
                __m512 sc = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));           \
                sc = _mm512_mask_blend_ps(live_lanes(n - t0), _mm512_set1_ps(-INFINITY), sc);      \
                _mm512_storeu_ps(s + t0, sc);                                                      \
                mx = _mm512_max_ps(mx, sc);                                                        \
            }                                                                                      \
            const float total = exp_sum(s, n, _mm512_reduce_max_ps(mx));                           \
            __m512 o0[MAX_HEAD_DIM / 16], o1[MAX_HEAD_DIM / 16]; /* two chains: even, odd t */     \
            for (int j = 0; j < nd; j++) o0[j] = o1[j] = _mm512_setzero_ps();                      \
            int64_t t = 0;                                                                         \
            for (; t + 1 < n; t += 2) {                                                            \
                const __m512 p0 = _mm512_set1_ps(s[t]), p1 = _mm512_set1_ps(s[t + 1]);             \
                for (int j = 0; j < nd; j++) {                                                     \
                    o0[j] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(vf + t * D + 16 * j), o0[j]);      \
                    o1[j] = _mm512_fmadd_ps(p1, _mm512_loadu_ps(vf + (t + 1) * D + 16 * j), o1[j]); \
                }                                                                                  \
            }                                                                                      \
            if (t < n) {                                                                           \
                const __m512 p0 = _mm512_set1_ps(s[t]);                                            \
                for (int j = 0; j < nd; j++)                                                       \
                    o0[j] = _mm512_fmadd_ps(p0, _mm512_loadu_ps(vf + t * D + 16 * j), o0[j]);      \
            }                                                                                      \
            const __m512 inv = _mm512_set1_ps(1.0f / total);                                       \
            T *op = out + i * o_si;                                                                \
            for (int j = 0; j < nd; j++) STORE(op + 16 * j, _mm512_mul_ps(_mm512_add_ps(o0[j], o1[j]), inv)); \
        }                                                                                          \
    }

/* Returns 0, or 1 when a scratch buffer could not be allocated (out is then incomplete). */
#define PREFILL_ATTENTION(NAME, ONE, T, KT)                                                        \
    int NAME(const T *q, int64_t q_si, int64_t q_sh, const KT *k, const KT *v, int64_t sb,        \
              int64_t sh, int64_t st, const float *ks, const float *vs, int64_t c_sb,              \
              int64_t c_sh, int64_t c_st, const int64_t *slots, const int64_t *pasts,              \
              const int64_t *qlens, T *out, int64_t o_si, int64_t o_sh, int B, int H, int D,       \
              float scale, int threads) {                                                          \
        int64_t *starts = (int64_t *)malloc(sizeof(int64_t) * (B > 0 ? B : 1));                    \
        int failed = starts == NULL;                                                               \
        if (failed) return 1;                                                                      \
        int64_t acc = 0;                                                                           \
        for (int b = 0; b < B; b++) { starts[b] = acc; acc += qlens[b]; }                          \
        _Pragma("omp parallel for num_threads(threads) schedule(dynamic, 2) collapse(2)")          \
        for (int b = 0; b < B; b++) {                                                              \
            for (int h = 0; h < H; h++) {                                                          \
                const int64_t len = pasts[b] + qlens[b], lpad = (len + 15) & ~(int64_t)15;         \
                float *kt = (float *)aligned_alloc(64, (size_t)(lpad * D + len * D + lpad) * 4);  \
                if (kt == NULL) {                                                                  \
                    _Pragma("omp atomic write")                                                    \
                    failed = 1;                                                                    \
                    continue;                                                                      \
                }                                                                                  \
                const KT *kp = k + slots[b] * sb + h * sh, *vp = v + slots[b] * sb + h * sh;      \
                const int64_t c_off = slots[b] * c_sb + h * c_sh;                                  \
                const float *ksb = ks ? ks + c_off : NULL, *vsb = vs ? vs + c_off : NULL;          \
                const T *qp = q + starts[b] * q_si + h * q_sh;                                     \
                T *op = out + starts[b] * o_si + h * o_sh;                                         \
                float *vf = kt + lpad * D, *s = vf + len * D;                                      \
                if (D == 64)                                                                       \
                    ONE(qp, q_si, kp, vp, st, ksb, vsb, c_st, pasts[b], qlens[b], op, o_si, scale, kt, vf, s, \
                        lpad, 4);                                                                  \
                else                                                                               \
                    ONE(qp, q_si, kp, vp, st, ksb, vsb, c_st, pasts[b], qlens[b], op, o_si, scale, kt, vf, s, \
                        lpad, D / 16);                                                             \
                free(kt);                                                                          \
            }                                                                                      \
        }                                                                                          \
        free(starts);                                                                              \
        return failed;                                                                             \
    }

static inline float f32_of_f32(float x) { return x; }
static inline float f32_of_bf16(uint16_t x) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)x << 16;
    return c.f;
}
static inline float f32_of_i8(int8_t x) { return (float)x; }
#define VEC_SCALE(x, sc) _mm512_mul_ps(x, _mm512_set1_ps(sc))
PREFILL_ONE(prefill_one_f32, float, float, load_f32, load_f32, store_f32, f32_of_f32, NO_SCALE, NO_SCALE)
PREFILL_ONE(prefill_one_bf16, uint16_t, uint16_t, load_bf16, load_bf16, store_bf16, f32_of_bf16, NO_SCALE, NO_SCALE)
PREFILL_ONE(prefill_one_f32_i8, float, int8_t, load_f32, load_i8, store_f32, f32_of_i8, BY_SCALE, VEC_SCALE)
PREFILL_ONE(prefill_one_bf16_i8, uint16_t, int8_t, load_bf16, load_i8, store_bf16, f32_of_i8, BY_SCALE, VEC_SCALE)
PREFILL_ATTENTION(prefill_attention_f32, prefill_one_f32, float, float)
PREFILL_ATTENTION(prefill_attention_bf16, prefill_one_bf16, uint16_t, uint16_t)
PREFILL_ATTENTION(prefill_attention_f32_i8, prefill_one_f32_i8, float, int8_t)
PREFILL_ATTENTION(prefill_attention_bf16_i8, prefill_one_bf16_i8, uint16_t, int8_t)

/* The int8 cache's write: each token's key and value of each head, quantized symmetrically
 * on its own: scale = max|x| / 127, q = round-half-even(x * (127 / max|x|)) (all zero, scale
 * 0, when max|x| == 0). src (float32, or bf16 when src_bf16) and dst as in write_kv; the
 * scale of (kv, slot, h, t) at sc[kv*c_kv + slot*c_slot + h*c_h + t*c_t]. D % 16 == 0.
 * `server.engine.kv_cache.quantize_kv` is the same arithmetic in torch (tested equal). */
void write_kv_i8(const void *src, int src_bf16, int64_t s_i, int64_t s_kv, int64_t s_h, int8_t *dst,
                 int64_t d_kv, int64_t d_slot, int64_t d_h, int64_t d_t, float *sc, int64_t c_kv,
                 int64_t c_slot, int64_t c_h, int64_t c_t, const int64_t *slots, const int64_t *pos,
                 int N, int H, int D, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(static) if(N >= 64)")
    for (int i = 0; i < N; i++) {
        for (int kv = 0; kv < 2; kv++) {
            for (int h = 0; h < H; h++) {
                const int64_t off = i * s_i + kv * s_kv + h * s_h;
                __m512 x[MAX_HEAD_DIM / 16];
                __m512 mx = _mm512_setzero_ps();
                for (int j = 0; j < D / 16; j++) {
                    x[j] = src_bf16 ? load_bf16((const uint16_t *)src + off + 16 * j)
                                    : load_f32((const float *)src + off + 16 * j);
                    mx = _mm512_max_ps(mx, _mm512_abs_ps(x[j]));
                }
                const float amax = _mm512_reduce_max_ps(mx);
                const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
                int8_t *q = dst + kv * d_kv + slots[i] * d_slot + h * d_h + pos[i] * d_t;
                for (int j = 0; j < D / 16; j++)
                    _mm_storeu_si128((__m128i *)(q + 16 * j),
                                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(x[j], inv))));
                sc[kv * c_kv + slots[i] * c_slot + h * c_h + pos[i] * c_t] = amax / 127.0f;
            }
        }
    }
}

/* tanh-approximation GELU (GPT-2's gelu_new) in float32 */
static inline __m512 gelu_tanh(__m512 v) {
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                   _mm512_fmadd_ps(_mm512_mul_ps(_mm512_set1_ps(0.044715f), v),
                                                   _mm512_mul_ps(v, v), v));
    const __m512 au = _mm512_abs_ps(u);
    const __m512 e = exp_nonpos(_mm512_mul_ps(_mm512_set1_ps(-2.0f), au));
    __m512 t = _mm512_div_ps(_mm512_sub_ps(_mm512_set1_ps(1.0f), e), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
    t = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(t), _mm512_and_si512(
        _mm512_castps_si512(u), _mm512_set1_epi32((int)0x80000000)))); /* tanh(u) = sign(u) tanh|u| */
    return _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), v), _mm512_add_ps(_mm512_set1_ps(1.0f), t));
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
/* ---------------------------------------------------------------------------------------
 * linear_amx_bf16: y = x . W^T + bias (optionally tanh-GELU), bf16 in and out, float32
 * accumulation on AMX tiles; for the few rows of a decode step.
 *
 * oneDNN runs a 64-row bf16 matmul at the rate AMX gives it, but it does not keep the
 * weights streaming: at 64 rows each weight is used 64 times and a decode step reads all
 * of them (170 MB for the 124M model's blocks), so this is a stream through the weights.
 * Here each thread walks its own contiguous share of a pre-packed weight (one 1 KB B tile
 * per 32 inputs x 16 outputs, in the order they are used) and prefetches AMX_PREFETCH
 * bytes ahead; output blocks go in pairs and rows 32 at a time (four accumulator tiles:
 * 2 row tiles x 2 output blocks, two A and two B tiles), inputs 32 at a time, so each tile
 * loaded serves two products. At 64 rows the rows' tiles come from L2 (more than L1 holds),
 * and those loads bound the compute: the 4 x 1 layout before (one B tile, four A tiles) loaded
 * 5 tiles for 4 products, and its 48 block matmuls of the 124M shape took 9.4-9.8 ms at 64
 * rows and 6.2-7.5 at 16 on Sapphire Rapids, against 8.7-8.8 and 5.2-5.3 now (same bits).
 *
 * wp: W [N, K] packed by cpu_kernels.pack_amx: [ceil(N/16)][K/32][16][16][2] (zero rows
 * past N): tile (nb, kb) row r holds W[nb*16 + n][kb*32 + 2r + {0,1}] for n = 0..15, the
 * pair layout TDPBF16PS takes. x: [M, K] contiguous; y: [M, N] contiguous. K % 32 == 0
 * (checked by the caller). Returns 1 when the row padding scratch could not be
 * allocated, else 0.
 * ------------------------------------------------------------------------------------- */
#include <sys/syscall.h>
#include <unistd.h>

/* 32 KB ahead into L2: a 124M decode step's 49 matmuls took 16 ms instead of 22 with the
 * 16 KB-ahead L1 prefetch used before (Sapphire Rapids, 64 rows, weights streamed) */
#define AMX_PREFETCH 32768
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 when AMX-BF16 is there and the kernel let this process use the tile state. */
int amx_init(void) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!((d >> 22) & 1) || !((d >> 24) & 1)) return 0; /* AMX-BF16, AMX-TILE */
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* this thread's tiles: eight of 16 rows x 64 bytes (the kernels use 0-3 as C, 4-5 as A, 6 as B) */
static void load_tile_config(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.colsb[t] = 64; cfg.rows[t] = 16; }
    _tile_loadconfig(&cfg);
}

/* the accumulators of output block h (0 or 1) of a 2 x 2 pass, rb (1 or 2) row tiles, to acc
 * (16 rows x 16 values of 4 bytes a tile): tiles 0 and 2 hold block 0, tiles 1 and 3 block 1 */
static inline void store_pair_tiles(int h, int rb, void *acc) {
    if (h == 0) { _tile_stored(0, acc, 64); if (rb > 1) _tile_stored(2, (char *)acc + 1024, 64); }
    else { _tile_stored(1, acc, 64); if (rb > 1) _tile_stored(3, (char *)acc + 1024, 64); }
}

int linear_amx_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *wp, int64_t N,
                    const uint16_t *bias, uint16_t *y, int gelu, int threads) {
    const int64_t nblk = (N + 15) / 16, kblk = K / 32, Mp = (M + 15) / 16 * 16, npair = (nblk + 1) / 2;
    uint16_t *pad = NULL;
    if (Mp != M) { /* tiles load 16 rows: give the last ones zero rows to read */
        pad = aligned_alloc(64, (size_t)Mp * K * 2);
        if (pad == NULL) return 1;
        memcpy(pad, x, (size_t)M * K * 2);
        memset(pad + M * K, 0, (size_t)(Mp - M) * K * 2);
        x = pad;
    }
    _Pragma("omp parallel num_threads(threads)")
    {
        load_tile_config();
        float acc[32 * 16] __attribute__((aligned(64)));
        _Pragma("omp for schedule(static)")
        for (int64_t pr = 0; pr < npair; pr++) {
            const int64_t nb0 = 2 * pr;
            const int two = nb0 + 1 < nblk;
            const char *w0 = (const char *)(wp + nb0 * kblk * 512);
            const char *w1 = two ? w0 + kblk * 1024 : w0; /* a lone last block pairs with itself */
            for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
                const int rb = Mp - m0 >= 32 ? 2 : 1;
                const uint16_t *xm = x + m0 * K;
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                for (int64_t kb = 0; kb < kblk; kb++) {
                    const char *b0 = w0 + kb * 1024, *b1 = w1 + kb * 1024;
                    if (m0 == 0)
                        for (int c = 0; c < 1024; c += 64) {
                            _mm_prefetch(b0 + AMX_PREFETCH + c, _MM_HINT_T1);
                            _mm_prefetch(b1 + AMX_PREFETCH + c, _MM_HINT_T1);
                        }
                    const uint16_t *xa = xm + kb * 32;
                    _tile_loadd(6, b0, 64);
                    _tile_loadd(7, b1, 64);
                    _tile_loadd(4, xa, K * 2);
                    _tile_dpbf16ps(0, 4, 6);
                    _tile_dpbf16ps(1, 4, 7);
                    if (rb > 1) {
                        _tile_loadd(5, xa + 16 * K, K * 2);
                        _tile_dpbf16ps(2, 5, 6);
                        _tile_dpbf16ps(3, 5, 7);
                    }
                }
                for (int h = 0; h < 1 + two; h++) {
                    const int64_t nb = nb0 + h;
                    const __mmask16 cols = live_lanes(N - nb * 16);
                    const __m512 bv = bias ? load_bf16_masked(bias + nb * 16, cols) : _mm512_setzero_ps();
                    store_pair_tiles(h, rb, acc);
                    for (int64_t m = m0; m < M && m < m0 + 16 * rb; m++) {
                        __m512 r = _mm512_add_ps(_mm512_load_ps(acc + (m - m0) * 16), bv);
                        if (gelu) r = gelu_tanh(r);
                        uint16_t *yp = y + m * N + nb * 16;
                        if (cols == 0xffff) store_bf16(yp, r);
                        else {
                            uint16_t tmp[16];
                            store_bf16(tmp, r);
                            _mm256_mask_storeu_epi16(yp, cols, _mm256_loadu_si256((const __m256i *)tmp));
                        }
                    }
                }
            }
        }
        _tile_release();
    }
    free(pad);
    return 0;
}
#endif

/* ------------------------------------------------------------------------------------------
 * linear_int8: y = x W^T + b (then tanh-GELU if asked) with int8 weights, on AVX512-VNNI.
 *
 * W is quantized per output channel (symmetric, scale ws[n], int8 in -127..127) and packed
 * by cpu_kernels.pack_int8 in panels of 64 outputs: wp[p][k/4][64][4] holds W[64p + c, k..k+3].
 * Each row of x (float32 or bf16) is quantized on the fly, symmetric per row (scale sa[m]),
 * and stored biased by 128 as uint8, because vpdpbusd multiplies unsigned by signed bytes:
 *   sum_k (qa + 128) qw = sum_k qa qw + 128 colsum(qw),  so  y = sa ws (acc - 128 colsum) + b.
 * The accumulation is exact int32 (|acc| <= K 255 127 < 2^31 for K < 66,000); one float
 * multiply per output. A 6-row x 64-column tile keeps 24 accumulators in registers and reads
 * 256 bytes of weights per 4 k; rows go in blocks of I8_MB so a block's activations stay in
 * cache while every panel passes over them, the panels split over the threads.
 * ------------------------------------------------------------------------------------------ */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512vnni")
#define I8_OK 1
#elif defined(__AVX512VNNI__)
#define I8_OK 1
#endif

/* a switch on a tile's row count (1..6) calling TILE(n) with n a constant: each call is
 * compiled for its row count, so the tile's accumulators stay in registers */
#define MR_SWITCH(mr, TILE)                                                                        \
    switch (mr) {                                                                                  \
    case 6: TILE(6); break;                                                                        \
    case 5: TILE(5); break;                                                                        \
    case 4: TILE(4); break;                                                                        \
    case 3: TILE(3); break;                                                                        \
    case 2: TILE(2); break;                                                                        \
    default: TILE(1); break;                                                                       \
    }

/* the VNNI and AVX512-BF16 matmuls prefetch the next panel into L2 while a panel has at
 * least this many 6-row tiles to compute (a 124M decode step's 48 block matmuls on Zen 5,
 * bench/results/HISTORY.md session 14: 16-64 rows 8-20 % faster with it; 8 rows, bound by
 * the weights' stream alone, which the hardware prefetcher follows unaided, 10 % slower) */
#ifndef PF_MIN_TILES
#define PF_MIN_TILES 3
#endif

#ifdef I8_OK
#define I8_MR 6
#define I8_MB 96

/* row m of x (K values, float32 or bf16) -> q (K bytes, round(x / s) + 128), returns s */
static float quant_row(const void *x, int bf16, int64_t K, uint8_t *q) {
    __m512 mx = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 live = live_lanes(K - k);
        const __m512 v = bf16 ? load_bf16_masked((const uint16_t *)x + k, live)
                              : _mm512_maskz_loadu_ps(live, (const float *)x + k);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    const float amax = _mm512_reduce_max_ps(mx);
    const float s = amax > 0.0f && isfinite(amax) ? amax / 127.0f : 0.0f;
    const __m512 inv = _mm512_set1_ps(s > 0.0f ? 1.0f / s : 0.0f);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127), bias = _mm512_set1_epi32(128);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 live = live_lanes(K - k);
        const __m512 v = bf16 ? load_bf16_masked((const uint16_t *)x + k, live)
                              : _mm512_maskz_loadu_ps(live, (const float *)x + k);
        __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv)); /* round to nearest even */
        r = _mm512_add_epi32(_mm512_min_epi32(_mm512_max_epi32(r, lo), hi), bias);
        _mm_mask_storeu_epi8(q + k, live, _mm512_cvtepi32_epi8(r));
    }
    return s;
}

/* acc = a (mr rows, stride lda bytes) x panel w (kq groups of 4 k); the sums live in
 * registers (locals, the loops unrolled: GCC keeps an output array in memory otherwise) */
static inline __attribute__((always_inline)) void i8_tile(const int mr, const uint8_t *a, int64_t lda,
                                                          const int8_t *w, int64_t kq, __m512i acc[I8_MR][4],
                                                          const char *pf, int64_t pf_lines) {
    __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
            c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00,
            c40 = c00, c41 = c00, c42 = c00, c43 = c00, c50 = c00, c51 = c00, c52 = c00, c53 = c00;
    for (int64_t g = 0; g < kq; g++) {
        const int8_t *wg = w + g * 256;
        const uint8_t *ag = a + g * 4;
        const __m512i w0 = _mm512_load_si512(wg), w1 = _mm512_load_si512(wg + 64),
                      w2 = _mm512_load_si512(wg + 128), w3 = _mm512_load_si512(wg + 192);
        if (g < pf_lines) _mm_prefetch(pf + g * 64, _MM_HINT_T1);
        __m512i b;
#define I8_ROW(i)                                                                                  \
        if (mr > i) {                                                                              \
            int32_t quad;                                                                          \
            memcpy(&quad, ag + i * lda, 4);                                                        \
            b = _mm512_set1_epi32(quad);                                                           \
            c##i##0 = _mm512_dpbusd_epi32(c##i##0, b, w0);                                         \
            c##i##1 = _mm512_dpbusd_epi32(c##i##1, b, w1);                                         \
            c##i##2 = _mm512_dpbusd_epi32(c##i##2, b, w2);                                         \
            c##i##3 = _mm512_dpbusd_epi32(c##i##3, b, w3);                                         \
        }
        I8_ROW(0) I8_ROW(1) I8_ROW(2) I8_ROW(3) I8_ROW(4) I8_ROW(5)
#undef I8_ROW
    }
#define I8_OUT(i) acc[i][0] = c##i##0; acc[i][1] = c##i##1; acc[i][2] = c##i##2; acc[i][3] = c##i##3;
    I8_OUT(0) I8_OUT(1) I8_OUT(2) I8_OUT(3) I8_OUT(4) I8_OUT(5)
#undef I8_OUT
}

/* pf, pf_lines: lines of the next panel to prefetch into L2 meanwhile (one per 4 inputs) */
static void i8_panel_rows(int mr, const uint8_t *a, int64_t K, const int8_t *w, __m512i acc[I8_MR][4],
                          const char *pf, int64_t pf_lines) {
#define I8_CALL(n) i8_tile(n, a, K, w, K / 4, acc, pf, pf_lines)
    MR_SWITCH(mr, I8_CALL)
#undef I8_CALL
}

/* 16 outputs of one row (lanes `live`) from their int32 sums: (acc - 128 colsum) sa ws + b,
 * then tanh-GELU if asked, stored at element `off` of y (bf16 when x_bf16, else float32) */
static inline void i8_store(__m512i acc, float sa, __m512 ws, __m512i wsum, __m512 b, int gelu, int x_bf16,
                            void *y, int64_t off, __mmask16 live) {
    __m512 r = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, wsum));
    r = _mm512_fmadd_ps(r, _mm512_mul_ps(_mm512_set1_ps(sa), ws), b);
    if (gelu) r = gelu_tanh(r);
    if (x_bf16) {
        uint16_t tmp[16];
        store_bf16(tmp, r);
        _mm256_mask_storeu_epi16((uint16_t *)y + off, live, _mm256_loadu_si256((const __m256i *)tmp));
    } else {
        _mm512_mask_storeu_ps((float *)y + off, live, r);
    }
}

int i8_available(void) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    return (c >> 11) & 1; /* AVX512_VNNI */
}

/* x [M, K] (float32, or bf16 when x_bf16), weights as pack_int8 gives them, ws [N] float32
 * scales, wsum [N] int32 = 128 x the column sums of the int8 weights, bias [N] float32 or
 * NULL; y [M, N] in x's dtype. K % 4 == 0. Returns 1 when scratch memory ran out. */
int linear_int8(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *wp, const float *ws,
                const int32_t *wsum, int64_t N, const float *bias, void *y, int gelu, int threads) {
    const int64_t panels = (N + 63) / 64, esz = x_bf16 ? 2 : 4;
    uint8_t *q = aligned_alloc(64, (size_t)((M * K + 63) / 64 * 64));
    float *sa = malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (q == NULL || sa == NULL) { free(q); free(sa); return 1; }
    _Pragma("omp parallel num_threads(threads)")
    {
        _Pragma("omp for schedule(static)")
        for (int64_t m = 0; m < M; m++) sa[m] = quant_row((const char *)x + m * K * esz, x_bf16, K, q + m * K);
        for (int64_t m0 = 0; m0 < M; m0 += I8_MB) {
            const int64_t mend = m0 + I8_MB < M ? m0 + I8_MB : M;
            _Pragma("omp for schedule(static)")
            for (int64_t p = 0; p < panels; p++) {
                const int8_t *w = wp + p * K * 64;
                __mmask16 live[4];
                __m512 wsv[4], bv[4];
                __m512i sv[4];
                for (int j = 0; j < 4; j++) {
                    const int64_t n0 = p * 64 + j * 16;
                    live[j] = N > n0 ? live_lanes(N - n0) : 0;
                    wsv[j] = _mm512_maskz_loadu_ps(live[j], ws + n0);
                    sv[j] = _mm512_maskz_loadu_epi32(live[j], wsum + n0);
                    bv[j] = bias ? _mm512_maskz_loadu_ps(live[j], bias + n0) : _mm512_setzero_ps();
                }
                /* the next panel (this thread's next: they follow in memory), a 1/tiles share of
                 * its K lines per tile of rows, into L2 while this one is computed */
                const int64_t tiles = (mend - m0 + I8_MR - 1) / I8_MR, share = (K + tiles - 1) / tiles;
                for (int64_t m = m0; m < mend; m += I8_MR) {
                    const int mr = (int)(mend - m < I8_MR ? mend - m : I8_MR);
                    __m512i acc[I8_MR][4];
                    i8_panel_rows(mr, q + m * K, K, w, acc, (const char *)(w + K * 64) + (m - m0) / I8_MR * share * 64,
                                  tiles < PF_MIN_TILES ? 0 : share < K / 4 ? share : K / 4);
                    for (int i = 0; i < mr; i++)
                        for (int j = 0; j < 4; j++)
                            if (live[j])
                                i8_store(acc[i][j], sa[m + i], wsv[j], sv[j], bv[j], gelu, x_bf16, y,
                                         (m + i) * N + p * 64 + j * 16, live[j]);
                }
            }
        }
    }
    free(q);
    free(sa);
    return 0;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AMX_INT8__)
/* ------------------------------------------------------------------------------------------
 * linear_int8_amx: linear_int8 on AMX-INT8 tiles (TDPBUSD: unsigned activations x signed
 * weights, int32 sums), same arguments, same weights, same quantized rows, so the same
 * exact int32 sums and bit-identical outputs. The VNNI panel layout is already the B-tile
 * layout: rows of 4 k x 64 outputs, 256 bytes, so the tile of 64 k x 16 outputs j of a
 * panel is 16 of those rows, 64 bytes each at offset 64 j (stride 256). Decode steps (<= 64
 * rows, i8x_panel_4x1): per 16 outputs, rows go 64 at a time (four accumulator tiles, two A
 * tiles in turn, one B tile); the panel's four passes find it in L2, each having prefetched a
 * quarter of the next panel there (int8 weights streamed at 12 GB/s instead of 10 with an L1
 * prefetch a few rows ahead). Larger calls (i8x_panel_2x2): per pair of 16-output blocks, rows
 * 32 at a time (2 row tiles x 2 output blocks, two A and two B tiles), so each tile loaded
 * serves two products instead of 4 / 5: a prefill's 48 block matmuls in the engine 199-204 ->
 * 165-168 ms on Sapphire Rapids, while its 64-row decode steps took 12.2-12.4 ms of int8 matmuls
 * with the 4 x 1 layout against 13.1-13.2 with the 2 x 2 one. Same bits either way (exact int32
 * sums, the same epilogue).
 * Rows come in blocks of I8X_MB so a block's quantized rows stay in L2 while every panel
 * passes over them. K % 64 == 0 (the caller checks; linear_int8 takes any K % 4 == 0).
 * ------------------------------------------------------------------------------------------ */
#define I8X_MB 256

int amx_int8_available(void) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    return ((d >> 25) & 1) && amx_init(); /* AMX-INT8, and the tile state granted */
}

/* one panel, per 16-output block: rows 64 at a time (4 accumulator tiles, one B tile): decode steps */
static inline __attribute__((always_inline)) void i8x_panel_4x1(const int8_t *w, int64_t p, int64_t panels, int64_t c0,
        int64_t cend, const uint8_t *q, const float *sa, int64_t M, int64_t K, int64_t kblk, const float *ws,
        const int32_t *wsum, int64_t N, const float *bias, void *y, int gelu, int x_bf16, int32_t *acc) {
    for (int j = 0; j < 4 && p * 64 + j * 16 < N; j++) {
        const int64_t n0 = p * 64 + j * 16;
        const __mmask16 live = live_lanes(N - n0);
        const __m512 wsv = _mm512_maskz_loadu_ps(live, ws + n0);
        const __m512i sv = _mm512_maskz_loadu_epi32(live, wsum + n0);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(live, bias + n0) : _mm512_setzero_ps();
        for (int64_t m0 = c0; m0 < cend; m0 += 64) {
            const int mb = (int)((cend - m0) / 16 < 4 ? (cend - m0) / 16 : 4);
            const uint8_t *xm = q + m0 * K;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t kb = 0; kb < kblk; kb++) {
                if (m0 == c0 && p + 1 < panels) /* a quarter of the next panel into L2 */
                    for (int c = 0; c < 1024; c += 64) _mm_prefetch(w + K * 64 + kb * 4096 + j * 1024 + c, _MM_HINT_T1);
                const uint8_t *xa = xm + kb * 64;
                _tile_loadd(6, w + kb * 4096 + j * 64, 256);
                _tile_loadd(4, xa, K);
                _tile_dpbusd(0, 4, 6);
                if (mb > 1) { _tile_loadd(5, xa + 16 * K, K); _tile_dpbusd(1, 5, 6); }
                if (mb > 2) { _tile_loadd(4, xa + 32 * K, K); _tile_dpbusd(2, 4, 6); }
                if (mb > 3) { _tile_loadd(5, xa + 48 * K, K); _tile_dpbusd(3, 5, 6); }
            }
            _tile_stored(0, acc, 64);
            if (mb > 1) _tile_stored(1, acc + 256, 64);
            if (mb > 2) _tile_stored(2, acc + 512, 64);
            if (mb > 3) _tile_stored(3, acc + 768, 64);
            for (int64_t m = m0; m < M && m < m0 + 64; m++)
                i8_store(_mm512_load_si512(acc + (m - m0) * 16), sa[m], wsv, sv, bv, gelu, x_bf16,
                         y, m * N + n0, live);
        }
    }
}

/* one panel, per pair of 16-output blocks: rows 32 at a time (2 x 2 accumulator tiles): larger calls */
static inline __attribute__((always_inline)) void i8x_panel_2x2(const int8_t *w, int64_t p, int64_t panels, int64_t c0,
        int64_t cend, const uint8_t *q, const float *sa, int64_t M, int64_t K, int64_t kblk, const float *ws,
        const int32_t *wsum, int64_t N, const float *bias, void *y, int gelu, int x_bf16, int32_t *acc) {
    for (int j = 0; j < 4 && p * 64 + j * 16 < N; j += 2) {
        const int two = p * 64 + (j + 1) * 16 < N; /* the pair's second block has outputs */
        for (int64_t m0 = c0; m0 < cend; m0 += 32) {
            const int rb = cend - m0 >= 32 ? 2 : 1;
            const uint8_t *xm = q + m0 * K;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t kb = 0; kb < kblk; kb++) {
                if (m0 == c0 && p + 1 < panels) /* this pair's half of the next panel into L2 */
                    for (int c = 0; c < 2048; c += 64) _mm_prefetch(w + K * 64 + kb * 4096 + j * 1024 + c, _MM_HINT_T1);
                const uint8_t *xa = xm + kb * 64;
                _tile_loadd(6, w + kb * 4096 + j * 64, 256);
                _tile_loadd(7, w + kb * 4096 + (j + 1) * 64, 256);
                _tile_loadd(4, xa, K);
                _tile_dpbusd(0, 4, 6);
                _tile_dpbusd(1, 4, 7);
                if (rb > 1) {
                    _tile_loadd(5, xa + 16 * K, K);
                    _tile_dpbusd(2, 5, 6);
                    _tile_dpbusd(3, 5, 7);
                }
            }
            for (int h = 0; h < 1 + two; h++) {
                const int64_t n0 = p * 64 + (j + h) * 16;
                const __mmask16 live = live_lanes(N - n0);
                const __m512 wsv = _mm512_maskz_loadu_ps(live, ws + n0);
                const __m512i sv = _mm512_maskz_loadu_epi32(live, wsum + n0);
                const __m512 bv = bias ? _mm512_maskz_loadu_ps(live, bias + n0) : _mm512_setzero_ps();
                store_pair_tiles(h, rb, acc);
                for (int64_t m = m0; m < M && m < m0 + 16 * rb; m++)
                    i8_store(_mm512_load_si512(acc + (m - m0) * 16), sa[m], wsv, sv, bv, gelu, x_bf16,
                             y, m * N + n0, live);
            }
        }
    }
}

int linear_int8_amx(const void *x, int x_bf16, int64_t M, int64_t K, const int8_t *wp, const float *ws,
                    const int32_t *wsum, int64_t N, const float *bias, void *y, int gelu, int threads) {
    const int64_t panels = (N + 63) / 64, esz = x_bf16 ? 2 : 4, kblk = K / 64, Mp = (M + 15) / 16 * 16;
    uint8_t *q = aligned_alloc(64, (size_t)((Mp * K + 63) / 64 * 64));
    float *sa = malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
    if (q == NULL || sa == NULL) { free(q); free(sa); return 1; }
    memset(q + M * K, 0, (size_t)((Mp - M) * K)); /* tiles load 16 rows: padding rows of zeros */
    _Pragma("omp parallel num_threads(threads)")
    {
        load_tile_config();
        int32_t acc[64 * 16] __attribute__((aligned(64)));
        _Pragma("omp for schedule(static)")
        for (int64_t m = 0; m < M; m++) sa[m] = quant_row((const char *)x + m * K * esz, x_bf16, K, q + m * K);
        for (int64_t c0 = 0; c0 < Mp; c0 += I8X_MB) {
            const int64_t cend = c0 + I8X_MB < Mp ? c0 + I8X_MB : Mp;
            _Pragma("omp for schedule(static)")
            for (int64_t p = 0; p < panels; p++) {
                const int8_t *w = wp + p * K * 64;
                if (Mp <= 64)
                    i8x_panel_4x1(w, p, panels, c0, cend, q, sa, M, K, kblk, ws, wsum, N, bias, y, gelu, x_bf16, acc);
                else
                    i8x_panel_2x2(w, p, panels, c0, cend, q, sa, M, K, kblk, ws, wsum, N, bias, y, gelu, x_bf16, acc);
            }
        }
        _tile_release();
    }
    free(q);
    free(sa);
    return 0;
}
#endif
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* ------------------------------------------------------------------------------------------
 * linear_bf16: y = x W^T + b (then tanh-GELU if asked) for bf16 x and W on AVX512-BF16, for
 * decode-sized steps on CPUs without AMX. W packed by cpu_kernels.pack_bf16 in panels of 64
 * outputs: wp[p][k/2][64][2] holds W[64p + c, k], W[64p + c, k+1]; vdpbf16ps adds both
 * products of a pair into a float32 lane. The same 6-row x 64-column register tile as
 * linear_int8 (24 float32 accumulators, 256 bytes of weights per 2 k), float32 sums, one
 * rounding to bf16 at the end.
 * ------------------------------------------------------------------------------------------ */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC target("avx512bf16")
#define BF_OK 1
#elif defined(__AVX512BF16__)
#define BF_OK 1
#endif

#ifdef BF_OK
#define BF_MR 6
#define BF_MB 96

static inline __attribute__((always_inline)) void bf_tile(const int mr, const uint16_t *a, int64_t lda,
                                                          const uint16_t *w, int64_t kp, __m512 acc[BF_MR][4],
                                                          const char *pf, int64_t pf_lines) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
           c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00,
           c40 = c00, c41 = c00, c42 = c00, c43 = c00, c50 = c00, c51 = c00, c52 = c00, c53 = c00;
    for (int64_t g = 0; g < kp; g++) {
        const uint16_t *wg = w + g * 128;
        const uint16_t *ag = a + g * 2;
        const __m512bh w0 = (__m512bh)_mm512_load_si512(wg), w1 = (__m512bh)_mm512_load_si512(wg + 32),
                       w2 = (__m512bh)_mm512_load_si512(wg + 64), w3 = (__m512bh)_mm512_load_si512(wg + 96);
        if (g < pf_lines) _mm_prefetch(pf + g * 64, _MM_HINT_T1);
        __m512bh b;
#define BF_ROW(i)                                                                                  \
        if (mr > i) {                                                                              \
            int32_t pair;                                                                          \
            memcpy(&pair, ag + i * lda, 4);                                                        \
            b = (__m512bh)_mm512_set1_epi32(pair);                                                 \
            c##i##0 = _mm512_dpbf16_ps(c##i##0, b, w0);                                            \
            c##i##1 = _mm512_dpbf16_ps(c##i##1, b, w1);                                            \
            c##i##2 = _mm512_dpbf16_ps(c##i##2, b, w2);                                            \
            c##i##3 = _mm512_dpbf16_ps(c##i##3, b, w3);                                            \
        }
        BF_ROW(0) BF_ROW(1) BF_ROW(2) BF_ROW(3) BF_ROW(4) BF_ROW(5)
#undef BF_ROW
    }
#define BF_OUT(i) acc[i][0] = c##i##0; acc[i][1] = c##i##1; acc[i][2] = c##i##2; acc[i][3] = c##i##3;
    BF_OUT(0) BF_OUT(1) BF_OUT(2) BF_OUT(3) BF_OUT(4) BF_OUT(5)
#undef BF_OUT
}

/* pf, pf_lines: lines of the next panel to prefetch into L2 meanwhile (one per 2 inputs) */
static void bf_panel_rows(int mr, const uint16_t *a, int64_t K, const uint16_t *w, __m512 acc[BF_MR][4],
                          const char *pf, int64_t pf_lines) {
#define BF_CALL(n) bf_tile(n, a, K, w, K / 2, acc, pf, pf_lines)
    MR_SWITCH(mr, BF_CALL)
#undef BF_CALL
}

int bf16_available(void) {
    unsigned a, b, c, d;
    __asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(1));
    return (a >> 5) & 1; /* AVX512_BF16 */
}

/* x [M, K] bf16 (K % 2 == 0), weights as pack_bf16 gives them, bias [N] float32 or NULL;
 * y [M, N] bf16. */
void linear_bf16(const uint16_t *x, int64_t M, int64_t K, const uint16_t *wp, int64_t N, const float *bias,
                 uint16_t *y, int gelu, int threads) {
    const int64_t panels = (N + 63) / 64;
    _Pragma("omp parallel num_threads(threads)")
    for (int64_t m0 = 0; m0 < M; m0 += BF_MB) {
        const int64_t mend = m0 + BF_MB < M ? m0 + BF_MB : M;
        _Pragma("omp for schedule(static)")
        for (int64_t p = 0; p < panels; p++) {
            const uint16_t *w = wp + p * K * 64;
            __mmask16 live[4];
            __m512 bv[4];
            for (int j = 0; j < 4; j++) {
                const int64_t n0 = p * 64 + j * 16;
                live[j] = N > n0 ? live_lanes(N - n0) : 0;
                bv[j] = bias ? _mm512_maskz_loadu_ps(live[j], bias + n0) : _mm512_setzero_ps();
            }
            /* the next panel (2 K lines), a 1/tiles share per tile of rows, into L2 meanwhile */
            const int64_t tiles = (mend - m0 + BF_MR - 1) / BF_MR, share = (2 * K + tiles - 1) / tiles;
            for (int64_t m = m0; m < mend; m += BF_MR) {
                const int mr = (int)(mend - m < BF_MR ? mend - m : BF_MR);
                __m512 acc[BF_MR][4];
                bf_panel_rows(mr, x + m * K, K, w, acc, (const char *)(w + K * 64) + (m - m0) / BF_MR * share * 64,
                              tiles < PF_MIN_TILES ? 0 : share < K / 2 ? share : K / 2);
                for (int i = 0; i < mr; i++)
                    for (int j = 0; j < 4; j++) {
                        if (!live[j]) continue;
                        __m512 r = _mm512_add_ps(acc[i][j], bv[j]);
                        if (gelu) r = gelu_tanh(r);
                        uint16_t tmp[16];
                        store_bf16(tmp, r);
                        _mm256_mask_storeu_epi16(y + (m + i) * N + p * 64 + j * 16, live[j],
                                                 _mm256_loadu_si256((const __m256i *)tmp));
                    }
            }
        }
    }
}
#endif
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif

/* ---------------------------------------------------------------------------------------
 * linear_f32: y = x . W^T + bias (optionally tanh-GELU) in float32, for fp32 models.
 *
 * oneDNN's fp32 matmul does not keep the weights streaming at decode sizes either: at 64
 * rows a decode step reads every weight (340 MB for the 124M model's blocks) once and uses
 * it 64 times, and oneDNN left ~10-15 % of the FMA rate unused there (the blocks' 49 matmuls
 * at 64 rows, Zen 5: 27-30 ms against 23-27 here). Each thread walks its own contiguous
 * share of the panels (64 outputs, [K][64] floats each) in chunks of f32_kc inputs that stay
 * in cache while every 6-row tile of a block of F32_MB rows passes over them, and prefetches
 * the next chunk into L2 meanwhile (a share of it per tile). The chunk is set per CPU once
 * (set_f32_chunk, from cpu_kernels.load) for calls of one block of rows (decode steps, whose
 * weights stream by once): 256 inputs (64 KB of a panel) were best on a Zen 5, 128 (32 KB,
 * within L1) on a Sapphire Rapids (a 64-row step's 48 block matmuls 43.0-43.7 -> 39.8-40.6 ms
 * there; 192: 42.3). Larger calls (prefill) take 256 (at 2,048 rows 128 was 1-2 % slower on
 * the Sapphire Rapids). Partial sums of a chunk go to y and
 * come back for the next, unrounded (float32 either way), so each output is one sequential
 * float32 sum over k, whatever the row count: a row's result does not depend on the others.
 *
 * wp: W [N, K] packed by cpu_matmul.pack_f32: [ceil(N/64)][K][64] (zero rows past N);
 * x [M, K], y [M, N] contiguous; bias [N] or NULL.
 * ------------------------------------------------------------------------------------- */
#define F32_MR 6
#define F32_KC 256
#define F32_MB 96
static int64_t f32_kc = F32_KC;

/* the inputs per chunk of linear_f32 calls of at most F32_MB rows from now on (any kc >= 1
 * gives the same bits: each output stays one sequential sum over k); 0 when kc is refused */
int set_f32_chunk(int64_t kc) {
    if (kc < 1 || kc > 65536) return 0;
    f32_kc = kc;
    return 1;
}

static inline __attribute__((always_inline)) void f32_tile(const int mr, const float *a, int64_t lda,
                                                           const float *w, int64_t kc, int first, int last,
                                                           const __m512 bv[4], int gelu, const __mmask16 live[4],
                                                           float *y, int64_t ldy, const char *pf, int64_t pf_lines) {
    __m512 c00 = _mm512_setzero_ps(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
           c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00,
           c40 = c00, c41 = c00, c42 = c00, c43 = c00, c50 = c00, c51 = c00, c52 = c00, c53 = c00;
#define F32_LOAD(i)                                                                                \
    if (mr > i && !first) {                                                                        \
        const float *yi = y + i * ldy;                                                             \
        c##i##0 = _mm512_maskz_loadu_ps(live[0], yi);                                              \
        c##i##1 = _mm512_maskz_loadu_ps(live[1], yi + 16);                                         \
        c##i##2 = _mm512_maskz_loadu_ps(live[2], yi + 32);                                         \
        c##i##3 = _mm512_maskz_loadu_ps(live[3], yi + 48);                                         \
    }
    F32_LOAD(0) F32_LOAD(1) F32_LOAD(2) F32_LOAD(3) F32_LOAD(4) F32_LOAD(5)
#undef F32_LOAD
    for (int64_t k = 0; k < kc; k++) {
        const float *wk = w + k * 64;
        const __m512 w0 = _mm512_load_ps(wk), w1 = _mm512_load_ps(wk + 16), w2 = _mm512_load_ps(wk + 32),
                     w3 = _mm512_load_ps(wk + 48);
        if (k < pf_lines) _mm_prefetch(pf + k * 64, _MM_HINT_T1);
        __m512 b;
#define F32_ROW(i)                                                                                 \
        if (mr > i) {                                                                              \
            b = _mm512_set1_ps(a[i * lda + k]);                                                    \
            c##i##0 = _mm512_fmadd_ps(b, w0, c##i##0);                                             \
            c##i##1 = _mm512_fmadd_ps(b, w1, c##i##1);                                             \
            c##i##2 = _mm512_fmadd_ps(b, w2, c##i##2);                                             \
            c##i##3 = _mm512_fmadd_ps(b, w3, c##i##3);                                             \
        }
        F32_ROW(0) F32_ROW(1) F32_ROW(2) F32_ROW(3) F32_ROW(4) F32_ROW(5)
#undef F32_ROW
    }
#define F32_PUT(v, j, off)                                                                         \
    {                                                                                              \
        __m512 r = v;                                                                              \
        if (last) {                                                                                \
            r = _mm512_add_ps(r, bv[j]);                                                           \
            if (gelu) r = gelu_tanh(r);                                                            \
        }                                                                                          \
        _mm512_mask_storeu_ps(off, live[j], r);                                                    \
    }
#define F32_STORE(i)                                                                               \
    if (mr > i) {                                                                                  \
        float *yi = y + i * ldy;                                                                   \
        F32_PUT(c##i##0, 0, yi) F32_PUT(c##i##1, 1, yi + 16) F32_PUT(c##i##2, 2, yi + 32)          \
        F32_PUT(c##i##3, 3, yi + 48)                                                               \
    }
    F32_STORE(0) F32_STORE(1) F32_STORE(2) F32_STORE(3) F32_STORE(4) F32_STORE(5)
#undef F32_STORE
#undef F32_PUT
}

static void f32_rows(int mr, const float *a, int64_t lda, const float *w, int64_t kc, int first, int last,
                     const __m512 bv[4], int gelu, const __mmask16 live[4], float *y, int64_t ldy,
                     const char *pf, int64_t pf_lines) {
#define F32_CALL(n) f32_tile(n, a, lda, w, kc, first, last, bv, gelu, live, y, ldy, pf, pf_lines)
    MR_SWITCH(mr, F32_CALL)
#undef F32_CALL
}

void linear_f32(const float *x, int64_t M, int64_t K, const float *wp, int64_t N, const float *bias,
                float *y, int gelu, int threads) {
    const int64_t panels = (N + 63) / 64, chunk = M <= F32_MB ? f32_kc : F32_KC;
    _Pragma("omp parallel num_threads(threads)")
    for (int64_t m0 = 0; m0 < M; m0 += F32_MB) {
        const int64_t mend = m0 + F32_MB < M ? m0 + F32_MB : M;
        const int64_t tiles = (mend - m0 + F32_MR - 1) / F32_MR;
        _Pragma("omp for schedule(static)")
        for (int64_t p = 0; p < panels; p++) {
            const float *w = wp + p * K * 64;
            __mmask16 live[4];
            __m512 bv[4];
            for (int j = 0; j < 4; j++) {
                const int64_t n0 = p * 64 + j * 16;
                live[j] = N > n0 ? live_lanes(N - n0) : 0;
                bv[j] = bias ? _mm512_maskz_loadu_ps(live[j], bias + n0) : _mm512_setzero_ps();
            }
            for (int64_t k0 = 0; k0 < K; k0 += chunk) {
                const int64_t kc = K - k0 < chunk ? K - k0 : chunk;
                /* the next chunk of this thread's stream (this panel's next, or the next panel's
                 * first: they follow in memory), a 1/tiles share of its lines per tile */
                const char *next = (const char *)(w + (k0 + kc) * 64);
                const int64_t share = (kc * 4 + tiles - 1) / tiles;
                for (int64_t t = 0; t < tiles; t++) {
                    const int64_t m = m0 + t * F32_MR;
                    const int mr = (int)(mend - m < F32_MR ? mend - m : F32_MR);
                    f32_rows(mr, x + m * K + k0, K, w + k0 * 64, kc, k0 == 0, k0 + kc >= K, bv, gelu, live,
                             y + m * N + p * 64, N, next + t * share * 64, share < kc ? share : kc);
                }
            }
        }
    }
}
