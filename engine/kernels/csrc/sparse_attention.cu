// Sparse decode attention kernels: block_mass (block scoring), sparse_paged_attention
// (flash-decoding over selected score blocks + compressed extra entries, split-K) and
// update_summaries (min / max / mean of full score blocks).
//
// Semantics: engine/kernels/sparse_attention.py and tests/engine/test_kernels_gpu_ext.py.
#include <cfloat>
#include <cmath>

#include "kernels.h"

namespace dualpath {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---- block_mass ---------------------------------------------------------------------------
// One CTA per (b, kvh). Pass 1: a warp per block j computes the G head scores (lane l holds
// dims l, l+32, ...), stores them in scores_ws and keeps a per-(warp, g) online max / sum.
// Pass 2: combine the warps' (max, sum) per head. Pass 3: mass_j = sum_g p_g(j).
constexpr int kMassMaxPerLane = 8;  // D <= 256

template <typename T, bool kMinMax>
__global__ void __launch_bounds__(kThreads) block_mass_kernel(BlockMassParams p) {
  extern __shared__ __align__(16) float mass_smem[];
  const int G = p.G, D = p.D, n = p.n;
  float* q_s = mass_smem;                // [G, D] q * scale
  float* wm_s = q_s + G * D;             // [kWarps, G] running max
  float* wl_s = wm_s + kWarps * G;       // [kWarps, G] running sum
  float* gm_s = wl_s + kWarps * G;       // [G] final max
  float* gl_s = gm_s + G;                // [G] 1 / final sum

  const int bh = blockIdx.x, b = bh / p.KVH, kvh = bh % p.KVH;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float* out = p.out + static_cast<size_t>(bh) * n;
  const int nf = static_cast<int>(p.num_full[b] < 0 ? 0 : (p.num_full[b] > n ? n : p.num_full[b]));
  if (nf == 0) {  // uniform over the CTA: no full block, zero mass
    for (int j = tid; j < n; j += kThreads) out[j] = 0.f;
    return;
  }
  const T* q = static_cast<const T*>(p.q) + static_cast<size_t>(bh) * G * D;
  for (int i = tid; i < G * D; i += kThreads) q_s[i] = to_float(q[i]) * p.scale;
  for (int i = tid; i < kWarps * G; i += kThreads) {
    wm_s[i] = -INFINITY;
    wl_s[i] = 0.f;
  }
  __syncthreads();

  const T* summ = static_cast<const T*>(p.summaries);
  const int64_t* phys = p.phys + static_cast<size_t>(b) * n;
  float* ws = p.scores_ws + static_cast<size_t>(bh) * G * n;
  for (int j = warp; j < nf; j += kWarps) {
    // NOTE: only j < num_full is read: later phys entries may be garbage.
    const T* row = summ + (static_cast<size_t>(phys[j]) * p.S * p.KVH + kvh) * D;
    float lo[kMassMaxPerLane], hi[kMassMaxPerLane];
#pragma unroll
    for (int i = 0; i < kMassMaxPerLane; ++i) {
      const int d = lane + 32 * i;
      lo[i] = d < D ? to_float(row[d]) : 0.f;
      hi[i] = (kMinMax && d < D) ? to_float(row[static_cast<size_t>(p.KVH) * D + d]) : 0.f;
    }
    for (int g = 0; g < G; ++g) {
      float part = 0.f;
#pragma unroll
      for (int i = 0; i < kMassMaxPerLane; ++i) {
        const int d = lane + 32 * i;
        if (d < D) {
          const float qd = q_s[g * D + d];
          part += kMinMax ? fmaxf(qd * lo[i], qd * hi[i]) : qd * lo[i];
        }
      }
      const float s = warp_sum(part);
      if (lane == 0) {
        ws[static_cast<size_t>(g) * n + j] = s;
        const int w = warp * G + g;
        const float m_new = fmaxf(wm_s[w], s);
        wl_s[w] = wl_s[w] * __expf(wm_s[w] - m_new) + __expf(s - m_new);
        wm_s[w] = m_new;
      }
    }
  }
  __syncthreads();
  for (int g = tid; g < G; g += kThreads) {
    float m = -INFINITY;
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, wm_s[w * G + g]);
    float l = 0.f;
    for (int w = 0; w < kWarps; ++w) {
      const float mw = wm_s[w * G + g];
      if (mw != -INFINITY) l += wl_s[w * G + g] * __expf(mw - m);
    }
    gm_s[g] = m;
    gl_s[g] = 1.f / l;  // l >= 1: the max score contributes exp(0)
  }
  __syncthreads();  // also orders the scores_ws writes of pass 1 before the reads below
  for (int j = tid; j < n; j += kThreads) {
    float mass = 0.f;
    if (j < nf) {
      for (int g = 0; g < G; ++g) mass += __expf(ws[static_cast<size_t>(g) * n + j] - gm_s[g]) * gl_s[g];
    }
    out[j] = mass;
  }
}

