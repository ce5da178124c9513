// Fused MoE (routed SwiGLU experts): align -> grouped GEMM 1 (gate/up, fused silu * up)
// -> grouped GEMM 2 (down, times the routing weight) -> reduce over the k choices.
//
// Rows are the (token, choice) pairs p = t * k + j, grouped by expert and padded per expert
// to whole kMoeTileM-row tiles (sorted_pair = -1 on padding rows); tile_expert names each
// tile's expert. GEMM tiles: 64 x 64 outputs, K step 32 (16-bit types; 16 for float32),
// two-stage cp.async pipeline, 4 warps. bf16 / fp16 multiply on tensor cores (WMMA
// 16x16x16, float32 accumulate); float32 uses register-tiled FMA (exact float32 math).
// Each pair's output row is written once, to pair_out, and the final sum over its k rows
// runs in a fixed order: no atomics on data, the result is deterministic.
//
// Semantics: engine/kernels/moe.py (fused_moe).
#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "kernels.h"

namespace dualpath {
namespace {

constexpr int kBM = kMoeTileM, kBN = kMoeTileN;
constexpr int kGemmThreads = 128;
constexpr int kAlignThreads = 1024;

// ---- align: counts per expert -> tile ranges -> sorted (token, choice) rows ----------------
// One CTA. Out-of-range expert ids are dropped (their pairs contribute nothing).
__global__ void __launch_bounds__(kAlignThreads)
    moe_align_kernel(const int64_t* ids, int num_pairs, int E, int num_tiles_max,
                     int* sorted_pair, int* tile_expert) {
  extern __shared__ int align_smem[];
  int* counts = align_smem;          // [E]
  int* tile_start = counts + E;      // [E + 1] first tile of each expert
  int* cursor = tile_start + E + 1;  // [E] rows placed so far
  const int tid = threadIdx.x;
  for (int e = tid; e < E; e += kAlignThreads) {
    counts[e] = 0;
    cursor[e] = 0;
  }
  __syncthreads();
  for (int i = tid; i < num_pairs; i += kAlignThreads) {
    const int64_t e = ids[i];
    if (e >= 0 && e < E) atomicAdd(&counts[e], 1);
  }
  __syncthreads();
  if (tid == 0) {
    int acc = 0;
    for (int e = 0; e < E; ++e) {
      tile_start[e] = acc;
      acc += (counts[e] + kBM - 1) / kBM;
    }
    tile_start[E] = acc;  // <= num_tiles_max by construction
  }
  for (int s = tid; s < num_tiles_max * kBM; s += kAlignThreads) sorted_pair[s] = -1;
  __syncthreads();
  for (int t = tid; t < num_tiles_max; t += kAlignThreads) {
    int e = -1;
    if (t < tile_start[E]) {  // last expert whose first tile is <= t (binary search)
      int lo = 0, hi = E - 1;
      while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tile_start[mid] <= t) lo = mid; else hi = mid - 1;
      }
      e = lo;
    }
    tile_expert[t] = e;
  }
  // NOTE: the order of rows inside an expert depends on atomic timing; it does not change
  // any value, since every output row is computed from its own input row only.
  for (int i = tid; i < num_pairs; i += kAlignThreads) {
    const int64_t e = ids[i];
    if (e >= 0 && e < E) sorted_pair[tile_start[e] * kBM + atomicAdd(&cursor[e], 1)] = i;
  }
}

// ---- grouped GEMM ---------------------------------------------------------------------------
// kGateUp: rows = x[token of pair], B = w13[e] gate rows n and up rows I + n, K = Hd, N = I;
//          epilogue inter[slot, n] = silu(gate) * up.
// else:    rows = inter[slot], B = w2[e] rows n, K = I, N = Hd;
//          epilogue pair_out[pair, n] = acc * topk_weights[pair].
template <typename T>
struct GemmCfg {
  static constexpr int kVec = 16 / sizeof(T);           // elements per 16-byte chunk
  static constexpr int kBK = sizeof(T) == 4 ? 16 : 32;  // K step
  static constexpr int kLd = kBK + kVec;                // smem row stride (16-byte pad)
  static constexpr int kLdc = kBN + 4;                  // float staging row stride
};

template <typename T, bool kGateUp>
struct GemmSmem {
  static constexpr int kNB = kGateUp ? 2 : 1;
  static constexpr int kLd = GemmCfg<T>::kLd;
  union {
    struct {
      T a[2][kBM][kLd];
      T b[2][kNB][kBN][kLd];
    } tiles;
    float c[kNB][kBM][GemmCfg<T>::kLdc];  // accumulator staging for the epilogue
  };
  const T* row_src[kBM];  // A row of each tile row (nullptr: padding)
  int pair[kBM];
};

