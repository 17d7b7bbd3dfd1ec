// fast_decode.py's CPU kernels, compiled on first use (torch.utils.cpp_extension) for the instructions the CPU has
// (AVX-512 with VNNI, else AVX2): products with 4- and 8-bit weights, a one-row bf16 product, a decode step's
// attention (one query row a head), and, at the end, a Llama decoder's whole decode step on those in one call.
//
// PyTorch's own int4 and int8 CPU kernels widen every weight to a float and multiply it with a float FMA. These
// multiply in integer registers instead, as llama.cpp's Q4_1 x Q8_1 and Q8_0 x Q8_0 dot products do: each row of
// activations is rounded to int8 in blocks of 32 (one float scale per block, llama.cpp's Q8 activations), the
// 4-bit weights are widened only to bytes, and one instruction multiplies 64 byte pairs and sums them in fours into
// int32 lanes (AVX-512 VNNI; AVX2 takes two for 32). The int32 sums of a block are scaled to floats once per block.
//
// Weights are held in tiles of 16 rows, each lane of a 64-byte register one row (as llama.cpp's repacked
// Q4_0 and KleidiAI's kernels interleave rows): a tile's weights are one stream from memory, four activations
// broadcast to every lane meet four weights of each of the 16 rows in one instruction, and a block's scales are
// applied to all 16 rows at once. A tile is k / 8 chunks of 64 bytes; chunk c holds weights 8c..8c+7 of the 16
// rows, byte 4r + i weight 8c + i of row r in its low nibble and weight 8c + 4 + i in its high one (i in 0..3). Each
// group of 32, 64, 128 or 256 weights along a row has a scale s and zero z, weight = (q - 8) * s + z with q in
// 0..15 (fast_decode.quantize_int4's form, as PyTorch's int4 kernels take it). A row's scales are whole multiples
// (uint8 codes) of one power of two and its zeros (int8 codes) of another, held per tile as (1 + k / group, 2, 16)
// bytes: the 16 rows' two exponents, then for each group the 16 rows' scale codes and zero codes: 4.5 bits a
// weight with group 32, as llama.cpp's Q4_0. 8-bit weights: tiles of k / 4 chunks of 64 bytes, chunk
// c's byte 4r + i weight 4c + i of row r (held as w + 128: below), one bf16 scale per row.
//
// A product of 32 weights with a block of activations x ~= d * a (a int8):
//   sum_j w_j x_j = s * d * sum_j q_j a_j + (z - 8 s) * d * sum_j a_j
// The first sum is the integer product; the second needs only the block's own sum of a, computed once per row of
// activations and shared by every weight row.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/mman.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define WIDE 1  // 64-byte registers, VNNI's multiply-and-sum of byte quads (vpdpbusd)
#elif defined(__AVX2__) && defined(__FMA__)
#define WIDE 0  // 32-byte registers: two instructions (maddubs, madd) do what one VNNI one does
#else
#error "fast_decode.cpp needs AVX2 and FMA (or AVX-512 with VNNI)"
#endif

namespace {

constexpr int64_t BLOCK = 32;  // activations and 4-bit scales both come in blocks of 32 along k
constexpr int64_t LANES = 16;  // rows of a tile: one per 32-bit lane of a 64-byte register

struct Activations {  // rows of x rounded to int8 in blocks of 32, x ~= d * a
  std::vector<int8_t> a;  // (m, k)
  std::vector<float> d;   // (m, k / 32) the block's scale, max |x| / 127
  std::vector<float> sum; // (m, k / 32) d * sum(a): the block's zero-point term
};

// One row of k floats rounded to int8 in blocks of 32: a (k), d and sum (k / 32). Each block's largest |x| (a NaN
// kept: the block's products come out NaN) sets d = max / 127; x / d rounded to the nearest integer (ties to even,
// as nearbyint) is at most 127, so the saturating narrowing to bytes is exact.
void round_row(const float* x, int64_t k, int8_t* a, float* d, float* sum) {
  for (int64_t i = 0; i < k / BLOCK; ++i, x += BLOCK, a += BLOCK) {
#if WIDE
    const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
    const bool nan = _mm512_cmp_ps_mask(lo, lo, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(hi, hi, _CMP_UNORD_Q);
    const float amax = nan ? NAN : _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
#else
    const __m256 sign = _mm256_set1_ps(-0.f);
    __m256 v[4], top = _mm256_setzero_ps();
    int nan = 0;
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + 8 * j);
      top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v[j]));
      nan |= _mm256_movemask_ps(_mm256_cmp_ps(v[j], v[j], _CMP_UNORD_Q));
    }
    __m128 t = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
    t = _mm_max_ps(t, _mm_movehl_ps(t, t));
    const float amax = nan ? NAN : _mm_cvtss_f32(_mm_max_ss(t, _mm_movehdup_ps(t)));
#endif
    // d = 0, or below the smallest normal float (whose inverse overflows): the block is zeros
    const float di = amax / 127.f, inv = std::isnormal(di) ? 1.f / di : 0.f;
#if WIDE
    const __m512i q_lo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, _mm512_set1_ps(inv)));
    const __m512i q_hi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, _mm512_set1_ps(inv)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a), _mm512_cvtsepi32_epi8(q_lo));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(a + 16), _mm512_cvtsepi32_epi8(q_hi));
    const int total = _mm512_reduce_add_epi32(_mm512_add_epi32(q_lo, q_hi));
#else
    __m256i q[4];
    for (int j = 0; j < 4; ++j) q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));
    // (the packs work within 128-bit lanes: the permute puts the 32 bytes back in order, as llama.cpp's Q8 does)
    const __m256i bytes = _mm256_permutevar8x32_epi32(
        _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
        _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(a), bytes);
    __m256i s32 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    const int total = _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
#endif
    d[i] = di;
    sum[i] = di * static_cast<float>(total);
  }
}

Activations round_rows(const at::Tensor& x2) {
  const int64_t m = x2.size(0), k = x2.size(1), blocks = k / BLOCK;
  Activations r{std::vector<int8_t>(m * k), std::vector<float>(m * blocks), std::vector<float>(m * blocks)};
  const float* x = x2.data_ptr<float>();
  for (int64_t i = 0; i < m; ++i) round_row(x + i * k, k, &r.a[i * k], &r.d[i * blocks], &r.sum[i * blocks]);
  return r;
}