// ---- sparse_paged_attention ---------------------------------------------------------------
// Grid (num_splits, B * KVH); a CTA handles the G heads of one (b, kvh), so each K/V row is
// read once per group. The entry space of a group is [0, M*sbs) cache tokens (slot m = e /
// sbs, token t = e % sbs) then [M*sbs, M*sbs + C) extra entries; a split owns a contiguous
// range of kAttnTile-entry tiles. Per tile: per-entry metadata (source rows, logit bias or
// -inf when invisible) -> cp.async of K/V rows into a double buffer (invisible rows are
// zero-filled, so p = 0 never meets garbage) -> logits -> online softmax per head -> P.V.
constexpr int kTile = kAttnTile;        // == warp size: the softmax maps one entry per lane
constexpr int kMaxAccVec = kAttnMaxGD / (4 * kThreads);  // float4 accumulators per thread
static_assert(kTile == 32, "softmax maps one tile entry per lane");

struct AttnSmem {
  int ld;  // K/V smem row stride in elements (D + one 16-byte pad: conflict-free 16B reads)
  size_t kv_bytes, meta_off, q_off, s_off, bias_off, m_off, l_off, a_off, total;
};

template <typename T>
__host__ __device__ inline AttnSmem attn_smem_layout(int G, int D) {
  AttnSmem s;
  s.ld = D + 16 / static_cast<int>(sizeof(T));
  s.kv_bytes = static_cast<size_t>(kTile) * s.ld * sizeof(T);  // one K (or V) stage
  s.meta_off = 4 * s.kv_bytes;                                   // [K, V] x 2 stages
  s.q_off = s.meta_off + 2 * 2 * kTile * sizeof(void*);          // k/v row ptrs x 2 stages
  s.s_off = s.q_off + static_cast<size_t>(G) * D * sizeof(float);
  s.bias_off = s.s_off + static_cast<size_t>(G) * (kTile + 1) * sizeof(float);
  s.m_off = s.bias_off + 2 * kTile * sizeof(float);
  s.l_off = s.m_off + G * sizeof(float);
  s.a_off = s.l_off + G * sizeof(float);
  s.total = s.a_off + G * sizeof(float);
  return s;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sparse_attention_kernel(AttentionParams p) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte chunk
  extern __shared__ __align__(16) unsigned char attn_smem[];
  const int G = p.G, D = p.D, sbs = p.sbs;
  const AttnSmem L = attn_smem_layout<T>(G, D);
  T* k_s = reinterpret_cast<T*>(attn_smem);                      // [2][kTile][ld]
  T* v_s = reinterpret_cast<T*>(attn_smem + 2 * L.kv_bytes);     // [2][kTile][ld]
  const T** kp_s = reinterpret_cast<const T**>(attn_smem + L.meta_off);  // [2][kTile]
  const T** vp_s = kp_s + 2 * kTile;                                     // [2][kTile]
  float* q_s = reinterpret_cast<float*>(attn_smem + L.q_off);    // [G][D] q * scale
  float* s_s = reinterpret_cast<float*>(attn_smem + L.s_off);    // [G][kTile + 1] logits / p
  float* bias_s = reinterpret_cast<float*>(attn_smem + L.bias_off);  // [2][kTile]
  float* m_s = reinterpret_cast<float*>(attn_smem + L.m_off);    // [G] running max
  float* l_s = reinterpret_cast<float*>(attn_smem + L.l_off);    // [G] running sum
  float* a_s = reinterpret_cast<float*>(attn_smem + L.a_off);    // [G] rescale of this tile

  const int split = blockIdx.x, bh = blockIdx.y;
  const int b = bh / p.KVH, kvh = bh % p.KVH;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int chunks = D / kVec;  // 16-byte chunks per row
  const int n_cache = p.M * sbs, total = n_cache + p.C;
  const int num_tiles = (total + kTile - 1) / kTile;
  const int tile_begin = split * p.tiles_per_split;
  const int tile_end = min(tile_begin + p.tiles_per_split, num_tiles);

  const T* q = static_cast<const T*>(p.q) + static_cast<size_t>(bh) * G * D;
  for (int i = tid; i < G * D; i += kThreads) q_s[i] = to_float(q[i]) * p.scale;
  for (int g = tid; g < G; g += kThreads) {
    m_s[g] = -INFINITY;
    l_s[g] = 0.f;
  }

  const size_t slot0 = static_cast<size_t>(bh) * p.M;
  const int64_t ctx = p.context_lens[b];
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  // Metadata of one tile: row pointers (nullptr: invisible) and the logit bias.
  auto fill_meta = [&](int tile, int stage) {
    if (tid < kTile) {
      const int e = tile * kTile + tid;
      const T* kr = nullptr;
      const T* vr = nullptr;
      float bias = -INFINITY;
      if (e < n_cache) {
        const int m = e / sbs, t = e - m * sbs;
        if (p.valid[slot0 + m] && p.logical[slot0 + m] * sbs + t < ctx) {
          const size_t row = (static_cast<size_t>(p.phys[slot0 + m]) * sbs + t) * p.KVH + kvh;
          kr = kc + row * D;
          vr = vc + row * D;
          bias = 0.f;
        }
      } else if (e < total) {
        const size_t c = static_cast<size_t>(bh) * p.C + (e - n_cache);
        const float eb = p.extra_bias[c];
        if (eb != -INFINITY) {
          kr = static_cast<const T*>(p.extra_k) + c * D;
          vr = static_cast<const T*>(p.extra_v) + c * D;
          bias = eb;
        }
      }
      kp_s[stage * kTile + tid] = kr;
      vp_s[stage * kTile + tid] = vr;
      bias_s[stage * kTile + tid] = bias;
    }
  };
  auto issue_loads = [&](int stage) {
    for (int c = tid; c < kTile * chunks; c += kThreads) {
      const int i = c / chunks, ch = c - i * chunks;
      const T* kr = kp_s[stage * kTile + i];
      const T* vr = vp_s[stage * kTile + i];
      const size_t dst = (static_cast<size_t>(stage) * kTile + i) * L.ld + ch * kVec;
      cp_async16(k_s + dst, kr ? kr + ch * kVec : q, kr != nullptr);
      cp_async16(v_s + dst, vr ? vr + ch * kVec : q, vr != nullptr);
    }
    cp_async_commit();
  };

  // Logits: R lanes share one (head, entry) dot product (R = power of two <= 32 chosen so
  // that G * kTile * R ~ kThreads; small G then still uses every thread).
  int R = 1;
  while (R < 32 && 2 * R * G * kTile <= kThreads && 2 * R <= chunks) R *= 2;
  const int groups = kThreads / R, my_group = tid / R, my_r = tid % R;
  const int pairs = G * kTile;
  // P.V: thread owns float4 output vectors v = tid + j * kThreads of the [G, D] block.
  const int out_vecs = G * D / 4;
  float4 acc[kMaxAccVec];
#pragma unroll
  for (int j = 0; j < kMaxAccVec; ++j) acc[j] = make_float4(0.f, 0.f, 0.f, 0.f);

  if (tile_begin < tile_end) {
    fill_meta(tile_begin, 0);
    __syncthreads();  // meta + q_s + m_s/l_s visible
    issue_loads(0);
  }
  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int st = (tile - tile_begin) & 1;
    const bool has_next = tile + 1 < tile_end;
    // Stage st^1 (meta and rows) was last read by the previous tile, finished at its
    // trailing barrier.
    if (has_next) fill_meta(tile + 1, st ^ 1);
    cp_async_wait<0>();
    __syncthreads();  // rows of `tile` and meta of `tile + 1` visible
    if (has_next) issue_loads(st ^ 1);

    const T* kt = k_s + static_cast<size_t>(st) * kTile * L.ld;
    for (int base = 0; base < pairs; base += groups) {
      const int pair = base + my_group;
      const bool active = pair < pairs;
      const int g = active ? pair / kTile : 0, i = pair % kTile;
      float dot = 0.f;
      if (active) {
        const T* krow = kt + static_cast<size_t>(i) * L.ld;
        const float* qg = q_s + g * D;
        for (int ch = my_r; ch < chunks; ch += R) {
          float kv[kVec];
          load16_float(krow + ch * kVec, kv);
#pragma unroll
          for (int x = 0; x < kVec; ++x) dot += qg[ch * kVec + x] * kv[x];
        }
      }
      for (int o = R / 2; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
      if (active && my_r == 0) {
        const float bias = bias_s[st * kTile + i];
        s_s[g * (kTile + 1) + i] = bias == -INFINITY ? -INFINITY : dot + bias;
      }
    }
    __syncthreads();

    // Online softmax, one warp per head, one entry per lane.
    for (int g = warp; g < G; g += kWarps) {
      const float s = s_s[g * (kTile + 1) + lane];
      const float m_old = m_s[g];
      const float m_new = fmaxf(m_old, warp_max(s));
      const float pr = s == -INFINITY ? 0.f : __expf(s - m_new);
      const float alpha = m_old == -INFINITY ? 0.f : __expf(m_old - m_new);
      const float sum = warp_sum(pr);
      s_s[g * (kTile + 1) + lane] = pr;
      __syncwarp();
      if (lane == 0) {
        m_s[g] = m_new;
        l_s[g] = l_s[g] * alpha + sum;
        a_s[g] = alpha;
      }
    }
    __syncthreads();

    const T* vt = v_s + static_cast<size_t>(st) * kTile * L.ld;
#pragma unroll
    for (int j = 0; j < kMaxAccVec; ++j) {
      const int v = tid + j * kThreads;
      if (v < out_vecs) {
        const int g = v / (D / 4), d = (v - g * (D / 4)) * 4;
        const float alpha = a_s[g];
        float4 a = acc[j];
        a.x *= alpha;
        a.y *= alpha;
        a.z *= alpha;
        a.w *= alpha;
        const float* pg = s_s + g * (kTile + 1);
#pragma unroll 8
        for (int i = 0; i < kTile; ++i) {
          const float pr = pg[i];
          const float4 vv = load4_float(vt + static_cast<size_t>(i) * L.ld + d);
          a.x += pr * vv.x;
          a.y += pr * vv.y;
          a.z += pr * vv.z;
          a.w += pr * vv.w;
        }
        acc[j] = a;
      }
    }
    __syncthreads();  // stage st and s_s free for the next tile
  }

  // Epilogue: normalised output (one split) or the partial (acc, max, sum) for the reduce.
  // Every thread's m_s / l_s reads are ordered after the last tile's barrier.
  __syncthreads();
#pragma unroll
  for (int j = 0; j < kMaxAccVec; ++j) {
    const int v = tid + j * kThreads;
    if (v < out_vecs) {
      const int g = v / (D / 4), d = (v - g * (D / 4)) * 4;
      float4 a = acc[j];
      if (p.num_splits == 1) {
        const float l = l_s[g];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        a.x *= inv;
        a.y *= inv;
        a.z *= inv;
        a.w *= inv;
        T* out = static_cast<T*>(p.out) + (static_cast<size_t>(bh) * G + g) * D + d;
        store4(out, a);
      } else {
        const size_t row = (static_cast<size_t>(bh) * p.num_splits + split) * G + g;
        *reinterpret_cast<float4*>(p.ws_acc + row * D + d) = a;
      }
    }
  }
  if (p.num_splits > 1) {
    for (int g = tid; g < G; g += kThreads) {
      const size_t row = (static_cast<size_t>(bh) * p.num_splits + split) * G + g;
      p.ws_ml[row * 2] = m_s[g];
      p.ws_ml[row * 2 + 1] = l_s[g];
    }
  }
}

