// Runtime choice of the x86 instruction set for the CPU update kernels, the way ATen picks its CPU_CAPABILITY.
//
// The extension is built for baseline x86-64 (SSE2: it must run on any x86-64 machine), so a loop the compiler
// vectorizes there uses 128-bit registers and no FMA/F16C. The kernels that need more are written once in an
// ".inc" file and stamped out in three namespaces (baseline, avx2, avx512), each function of the AVX ones carrying
// a GCC/Clang target attribute, so the same loops are vectorized with 256- or 512-bit registers there; cpu_isa()
// says which set the launcher calls. It follows ATen's choice (torch.backends.cpu.get_cpu_capability(), which
// honours ATEN_CPU_CAPABILITY=default|avx2|avx512, so the baseline path can be forced in tests) and confirms it
// with the CPU's own feature bits.
//
// Why target attributes rather than a translation unit compiled with -mavx2: functions carrying the attribute
// inline the shared baseline math (device_math.h) and are the only code generated for AVX, so no inline function
// of a header (c10, the standard library) is ever emitted with AVX instructions into the shared object, where the
// linker could pick that copy for callers on a machine without AVX.
#pragma once

#include <ATen/Version.h>

#include <cstdint>
#include <cstring>
#include <string>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define OPTIM_X86_DISPATCH 1
#include <immintrin.h>
#define OPTIM_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define OPTIM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#else
#define OPTIM_X86_DISPATCH 0
#endif

namespace optim {

enum class CpuIsa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline CpuIsa compute_cpu_isa() {
#if OPTIM_X86_DISPATCH
  const std::string aten = at::get_cpu_capability();  // "DEFAULT", "AVX2" or "AVX512" (after ATEN_CPU_CAPABILITY)
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (aten == "AVX512" && avx512) return CpuIsa::kAvx512;
  if ((aten == "AVX512" || aten == "AVX2") && avx2) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kBaseline;
}

// Computed once per process (ATen reads ATEN_CPU_CAPABILITY once too).
inline CpuIsa cpu_isa() {
  static const CpuIsa isa = compute_cpu_isa();
  return isa;
}

// bfloat16 <-> float as c10::BFloat16 converts (round to nearest even, NaN -> 0x7FC0), written on the bits so that
// the loops over them vectorize.
inline float bf16_bits_to_float(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline uint16_t float_to_bf16_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + (((u >> 16) & 1u) + 0x7FFFu)) >> 16;
  return x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

}  // namespace optim
