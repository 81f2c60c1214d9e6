/* polyprompt's native CPU kernels (AVX-512F/BW), built at runtime by server/cpu_kernels.py
 * with the machine's compiler and loaded with ctypes.
 *
 * decode_attention_*: one query per row over its own slot of the KV cache.
 *
 * For each decode row b and head h: scores over the row's own keys 0..len-1 (nothing
 * past its length is read, unlike a padded SDPA call with a mask), softmax in float32,
 * then the weighted sum of its values. K and V are read straight from the cache in
 * whatever memory order it has (strides in elements), in float32 or bfloat16 with float32
 * accumulation.
 * argmax_rows_bf16: torch.argmax over the last dim of bf16 logits, in one pass.
 *
 * Work is split over OpenMP threads: torch's own runtime, since the library is loaded into
 * a process that already has libgomp.so.1, and the caller passes torch's thread count.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_LEN 8192

static inline __m512 load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
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
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
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

/* q: [B, H, D] (strides q_sb, q_sh; unit stride in D); row b reads slot slots[b] of the
 * cache, keys/values at positions 0..lens[b]-1: element (slot, h, t, d) of K (and of V)
 * is at k[slot*sb + h*sh + t*st + d]; out: [B, H, D] (strides o_sb, o_sh). D % 16 == 0,
 * D <= MAX_HEAD_DIM, 1 <= lens[b] <= MAX_LEN (checked by the caller). */
#define DECODE_ATTENTION(NAME, T, LOAD, STORE)                                                     \
    void NAME(const T *q, int64_t q_sb, int64_t q_sh, const T *k, const T *v, int64_t sb,          \
              int64_t sh, int64_t st, const int64_t *slots, const int64_t *lens, T *out,          \
              int64_t o_sb, int64_t o_sh, int B, int H, int D, float scale, int threads) {         \
        const int nd = D / 16;                                                                     \
        _Pragma("omp parallel for num_threads(threads) schedule(static) collapse(2)")              \
        for (int b = 0; b < B; b++) {                                                              \
            for (int h = 0; h < H; h++) {                                                          \
                float s[MAX_LEN + 16];                                                             \
                __m512 qv[MAX_HEAD_DIM / 16], ov[MAX_HEAD_DIM / 16];                               \
                const int64_t n = lens[b];                                                         \
                const T *qp = q + b * q_sb + h * q_sh;                                             \
                const T *kp = k + slots[b] * sb + h * sh, *vp = v + slots[b] * sb + h * sh;        \
                for (int j = 0; j < nd; j++)                                                       \
                    qv[j] = _mm512_mul_ps(LOAD(qp + 16 * j), _mm512_set1_ps(scale));               \
                float mx = -INFINITY;                                                              \
                for (int64_t t = 0; t < n; t++) {                                                  \
                    const T *kt = kp + t * st;                                                     \
                    __m512 acc = _mm512_mul_ps(qv[0], LOAD(kt));                                   \
                    for (int j = 1; j < nd; j++) acc = _mm512_fmadd_ps(qv[j], LOAD(kt + 16 * j), acc); \
                    const float x = _mm512_reduce_add_ps(acc);                                     \
                    s[t] = x;                                                                      \
                    mx = x > mx ? x : mx;                                                          \
                }                                                                                  \
                const __m512 m = _mm512_set1_ps(mx);                                               \
                __m512 sum = _mm512_setzero_ps();                                                  \
                for (int64_t t = 0; t < n; t += 16) {                                              \
                    const __mmask16 live = n - t >= 16 ? 0xffff : (__mmask16)((1u << (n - t)) - 1); \
                    __m512 e = exp_nonpos(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + t), m));   \
                    e = _mm512_maskz_mov_ps(live, e);                                              \
                    _mm512_mask_storeu_ps(s + t, live, e);                                         \
                    sum = _mm512_add_ps(sum, e);                                                   \
                }                                                                                  \
                for (int j = 0; j < nd; j++) ov[j] = _mm512_setzero_ps();                          \
                for (int64_t t = 0; t < n; t++) {                                                  \
                    const __m512 p = _mm512_set1_ps(s[t]);                                         \
                    const T *vt = vp + t * st;                                                     \
                    for (int j = 0; j < nd; j++) ov[j] = _mm512_fmadd_ps(p, LOAD(vt + 16 * j), ov[j]); \
                }                                                                                  \
                const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));               \
                T *op = out + b * o_sb + h * o_sh;                                                 \
                for (int j = 0; j < nd; j++) STORE(op + 16 * j, _mm512_mul_ps(ov[j], inv));        \
            }                                                                                      \
        }                                                                                          \
    }

DECODE_ATTENTION(decode_attention_f32, float, load_f32, store_f32)
DECODE_ATTENTION(decode_attention_bf16, uint16_t, load_bf16, store_bf16)

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
            const __mmask16 live = (__mmask16)((1u << (V - v)) - 1);
            __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, p + v)), 16));
            y = _mm512_mask_blend_ps(live, _mm512_set1_ps(-INFINITY), y);
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
