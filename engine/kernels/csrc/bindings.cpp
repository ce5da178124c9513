// Python bindings of the dualpath CUDA kernels (module engine.kernels._C / dualpath_kernels).
//
// Each op checks devices, dtypes, shapes and layout, makes the small index tensors
// contiguous int64 (cheap copies when they are not), allocates outputs and workspaces with
// torch's caching allocator, and launches on the current stream of the inputs' device.
// NOTE: only light headers (no torch/extension.h, no ATen/cuda/CUDAContext.h, which needs
// cuBLAS headers): this file is compiled on CPU-only CI machines as a check.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/utils/pybind.h>

#include <pybind11/stl.h>

#include <optional>

#include "kernels.h"

namespace {

using at::Tensor;

dualpath::DType dtype_of(const Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat: return dualpath::DType::kFloat32;
    case at::kBFloat16: return dualpath::DType::kBFloat16;
    case at::kHalf: return dualpath::DType::kFloat16;
    default: break;
  }
  TORCH_CHECK(false, op, ": dtype must be float32, bfloat16 or float16, got ", t.scalar_type());
  return dualpath::DType::kFloat32;  // unreachable
}

void check_cuda(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), ", expected ", ref.device());
}

void check_data(const Tensor& t, const Tensor& ref, const char* op, const char* name) {
  check_cuda(t, ref, op, name);
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, op, ": ", name,
              " must be 16-byte aligned (vectorised loads)");
}

// Small index / metadata tensors: any layout and integer width in, contiguous dtype out.
Tensor as_index(const Tensor& t, const Tensor& ref, const char* op, const char* name,
                at::ScalarType type = at::kLong) {
  check_cuda(t, ref, op, name);
  return t.to(type).contiguous();
}

int num_sms(int device) {
  static int cached[64] = {0};
  if (device < 64 && cached[device]) return cached[device];
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, device));
  if (device < 64) cached[device] = v;
  return v;
}

size_t max_smem(int device) {
  int v = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return static_cast<size_t>(v);
}