// Accumulators of one thread: WMMA fragments (16-bit) or a register tile (float32).
template <typename T, int kNB>
struct Accum {
  // float32: thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 8 i, cols tx + 16 j.
  float r[kNB][8][4];
  __device__ void zero() {
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) r[nb][i][j] = 0.f;
  }
  template <typename S>
  __device__ void mma(const S& sm, int st) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int kk = 0; kk < GemmCfg<T>::kBK; ++kk) {
      float a[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) a[i] = sm.tiles.a[st][ty + 8 * i][kk];
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float bv = sm.tiles.b[st][nb][tx + 16 * j][kk];
#pragma unroll
          for (int i = 0; i < 8; ++i) r[nb][i][j] = fmaf(a[i], bv, r[nb][i][j]);
        }
    }
  }
  template <typename S>
  __device__ void stage(S& sm) {
    const int ty = threadIdx.x / 16, tx = threadIdx.x % 16;
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) sm.c[nb][ty + 8 * i][tx + 16 * j] = r[nb][i][j];
  }
};

// 16-bit: warp w computes the 32 x 32 block (w / 2, w % 2) as 2 x 2 WMMA 16x16 fragments.
template <typename T, int kNB>
struct WmmaAccum {
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, T, nvcuda::wmma::row_major>;
  using FragB = nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, T, nvcuda::wmma::col_major>;
  using FragC = nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float>;
  FragC c[kNB][2][2];
  __device__ void zero() {
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) nvcuda::wmma::fill_fragment(c[nb][i][j], 0.f);
  }
  template <typename S>
  __device__ void mma(const S& sm, int st) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
    constexpr int kLd = GemmCfg<T>::kLd;
#pragma unroll
    for (int kk = 0; kk < GemmCfg<T>::kBK; kk += 16) {
      FragA a[2];
#pragma unroll
      for (int i = 0; i < 2; ++i)
        nvcuda::wmma::load_matrix_sync(a[i], &sm.tiles.a[st][wm * 32 + i * 16][kk], kLd);
#pragma unroll
      for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          // B tile is stored [n][k]: a col-major K x N matrix with leading dimension kLd.
          FragB bf;
          nvcuda::wmma::load_matrix_sync(bf, &sm.tiles.b[st][nb][wn * 32 + j * 16][kk], kLd);
#pragma unroll
          for (int i = 0; i < 2; ++i) nvcuda::wmma::mma_sync(c[nb][i][j], a[i], bf, c[nb][i][j]);
        }
    }
  }
  template <typename S>
  __device__ void stage(S& sm) {
    const int warp = threadIdx.x / 32, wm = warp / 2, wn = warp % 2;
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb)
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          nvcuda::wmma::store_matrix_sync(&sm.c[nb][wm * 32 + i * 16][wn * 32 + j * 16], c[nb][i][j],
                                          GemmCfg<T>::kLdc, nvcuda::wmma::mem_row_major);
  }
};

template <typename T, int kNB>
using AccumFor = typename std::conditional<sizeof(T) == 4, Accum<T, kNB>, WmmaAccum<T, kNB>>::type;

