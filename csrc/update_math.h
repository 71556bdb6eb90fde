// The per-element math of every fused update, written once for the CPU loops and the CUDA kernels.
//
// Plain C++ on float registers: no ATen, no pybind11, no CUDA runtime. Included by
//   csrc/cpu/kernels_*.cpp   (the CPU loops, once per CPU capability),
//   csrc/cuda/*.cu           (the CUDA kernels),
//   csrc/bindings.cpp        (only for the slot constants and DType).
//
// The specification is fusedmf/functional/reference.py; see NOTE [op order] and NOTE [fma placement].
#pragma once

#include <math.h>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FUSEDMF_HOST_DEVICE __host__ __device__
#define FUSEDMF_INLINE __forceinline__
#else
#define FUSEDMF_HOST_DEVICE
// always_inline: the CPU loops of csrc/cpu/kernels_avx2.cpp carry a target("avx2,fma") attribute
// and these functions do not, so they must be inlined to be compiled for that target (a callee
// whose target is a subset of its caller's may be inlined; a call would reach libm's fmaf).
#define FUSEDMF_INLINE inline __attribute__((always_inline))
#endif

// Everything whose definition depends on the compilation target (the fused multiply-add, the
// conversions) lives in a namespace named after that target, so that the CPU capability variants
// (csrc/cpu/kernels_avx2.cpp, csrc/cpu/kernels_base.cpp) and nvcc's host pass never define one
// inline function in two different ways (an ODR violation the linker would resolve at random).
#ifndef FUSEDMF_MATH_NS
#if defined(__CUDACC__)
#define FUSEDMF_MATH_NS cuda_math
#else
#define FUSEDMF_MATH_NS base_math
#endif
#endif

namespace fusedmf {

// ---------------------------------------------------------------------------------------------
// Target-independent part: layouts shared with Python and with the binding.

// Element types of params and grads. Masters and optimizer states are always F32.
enum class DType : int8_t { F32 = 0, F16 = 1, BF16 = 2 };

// Slots of the per-step scalar vector; keep in the order of SGD_SLOTS / ADAM_SLOTS / SMEGA2_SLOTS in
// fusedmf/functional/scalars.py (NOTE [per-step scalars are data]). The binding rejects a vector
// of another length, and exports every constant by name (fusedmf._C.SGD_SLOT_INDEX /
// ADAM_SLOT_INDEX / SMEGA2_SLOT_INDEX), which fusedmf/functional/_ops.py checks against the Python tuples before the
// first launch (NOTE [one scalar layout]).
constexpr int kSgdLr = 0;
constexpr int kSgdMomentum = 1;
constexpr int kSgdOneMinusDampening = 2;
constexpr int kSgdL2WeightDecay = 3;
constexpr int kSgdDecayFactor = 4;
constexpr int kSgdNesterov = 5;
constexpr int kSgdFirstStep = 6;
constexpr int kSgdMaximize = 7;
constexpr int kSgdNumScalars = 8;

constexpr int kAdamLr = 0;
constexpr int kAdamBeta1 = 1;
constexpr int kAdamOneMinusBeta1 = 2;
constexpr int kAdamBeta2 = 3;
constexpr int kAdamOneMinusBeta2 = 4;
constexpr int kAdamEps = 5;
constexpr int kAdamL2WeightDecay = 6;
constexpr int kAdamDecayFactor = 7;
constexpr int kAdamNegStepSize = 8;
constexpr int kAdamBiasCorrection2Sqrt = 9;
constexpr int kAdamMaximize = 10;
constexpr int kAdamNumScalars = 11;

// SMEGA2 (SMEGA2_SLOTS / SMEGA2_ESTIMATE_SLOTS in scalars.py).
constexpr int kSmega2Lr = 0;
constexpr int kSmega2Momentum = 1;
constexpr int kSmega2MomentumScale = 2;
constexpr int kSmega2L2WeightDecay = 3;
constexpr int kSmega2CycleEnd = 4;
constexpr int kSmega2Maximize = 5;
constexpr int kSmega2NumScalars = 6;

constexpr int kSmega2EstimateAccumulatorCoef = 0;
constexpr int kSmega2EstimateMomentumCoef = 1;
constexpr int kSmega2EstimateNumScalars = 2;

// Tensor-list slots (docs/backends.md, the scalar vector and the lists). The first three are common to every update rule, so a slot
// index means the same list in the SGD and the Adam kernels; kMomentum and kExpAvg share index 3.
constexpr int kParam = 0;     // params: F32, F16 or BF16; written
constexpr int kGrad = 1;      // grads: F32, F16 or BF16; read
constexpr int kMaster = 2;    // fp32 master weights, optional; when present the param is their cast
constexpr int kMomentum = 3;  // SGD: fp32 momentum buffer, optional
constexpr int kExpAvg = 3;    // Adam: fp32 first moment
constexpr int kExpAvgSq = 4;  // Adam: fp32 second moment
constexpr int kMaxExpAvgSq = 5;  // Adam: fp32 running maximum of the second moment, AMSGrad only
constexpr int kMaxSlots = 6;
// SMEGA2: kParam, kGrad, kMaster, kMomentum and its fp32 gradient accumulator G. Its estimate has
// no grad: the look-ahead weights go to kEstimateOut (any of F32/F16/BF16), the rest is read.
constexpr int kGradAccumulator = 4;
constexpr int kEstimateOut = 1;
// pack_ (fusedmf/functional/pack.py, NOTE [pack layout]) uses two slots: the grads in kGrad and,
// in kPackOut, the start of each grad's slot of the flat buffer (out + offsets[i]).
constexpr int kPackOut = 0;
// Slots of a packed buffer start on a multiple of this many bytes (pack.py PACK_ALIGN_BYTES).
constexpr int kPackAlignBytes = 16;

// Flags travel as 0.0 / 1.0 and are tested with != 0 (scalars.py).
struct SgdScalars {
  float lr;
  float momentum;
  float one_minus_dampening;
  float l2_weight_decay;
  float decay_factor;
  // Flags stay floats, tested with != 0 where used: a loop-invariant comparison is a select the
  // CPU vectorizers handle, a bool loaded from memory is not (GCC 12).
  float nesterov;
  float first_step;
  float maximize;  // flag: the unscaled gradient is negated (ascent)

