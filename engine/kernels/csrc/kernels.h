// Launchers of the dualpath CUDA kernels: raw pointers, no torch headers.
//
// bindings.cpp checks shapes/dtypes/contiguity and allocates outputs and workspaces; the
// .cu files only launch. Every launcher returns cudaGetLastError() of its launches.
// All tensors are contiguous row-major; element types are named by DType and every
// reduction runs in float32.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace dualpath {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// ---- sparse attention (sparse_attention.cu) ----------------------------------------------

// mass[b, kvh, j] = sum_g softmax_j(scale * score(q[b, kvh, g], summaries[phys[b, j]]))
// over j < num_full[b]; 0 elsewhere. scores_ws: float32 [B, KVH, G, n] scratch.
struct BlockMassParams {
  const void* q;           // [B, KVH, G, D]
  const void* summaries;   // [num_sub, S, KVH, D]
  const int64_t* phys;     // [B, n]
  const int64_t* num_full; // [B]
  float* out;              // [B, KVH, n]
  float* scores_ws;        // [B, KVH, G, n]
  int B, KVH, G, D, n, S;
  bool minmax;
  float scale;
};
size_t block_mass_smem_bytes(int G, int D);
cudaError_t block_mass(DType dtype, const BlockMassParams& p, cudaStream_t stream);

// Flash-decoding attention of the G query heads of each (b, kvh) over the selected score
// blocks (+ optional extra entries). Split-K over the entry range when num_splits > 1.
struct AttentionParams {
  const void* q;             // [B, H, D], H = KVH * G
  const void* k_cache;       // [num_sub * sbs, KVH, D] key rows
  const void* v_cache;       // [num_sub * sbs, KVH, D] value rows
  const int64_t* phys;       // [B, KVH, M] flat score-block ids
  const int64_t* logical;    // [B, KVH, M] logical score-block indices
  const bool* valid;         // [B, KVH, M]
  const int64_t* context_lens; // [B]
  const void* extra_k;       // [B, KVH, C, D] or nullptr (then C == 0)
  const void* extra_v;       // [B, KVH, C, D]
  const float* extra_bias;   // [B, KVH, C]
  void* out;                 // [B, H, D]
  float* ws_acc;             // [B * KVH, num_splits, G, D] unnormalised partial outputs
  float* ws_ml;              // [B * KVH, num_splits, G, 2] partial (max, sum) per head
  int B, KVH, G, D, M, sbs, C;
  int num_splits, tiles_per_split;  // from plan_attention
  float scale;
};
// Tokens per tile of the attention kernel and the split-K threshold (entries = M*sbs + C).
constexpr int kAttnTile = 32;
constexpr int kAttnSplitThreshold = 1024;
// Largest G * D the attention kernel supports (per-thread accumulator registers).
constexpr int kAttnMaxGD = 8192;
// Fills num_splits / tiles_per_split from the shapes and the SM count.
void plan_attention(AttentionParams& p, int num_sms);
size_t attention_smem_bytes(DType dtype, int G, int D);
cudaError_t sparse_paged_attention(DType dtype, const AttentionParams& p, cudaStream_t stream);

// Summaries of the listed score blocks (see bindings.cpp for the S layout).
struct SummaryParams {
  const void* k_cache;        // [num_sub * sbs, KVH, D]
  const void* v_cache;
  void* summaries;            // [num_sub, S, KVH, D]
  const int64_t* block_ids;   // [m]
  int m, num_sub, sbs, KVH, D, S;
  bool minmax, means;
};
cudaError_t update_summaries(DType dtype, const SummaryParams& p, cudaStream_t stream);

// ---- fused MoE (moe.cu) --------------------------------------------------------------------

// Rows of the grouped GEMMs are padded per expert to multiples of kMoeTileM.
constexpr int kMoeTileM = 64;
constexpr int kMoeTileN = 64;

struct MoeParams {
  const void* x;              // [T, Hd]
  const void* w13;            // [E, 2I, Hd]
  const void* w2;             // [E, Hd, I]
  const float* topk_weights;  // [T, k]
  const int64_t* topk_ids;    // [T, k]
  void* out;                  // [T, Hd]
  // workspaces (moe_num_tiles_max tiles of kMoeTileM rows)
  int* sorted_pair;           // [tiles * kMoeTileM] (token * k + choice) or -1 (padding)
  int* tile_expert;           // [tiles] expert of each row tile, -1 past the last
  void* inter;                // [tiles * kMoeTileM, I] silu(gate) * up, x's dtype
  float* pair_out;            // [T * k, Hd] weighted expert outputs per (token, choice)
  int T, Hd, I, E, k;
};
int moe_num_tiles_max(int T, int k, int E);
cudaError_t fused_moe(DType dtype, const MoeParams& p, cudaStream_t stream);

}  // namespace dualpath

// ---- device helpers shared by the .cu files -----------------------------------------------
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace dualpath {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

// 16-byte chunk of T at a 16-byte aligned address -> 16 / sizeof(T) floats.
template <typename T>
__device__ __forceinline__ void load16_float(const T* ptr, float* dst) {
  const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
  if constexpr (sizeof(T) == 4) {
    dst[0] = __uint_as_float(raw.x);
    dst[1] = __uint_as_float(raw.y);
    dst[2] = __uint_as_float(raw.z);
    dst[3] = __uint_as_float(raw.w);
  } else {
    const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) dst[i] = to_float(h[i]);
  }
}

// 4 consecutive elements (8 or 16 bytes, aligned to that size) -> float4.
template <typename T>
__device__ __forceinline__ float4 load4_float(const T* ptr) {
  if constexpr (sizeof(T) == 4) {
    return *reinterpret_cast<const float4*>(ptr);
  } else {
    const uint2 raw = *reinterpret_cast<const uint2*>(ptr);
    const T* h = reinterpret_cast<const T*>(&raw);
    return make_float4(to_float(h[0]), to_float(h[1]), to_float(h[2]), to_float(h[3]));
  }
}

template <typename T>
__device__ __forceinline__ void store4(T* ptr, float4 v) {
  if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<float4*>(ptr) = v;
  } else {
    uint2 raw;
    T* h = reinterpret_cast<T*>(&raw);
    h[0] = from_float<T>(v.x);
    h[1] = from_float<T>(v.y);
    h[2] = from_float<T>(v.z);
    h[3] = from_float<T>(v.w);
    *reinterpret_cast<uint2*>(ptr) = raw;
  }
}

// cp.async of 16 bytes global -> shared; zero-fills the destination when !pred
// (src must still be a valid address; no byte of it is read then).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool pred) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

}  // namespace dualpath
#endif  // __CUDACC__