template <typename T, bool kGateUp>
__global__ void __launch_bounds__(kGemmThreads) moe_gemm_kernel(MoeParams p) {
  using Cfg = GemmCfg<T>;
  using Smem = GemmSmem<T, kGateUp>;
  constexpr int kNB = Smem::kNB, kVec = Cfg::kVec, kBK = Cfg::kBK;
  constexpr int kChunks = kBK / kVec;  // 16-byte chunks per smem row per K step
  __shared__ __align__(128) Smem sm;

  const int tile = blockIdx.x, n0 = blockIdx.y * kBN, tid = threadIdx.x;
  const int e = p.tile_expert[tile];
  if (e < 0) return;  // past the last used tile (uniform over the CTA)
  const int K = kGateUp ? p.Hd : p.I;
  const int N = kGateUp ? p.I : p.Hd;
  const T* x = static_cast<const T*>(p.x);
  const T* inter = static_cast<const T*>(p.inter);
  for (int r = tid; r < kBM; r += kGemmThreads) {
    const int slot = tile * kBM + r;
    const int pair = p.sorted_pair[slot];
    sm.pair[r] = pair;
    const T* src = nullptr;
    if (pair >= 0) src = kGateUp ? x + static_cast<size_t>(pair / p.k) * K : inter + static_cast<size_t>(slot) * K;
    sm.row_src[r] = src;
  }
  // B rows: gate (and up) rows of w13[e], or rows of w2[e]; rows n >= N are zero-filled.
  const T* wbase = kGateUp ? static_cast<const T*>(p.w13) + static_cast<size_t>(e) * 2 * p.I * K
                           : static_cast<const T*>(p.w2) + static_cast<size_t>(e) * p.Hd * K;
  __syncthreads();

  auto load_stage = [&](int k0, int st) {
    for (int c = tid; c < kBM * kChunks; c += kGemmThreads) {
      const int r = c / kChunks, kc = k0 + (c % kChunks) * kVec;
      const T* src = sm.row_src[r];
      const bool ok = src != nullptr && kc < K;  // K % kVec == 0: chunks are all-in or all-out
      cp_async16(&sm.tiles.a[st][r][(c % kChunks) * kVec], ok ? src + kc : wbase, ok);
    }
#pragma unroll
    for (int nb = 0; nb < kNB; ++nb) {
      for (int c = tid; c < kBN * kChunks; c += kGemmThreads) {
        const int r = c / kChunks, kc = k0 + (c % kChunks) * kVec;
        const int n = n0 + r;
        const bool ok = n < N && kc < K;
        const T* src = wbase + (static_cast<size_t>(nb) * p.I + n) * K + kc;
        cp_async16(&sm.tiles.b[st][nb][r][(c % kChunks) * kVec], ok ? src : wbase, ok);
      }
    }
    cp_async_commit();
  };

  AccumFor<T, kNB> acc;
  acc.zero();
  const int num_k = (K + kBK - 1) / kBK;
  load_stage(0, 0);
  for (int kt = 0; kt < num_k; ++kt) {
    const int st = kt & 1;
    if (kt + 1 < num_k) {
      load_stage((kt + 1) * kBK, st ^ 1);  // stage st^1 was freed by the last barrier
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    acc.mma(sm, st);
    __syncthreads();
  }
  acc.stage(sm);  // sm.c aliases the tiles: safe after the loop's trailing barrier
  __syncthreads();

  for (int idx = tid; idx < kBM * kBN; idx += kGemmThreads) {
    const int r = idx / kBN, c = idx % kBN, n = n0 + c;
    const int pair = sm.pair[r];
    if (pair < 0 || n >= N) continue;
    if constexpr (kGateUp) {
      const float g = sm.c[0][r][c], u = sm.c[kNB - 1][r][c];
      const float act = g / (1.f + __expf(-g)) * u;  // silu(g) * u; g -> -inf gives -0 * u
      static_cast<T*>(p.inter)[static_cast<size_t>(tile * kBM + r) * N + n] = from_float<T>(act);
    } else {
      p.pair_out[static_cast<size_t>(pair) * N + n] = sm.c[0][r][c] * p.topk_weights[pair];
    }
  }
}

// out[t, d] = sum_j pair_out[t * k + j, d] over the valid choices, in order j = 0..k-1.
template <typename T>
__global__ void moe_reduce_kernel(MoeParams p) {
  const size_t total = static_cast<size_t>(p.T) * (p.Hd / 4);
  for (size_t v = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const size_t t = v / (p.Hd / 4);
    const int d = static_cast<int>(v % (p.Hd / 4)) * 4;
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < p.k; ++j) {
      const size_t pair = t * p.k + j;
      const int64_t e = p.topk_ids[pair];
      if (e < 0 || e >= p.E) continue;  // dropped by the align kernel: row never written
      const float4 r = *reinterpret_cast<const float4*>(p.pair_out + pair * p.Hd + d);
      o.x += r.x;
      o.y += r.y;
      o.z += r.z;
      o.w += r.w;
    }
    store4(static_cast<T*>(p.out) + t * p.Hd + d, o);
  }
}

template <typename T>
cudaError_t launch_moe(const MoeParams& p, cudaStream_t stream) {
  const int num_pairs = p.T * p.k;
  const int tiles = moe_num_tiles_max(p.T, p.k, p.E);
  const size_t align_smem = (3 * static_cast<size_t>(p.E) + 1) * sizeof(int);
  moe_align_kernel<<<1, kAlignThreads, align_smem, stream>>>(p.topk_ids, num_pairs, p.E, tiles,
                                                             p.sorted_pair, p.tile_expert);
  const dim3 grid1(tiles, (p.I + kBN - 1) / kBN);
  moe_gemm_kernel<T, true><<<grid1, kGemmThreads, 0, stream>>>(p);
  const dim3 grid2(tiles, (p.Hd + kBN - 1) / kBN);
  moe_gemm_kernel<T, false><<<grid2, kGemmThreads, 0, stream>>>(p);
  const size_t vecs = static_cast<size_t>(p.T) * (p.Hd / 4);
  const int blocks = static_cast<int>(std::min<size_t>((vecs + 255) / 256, 65535));
  moe_reduce_kernel<T><<<blocks, 256, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

int moe_num_tiles_max(int T, int k, int E) {
  // sum_e ceil(c_e / BM) <= ceil(sum_e c_e / BM) + (experts with c_e > 0)
  const int pairs = T * k;
  return (pairs + kBM - 1) / kBM + std::min(E, pairs);
}

cudaError_t fused_moe(DType dtype, const MoeParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_moe<float>(p, stream);
    case DType::kBFloat16: return launch_moe<__nv_bfloat16>(p, stream);
    default: return launch_moe<__half>(p, stream);
  }
}

}  // namespace dualpath