  FUSEDMF_HOST_DEVICE static SgdScalars load(const float* v) {
    SgdScalars s;
    s.lr = v[kSgdLr];
    s.momentum = v[kSgdMomentum];
    s.one_minus_dampening = v[kSgdOneMinusDampening];
    s.l2_weight_decay = v[kSgdL2WeightDecay];
    s.decay_factor = v[kSgdDecayFactor];
    s.nesterov = v[kSgdNesterov];
    s.first_step = v[kSgdFirstStep];
    s.maximize = v[kSgdMaximize];
    return s;
  }
};

struct AdamScalars {
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float l2_weight_decay;
  float decay_factor;
  float neg_step_size;
  float bias_correction2_sqrt;
  float maximize;  // flag

  FUSEDMF_HOST_DEVICE static AdamScalars load(const float* v) {
    AdamScalars s;
    s.beta1 = v[kAdamBeta1];
    s.one_minus_beta1 = v[kAdamOneMinusBeta1];
    s.beta2 = v[kAdamBeta2];
    s.one_minus_beta2 = v[kAdamOneMinusBeta2];
    s.eps = v[kAdamEps];
    s.l2_weight_decay = v[kAdamL2WeightDecay];
    s.decay_factor = v[kAdamDecayFactor];
    s.neg_step_size = v[kAdamNegStepSize];
    s.bias_correction2_sqrt = v[kAdamBiasCorrection2Sqrt];
    s.maximize = v[kAdamMaximize];
    return s;
  }
};

struct Smega2Scalars {
  float lr;
  float momentum;
  float momentum_scale;  // (1 - dampening) / N
  float l2_weight_decay;
  float cycle_end;  // flag: this step closes a cycle of N gradients
  float maximize;   // flag

  FUSEDMF_HOST_DEVICE static Smega2Scalars load(const float* v) {
    Smega2Scalars s;
    s.lr = v[kSmega2Lr];
    s.momentum = v[kSmega2Momentum];
    s.momentum_scale = v[kSmega2MomentumScale];
    s.l2_weight_decay = v[kSmega2L2WeightDecay];
    s.cycle_end = v[kSmega2CycleEnd];
    s.maximize = v[kSmega2Maximize];
    return s;
  }
};

struct Smega2EstimateScalars {
  float accumulator_coef;  // 0 for the naive estimate: G is not read
  float momentum_coef;

