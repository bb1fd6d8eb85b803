// Fused AdaBelief step for CPU tensors (adabatch.optim.fused.cpu).
//
// One pass per parameter reads p, g, m, s (and s_max under amsgrad) and writes p, m, s
// (and s_max): the same memory traffic as torch's fused Adam.  The library has a plain C ABI
// (no torch or Python headers), so it builds in about a second with any C++17 compiler and
// is loaded with ctypes; Python passes raw data pointers of contiguous tensors.
//
// Numerics (the math of adabelief-pytorch 0.2.1, amsgrad also applied in the rectified path):
//   g   <- sign * g / grad_scale            (sign = -1 under maximize)
//   g   <- g + wd * p                       (L2 decay)        or
//   p   <- p * decay                        (decoupled decay: decay = 1 - lr*wd or 1 - wd)
//   m   <- b1 * m + (1 - b1) * g
//   s   <- b2 * s + (1 - b2) * (g - m)^2 + eps
//   v   <- amsgrad ? (s_max <- max(s_max, s)) : s
//   mode 0 (Adam-like): p <- p - step * m / (sqrt(v) * dmul + eps)
//   mode 1 (SGD-like):  p <- p - step * m
//   mode 2:             p unchanged (state still updated)
// step, dmul and the mode are per-tensor scalars computed in double from the tensor's step.
// Low-precision parameters (float16 / bfloat16) are widened to float, the math runs in
// float with float state, and the parameter is rounded (to nearest even) once at the end.
//
// Compiled with -ffp-contract=off, so the baseline and AVX2 variants of the loop (picked at
// run time) give bit-identical results.

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#ifdef _OPENMP
#include <omp.h>
#endif

#define ADABATCH_FUSED_ABI 1

namespace {

struct Half {
  uint16_t x;
};
struct BHalf {
  uint16_t x;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// IEEE binary16 -> float.  Exponent and mantissa are moved to the float positions and the
// value is rescaled by 2^112 (the difference of the exponent biases); this is exact for
// normal and subnormal halves.  Inf/NaN keep their payload.
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const float finite = bits_to_float(em) * 0x1p112f;
  const uint32_t special = em | 0x7f800000u;
  const uint32_t mag = ((h & 0x7c00u) == 0x7c00u) ? special : float_to_bits(finite);
  return bits_to_float(mag | sign);
}

// float -> IEEE binary16, round to nearest even.
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // normal halves: drop 13 mantissa bits with round-to-nearest-even, rebias the exponent
  // (127 - 15 = 112); a carry out of the mantissa correctly bumps the exponent.
  const uint32_t normal = ((a + 0xfffu + ((a >> 13) & 1u)) >> 13) - (112u << 10);
  // subnormal halves: adding 0.5f leaves units of 2^-24 in the low mantissa bits, rounded by
  // the float addition itself (to nearest even).
  const uint32_t sub = float_to_bits(bits_to_float(a) + 0.5f) - 0x3f000000u;
  uint32_t r = (a < 0x38800000u) ? sub : normal;        // below 2^-14: subnormal
  r = (a >= 0x477ff000u) ? 0x7c00u : r;                 // rounds past 65504: inf
  r = (a > 0x7f800000u) ? (0x7e00u | ((a >> 13) & 0x3ffu)) : r;  // NaN stays NaN
  return static_cast<uint16_t>(r | sign);
}

inline float bhalf_to_float(uint16_t b) { return bits_to_float(static_cast<uint32_t>(b) << 16); }

