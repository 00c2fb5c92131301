// CPU emulation of the Metal Shading Language subset our kernels use (C++20, g++ or clang).
//
// Each GPU thread of a threadgroup runs as an OS thread; threadgroups run one after another.
// Barriers check that every lane arrives from the same source line (divergence) and time out
// instead of hanging (deadlock). SIMD collectives exchange values through a per-simdgroup
// scratch area in the xor-butterfly order of Apple GPUs. Threadgroup arrays are allocated per
// group, exactly sized (ASan sees overruns) and filled with 0xFF bytes (NaN / -1) so reads of
// unwritten memory show up in the results. See ../README.md for what this cannot catch.
#pragma once

#include <array>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef _Float16 half;

struct bfloat {
  uint16_t bits;
  bfloat() = default;
  bfloat(float f) {  // round to nearest even, NaN kept quiet
    uint32_t u = std::bit_cast<uint32_t>(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);
    bits = uint16_t(u >> 16);
  }
  bfloat(double d) : bfloat(float(d)) {}
  bfloat(int i) : bfloat(float(i)) {}
  operator float() const { return std::bit_cast<float>(uint32_t(bits) << 16); }
};
typedef bfloat bfloat16_t;
typedef half float16_t;

struct uint3 {
  uint x, y, z;
};

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

namespace emu {

[[noreturn]] void fail(const char* kind, const char* fmt, ...);

struct Lane {
  uint3 tpig, tpitg, tgpig, tptg, tpg, tgpg;
  uint tiitg, tiisg, sgiitg, sgptg;
};

// Implemented in emu_runtime.cpp (compiled once per sanitizer), so a kernel's translation
// unit stays small: the running lane, barriers, SIMD exchange, threadgroup arrays.
Lane& lane();
void barrier(int line);
// All active lanes of the simdgroup publish `size` bytes; out[i] gets lane i's (poison if
// inactive), active[i] whether lane i took part.
void simd_exchange(const void* v, unsigned size, int line, void* out, bool* active);
void* tg_alloc_raw(long id, unsigned long size);
void run_grid(uint3 grid, uint3 tg, void (*body)(void*), void* ctx);

template <class A>
A* tg_alloc(long id) { return static_cast<A*>(tg_alloc_raw(id, sizeof(A))); }

template <class T>
std::array<T, 32> simd_collect(T v, int line, std::array<bool, 32>* active = nullptr) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  std::array<T, 32> out;
  std::array<bool, 32> act;
  simd_exchange(&v, sizeof(T), line, out.data(), act.data());
  if (active) *active = act;
  return out;
}

template <class T, class Op>
T butterfly(std::array<T, 32> v, const std::array<bool, 32>& active, T identity, Op op) {
  for (int i = 0; i < 32; ++i)
    if (!active[i]) v[i] = identity;
  for (int k = 1; k < 32; k <<= 1) {
    std::array<T, 32> w;
    for (int i = 0; i < 32; ++i) w[i] = op(v[i], v[i ^ k]);
    v = w;
  }
  return v[lane().tiisg];
}

}  // namespace emu