// Combine the splits of one (b, kvh, g): out = sum_s acc_s e^(m_s - m) / sum_s l_s e^(m_s - m).
template <typename T>
__global__ void attention_reduce_kernel(AttentionParams p) {
  const int bhg = blockIdx.x;  // (b * KVH + kvh) * G + g == b * H + h
  const int bh = bhg / p.G, g = bhg % p.G;
  const int S = p.num_splits, D = p.D;
  const size_t row0 = static_cast<size_t>(bh) * S * p.G + g;  // split s: row0 + s * G
  float m = -INFINITY;
  for (int s = 0; s < S; ++s) m = fmaxf(m, p.ws_ml[(row0 + s * p.G) * 2]);
  float l = 0.f;
  for (int s = 0; s < S; ++s) {
    const float ms = p.ws_ml[(row0 + s * p.G) * 2];
    if (ms != -INFINITY) l += p.ws_ml[(row0 + s * p.G) * 2 + 1] * __expf(ms - m);
  }
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* out = static_cast<T*>(p.out) + static_cast<size_t>(bhg) * D;
  for (int d = threadIdx.x * 4; d < D; d += blockDim.x * 4) {
    float4 o = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int s = 0; s < S; ++s) {
      const size_t row = row0 + s * p.G;
      const float ms = p.ws_ml[row * 2];
      if (ms == -INFINITY) continue;  // split saw no visible entry: acc is 0
      const float w = __expf(ms - m) * inv;
      const float4 a = *reinterpret_cast<const float4*>(p.ws_acc + row * D + d);
      o.x += w * a.x;
      o.y += w * a.y;
      o.z += w * a.z;
      o.w += w * a.w;
    }
    store4(out + d, o);
  }
}