Tensor block_mass(const Tensor& q_in, const Tensor& summaries, const Tensor& phys_in,
                  const Tensor& num_full_in, bool minmax, double scale) {
  constexpr const char* op = "block_mass";
  TORCH_CHECK(q_in.is_cuda(), op, ": q must be a CUDA tensor");
  const Tensor q = q_in.contiguous();
  const auto dtype = dtype_of(q, op);
  TORCH_CHECK(q.dim() == 4, op, ": q must be [B, KVH, G, D], got ", q.sizes());
  TORCH_CHECK(summaries.dim() == 4, op, ": summaries must be [num_sub, S, KVH, D], got ", summaries.sizes());
  check_data(summaries, q, op, "summaries");
  const int64_t B = q.size(0), KVH = q.size(1), G = q.size(2), D = q.size(3);
  TORCH_CHECK(summaries.size(2) == KVH && summaries.size(3) == D, op, ": summaries ", summaries.sizes(),
              " do not match q ", q.sizes());
  TORCH_CHECK(summaries.size(1) >= (minmax ? 2 : 1), op, ": summaries need ", minmax ? 2 : 1, " vectors");
  TORCH_CHECK(D >= 1 && D <= 256, op, ": head dim must be in [1, 256], got ", D);
  TORCH_CHECK(phys_in.dim() == 2 && phys_in.size(0) == B, op, ": phys must be [B, n], got ", phys_in.sizes());
  TORCH_CHECK(num_full_in.dim() == 1 && num_full_in.size(0) == B, op, ": num_full must be [B]");
  const Tensor phys = as_index(phys_in, q, op, "phys");
  const Tensor num_full = as_index(num_full_in, q, op, "num_full");
  const int64_t n = phys.size(1);
  const c10::cuda::CUDAGuard guard(q.device());
  Tensor out = at::empty({B, KVH, n}, q.options().dtype(at::kFloat));
  if (B * KVH == 0 || n == 0) return out;
  const size_t smem = dualpath::block_mass_smem_bytes(static_cast<int>(G), static_cast<int>(D));
  TORCH_CHECK(smem <= max_smem(q.get_device()), op, ": G * D = ", G * D, " needs too much shared memory");
  Tensor ws = at::empty({B, KVH, G, n}, out.options());
  dualpath::BlockMassParams p{};
  p.q = q.data_ptr();
  p.summaries = summaries.data_ptr();
  p.phys = phys.data_ptr<int64_t>();
  p.num_full = num_full.data_ptr<int64_t>();
  p.out = out.data_ptr<float>();
  p.scores_ws = ws.data_ptr<float>();
  p.B = static_cast<int>(B);
  p.KVH = static_cast<int>(KVH);
  p.G = static_cast<int>(G);
  p.D = static_cast<int>(D);
  p.n = static_cast<int>(n);
  p.S = static_cast<int>(summaries.size(1));
  p.minmax = minmax;
  p.scale = static_cast<float>(scale);
  C10_CUDA_CHECK(dualpath::block_mass(dtype, p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

Tensor sparse_paged_attention(const Tensor& q_in, const Tensor& kv_cache, const Tensor& phys_in,
                              const Tensor& logical_in, const Tensor& valid_in,
                              const Tensor& context_lens_in, int64_t sbs, double scale,
                              const std::optional<Tensor>& extra_k_in,
                              const std::optional<Tensor>& extra_v_in,
                              const std::optional<Tensor>& extra_bias_in) {
  constexpr const char* op = "sparse_paged_attention";
  TORCH_CHECK(q_in.is_cuda(), op, ": q must be a CUDA tensor");
  const Tensor q = q_in.contiguous();
  const auto dtype = dtype_of(q, op);
  check_data(q, q, op, "q");
  TORCH_CHECK(q.dim() == 3, op, ": q must be [B, H, D], got ", q.sizes());
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2, op,
              ": kv_cache must be [2, N, bs, KVH, D], got ", kv_cache.sizes());
  check_data(kv_cache, q, op, "kv_cache");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t N = kv_cache.size(1), bs = kv_cache.size(2), KVH = kv_cache.size(3);
  TORCH_CHECK(kv_cache.size(4) == D, op, ": kv_cache head dim ", kv_cache.size(4), " != q head dim ", D);
  TORCH_CHECK(KVH >= 1 && H % KVH == 0, op, ": ", H, " query heads do not split into ", KVH, " kv heads");
  const int64_t G = H / KVH;
  TORCH_CHECK(D % 8 == 0, op, ": head dim must be a multiple of 8, got ", D);
  TORCH_CHECK(G * D <= dualpath::kAttnMaxGD, op, ": G * D = ", G * D, " exceeds ", dualpath::kAttnMaxGD);
  TORCH_CHECK(sbs >= 1 && bs % sbs == 0, op, ": score block size ", sbs, " must divide the block size ", bs);
  TORCH_CHECK(phys_in.dim() == 3 && phys_in.size(0) == B && phys_in.size(1) == KVH, op,
              ": phys must be [B, KVH, M], got ", phys_in.sizes());
  TORCH_CHECK(logical_in.sizes() == phys_in.sizes() && valid_in.sizes() == phys_in.sizes(), op,
              ": phys, logical and valid must have the same shape");
  TORCH_CHECK(valid_in.scalar_type() == at::kBool, op, ": valid must be bool");
  TORCH_CHECK(context_lens_in.dim() == 1 && context_lens_in.size(0) == B, op, ": context_lens must be [B]");
  const Tensor phys = as_index(phys_in, q, op, "phys");
  const Tensor logical = as_index(logical_in, q, op, "logical");
  const Tensor valid = as_index(valid_in, q, op, "valid", at::kBool);
  const Tensor lens = as_index(context_lens_in, q, op, "context_lens");
  const int64_t M = phys.size(2);

  const bool has_extra = extra_k_in.has_value();
  TORCH_CHECK(has_extra == extra_v_in.has_value() && has_extra == extra_bias_in.has_value(), op,
              ": extra_k, extra_v and extra_bias go together");
  Tensor extra_k, extra_v, extra_bias;
  int64_t C = 0;
  if (has_extra) {
    check_cuda(*extra_k_in, q, op, "extra_k");
    check_cuda(*extra_v_in, q, op, "extra_v");
    TORCH_CHECK(extra_k_in->dim() == 4 && extra_k_in->size(0) == B && extra_k_in->size(1) == KVH &&
                    extra_k_in->size(3) == D,
                op, ": extra_k must be [B, KVH, C, D], got ", extra_k_in->sizes());
    TORCH_CHECK(extra_v_in->sizes() == extra_k_in->sizes(), op, ": extra_v must match extra_k");
    C = extra_k_in->size(2);
    TORCH_CHECK(extra_bias_in->dim() == 3 && extra_bias_in->size(0) == B && extra_bias_in->size(1) == KVH &&
                    extra_bias_in->size(2) == C,
                op, ": extra_bias must be [B, KVH, C], got ", extra_bias_in->sizes());
    extra_k = extra_k_in->to(q.scalar_type()).contiguous();
    extra_v = extra_v_in->to(q.scalar_type()).contiguous();
    extra_bias = as_index(*extra_bias_in, q, op, "extra_bias", at::kFloat);
    check_data(extra_k, q, op, "extra_k");
    check_data(extra_v, q, op, "extra_v");
  }
  TORCH_CHECK(M * sbs + C >= 1, op, ": nothing to attend to (M = 0 and no extra entries)");
  TORCH_CHECK(M * sbs + C < (int64_t{1} << 31), op, ": too many entries");
  TORCH_CHECK(B * KVH <= 65535, op, ": B * KVH = ", B * KVH, " exceeds the grid limit 65535");

  const c10::cuda::CUDAGuard guard(q.device());
  const int device = q.get_device();
  Tensor out = at::empty_like(q);
  if (B == 0) return out;
  const size_t smem = dualpath::attention_smem_bytes(dtype, static_cast<int>(G), static_cast<int>(D));
  TORCH_CHECK(smem <= max_smem(device), op, ": G = ", G, ", D = ", D, " need ", smem,
              " bytes of shared memory, more than the device allows");

  dualpath::AttentionParams p{};
  p.q = q.data_ptr();
  const size_t half = static_cast<size_t>(N) * bs * KVH * D * q.element_size();
  p.k_cache = kv_cache.data_ptr();
  p.v_cache = static_cast<const char*>(kv_cache.data_ptr()) + half;
  p.phys = phys.data_ptr<int64_t>();
  p.logical = logical.data_ptr<int64_t>();
  p.valid = valid.data_ptr<bool>();
  p.context_lens = lens.data_ptr<int64_t>();
  p.extra_k = has_extra ? extra_k.data_ptr() : nullptr;
  p.extra_v = has_extra ? extra_v.data_ptr() : nullptr;
  p.extra_bias = has_extra ? extra_bias.data_ptr<float>() : nullptr;
  p.out = out.data_ptr();
  p.B = static_cast<int>(B);
  p.KVH = static_cast<int>(KVH);
  p.G = static_cast<int>(G);
  p.D = static_cast<int>(D);
  p.M = static_cast<int>(M);
  p.sbs = static_cast<int>(sbs);
  p.C = static_cast<int>(C);
  p.scale = static_cast<float>(scale);
  dualpath::plan_attention(p, num_sms(device));
  Tensor ws_acc, ws_ml;
  if (p.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    ws_acc = at::empty({B * KVH, p.num_splits, G, D}, f32);
    ws_ml = at::empty({B * KVH, p.num_splits, G, 2}, f32);
    p.ws_acc = ws_acc.data_ptr<float>();
    p.ws_ml = ws_ml.data_ptr<float>();
  }
  C10_CUDA_CHECK(dualpath::sparse_paged_attention(dtype, p, c10::cuda::getCurrentCUDAStream()));
  return out;
}

void update_summaries(const Tensor& kv_cache, const Tensor& summaries, const Tensor& ids_in, bool minmax,
                      bool means) {
  constexpr const char* op = "update_summaries";
  TORCH_CHECK(kv_cache.is_cuda(), op, ": kv_cache must be a CUDA tensor");
  const auto dtype = dtype_of(kv_cache, op);
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2, op,
              ": kv_cache must be [2, N, bs, KVH, D], got ", kv_cache.sizes());
  TORCH_CHECK(summaries.dim() == 4, op, ": summaries must be [num_sub, S, KVH, D], got ", summaries.sizes());
  check_data(kv_cache, kv_cache, op, "kv_cache");
  check_data(summaries, kv_cache, op, "summaries");
  const int64_t N = kv_cache.size(1), bs = kv_cache.size(2), KVH = kv_cache.size(3), D = kv_cache.size(4);
  const int64_t num_sub = summaries.size(0), S = summaries.size(1);
  TORCH_CHECK(summaries.size(2) == KVH && summaries.size(3) == D, op, ": summaries ", summaries.sizes(),
              " do not match kv_cache ", kv_cache.sizes());
  TORCH_CHECK(num_sub >= 1 && (N * bs) % num_sub == 0 && bs % ((N * bs) / num_sub) == 0, op, ": ", num_sub,
              " score blocks do not evenly split ", N, " blocks of ", bs, " tokens");
  const int64_t expected = minmax ? (means ? 4 : 2) : (means ? 2 : 1);
  TORCH_CHECK(S == expected, op, ": summaries hold ", S, " vectors, expected ", expected,
              " (minmax=", minmax, ", means=", means, ")");
  TORCH_CHECK(ids_in.dim() == 1, op, ": sub_block_ids must be 1-D");
  TORCH_CHECK(KVH <= 65535, op, ": too many kv heads");
  const Tensor ids = as_index(ids_in, kv_cache, op, "sub_block_ids");
  if (ids.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(kv_cache.device());
  dualpath::SummaryParams p{};
  const size_t half = static_cast<size_t>(N) * bs * KVH * D * kv_cache.element_size();
  p.k_cache = kv_cache.data_ptr();
  p.v_cache = static_cast<const char*>(kv_cache.data_ptr()) + half;
  p.summaries = summaries.data_ptr();
  p.block_ids = ids.data_ptr<int64_t>();
  p.m = static_cast<int>(ids.numel());
  p.num_sub = static_cast<int>(num_sub);
  p.sbs = static_cast<int>((N * bs) / num_sub);
  p.KVH = static_cast<int>(KVH);
  p.D = static_cast<int>(D);
  p.S = static_cast<int>(S);
  p.minmax = minmax;
  p.means = means;
  C10_CUDA_CHECK(dualpath::update_summaries(dtype, p, c10::cuda::getCurrentCUDAStream()));
}

Tensor fused_moe(const Tensor& x_in, const Tensor& w13, const Tensor& w2, const Tensor& weights_in,
                 const Tensor& ids_in) {
  constexpr const char* op = "fused_moe";
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor");
  const Tensor x = x_in.contiguous();
  const auto dtype = dtype_of(x, op);
  check_data(x, x, op, "x");
  TORCH_CHECK(x.dim() == 2, op, ": x must be [T, Hd], got ", x.sizes());
  TORCH_CHECK(w13.dim() == 3 && w2.dim() == 3, op, ": w13 must be [E, 2I, Hd] and w2 [E, Hd, I]");
  check_data(w13, x, op, "w13");
  check_data(w2, x, op, "w2");
  const int64_t T = x.size(0), Hd = x.size(1), E = w13.size(0), I = w13.size(1) / 2;
  TORCH_CHECK(w13.size(1) == 2 * I && w13.size(2) == Hd, op, ": w13 ", w13.sizes(), " does not match x ", x.sizes());
  TORCH_CHECK(w2.size(0) == E && w2.size(1) == Hd && w2.size(2) == I, op, ": w2 must be [", E, ", ", Hd, ", ",
              I, "], got ", w2.sizes());
  const int64_t vec = 16 / x.element_size();
  TORCH_CHECK(Hd % vec == 0 && I % vec == 0 && I >= 1, op, ": hidden (", Hd, ") and intermediate (", I,
              ") sizes must be multiples of ", vec, " (16-byte rows)");
  TORCH_CHECK(ids_in.dim() == 2 && ids_in.size(0) == T && weights_in.sizes() == ids_in.sizes(), op,
              ": topk_weights and topk_ids must both be [T, k]");
  const Tensor weights = as_index(weights_in, x, op, "topk_weights", at::kFloat);
  const Tensor ids = as_index(ids_in, x, op, "topk_ids");
  const int64_t k = ids.size(1);
  TORCH_CHECK(k >= 1 && E >= 1 && E <= 2048, op, ": need k >= 1 and 1 <= E <= 2048");
  TORCH_CHECK((I + dualpath::kMoeTileN - 1) / dualpath::kMoeTileN <= 65535 &&
                  (Hd + dualpath::kMoeTileN - 1) / dualpath::kMoeTileN <= 65535,
              op, ": matrix too wide for the grid");
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty_like(x);
  if (T == 0) return out;

  // Tokens per launch: keeps the float32 per-(token, choice) rows at <= 256 MiB.
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(T, (int64_t{64} << 20) / (k * Hd)));
  const int64_t tiles = dualpath::moe_num_tiles_max(static_cast<int>(chunk), static_cast<int>(k), static_cast<int>(E));
  const auto i32 = x.options().dtype(at::kInt);
  Tensor sorted_pair = at::empty({tiles * dualpath::kMoeTileM}, i32);
  Tensor tile_expert = at::empty({tiles}, i32);
  Tensor inter = at::empty({tiles * dualpath::kMoeTileM, I}, x.options());
  Tensor pair_out = at::empty({chunk * k, Hd}, x.options().dtype(at::kFloat));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const auto esize = x.element_size();
  for (int64_t t0 = 0; t0 < T; t0 += chunk) {
    const int64_t tn = std::min(chunk, T - t0);
    dualpath::MoeParams p{};
    p.x = static_cast<const char*>(x.data_ptr()) + t0 * Hd * esize;
    p.w13 = w13.data_ptr();
    p.w2 = w2.data_ptr();
    p.topk_weights = weights.data_ptr<float>() + t0 * k;
    p.topk_ids = ids.data_ptr<int64_t>() + t0 * k;
    p.out = static_cast<char*>(out.data_ptr()) + t0 * Hd * esize;
    p.sorted_pair = sorted_pair.data_ptr<int>();
    p.tile_expert = tile_expert.data_ptr<int>();
    p.inter = inter.data_ptr();
    p.pair_out = pair_out.data_ptr<float>();
    p.T = static_cast<int>(tn);
    p.Hd = static_cast<int>(Hd);
    p.I = static_cast<int>(I);
    p.E = static_cast<int>(E);
    p.k = static_cast<int>(k);
    C10_CUDA_CHECK(dualpath::fused_moe(dtype, p, stream));
  }
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dualpath-serve CUDA kernels (sparse decode attention, fused MoE)";
  m.def("block_mass", &block_mass, "Estimated attention mass [B, KVH, n] of full score blocks",
        pybind11::arg("q"), pybind11::arg("summaries"), pybind11::arg("phys"), pybind11::arg("num_full"),
        pybind11::arg("minmax"), pybind11::arg("scale"));
  m.def("sparse_paged_attention", &sparse_paged_attention,
        "Decode attention over selected score blocks plus optional extra entries", pybind11::arg("q"),
        pybind11::arg("kv_cache"), pybind11::arg("phys"), pybind11::arg("logical"), pybind11::arg("valid"),
        pybind11::arg("context_lens"), pybind11::arg("sbs"), pybind11::arg("scale"),
        pybind11::arg("extra_k") = pybind11::none(), pybind11::arg("extra_v") = pybind11::none(),
        pybind11::arg("extra_bias") = pybind11::none());
  m.def("update_summaries", &update_summaries, "Recompute score-block summaries in place",
        pybind11::arg("kv_cache"), pybind11::arg("summaries"), pybind11::arg("sub_block_ids"),
        pybind11::arg("minmax"), pybind11::arg("means"));
  m.def("fused_moe", &fused_moe, "Routed SwiGLU experts (permute, grouped GEMMs, weighted un-permute)",
        pybind11::arg("x"), pybind11::arg("w13"), pybind11::arg("w2"), pybind11::arg("topk_weights"),
        pybind11::arg("topk_ids"));
}