  FUSEDMF_HOST_DEVICE static Smega2EstimateScalars load(const float* v) {
    Smega2EstimateScalars s;
    s.accumulator_coef = v[kSmega2EstimateAccumulatorCoef];
    s.momentum_coef = v[kSmega2EstimateMomentumCoef];
    return s;
  }
};

// NOTE [maximize]
// torch's maximize negates the unscaled gradient, g = -(grad * inv_grad_scale), before L2 weight
// decay (reference.py _unscaled). Round to nearest is symmetric, RN(grad * -s) == -RN(grad * s), and
// grad * -1.0f == -grad without a scale, so every caller negates the unscale factor once per call
// instead: the per-element updates below (whose `inv_grad_scale` carries that sign) never see the
// flag, and cost no register or instruction for it (the 40-register budget of the CUDA SGD kernels
// has none to spare: a per-element select spilled there).
FUSEDMF_HOST_DEVICE inline float signed_inv_grad_scale(float inv_grad_scale, float maximize) {
  return maximize != 0.0f ? -inv_grad_scale : inv_grad_scale;
}

// Storage types of the 16-bit formats: raw IEEE binary16 / bfloat16 bits. Only the conversions
// below interpret them, so host and device code share one type.
struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

// ---------------------------------------------------------------------------------------------
// Target-dependent part.
namespace FUSEDMF_MATH_NS {

FUSEDMF_HOST_DEVICE FUSEDMF_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// NOTE [fma placement]
// reference.py is run by torch's CPU kernels, and on x86 CPUs with AVX2 (and on every aarch64
// CPU) those round some of its operations once, as a fused multiply-add (measured with torch
// 2.11; tests/test_binding.py::test_sgd_matches_reference asserts 0 ulps on such CPUs):
//   t.add(o, alpha=a)            -> fma(o, a, t)
//   t.lerp(e, w)                 -> fma(w, e - t, t)       (|w| < 0.5)
//                                   fma(w - 1, e - t, e)   (otherwise)
//   t.addcmul(a, b, value=s)     -> fma(s * a, b, t)
// while t.mul(s), t / s, t.add(s) and t.addcdiv(a, b, value=s) == t + (s * a) / b round every
// operation. madd() is that fused multiply-add and is used exactly where torch fuses, so the CPU
// kernels reproduce the reference's MF-SGD bit for bit, and so do the CUDA kernels (__fmaf_rn and
// the *_rn operations below leave nvcc nothing to contract). On CPUs without FMA (x86 before AVX2)
// torch rounds twice (a * b + c), and so does madd() in the base capability build; the build uses
// -ffp-contract=off so that the C++ compiler never fuses on its own.
// The one exception is t.sqrt() in MF-Adam: torch's CPU kernel calls MKL's vsSqrt, which is not
// correctly rounded (about 20% of float32 results are 1 ulp off with torch 2.11 / MKL 2024.2),
// while sqrt_rn() is IEEE. MF-Adam therefore matches the reference to about an ulp, not bitwise.
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float madd(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#elif defined(FUSEDMF_CPU_FMA) || defined(__FMA__) || defined(__aarch64__)
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}

// Single-rounding operations. On the device, __fmul_rn / __fadd_rn / __fsub_rn / __fdiv_rn /
// __fsqrt_rn are never contracted into an fma by nvcc (whose default is -fmad=true, which fused
// adam_update's `(step * m) / denom + w * decay_factor` into one fma before these were used) and
// stay IEEE under --use_fast_math. On the host, -ffp-contract=off (fusedmf/_build.py) keeps plain
// operators from being fused.
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return sqrtf(a);  // a single instruction with -fno-math-errno
#endif
}

// Conversions: round to nearest even, bit-identical to torch's (c10::Half, c10::BFloat16 on the
// host, cuda_fp16.h / cuda_bf16.h on the device). Only the bit pattern of NaNs may differ.
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float to_float(float x) { return x; }

FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float to_float(bf16 x) { return bits_float(static_cast<uint32_t>(x.bits) << 16); }

FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float to_float(f16 x) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(x.bits));
#else
  // c10::detail::fp16_ieee_to_fp32_value: exact, branch-free, vectorizes.
  const uint32_t w = static_cast<uint32_t>(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float exp_scale = bits_float(15u << 23);  // 0x1.0p-112f
  const float normalized = bits_float((two_w >> 4) + (0xE0u << 23)) * exp_scale;
  const float denormalized = bits_float((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result =
      sign | (two_w < (1u << 27) ? float_bits(denormalized) : float_bits(normalized));
  return bits_float(result);
#endif
}

template <class T>
FUSEDMF_HOST_DEVICE T from_float(float x);

template <>
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float from_float<float>(float x) {
  return x;
}

template <>
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE bf16 from_float<bf16>(float x) {
#if defined(__CUDA_ARCH__)
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  // c10::detail::round_to_nearest_even
  const uint32_t u = float_bits(x);
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return bf16{static_cast<uint16_t>(x != x ? 0x7FC0u : rounded)};
#endif
}

template <>
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE f16 from_float<f16>(float x) {
#if defined(__CUDA_ARCH__)
  return f16{__half_as_ushort(__float2half_rn(x))};
#else
  // c10::detail::fp16_ieee_from_fp32_value. The two scalings and the addition must each round
  // (-ffp-contract=off): they are what rounds the mantissa to nearest even.
  const float scale_to_inf = bits_float(239u << 23);  // 0x1.0p+112f
  const float scale_to_zero = bits_float(17u << 23);  // 0x1.0p-110f
  float base = (fabsf(x) * scale_to_inf) * scale_to_zero;
  const uint32_t w = float_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return f16{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
#endif
}

// inf or NaN, from the bits (exponent all ones).
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE bool non_finite(float x) { return (float_bits(x) & 0x7F800000u) == 0x7F800000u; }
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE bool non_finite(f16 x) { return (x.bits & 0x7C00u) == 0x7C00u; }
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE bool non_finite(bf16 x) { return (x.bits & 0x7F80u) == 0x7F80u; }

// NOTE [op order]
// Each update below performs reference.py's float32 operations in reference.py's order, with
// madd() where torch fuses (NOTE [fma placement]). Two rewrites are exact and save a branch:
// g * 1.0f == g when there is no inv_grad_scale, and w * 1.0f == w when decay_factor == 1 (the
// reference skips that multiplication). The L2 term keeps its test: fma(w, 0, g) is not always g
// (w = inf gives NaN, g = -0 gives +0).

// torch.maximum(a, b) for AMSGrad's running maximum: the larger, and NaN when either is NaN (torch
// propagates a NaN from both sides, where fmaxf would drop it).
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float maximum_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// torch's lerp (ATen/native/Lerp.h), as its CPU kernel rounds it.
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float lerp(float start, float end, float weight) {
  const float diff = sub_rn(end, start);
  return fabsf(weight) < 0.5f ? madd(weight, diff, start) : madd(sub_rn(weight, 1.0f), diff, end);
}

// One MF-SGD / MF-NAG element. `w` is the weight (fp32 master, or the param as float), `grad` the
// raw gradient as float, `inv_grad_scale` 1.0f when there is none, negated to maximize (NOTE
// [maximize], as in every update below). With kMomentum, `u` is the
// momentum buffer: read unless `first_step` (then it may hold anything, and is not looked at) and
// always written. Returns the new weight.
template <bool kMomentum>
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float sgd_update(const SgdScalars& s, float inv_grad_scale, bool first_step, float w,
                                                    float grad, float& u) {
  float g = mul_rn(grad, inv_grad_scale);
  if (s.l2_weight_decay != 0.0f) g = madd(w, s.l2_weight_decay, g);  // g.add(w, alpha=l2)
  float d = g;
  if (kMomentum) {
    // buf.mul_(momentum).add_(g, alpha=1 - dampening); u = g on the first step
    u = first_step ? g : madd(g, s.one_minus_dampening, mul_rn(u, s.momentum));
    d = s.nesterov != 0.0f ? madd(u, s.momentum, g) : u;  // g.add(u, alpha=momentum)
  }
  w = mul_rn(w, s.decay_factor);  // w.mul(decay_factor); exact no-op when 1
  return madd(d, -s.lr, w);       // w.add(d, alpha=-lr)
}

// One MF-Adam / MF-AdamW element; `m`, `v` are read and written. With kAmsgrad, `vmax` (the running
// maximum of v) is read and written and the denominator uses it instead of v; without, it is not
// looked at. Returns the new weight.
template <bool kAmsgrad>
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float adam_update(const AdamScalars& s, float inv_grad_scale, float w, float grad,
                                                     float& m, float& v, float& vmax) {
  float g = mul_rn(grad, inv_grad_scale);
  if (s.l2_weight_decay != 0.0f) g = madd(w, s.l2_weight_decay, g);  // g.add(w, alpha=l2)
  w = mul_rn(w, s.decay_factor);                                      // w.mul(decay_factor)
  m = lerp(m, g, s.one_minus_beta1);                                  // m.lerp_(g, 1 - beta1)
  // v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
  v = madd(mul_rn(s.one_minus_beta2, g), g, mul_rn(v, s.beta2));
  if (kAmsgrad) vmax = maximum_nan(vmax, v);  // torch.maximum(max_exp_avg_sq, v)
  // (v.sqrt() / bias_correction2_sqrt).add_(eps), of vmax with AMSGrad
  const float denom = add_rn(div_rn(sqrt_rn(kAmsgrad ? vmax : v), s.bias_correction2_sqrt), s.eps);
  // w.addcdiv(m, denom, value=neg_step_size): torch's CPU kernel computes w + (value * m) / denom
  // (its CUDA kernel computes w + value * (m / denom); the reference runs on the CPU).
  return add_rn(div_rn(mul_rn(s.neg_step_size, m), denom), w);
}

// NOTE [model averaging rounding] (fusedmf/functional/average.py is the specification)
// Local SGD averages differences from the last consensus c (fp32), not the weights themselves:
//   pack_delta_:    out = round_to(out dtype, (w - c) * scale)   w: the fp32 master, or the param as float
//   apply_average_: m = c + float(avg);  master = m;  param = round_to(param dtype, m);  c = m
// Each operation rounds once (fp32, to nearest even); nothing is fused. w - c is exact whenever
// c/2 <= w <= 2c (Sterbenz), the usual case after a few local steps, and * (1/N) is exact for N a
// power of two, so the only rounding before the allreduce is the cast to the compression dtype,
// which then loses digits of the small difference instead of the large weight.
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float delta_pack(float w, float c, float scale) { return mul_rn(sub_rn(w, c), scale); }
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float average_apply(float c, float avg) { return add_rn(c, avg); }

// One SMEGA2 master-step element (reference.py smega2_). `w` is the weight (fp32 master, or the
// param as float), `grad` the raw gradient as float; `v` (momentum) and `acc` (the accumulator G)
// are read, and written as the rule says: v only when kCycleEnd (then acc becomes 0), acc always.
// d is formed with the old v, before the refresh. Returns the new weight.
template <bool kCycleEnd>
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float smega2_update(const Smega2Scalars& s, float inv_grad_scale, float w,
                                                       float grad, float& v, float& acc) {
  float g = mul_rn(grad, inv_grad_scale);
  if (s.l2_weight_decay != 0.0f) g = madd(w, s.l2_weight_decay, g);  // g.add(w, alpha=l2)
  acc = add_rn(acc, g);                                               // G.add(g)
  const float d = madd(v, s.momentum, g);                             // g.add(v, alpha=momentum)
  if (kCycleEnd) {
    v = madd(acc, s.momentum_scale, mul_rn(v, s.momentum));  // v.mul(momentum).add(G, alpha=scale)
    acc = 0.0f;
  }
  return madd(d, -s.lr, w);  // w.add(d, alpha=-lr)
}

// One element of SMEGA2's look-ahead estimate (reference.py smega2_estimate_):
// w + accumulator_coef * acc + momentum_coef * v; `acc` is not looked at unless kReadAccumulator
// (accumulator_coef != 0).
template <bool kReadAccumulator>
FUSEDMF_HOST_DEVICE FUSEDMF_INLINE float smega2_estimate(const Smega2EstimateScalars& s, float w, float v,
                                                         float acc) {
  float e = w;
  if (kReadAccumulator) e = madd(acc, s.accumulator_coef, e);  // w.add(G, alpha=accumulator_coef)
  return madd(v, s.momentum_coef, e);                          // e.add(v, alpha=momentum_coef)
}

}  // namespace FUSEDMF_MATH_NS
}  // namespace fusedmf