// ---- update_summaries ---------------------------------------------------------------------
// Grid (m, KVH): a thread per dim loops over the sbs tokens of the block (coalesced over d).
template <typename T>
__global__ void update_summaries_kernel(SummaryParams p) {
  const int64_t blk = p.block_ids[blockIdx.x];
  if (blk < 0 || blk >= p.num_sub) return;  // out of range: skip rather than write wild
  const int kvh = blockIdx.y, D = p.D, KVH = p.KVH;
  const T* kc = static_cast<const T*>(p.k_cache);
  const T* vc = static_cast<const T*>(p.v_cache);
  T* summ = static_cast<T*>(p.summaries);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float mn = INFINITY, mx = -INFINITY, sk = 0.f, sv = 0.f;
    for (int t = 0; t < p.sbs; ++t) {
      const size_t off = ((static_cast<size_t>(blk) * p.sbs + t) * KVH + kvh) * D + d;
      const float k = to_float(kc[off]);
      mn = fminf(mn, k);
      mx = fmaxf(mx, k);
      sk += k;
      if (p.means) sv += to_float(vc[off]);
    }
    auto put = [&](int s, float v) {
      summ[((static_cast<size_t>(blk) * p.S + s) * KVH + kvh) * D + d] = from_float<T>(v);
    };
    const float cnt = static_cast<float>(p.sbs);
    int s = 0;
    if (p.minmax) {
      put(s++, mn);
      put(s++, mx);
    }
    if (!p.minmax || p.means) put(s++, sk / cnt);
    if (p.means) put(s++, sv / cnt);
  }
}