float bf16_float(uint16_t h) {
  const uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

__m256 bf16_floats(__m128i h) {  // 8 bf16 -> float: the bf16 bits are a float's top half
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

float sum_floats(__m256 v) {  // the sum of a register's 8 floats
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

#if WIDE
__m512 bf16_floats(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

float sum_floats(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif

// The floats 2^e of 16 (WIDE; else 8) exponents e (int8, -126..127): the grid units of a tile's rows.
#if WIDE
__m512 powers_of_two(const uint8_t* e) {
  const __m512i bits = _mm512_add_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(e))),
                                        _mm512_set1_epi32(127));
  return _mm512_castsi512_ps(_mm512_slli_epi32(bits, 23));
}
#else
__m256 powers_of_two(const uint8_t* e) {
  const __m256i bits = _mm256_add_epi32(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(e))),
                                        _mm256_set1_epi32(127));
  return _mm256_castsi256_ps(_mm256_slli_epi32(bits, 23));
}
#endif

// One tile of 16 rows of BITS-bit weights (4, or 6: the output head's) times one row of activations: out, the 16
// rows' products. A group of per_group blocks shares one scale and zero; codes: the tile's (1 + k / group, 2, 16)
// bytes (above). weight = (q - mid) * s + z, mid = 8 (q in 0..15) or 32 (0..63). A 6-bit tile's block is the 4-bit
// one's four chunks of low nibbles, then two chunks of each weight's top two bits: chunk j's byte 4r + i holds in
// bits 2m, 2m + 1 (m in 0..3) those of row r's weight 16j + 4m + i (whose nibble is in chunk 2j + m / 2).
template <int BITS>
void grouped_tile(const uint8_t* w, const uint8_t* codes, int64_t k, int64_t per_group, const int8_t* a,
                  const float* d, const float* sum, float* out) {
  static_assert(BITS == 4 || BITS == 6, "4- or 6-bit weights");
  const int64_t blocks = k / BLOCK;
  const float mid = 1 << (BITS - 1);
#if WIDE
  const __m512i low = _mm512_set1_epi8(0x0F), top = _mm512_set1_epi8(0x30);
  const __m512 s_unit = powers_of_two(codes), z_unit = powers_of_two(codes + LANES);
  __m512 acc = _mm512_setzero_ps(), s, zs;  // zs: z - mid s, the group's zero-point term per unit of sum(a)
  for (int64_t b = 0; b < blocks; ++b, w += BITS * 64, a += BLOCK) {
    if (b % per_group == 0) {
      const uint8_t* group = codes + (1 + b / per_group) * 2 * LANES;
      s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(group)))), s_unit);
      const __m512 z = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(group + LANES)))), z_unit);
      zs = _mm512_fnmadd_ps(_mm512_set1_ps(mid), s, z);
    }
    __m512i lo_sum = _mm512_setzero_si512(), hi_sum = _mm512_setzero_si512();
    for (int64_t c = 0; c < 4; ++c) {  // the block's four chunks of eight weights
      const __m512i v = _mm512_loadu_si512(w + 64 * c);
      __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      if constexpr (BITS == 6) {  // each weight's top two bits, moved to bits 4 and 5 of its byte
        const __m512i u = _mm512_loadu_si512(w + 4 * 64 + 64 * (c / 2));
        lo = _mm512_or_si512(lo, _mm512_and_si512(c % 2 ? u : _mm512_slli_epi16(u, 4), top));
        hi = _mm512_or_si512(hi, _mm512_and_si512(c % 2 ? _mm512_srli_epi16(u, 2) : _mm512_slli_epi16(u, 2), top));
      }
      int32_t x_lo, x_hi;  // activations 8c..8c+3 and 8c+4..8c+7, for every lane
      std::memcpy(&x_lo, a + 8 * c, 4);
      std::memcpy(&x_hi, a + 8 * c + 4, 4);
      lo_sum = _mm512_dpbusd_epi32(lo_sum, lo, _mm512_set1_epi32(x_lo));
      hi_sum = _mm512_dpbusd_epi32(hi_sum, hi, _mm512_set1_epi32(x_hi));
    }
    const __m512 q_sum = _mm512_cvtepi32_ps(_mm512_add_epi32(lo_sum, hi_sum));
    acc = _mm512_fmadd_ps(q_sum, _mm512_mul_ps(s, _mm512_set1_ps(d[b])), acc);
    acc = _mm512_fmadd_ps(zs, _mm512_set1_ps(sum[b]), acc);
  }
  _mm512_storeu_ps(out, acc);
#else
  const __m256i low = _mm256_set1_epi8(0x0F), top = _mm256_set1_epi8(0x30), ones = _mm256_set1_epi16(1);
  const __m256 s_unit[2] = {powers_of_two(codes), powers_of_two(codes + 8)};  // rows 0-7, rows 8-15
  const __m256 z_unit[2] = {powers_of_two(codes + LANES), powers_of_two(codes + LANES + 8)};
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, s[2], zs[2];
  for (int64_t b = 0; b < blocks; ++b, w += BITS * 64, a += BLOCK) {
    if (b % per_group == 0) {
      for (int64_t h = 0; h < 2; ++h) {
        const uint8_t* rows = codes + (1 + b / per_group) * 2 * LANES + 8 * h;
        s[h] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
            reinterpret_cast<const __m128i*>(rows)))), s_unit[h]);
        const __m256 z = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(
            reinterpret_cast<const __m128i*>(rows + LANES)))), z_unit[h]);
        zs[h] = _mm256_fnmadd_ps(_mm256_set1_ps(mid), s[h], z);
      }
    }
    // int16 sums of byte pairs: a 4-bit block's eight of them (each at most 2 * 15 * 127) stay below 2^15; a 6-bit
    // chunk's two (2 * 63 * 127 each) go on to int32 sums chunk by chunk
    __m256i pair_sum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()}, q_sum[2] = {pair_sum[0], pair_sum[1]};
    for (int64_t c = 0; c < 4; ++c) {
      int32_t x_lo, x_hi;
      std::memcpy(&x_lo, a + 8 * c, 4);
      std::memcpy(&x_hi, a + 8 * c + 4, 4);
      const __m256i xl = _mm256_set1_epi32(x_lo), xh = _mm256_set1_epi32(x_hi);
      for (int64_t h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * c + 32 * h));
        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if constexpr (BITS == 6) {
          const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 4 * 64 + 64 * (c / 2) + 32 * h));
          lo = _mm256_or_si256(lo, _mm256_and_si256(c % 2 ? u : _mm256_slli_epi16(u, 4), top));
          hi = _mm256_or_si256(hi, _mm256_and_si256(c % 2 ? _mm256_srli_epi16(u, 2) : _mm256_slli_epi16(u, 2), top));
        }
        const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh));
        if constexpr (BITS == 4)
          pair_sum[h] = _mm256_add_epi16(pair_sum[h], pairs);
        else
          q_sum[h] = _mm256_add_epi32(q_sum[h], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int64_t h = 0; h < 2; ++h) {
      const __m256 q = _mm256_cvtepi32_ps(BITS == 4 ? _mm256_madd_epi16(pair_sum[h], ones) : q_sum[h]);
      acc[h] = _mm256_fmadd_ps(q, _mm256_mul_ps(s[h], _mm256_set1_ps(d[b])), acc[h]);
      acc[h] = _mm256_fmadd_ps(zs[h], _mm256_set1_ps(sum[b]), acc[h]);
    }
  }
  _mm256_storeu_ps(out, acc[0]);
  _mm256_storeu_ps(out + 8, acc[1]);