inline uint16_t float_to_bhalf(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x0040u;
  return static_cast<uint16_t>(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

template <class P, class S>
struct IO;
template <>
struct IO<float, float> {
  static inline float load(float v) { return v; }
  static inline float store(float v) { return v; }
};
template <>
struct IO<double, double> {
  static inline double load(double v) { return v; }
  static inline double store(double v) { return v; }
};
template <>
struct IO<Half, float> {
  static inline float load(Half v) { return half_to_float(v.x); }
  static inline Half store(float v) { return Half{float_to_half(v)}; }
};
template <>
struct IO<BHalf, float> {
  static inline float load(BHalf v) { return bhalf_to_float(v.x); }
  static inline BHalf store(float v) { return BHalf{float_to_bhalf(v)}; }
};

inline float sqrt_(float v) { return __builtin_sqrtf(v); }
inline double sqrt_(double v) { return __builtin_sqrt(v); }

template <class S>
struct Coef {
  S gmul, l2, decay, b1, omb1, b2, omb2, eps, dmul, step;
};

template <class P, class S, bool AMS, int MODE, bool L2>
static inline __attribute__((always_inline)) void body(P* __restrict p, const P* __restrict g,
                                                       S* __restrict m, S* __restrict s,
                                                       S* __restrict v, int64_t n,
                                                       const Coef<S>& c) {
  const S gmul = c.gmul, l2 = c.l2, decay = c.decay, b1 = c.b1, omb1 = c.omb1, b2 = c.b2,
          omb2 = c.omb2, eps = c.eps, dmul = c.dmul, step = c.step;
  for (int64_t i = 0; i < n; ++i) {
    S x = IO<P, S>::load(p[i]);
    S gr = IO<P, S>::load(g[i]) * gmul;
    if (L2) gr = gr + l2 * x;
    x = x * decay;
    const S mi = b1 * m[i] + omb1 * gr;
    const S r = gr - mi;
    const S si = (b2 * s[i] + omb2 * (r * r)) + eps;
    m[i] = mi;
    s[i] = si;
    S vi = si;
    if (AMS) {
      const S old = v[i];
      vi = (old >= si) ? old : si;  // NaN in s propagates
      v[i] = vi;
    }
    if (MODE == 0) x = x - step * (mi / (sqrt_(vi) * dmul + eps));
    if (MODE == 1) x = x - step * mi;
    p[i] = IO<P, S>::store(x);
  }
}

template <class P, class S>
using Kernel = void (*)(P*, const P*, S*, S*, S*, int64_t, const Coef<S>&);

#define ADABATCH_VARIANT(NAME, ATTR)                                                      \
  template <class P, class S, bool AMS, int MODE, bool L2>                                 \
  ATTR __attribute__((noinline)) void NAME(P* p, const P* g, S* m, S* s, S* v, int64_t n, \
                                           const Coef<S>& c) {                             \
    body<P, S, AMS, MODE, L2>(p, g, m, s, v, n, c);                                        \
  }

ADABATCH_VARIANT(kernel_base, )
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define ADABATCH_X86 1
ADABATCH_VARIANT(kernel_avx2, __attribute__((target("avx2,fma,f16c"))))
#endif
// No AVX-512 variant: the loop is memory-bound (AVX2 measured within 2% of AVX-512 on an
// AVX-512 Xeon) and the AVX-512 instantiations more than doubled the build time.

// isa: 0 baseline, 1 AVX2
template <class P, class S, bool AMS, int MODE, bool L2>
Kernel<P, S> pick_isa(int isa) {
#ifdef ADABATCH_X86
  if (isa == 1) return &kernel_avx2<P, S, AMS, MODE, L2>;
#endif
  (void)isa;
  return &kernel_base<P, S, AMS, MODE, L2>;
}

template <class P, class S, bool AMS, int MODE>
Kernel<P, S> pick_l2(int isa, bool l2) {
  return l2 ? pick_isa<P, S, AMS, MODE, true>(isa) : pick_isa<P, S, AMS, MODE, false>(isa);
}

template <class P, class S, bool AMS>
Kernel<P, S> pick_mode(int isa, int mode, bool l2) {
  if (mode == 0) return pick_l2<P, S, AMS, 0>(isa, l2);
  if (mode == 1) return pick_l2<P, S, AMS, 1>(isa, l2);
  return pick_l2<P, S, AMS, 2>(isa, l2);
}

template <class P, class S>
Kernel<P, S> pick(int isa, bool ams, int mode, bool l2) {
  return ams ? pick_mode<P, S, true>(isa, mode, l2) : pick_mode<P, S, false>(isa, mode, l2);
}

int supported_isa() {
#ifdef ADABATCH_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#endif
  return 0;
}

enum Flags {
  kAmsgrad = 1,
  kDecouple = 2,
  kFixedDecay = 4,
  kRectify = 8,
  kDegenerate = 16,
  kMaximize = 32,
};

constexpr int64_t kChunk = int64_t(1) << 15;  // elements per work item

struct Item {
  int64_t tensor, begin, end;
};

template <class P, class S>
int run(int64_t n, void* const* params, void* const* grads, void* const* exp_avgs,
        void* const* exp_avg_vars, void* const* max_exp_avg_vars, float* const* steps,
        const int64_t* numels, double beta1, double beta2, double lr, double eps, double wd,
        int flags, double gmul, int nthreads, int isa) {
  const bool ams = flags & kAmsgrad;
  const bool decouple = flags & kDecouple;
  const bool l2 = !decouple && wd != 0.0;
  double decay = 1.0;
  if (decouple) decay = (flags & kFixedDecay) ? 1.0 - wd : 1.0 - lr * wd;

  Kernel<P, S>* fns = static_cast<Kernel<P, S>*>(std::malloc(sizeof(Kernel<P, S>) * (n + 1)));
  Coef<S>* coefs = static_cast<Coef<S>*>(std::malloc(sizeof(Coef<S>) * (n + 1)));
  if (fns == nullptr || coefs == nullptr) {
    std::free(fns);
    std::free(coefs);
    return 3;
  }
  int64_t n_items = 0, total = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float t_f = *steps[i] + 1.0f;
    *steps[i] = t_f;
    const double t = static_cast<double>(t_f);
    const double bc1 = 1.0 - std::pow(beta1, t);
    const double b2t = std::pow(beta2, t);
    const double bc2 = 1.0 - b2t;
    int mode = 0;
    double step = 0.0, dmul = 1.0;
    if (!(flags & kRectify)) {
      step = lr / bc1;
      dmul = 1.0 / std::sqrt(bc2);
    } else {
      const double rho_inf = 2.0 / (1.0 - beta2) - 1.0;
      const double rho_t = rho_inf - 2.0 * t * b2t / bc2;
      if (rho_t >= 5.0) {
        const double r = std::sqrt(bc2 * (rho_t - 4.0) / (rho_inf - 4.0) * (rho_t - 2.0) /
                                   rho_t * rho_inf / (rho_inf - 2.0)) /
                         bc1;
        step = r * lr;
      } else if (flags & kDegenerate) {
        mode = 1;
        step = 1.0 / bc1 * lr;
      } else {
        mode = 2;
      }
    }
    Coef<S>& c = coefs[i];
    c.gmul = static_cast<S>(gmul);
    c.l2 = static_cast<S>(wd);
    c.decay = static_cast<S>(decay);
    c.b1 = static_cast<S>(beta1);
    c.omb1 = static_cast<S>(1.0 - beta1);
    c.b2 = static_cast<S>(beta2);
    c.omb2 = static_cast<S>(1.0 - beta2);
    c.eps = static_cast<S>(eps);
    c.dmul = static_cast<S>(dmul);
    c.step = static_cast<S>(step);
    fns[i] = pick<P, S>(isa, ams, mode, l2);
    n_items += (numels[i] + kChunk - 1) / kChunk;
    total += numels[i];
  }
  // threads only pay off beyond a couple of chunks (waking them costs more on small steps)
  const bool parallel = nthreads > 1 && total >= 2 * kChunk;

  Item* items = static_cast<Item*>(std::malloc(sizeof(Item) * (n_items + 1)));
  if (items == nullptr) {
    std::free(fns);
    std::free(coefs);
    return 3;
  }
  int64_t k = 0;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t b = 0; b < numels[i]; b += kChunk) {
      items[k++] = Item{i, b, (b + kChunk < numels[i]) ? b + kChunk : numels[i]};
    }
  }