template <typename T>
cudaError_t launch_block_mass(const BlockMassParams& p, cudaStream_t stream) {
  const size_t smem = block_mass_smem_bytes(p.G, p.D);
  auto kernel = p.minmax ? block_mass_kernel<T, true> : block_mass_kernel<T, false>;
  if (smem > 48 * 1024) {
    cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  kernel<<<p.B * p.KVH, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_attention(const AttentionParams& p, cudaStream_t stream) {
  const size_t smem = attn_smem_layout<T>(p.G, p.D).total;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(sparse_attention_kernel<T>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.num_splits, p.B * p.KVH);
  sparse_attention_kernel<T><<<grid, kThreads, smem, stream>>>(p);
  if (p.num_splits > 1) {
    const int threads = min(64, max(32, p.D / 4));
    attention_reduce_kernel<T><<<p.B * p.KVH * p.G, threads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_summaries(const SummaryParams& p, cudaStream_t stream) {
  const int threads = min(256, (p.D + 31) / 32 * 32);
  update_summaries_kernel<T><<<dim3(p.m, p.KVH), threads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

size_t block_mass_smem_bytes(int G, int D) {
  return (static_cast<size_t>(G) * D + 2 * kWarps * G + 2 * G) * sizeof(float);
}

size_t attention_smem_bytes(DType dtype, int G, int D) {
  return dtype == DType::kFloat32 ? attn_smem_layout<float>(G, D).total
                                  : attn_smem_layout<__half>(G, D).total;
}

void plan_attention(AttentionParams& p, int num_sms) {
  // Split-K only for long selections (> kAttnSplitThreshold entries), into enough splits to
  // give ~2 CTAs per SM, each split at least 8 tiles (256 entries) long.
  const int total = p.M * p.sbs + p.C;
  const int num_tiles = (total + kTile - 1) / kTile;
  int splits = 1;
  if (total > kAttnSplitThreshold) {
    const int groups = p.B * p.KVH;
    const int want = (2 * num_sms + groups - 1) / groups;
    const int most = (num_tiles + 7) / 8;
    splits = max(1, min(want, most));
  }
  p.tiles_per_split = (num_tiles + splits - 1) / splits;
  p.num_splits = (num_tiles + p.tiles_per_split - 1) / p.tiles_per_split;  // none empty
}

cudaError_t block_mass(DType dtype, const BlockMassParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_block_mass<float>(p, stream);
    case DType::kBFloat16: return launch_block_mass<__nv_bfloat16>(p, stream);
    default: return launch_block_mass<__half>(p, stream);
  }
}

cudaError_t sparse_paged_attention(DType dtype, const AttentionParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_attention<float>(p, stream);
    case DType::kBFloat16: return launch_attention<__nv_bfloat16>(p, stream);
    default: return launch_attention<__half>(p, stream);
  }
}

cudaError_t update_summaries(DType dtype, const SummaryParams& p, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_summaries<float>(p, stream);
    case DType::kBFloat16: return launch_summaries<__nv_bfloat16>(p, stream);
    default: return launch_summaries<__half>(p, stream);
  }
}

}  // namespace dualpath