#endif
}

// One tile of 16 rows of 8-bit weights times one row of activations: out, the 16 rows' sums of each block's
// product times its d (the row scales come after). The weights are held as w + 128, unsigned bytes, so that VNNI
// multiplies them with the signed activations: sum (w + 128) a = sum w a + 128 sum a, and 128 * d * sum a, the same
// for every row, comes off at the end. AVX2's multiply-add of unsigned by signed bytes would overflow its int16
// sums on w + 128, so there the weights go back to signed bytes and |a| meets w with a's sign, as llama.cpp does.
void int8_tile(const uint8_t* w, int64_t k, const int8_t* a, const float* d, const float* sum, float* out) {
  const int64_t blocks = k / BLOCK;
#if WIDE
  __m512 acc = _mm512_setzero_ps();
  float offset = 0.f;
  for (int64_t b = 0; b < blocks; ++b, w += 8 * 64, a += BLOCK) {
    __m512i q_sum[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
    for (int64_t c = 0; c < 8; ++c) {  // the block's eight chunks of four weights
      int32_t x;
      std::memcpy(&x, a + 4 * c, 4);
      q_sum[c % 2] = _mm512_dpbusd_epi32(q_sum[c % 2], _mm512_loadu_si512(w + 64 * c), _mm512_set1_epi32(x));
    }
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(q_sum[0], q_sum[1])), _mm512_set1_ps(d[b]), acc);
    offset += 128.f * sum[b];
  }
  _mm512_storeu_ps(out, _mm512_sub_ps(acc, _mm512_set1_ps(offset)));
#else
  const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // rows 0-7, rows 8-15
  for (int64_t b = 0; b < blocks; ++b, w += 8 * 64, a += BLOCK) {
    __m256i q_sum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int64_t c = 0; c < 8; ++c) {
      int32_t x;
      std::memcpy(&x, a + 4 * c, 4);
      const __m256i xs = _mm256_set1_epi32(x), ax = _mm256_sign_epi8(xs, xs);
      for (int64_t h = 0; h < 2; ++h) {
        const __m256i held = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * c + 32 * h));
        const __m256i v = _mm256_xor_si256(held, flip);  // w + 128 -> w
        const __m256i pairs = _mm256_maddubs_epi16(ax, _mm256_sign_epi8(v, xs));  // at most 2 * 127 * 127
        q_sum[h] = _mm256_add_epi32(q_sum[h], _mm256_madd_epi16(pairs, ones));
      }
    }
    for (int64_t h = 0; h < 2; ++h)
      acc[h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q_sum[h]), _mm256_set1_ps(d[b]), acc[h]);
  }
  _mm256_storeu_ps(out, acc[0]);
  _mm256_storeu_ps(out + 8, acc[1]);
#endif
}

// One row of bf16 weights (row-major, as the model holds them) times one row of bf16 activations, 32 | k: AVX-512
// BF16's vdpbf16ps multiplies 32 bf16 pairs and sums them in twos into float lanes; without it, each bf16 is widened
// to a float (its top half) and multiplied with an FMA. Row after row, a thread's weights are one stream from
// memory, which the hardware prefetcher follows (four rows at a time, four streams with the rows eight on
// prefetched, was slower: docs/speed.md); two sums in flight (AVX2: four).
float bf16_row(const uint16_t* w, int64_t k, const uint16_t* x) {
#if defined(__AVX512BF16__)
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  for (int64_t j = 0; j < k; j += 32)
    acc[j / 32 % 2] = _mm512_dpbf16_ps(acc[j / 32 % 2], (__m512bh)_mm512_loadu_si512(w + j),
                                       (__m512bh)_mm512_loadu_si512(x + j));
  return sum_floats(_mm512_add_ps(acc[0], acc[1]));
#else
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t j = 0; j < k; j += 8) {
    const __m256 wv = bf16_floats(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + j)));
    const __m256 xv = bf16_floats(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + j)));
    acc[j / 8 % 4] = _mm256_fmadd_ps(wv, xv, acc[j / 8 % 4]);
  }
  return sum_floats(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
#endif
}

// A layer's weights in tiles of 16 rows (above), 4-, 6- or 8-bit, told apart by their shapes:
// - 4-bit: w (n, k / 2) uint8 and scales_and_zeros (n / 16, 1 + k / group, 2, 16) uint8 codes, group 32, 64,
//   128 or 256; 6-bit: the same, w (n, 3 k / 4);
// - 8-bit: w (n, k) uint8 (each weight + 128) and scale (n) bf16;
// or (the one-call step's bf16 models) bf16 weights (n, k) as the model holds them, no scales: 16 rows a tile too.
// tile(t, a, d, sum, out): tile t times one rounded row of activations, into its 16 outputs; bf16_tile the same
// for a bf16 row.
struct Tiles {
  const uint8_t* w = nullptr;
  const uint8_t* codes = nullptr;    // 4-bit weights' scales and zeros
  const uint16_t* scales = nullptr;  // 8-bit weights' row scales
  const uint16_t* bf16 = nullptr;    // bf16 weights, where they are
  int64_t n, k, groups = 0, bits = 8;  // groups: 4- or 6-bit groups along a row