namespace metal {
using std::abs; using std::ceil; using std::cos; using std::exp; using std::exp2; using std::floor;
using std::fma; using std::isinf; using std::isnan; using std::log; using std::log2; using std::pow;
using std::round; using std::sin; using std::sqrt; using std::tanh;
inline float rsqrt(float x) { return 1.0f / std::sqrt(x); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline float min(float a, float b) { return std::fmin(a, b); }
inline int max(int a, int b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a > b ? a : b; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline float clamp(float x, float a, float b) { return std::fmin(std::fmax(x, a), b); }
inline int clamp(int x, int a, int b) { return x < a ? a : (x > b ? b : x); }
inline float fast_exp(float x) { return std::exp(x); }
namespace fast { using std::exp; using std::log; inline float rsqrt(float x) { return 1.0f / std::sqrt(x); } }
namespace precise { using std::exp; using std::log; inline float rsqrt(float x) { return 1.0f / std::sqrt(x); } }

template <class To, class From>
inline To as_type(From x) { static_assert(sizeof(To) == sizeof(From)); return std::bit_cast<To>(x); }

inline void threadgroup_barrier(mem_flags, int line = __builtin_LINE()) { emu::barrier(line); }
inline void simdgroup_barrier(mem_flags, int line = __builtin_LINE()) {
  (void)emu::simd_collect<int>(0, line);
}

template <class T>
T simd_sum(T v, int line = __builtin_LINE()) {
  std::array<bool, 32> act;
  auto a = emu::simd_collect<T>(v, line, &act);
  return emu::butterfly<T>(a, act, T(0), [](T x, T y) { return T(x + y); });
}
template <class T>
T simd_max(T v, int line = __builtin_LINE()) {
  std::array<bool, 32> act;
  auto a = emu::simd_collect<T>(v, line, &act);
  return emu::butterfly<T>(a, act, std::numeric_limits<T>::lowest(), [](T x, T y) { return max(x, y); });
}
template <class T>
T simd_min(T v, int line = __builtin_LINE()) {
  std::array<bool, 32> act;
  auto a = emu::simd_collect<T>(v, line, &act);
  return emu::butterfly<T>(a, act, std::numeric_limits<T>::max(), [](T x, T y) { return min(x, y); });
}
template <class T>
T simd_shuffle_xor(T v, ushort mask, int line = __builtin_LINE()) {
  return emu::simd_collect<T>(v, line)[(emu::lane().tiisg ^ mask) & 31u];
}
template <class T>
T simd_shuffle(T v, ushort src, int line = __builtin_LINE()) {
  return emu::simd_collect<T>(v, line)[src & 31u];
}
template <class T>
T simd_broadcast(T v, ushort src, int line = __builtin_LINE()) {
  return emu::simd_collect<T>(v, line)[src & 31u];
}
template <class T>
T simd_shuffle_down(T v, ushort d, int line = __builtin_LINE()) {
  uint i = emu::lane().tiisg + d;
  auto a = emu::simd_collect<T>(v, line);
  return i < 32 ? a[i] : v;
}
}  // namespace metal

#define EMU_KERNEL_SCOPE                                                                      \
  using metal::abs; using metal::ceil; using metal::cos; using metal::exp; using metal::exp2; \
  using metal::floor; using metal::fma; using metal::isinf; using metal::isnan;               \
  using metal::log; using metal::log2; using metal::pow; using metal::round; using metal::sin; \
  using metal::sqrt; using metal::tanh; using metal::rsqrt; using metal::max; using metal::min; \
  using metal::clamp; using metal::as_type; using metal::threadgroup_barrier;                 \
  using metal::simdgroup_barrier; using metal::simd_sum; using metal::simd_max;               \
  using metal::simd_min; using metal::simd_shuffle_xor; using metal::simd_shuffle;            \
  using metal::simd_broadcast; using metal::simd_shuffle_down;                                \
  namespace fast = metal::fast;                                                               \
  namespace precise = metal::precise;

// Built-in attributes read the running lane's context.
#define thread_position_in_grid (emu::lane().tpig)
#define thread_position_in_threadgroup (emu::lane().tpitg)
#define threadgroup_position_in_grid (emu::lane().tgpig)
#define threads_per_threadgroup (emu::lane().tptg)
#define threads_per_grid (emu::lane().tpg)
#define threadgroups_per_grid (emu::lane().tgpg)
#define thread_index_in_threadgroup (emu::lane().tiitg)
#define thread_index_in_simdgroup (emu::lane().tiisg)
#define simdgroup_index_in_threadgroup (emu::lane().sgiitg)
#define simdgroups_per_threadgroup (emu::lane().sgptg)
#define threads_per_simdgroup (32u)
#define thread_execution_width (32u)
