// Declarations-only stand-in for metal_stdlib under clang's C++-for-OpenCL mode, with Metal's
// address spaces mapped onto OpenCL's and the generic address space disabled: a pointer
// that crosses address spaces (a threadgroup array passed as `device`, an unqualified
// pointer parameter given device memory) is rejected here as Apple's compiler rejects it.
#pragma OPENCL EXTENSION cl_khr_fp16 : enable
#define device __global
#define threadgroup __local
#define constant __constant
#define thread __private

typedef uchar uint8_t;
typedef char int8_t;
typedef ushort uint16_t;
typedef short int16_t;
typedef uint uint32_t;
typedef int int32_t;
typedef ulong uint64_t;
typedef long int64_t;
typedef half float16_t;

// bfloat is type-checked as half (a built-in 16-bit float); a class would need
// address-space-qualified members everywhere.
typedef half bfloat;
typedef bfloat bfloat16_t;

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);

template <class To, class From>
To as_type(From x) { return __builtin_bit_cast(To, x); }

template <class T> T simd_sum(T);
template <class T> T simd_max(T);
template <class T> T simd_min(T);
template <class T> T simd_shuffle_xor(T, ushort);
template <class T> T simd_shuffle(T, ushort);
template <class T> T simd_broadcast(T, ushort);
template <class T> T simd_shuffle_down(T, ushort);
namespace fast { float exp(float); float log(float); float rsqrt(float); }
namespace precise { float exp(float); float log(float); float rsqrt(float); }