  Tiles(const at::Tensor& weights, const at::Tensor& s, int64_t k_) : n(weights.size(0)), k(k_) {
    TORCH_CHECK(weights.device().is_cpu() && weights.is_contiguous() && s.is_contiguous() &&
                (weights.scalar_type() == at::kByte || weights.scalar_type() == at::kBFloat16),
                "fast_decode: weights in the wrong form");
    TORCH_CHECK(k % (2 * BLOCK) == 0 && n % LANES == 0, "fast_decode: the kernels need 64 | k and 16 | n");
    if (weights.scalar_type() == at::kBFloat16) {
      TORCH_CHECK(weights.size(1) == k && s.numel() == 0, "fast_decode: bf16 weights in the wrong form");
      bf16 = reinterpret_cast<const uint16_t*>(weights.data_ptr());
      return;
    }
    w = weights.data_ptr<uint8_t>();
    if (s.dim() == 4) {
      groups = s.size(1) - 1;
      bits = weights.size(1) == k / 2 ? 4 : 6;
      TORCH_CHECK(s.scalar_type() == at::kByte && weights.size(1) == k * bits / 8 && groups > 0 &&
                  (k / BLOCK) % groups == 0 && s.numel() == n * (groups + 1) * 2,
                  "fast_decode: 4- or 6-bit weights in the wrong form");
      codes = s.data_ptr<uint8_t>();
    } else {
      TORCH_CHECK(s.scalar_type() == at::kBFloat16 && weights.size(1) == k && s.numel() == n,
                  "fast_decode: 8-bit weights in the wrong form");
      scales = reinterpret_cast<const uint16_t*>(s.data_ptr());
    }
  }

  void tile(int64_t t, const int8_t* a, const float* d, const float* sum, float* out) const {
    if (groups) {
      const uint8_t* tile_codes = codes + t * LANES * (groups + 1) * 2;
      (bits == 4 ? grouped_tile<4> : grouped_tile<6>)(w + t * LANES * k * bits / 8, tile_codes, k, k / BLOCK / groups,
                                                      a, d, sum, out);
      return;
    }
    int8_tile(w + t * LANES * k, k, a, d, sum, out);
    for (int64_t r = 0; r < LANES; ++r) out[r] *= bf16_float(scales[t * LANES + r]);
  }

  void bf16_tile(int64_t t, const uint16_t* x, float* out) const {
    for (int64_t r = 0; r < LANES; ++r) out[r] = bf16_row(bf16 + (t * LANES + r) * k, k, x);
  }
};

// A product: the rows of x rounded once, then each tile of 16 weight rows times every row of x (the weights stream
// from memory once; the rounded rows stay in cache), the tiles split between threads.
// x (..., k) float or bf16 -> (rows of x, n) float32
at::Tensor tiled_product(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
  const int64_t k = x.size(-1), blocks = k / BLOCK;
  TORCH_CHECK(x.device().is_cpu(), "fast_decode's kernels run on the CPU");
  const Tiles tiles(w, scales, k);
  TORCH_CHECK(!tiles.bf16, "fast_decode: int4_linear, int6_linear and int8_linear take 4-, 6- and 8-bit weights");
  const at::Tensor x2 = x.reshape({-1, k}).to(at::kFloat).contiguous();
  const int64_t m = x2.size(0), n = tiles.n;
  const Activations act = round_rows(x2);
  at::Tensor y = at::empty({m, n}, x2.options());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, n / LANES, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t i = 0; i < m; ++i)
        tiles.tile(t, &act.a[i * k], &act.d[i * blocks], &act.sum[i * blocks], Y + i * n + t * LANES);
  });
  return y;
}

// x (k) bf16, one row; w (n, k) bf16 -> (1, n) float32
at::Tensor bf16_linear(const at::Tensor& x, const at::Tensor& w) {
  const int64_t k = x.size(-1), n = w.size(0);
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu() && x.scalar_type() == at::kBFloat16 &&
              w.scalar_type() == at::kBFloat16 && x.numel() == k && w.size(1) == k && k % 32 == 0,
              "fast_decode: bf16_linear takes one bf16 row and bf16 weights, 32 | k");
  const at::Tensor x1 = x.contiguous(), w1 = w.contiguous();
  at::Tensor y = at::empty({1, n}, x1.options().dtype(at::kFloat));
  const uint16_t* X = reinterpret_cast<const uint16_t*>(x1.data_ptr());
  const uint16_t* W = reinterpret_cast<const uint16_t*>(w1.data_ptr());
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, n, 64, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) Y[r] = bf16_row(W + r * k, k, X);
  });
  return y;
}

