// y = x @ W.T + b in float32 for a few rows of x (a decoding step's batch) on AVX-512: see tether/small_linear.py.
//
// W (N, K) is packed once as N/16 panels of (K, 16): the 16 output columns of a panel are one AVX-512 register, so a
// panel is read once, front to back, while every row's 16 sums build up in registers. The next 4 KB of the panel are
// prefetched as it goes, so the read from memory and the multiplies overlap. The panels are shared out among torch's
// threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <array>
#include <utility>
#include <vector>

namespace {

constexpr int64_t LANES = 16;    // float32 columns in one AVX-512 register: a panel's width
constexpr int64_t ROWS = 16;     // rows a panel multiplies at once (one register of sums each)
constexpr int64_t AHEAD = 1024;  // floats prefetched ahead in the panel (4 KB)

// y[m, 0:16] = b + sum_k xt[k, m] * w[k, 0:16] for the ROWS_ rows m; xt is (K, ROWS_), w one panel (K, 16)
template <int ROWS_>
void panel(const float* __restrict xt, const float* __restrict w, const float* bias, float* __restrict y, int64_t K,
           int64_t y_stride) {
  __m512 sums[ROWS_];
  const __m512 start = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int m = 0; m < ROWS_; ++m) sums[m] = start;
  for (int64_t k = 0; k < K; ++k) {
    const __m512 column = _mm512_loadu_ps(w + k * LANES);
    _mm_prefetch(reinterpret_cast<const char*>(w + k * LANES + AHEAD), _MM_HINT_T0);
    for (int m = 0; m < ROWS_; ++m) sums[m] = _mm512_fmadd_ps(_mm512_set1_ps(xt[k * ROWS_ + m]), column, sums[m]);
  }
  for (int m = 0; m < ROWS_; ++m) _mm512_storeu_ps(y + m * y_stride, sums[m]);
}

using Panel = void (*)(const float*, const float*, const float*, float*, int64_t, int64_t);

template <int... Counts>
constexpr std::array<Panel, sizeof...(Counts)> panels(std::integer_sequence<int, Counts...>) {
  return {panel<Counts + 1>...};
}

constexpr auto PANEL = panels(std::make_integer_sequence<int, ROWS>{});  // PANEL[m - 1]: m rows

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat && weight.size(0) % LANES == 0,
              "small_linear.pack: a float32 (N, K) weight with N a multiple of 16");
  return weight.view({weight.size(0) / LANES, LANES, weight.size(1)}).transpose(1, 2).contiguous();
}

at::Tensor linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat &&
                  packed.dim() == 3 && packed.size(1) == x.size(1) && packed.size(2) == LANES && packed.is_contiguous(),
              "small_linear.linear: float32 (M, K) rows and a weight packed from (N, K)");
  const int64_t rows = x.size(0), K = x.size(1), count = packed.size(0), N = count * LANES;
  at::Tensor y = at::empty({rows, N}, x.options());
  const at::Tensor rows_in = x.contiguous();
  const float* in = rows_in.data_ptr<float>();
  std::vector<float> transposed(rows * K);  // the rows ROWS at a time, each block (K, m)
  for (int64_t first = 0; first < rows; first += ROWS) {
    const int64_t m = std::min(ROWS, rows - first);
    float* block = transposed.data() + first * K;
    for (int64_t r = 0; r < m; ++r)
      for (int64_t k = 0; k < K; ++k) block[k * m + r] = in[(first + r) * K + k];
  }
  const float* w = packed.data_ptr<float>();
  const at::Tensor shift = bias && bias->defined() ? bias->contiguous() : at::Tensor();
  TORCH_CHECK(!shift.defined() || (shift.scalar_type() == at::kFloat && shift.numel() == N),
              "small_linear.linear: a float32 bias of N values");
  const float* b = shift.defined() ? shift.data_ptr<float>() : nullptr;
  float* out = y.data_ptr<float>();
  at::parallel_for(0, count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t first = 0; first < rows; first += ROWS) {
        PANEL[std::min(ROWS, rows - first) - 1](transposed.data() + first * K, w + p * K * LANES,
                                                b ? b + p * LANES : nullptr, out + first * N + p * LANES, K, N);
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(tether_small_linear, m) {
  m.def("pack(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(tether_small_linear, CPU, m) {  // CPU kernels only: torch.compile traces them with a fake
  m.impl("pack", pack);
  m.impl("linear", linear);
}