#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) if (parallel)
#endif
  for (int64_t j = 0; j < n_items; ++j) {
    const Item it = items[j];
    const int64_t i = it.tensor;
    P* p = static_cast<P*>(params[i]) + it.begin;
    const P* g = static_cast<const P*>(grads[i]) + it.begin;
    S* m = static_cast<S*>(exp_avgs[i]) + it.begin;
    S* s = static_cast<S*>(exp_avg_vars[i]) + it.begin;
    S* v = ams ? static_cast<S*>(max_exp_avg_vars[i]) + it.begin : nullptr;
    fns[i](p, g, m, s, v, it.end - it.begin, coefs[i]);
  }
  (void)parallel;
  std::free(items);
  std::free(coefs);
  std::free(fns);
  return 0;
}

}  // namespace

extern "C" {

int adabatch_fused_abi() { return ADABATCH_FUSED_ABI; }

int adabatch_fused_isa() { return supported_isa(); }

int adabatch_fused_openmp() {
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16 (parameters and grads); the state is
// float64 for float64 parameters and float32 otherwise.  steps: float32 scalars, each
// incremented by one.  grad_scale / found_inf: float32 scalars or null.  isa: -1 = best
// supported.  Returns 0 on success, 1 bad dtype, 2 unsupported isa, 3 out of memory.
int adabatch_adabelief_step(int64_t n, int dtype, void* const* params, void* const* grads,
                            void* const* exp_avgs, void* const* exp_avg_vars,
                            void* const* max_exp_avg_vars, float* const* steps,
                            const int64_t* numels, double beta1, double beta2, double lr,
                            double eps, double wd, int flags, const float* grad_scale,
                            const float* found_inf, int nthreads, int isa) {
  const int best = supported_isa();
  if (isa < 0) isa = best;
  if (isa > best) return 2;
  if (found_inf != nullptr && *found_inf != 0.0f) return 0;
  double gmul = (flags & kMaximize) ? -1.0 : 1.0;
  if (grad_scale != nullptr) gmul /= static_cast<double>(*grad_scale);
  if (nthreads < 1) nthreads = 1;
  switch (dtype) {
    case 0:
      return run<float, float>(n, params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars,
                               steps, numels, beta1, beta2, lr, eps, wd, flags, gmul,
                               nthreads, isa);
    case 1:
      return run<double, double>(n, params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars,
                                 steps, numels, beta1, beta2, lr, eps, wd, flags, gmul,
                                 nthreads, isa);
    case 2:
      return run<Half, float>(n, params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars,
                              steps, numels, beta1, beta2, lr, eps, wd, flags, gmul, nthreads,
                              isa);
    case 3:
      return run<BHalf, float>(n, params, grads, exp_avgs, exp_avg_vars, max_exp_avg_vars,
                               steps, numels, beta1, beta2, lr, eps, wd, flags, gmul,
                               nthreads, isa);
    default:
      return 1;
  }
}

}  // extern "C"