// One decode step's attention for one head: a single query row against the S cached keys and values, float32 or
// bf16 (a bf16 model's cache). PyTorch's CPU flash attention blocks its work for long queries; for one row it takes
// 1.4-1.7 times this one's time in float32 (1.0-1.3 held to AVX2), 6-10 times in bf16, where it converts its blocks
// to floats and back (benchmarks/bench_decode_attention.py). Summed in floats: the scores as dot products in 16 or
// 8 float lanes, SDPA's softmax (exp(score - max), normalized) with the exponentials taken 16 or 8 at a time, the
// values' weighted sum in the same lanes, the output rounded to its dtype once.
#if WIDE
using Floats = __m512;
constexpr int64_t FLOATS = 16;
Floats splat(float x) { return _mm512_set1_ps(x); }
Floats load_floats(const float* p) { return _mm512_loadu_ps(p); }
Floats load_floats(const c10::BFloat16* p) {
  return bf16_floats(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
void store_floats(float* p, Floats v) { _mm512_storeu_ps(p, v); }
Floats add(Floats a, Floats b) { return _mm512_add_ps(a, b); }
Floats fmadd(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
#else
using Floats = __m256;
constexpr int64_t FLOATS = 8;
Floats splat(float x) { return _mm256_set1_ps(x); }
Floats load_floats(const float* p) { return _mm256_loadu_ps(p); }
Floats load_floats(const c10::BFloat16* p) {
  return bf16_floats(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
void store_floats(float* p, Floats v) { _mm256_storeu_ps(p, v); }
Floats add(Floats a, Floats b) { return _mm256_add_ps(a, b); }
Floats fmadd(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
#endif

// exp(x) for x <= 0 (a score less the row's largest), -inf and below -87.3 giving 0: 2^n * exp(r), n = round(x /
// ln 2), r = x - n ln 2 (ln 2 in two parts), exp(r) by Cephes' degree-7 polynomial (expf's, within 2 ulp).
Floats exp_neg(Floats x) {
  const float lowest = -87.3f;  // (2^n stays a normal float)
  const float c[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                     5.0000001201e-1f};
#if WIDE
  const __mmask16 under = _mm512_cmp_ps_mask(x, splat(lowest), _CMP_LT_OQ);
  x = _mm512_max_ps(x, splat(lowest));
  const Floats n = _mm512_roundscale_ps(_mm512_mul_ps(x, splat(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
#else
  const Floats under = _mm256_cmp_ps(x, splat(lowest), _CMP_LT_OQ);
  x = _mm256_max_ps(x, splat(lowest));
  const Floats n = _mm256_round_ps(_mm256_mul_ps(x, splat(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
#endif
  const Floats r = fmadd(n, splat(2.12194440e-4f), fmadd(n, splat(-0.693359375f), x));
  Floats poly = splat(c[0]);
  for (int i = 1; i < 6; ++i) poly = fmadd(poly, r, splat(c[i]));
#if WIDE
  poly = fmadd(poly, _mm512_mul_ps(r, r), add(r, splat(1.f)));
  const __m512i two_n = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_mul_ps(poly, _mm512_castsi512_ps(two_n)));
#else
  poly = fmadd(poly, _mm256_mul_ps(r, r), add(r, splat(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(poly, _mm256_castsi256_ps(two_n)));
#endif
}

template <typename T>
float dot(const T* a, const T* b, int64_t n) {  // FLOATS | n
  Floats acc = splat(0.f);
  for (int64_t j = 0; j < n; j += FLOATS) acc = fmadd(load_floats(a + j), load_floats(b + j), acc);
  return sum_floats(acc);
}

// One head: query row q against S keys and values (rows k_slot and v_slot apart) through the mask's S additive
// terms (m_slot apart) -> out (D). p (S) and o (D): the caller's scratch.
template <typename T, typename M>
void attend_head(const T* q, const T* k, const T* v, const M* mask, int64_t S, int64_t D, int64_t k_slot,
                 int64_t v_slot, int64_t m_slot, float scale, float* p, float* o, T* out) {
  float top = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    const float m = static_cast<float>(mask[s * m_slot]);
    p[s] = m == -INFINITY ? m : scale * dot(q, k + s * k_slot, D) + m;  // (a masked slot's key is not read)
    if (p[s] > top || std::isnan(p[s])) top = p[s];  // (a NaN stays)
  }
  if (std::isnan(top) || top == -INFINITY) {  // a NaN makes the row NaN; every slot masked, zeros (as flash)
    std::fill(out, out + D, static_cast<T>(std::isnan(top) ? NAN : 0.f));
    return;
  }
  Floats sums = splat(0.f);
  int64_t s = 0;
  for (; s + FLOATS <= S; s += FLOATS) {
    const Floats e = exp_neg(add(load_floats(&p[s]), splat(-top)));
    store_floats(&p[s], e);
    sums = add(sums, e);
  }
  float total = sum_floats(sums);
  for (; s < S; ++s) total += p[s] = std::exp(p[s] - top);
  for (int64_t d = 0; d < D; d += FLOATS) {  // the weighted sum, FLOATS columns at a time (in one register)
    Floats acc = splat(0.f);
    for (s = 0; s < S; ++s)
      if (p[s] != 0.f) acc = fmadd(splat(p[s]), load_floats(v + s * v_slot + d), acc);  // (0: a masked slot)
    store_floats(&o[d], acc);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = static_cast<T>(o[d] / total);
}

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& m, float scale,
            at::Tensor& out) {
  const int64_t H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t k_slot = k.stride(2), v_slot = v.stride(2), m_slot = m.stride(3);  // (read once: not in the loops)
  const T *Q = q.data_ptr<T>(), *K = k.data_ptr<T>(), *V = v.data_ptr<T>(), *M = m.data_ptr<T>();
  T* O = out.data_ptr<T>();
  at::parallel_for(0, q.size(0) * H, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> p(S), o(D);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / H, h = i % H, g = h / (H / Hkv);
      attend_head(Q + b * q.stride(0) + h * q.stride(1), K + b * k.stride(0) + g * k.stride(1),
                  V + b * v.stride(0) + g * v.stride(1), M + b * m.stride(0) + h * m.stride(1), S, D, k_slot, v_slot,
                  m_slot, scale, p.data(), o.data(), O + i * D);
    }
  });
}

// q (B, H, 1, D), k and v (B, Hkv, S, D) (Hkv | H: query head h reads kv head h / (H / Hkv), as SDPA's enable_gqa),
// mask (B or 1, H or 1, 1, S) added to the scores (0 or -inf) -> (B, H, 1, D); all float32 or all bf16, any strides
// but a unit one along D (a multiple of 16).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                            double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const at::ScalarType type = q.scalar_type();
  for (const at::Tensor* t : {&q, &k, &v, &mask})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == type && t->dim() == 4 && t->stride(3) == 1 &&
                (type == at::kFloat || type == at::kBFloat16),
                "fast_decode: decode_attention takes 4-d CPU tensors, all float32 or all bf16, unit stride along the "
                "last axis");
  TORCH_CHECK(q.size(2) == 1 && k.size(0) == B && v.sizes() == k.sizes() && k.size(3) == D && H % Hkv == 0 &&
              D % 16 == 0, "fast_decode: decode_attention takes one query row a head against keys and values of one "
              "shape, 16 | head size");
  const at::Tensor m = mask.expand({B, H, 1, S});
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  if (type == at::kFloat)
    attend<float>(q, k, v, m, static_cast<float>(scale), out);
  else
    attend<c10::BFloat16>(q, k, v, m, static_cast<float>(scale), out);
  return out;
}

// SwiGLU's silu(gate) for n values, FLOATS at a time: g * sigmoid(g), sigmoid(g) = 1 / (1 + e) for g >= 0, else
// e / (1 + e), e = exp(-|g|) (never above 1, so exp_neg serves both signs).
void silu(const float* gate, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + FLOATS <= n; j += FLOATS) {
    const Floats g = load_floats(gate + j), one = splat(1.f);
#if WIDE
    const Floats e = exp_neg(_mm512_min_ps(g, _mm512_sub_ps(splat(0.f), g)));
    const Floats sigmoid = _mm512_div_ps(
        _mm512_mask_blend_ps(_mm512_cmp_ps_mask(g, splat(0.f), _CMP_GE_OQ), e, one), add(one, e));
    store_floats(out + j, _mm512_mul_ps(g, sigmoid));
#else
    const Floats e = exp_neg(_mm256_min_ps(g, _mm256_sub_ps(splat(0.f), g)));
    const Floats sigmoid = _mm256_div_ps(_mm256_blendv_ps(e, one, _mm256_cmp_ps(g, splat(0.f), _CMP_GE_OQ)),
                                         add(one, e));
    store_floats(out + j, _mm256_mul_ps(g, sigmoid));
#endif
  }
  for (; j < n; ++j) out[j] = gate[j] / (1.f + std::exp(-gate[j]));
}

// A value as the model's dtype T holds it (a bf16 model rounds after every op; float32 keeps it).
template <typename T>
float as(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// A decode step through every layer of a Llama-family decoder (smollm2.py's and llama31.py's Block: RMSNorm,
// attention with RoPE over the KV cache, RMSNorm, SwiGLU, each added to the residual stream), one token a row, the
// products on the tiles above: 4- and 8-bit weights in a float32 model, bf16 weights in a bf16 one, whose every
// op's rounding to bf16 is the model's own. One call a step, where a PyTorch step makes hundreds of calls, each a
// parallel region of its own with Python between them, which cost a SmolLM2 step more than its products do
// (docs/speed.md). The threads stay in one parallel region for the step and wait for each other only where the
// next work reads what the others wrote, six times a layer; each normalizes and rounds for itself the rows that
// all of them multiply, which costs less than a wait.
// x (B, dim) in the model's dtype T, the token's embedding; weights, 16 a layer: input norm (dim); q, k, v, o (each
// weights and scales; a bf16 weight's scales empty; k's and v's weights empty where q's hold all three stacked);
// post-attention norm; gate, up, down (up's weights empty where gate's hold both); caches, 2 a layer: k and v (B,
// n_kv_heads, S, head_dim), written at slot; cos and sin (B, head_dim), RoPE at the token's position; mask (B, S)
// bool, the slots each row attends to -> the last layer's output (B, dim), before the final norm.
template <typename T>
void layers(T* x, at::TensorList weights, at::TensorList caches, const T* cos, const T* sin, const bool* mask,
            int64_t B, int64_t dim, int64_t S, int64_t hd, int64_t slot, int64_t n_heads, int64_t n_kv_heads,
            float eps) {
  const int64_t L = static_cast<int64_t>(caches.size()) / 2, nq = n_heads * hd, nkv = n_kv_heads * hd;
  const int64_t width = nq + 2 * nkv;  // a row of q, k and v
  constexpr bool bf16_model = !std::is_same_v<T, float>;
  struct Part {  // one matrix of a phase's products, and where its rows go in the phase's output row
    Tiles w;
    int64_t offset;
  };
  std::vector<std::vector<Part>> phases;  // 4 a layer: q/k/v, o, gate/up, down
  int64_t hidden = 0;
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* w = &weights[16 * l];
    for (const at::Tensor* norm : {&w[0], &w[9]})
      TORCH_CHECK(norm->scalar_type() == caches[0].scalar_type() && norm->is_contiguous() && norm->numel() == dim,
                  "fast_decode: llama_layers' norms are (dim) in the model's dtype");
    for (int64_t c = 0; c < 2; ++c)
      TORCH_CHECK(caches[2 * l + c].is_contiguous() && caches[2 * l + c].sizes() == caches[0].sizes() &&
                  caches[2 * l + c].scalar_type() == caches[0].scalar_type(), "fast_decode: caches differ");
    // (matrix, its k, its slot): the weights of k, v and up may be empty, stacked into q's and gate's
    auto phase = [&](std::initializer_list<int64_t> slots, int64_t k) {
      std::vector<Part> parts;
      int64_t offset = 0;
      for (int64_t i : slots)
        if (w[i].numel()) {
          parts.push_back({Tiles(w[i], w[i + 1], k), offset});
          offset += parts.back().w.n;
          TORCH_CHECK((parts.back().w.bf16 != nullptr) == bf16_model,
                      "fast_decode: llama_layers takes 4- and 8-bit weights in float32, bf16 weights in bf16");
        }
      return std::make_pair(parts, offset);
    };
    auto [qkv, n_qkv] = phase({1, 3, 5}, dim);
    auto [o, n_o] = phase({7}, nq);
    auto [gate_up, n_gate_up] = phase({10, 12}, dim);
    TORCH_CHECK(n_gate_up % 2 == 0 && (l == 0 || n_gate_up / 2 == hidden),
                "fast_decode: llama_layers' products have the wrong shapes");
    hidden = n_gate_up / 2;
    auto [down, n_down] = phase({14}, hidden);
    TORCH_CHECK(n_qkv == width && n_o == dim && n_down == dim, "fast_decode: llama_layers' products have the wrong "
                "shapes");
    phases.insert(phases.end(), {qkv, o, gate_up, down});
  }
  const int64_t widest = std::max({dim, nq, hidden});
  std::vector<float> h(B * dim), qkv(B * width), gate_up(B * 2 * hidden), m(B * S);  // h: the residual stream
  std::vector<T> y(B * nq);  // attention's output
  for (int64_t i = 0; i < B * dim; ++i) h[i] = static_cast<float>(x[i]);
  for (int64_t i = 0; i < B * S; ++i) m[i] = mask[i] ? 0.f : -INFINITY;
  const float scale = 1.f / std::sqrt(static_cast<float>(hd));
#pragma omp parallel num_threads(at::get_num_threads())
  {
    const int64_t t = omp_get_thread_num(), threads = omp_get_num_threads();
    // this thread's copy of a product's input: rounded to 8 bits in blocks of 32, or in bf16
    const int64_t rounded = bf16_model ? 0 : B * widest;  // (a bf16 model's products take a16 alone)
    std::vector<int8_t> a(rounded);
    std::vector<uint16_t> a16(bf16_model ? B * widest : 0);
    std::vector<float> d(rounded / BLOCK), sum(rounded / BLOCK), row(widest), p(S), o(hd), part(LANES);
    std::vector<T> q(hd);
    auto first = [&](int64_t n) { return n * t / threads; };  // this thread's share of n items: first(n) to last(n)
    auto last = [&](int64_t n) { return n * (t + 1) / threads; };
    auto take = [&](const float* r, int64_t k, int64_t b) {  // row b of the next products' input
      if constexpr (bf16_model)
        for (int64_t j = 0; j < k; ++j) a16[b * k + j] = c10::BFloat16(r[j]).x;
      else
        round_row(r, k, &a[b * k], &d[b * k / BLOCK], &sum[b * k / BLOCK]);
    };
    auto take_normed = [&](const T* weight) {  // RMSNorm of each row of h, as the model's RMSNorm
      for (int64_t b = 0; b < B; ++b) {
        const float* hb = &h[b * dim];
        float squares = 0.f;
        for (int64_t j = 0; j < dim; ++j) squares += hb[j] * hb[j];
        const float r = 1.f / std::sqrt(squares / dim + eps);
        for (int64_t j = 0; j < dim; ++j) row[j] = as<T>(static_cast<float>(weight[j]) * as<T>(hb[j] * r));
        take(row.data(), dim, b);
      }
    };
    // this thread's share of the phase's tiles, every row: into out (rows out_width apart), or added to it
    auto multiply = [&](const std::vector<Part>& parts, float* out, int64_t out_width, bool residual) {
      int64_t total = 0, base = 0;  // base: the phase's tiles before this matrix's
      for (const Part& matrix : parts) total += matrix.w.n / LANES;
      for (const Part& matrix : parts) {
        const Tiles& w = matrix.w;
        const int64_t end = std::min(last(total) - base, w.n / LANES);
        for (int64_t tile = std::max(first(total) - base, int64_t{0}); tile < end; ++tile)
          for (int64_t b = 0; b < B; ++b) {
            if (w.bf16)
              w.bf16_tile(tile, &a16[b * w.k], part.data());
            else
              w.tile(tile, &a[b * w.k], &d[b * w.k / BLOCK], &sum[b * w.k / BLOCK], part.data());
            float* target = out + b * out_width + matrix.offset + tile * LANES;
            for (int64_t r = 0; r < LANES; ++r)
              target[r] = residual ? as<T>(target[r] + as<T>(part[r])) : as<T>(part[r]);
          }
        base += w.n / LANES;
      }
    };
    auto rope = [&](float* v, int64_t b) {  // (v_i, v_{i+hd/2}) rotated, as the model's apply_rope
      const T *c = cos + b * hd, *s = sin + b * hd;
      for (int64_t i = 0; i < hd; ++i) o[i] = v[i];
      for (int64_t i = 0; i < hd / 2; ++i) {
        const float c0 = static_cast<float>(c[i]), c1 = static_cast<float>(c[i + hd / 2]);
        const float s0 = static_cast<float>(s[i]), s1 = static_cast<float>(s[i + hd / 2]);
        v[i] = as<T>(as<T>(o[i] * c0) + as<T>(-o[i + hd / 2] * s0));
        v[i + hd / 2] = as<T>(as<T>(o[i + hd / 2] * c1) + as<T>(o[i] * s1));
      }
    };
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor* w = &weights[16 * l];
      T *K = caches[2 * l].data_ptr<T>(), *V = caches[2 * l + 1].data_ptr<T>();
      take_normed(w[0].data_ptr<T>());
      multiply(phases[4 * l], qkv.data(), width, false);
#pragma omp barrier
      for (int64_t i = first(B * (n_heads + n_kv_heads)); i < last(B * (n_heads + n_kv_heads)); ++i) {
        const int64_t b = i / (n_heads + n_kv_heads), j = i % (n_heads + n_kv_heads);
        float* head = &qkv[b * width + j * hd];  // a query head, or (j >= n_heads) a key head
        rope(head, b);
        if (j >= n_heads) {  // the key and its value into the cache
          const int64_t at = ((b * n_kv_heads + j - n_heads) * S + slot) * hd;
          for (int64_t e = 0; e < hd; ++e) {
            K[at + e] = static_cast<T>(head[e]);
            V[at + e] = static_cast<T>(head[nkv + e]);
          }
        }
      }
#pragma omp barrier
      for (int64_t i = first(B * n_heads); i < last(B * n_heads); ++i) {
        const int64_t b = i / n_heads, g = i % n_heads / (n_heads / n_kv_heads), at = (b * n_kv_heads + g) * S * hd;
        for (int64_t e = 0; e < hd; ++e) q[e] = static_cast<T>(qkv[b * width + i % n_heads * hd + e]);
        attend_head(q.data(), K + at, V + at, &m[b * S], S, hd, hd, hd, 1, scale, p.data(), o.data(), &y[i * hd]);
      }
#pragma omp barrier
      for (int64_t b = 0; b < B; ++b) {
        for (int64_t j = 0; j < nq; ++j) row[j] = static_cast<float>(y[b * nq + j]);
        take(row.data(), nq, b);
      }
      multiply(phases[4 * l + 1], h.data(), dim, true);
#pragma omp barrier
      take_normed(w[9].data_ptr<T>());
      multiply(phases[4 * l + 2], gate_up.data(), 2 * hidden, false);
#pragma omp barrier
      for (int64_t b = 0; b < B; ++b) {  // SwiGLU: silu(gate) * up
        const float* g = &gate_up[b * 2 * hidden];
        silu(g, row.data(), hidden);
        for (int64_t j = 0; j < hidden; ++j) row[j] = as<T>(as<T>(row[j]) * g[hidden + j]);
        take(row.data(), hidden, b);
      }
      multiply(phases[4 * l + 3], h.data(), dim, true);
#pragma omp barrier
    }
  }
  for (int64_t i = 0; i < B * dim; ++i) x[i] = static_cast<T>(h[i]);
}

at::Tensor llama_layers(const at::Tensor& x, at::TensorList weights, at::TensorList caches, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& mask, int64_t slot, int64_t n_heads,
                        int64_t n_kv_heads, double eps) {
  TORCH_CHECK(!caches.empty() && weights.size() == 8 * caches.size() && x.dim() == 2 && cos.dim() == 2,
              "fast_decode: llama_layers takes 16 weights and 2 caches a layer, x (B, dim), cos (B, head_dim)");
  const int64_t B = x.size(0), dim = x.size(1), hd = cos.size(1), S = caches[0].size(2);
  const at::ScalarType type = x.scalar_type();
  for (const at::Tensor* t : {&x, &cos, &sin, &caches[0]})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == type && t->is_contiguous() && t->size(0) == B &&
                (type == at::kFloat || type == at::kBFloat16),
                "fast_decode: llama_layers takes rows, RoPE and caches on the CPU, all float32 or all bf16");
  TORCH_CHECK(sin.sizes() == cos.sizes() && mask.scalar_type() == at::kBool && mask.is_contiguous() &&
              mask.numel() == B * S && 0 <= slot && slot < S && hd % 16 == 0 && n_kv_heads > 0 &&
              n_heads % n_kv_heads == 0 && caches[0].sizes() == at::IntArrayRef({B, n_kv_heads, S, hd}),
              "fast_decode: llama_layers' RoPE, mask, caches or heads in the wrong form");
  at::Tensor out = x.clone();
  if (type == at::kFloat)
    layers<float>(out.data_ptr<float>(), weights, caches, cos.data_ptr<float>(), sin.data_ptr<float>(),
                  mask.data_ptr<bool>(), B, dim, S, hd, slot, n_heads, n_kv_heads, static_cast<float>(eps));
  else
    layers<c10::BFloat16>(out.data_ptr<c10::BFloat16>(), weights, caches, cos.data_ptr<c10::BFloat16>(),
                          sin.data_ptr<c10::BFloat16>(), mask.data_ptr<bool>(), B, dim, S, hd, slot, n_heads,
                          n_kv_heads, static_cast<float>(eps));
  return out;
}

// A copy of t in memory of its own on 2 MB pages (Linux's transparent huge pages, asked for with madvise): weights
// streamed every token cross a 4 kB page every 4 kB, and in a virtual machine each new page's address translation
// walks two page tables: on this project's VMs the int8 and bf16 steps ran much faster from 2 MB pages (docs/speed.md,
// "Weights on 2 MB pages"). The memory is mapped for t alone, whole 2 MB pages (at most 2 MB more than t), and
// unmapped with it; where the kernel gives no huge pages, plain ones.
at::Tensor huge_pages(const at::Tensor& t, bool release) {
  constexpr size_t page = size_t{1} << 21;
  const at::Tensor c = t.contiguous();
  const size_t nbytes = c.numel() * c.element_size(), size = std::max((nbytes + page - 1) / page * page, page);
  char* mapped = static_cast<char*>(mmap(nullptr, size + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                                         -1, 0));
  TORCH_CHECK(mapped != MAP_FAILED, "fast_decode: out of memory for ", nbytes, " bytes of weights");
  char* aligned = mapped + (page - reinterpret_cast<uintptr_t>(mapped) % page) % page;  // the first 2 MB boundary
  if (aligned > mapped) munmap(mapped, aligned - mapped);  // (the slack on either side, unmapped at once)
  if (aligned + size < mapped + size + page) munmap(aligned + size, mapped + size + page - (aligned + size));
#ifdef MADV_HUGEPAGE
  madvise(aligned, size, MADV_HUGEPAGE);  // (a hint: refused, the pages are plain ones)
#endif
  std::memcpy(aligned, c.data_ptr(), nbytes);
#ifdef MADV_PAGEOUT
  // release: the original's whole pages back to where they came from (a model's parameters may be a checkpoint's
  // memory map, which stays mapped while any of them is: its pages, read once by the copy, would stay counted
  // beside it); a hint that never loses data (a page read again comes back from its file)
  const uintptr_t page4k = 4096, from = reinterpret_cast<uintptr_t>(c.data_ptr());
  const uintptr_t first = (from + page4k - 1) / page4k * page4k, end = (from + nbytes) / page4k * page4k;
  if (release && end > first) madvise(reinterpret_cast<void*>(first), end - first, MADV_PAGEOUT);
#endif
  return at::from_blob(aligned, c.sizes(), [size](void* m) { munmap(m, size); }, c.options());
}

// Free memory the C library keeps in its heap handed back to the system (glibc's malloc_trim), after a model's
// weights were copied: their originals, freed, would otherwise stay in its heap.
void release_free_memory() {
#ifdef __GLIBC__
  malloc_trim(0);
#endif
}

}  // namespace

TORCH_LIBRARY(fast_decode, m) {
  m.def("int4_linear(Tensor x, Tensor w, Tensor scales_and_zeros) -> Tensor");
  m.def("int6_linear(Tensor x, Tensor w, Tensor scales_and_zeros) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("bf16_linear(Tensor x, Tensor w) -> Tensor");
  m.def("huge_pages(Tensor t, bool release) -> Tensor");
  m.def("release_free_memory() -> ()", &release_free_memory);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
  m.def("llama_layers(Tensor x, Tensor[] weights, Tensor(a!)[] caches, Tensor cos, Tensor sin, Tensor mask, "
        "int slot, int n_heads, int n_kv_heads, float eps) -> Tensor");
}

TORCH_LIBRARY_IMPL(fast_decode, CPU, m) {
  m.impl("int4_linear", &tiled_product);  // (the shapes tell the three apart)
  m.impl("int6_linear", &tiled_product);
  m.impl("int8_linear", &tiled_product);
  m.impl("bf16_linear", &bf16_linear);
  m.impl("huge_pages", &huge_pages);
  m.impl("decode_attention", &decode_attention);
  m.impl("llama_layers", &llama_layers);
}
