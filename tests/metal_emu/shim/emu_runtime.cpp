// The scheduler and synchronisation of the emulator: threadgroups in turn, every lane of a
// group an OS thread. Compiled once per sanitizer and linked with each kernel.
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

#include "msl_emu.h"

namespace emu {

void fail(const char* kind, const char* fmt, ...) {
  std::fprintf(stderr, "EMU %s: ", kind);
  va_list ap;
  va_start(ap, fmt);
  std::vfprintf(stderr, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::_Exit(3);
}

static int timeout_ms() {
  const char* s = std::getenv("EMU_TIMEOUT_MS");
  return s ? std::atoi(s) : 20000;
}

// A barrier over a changing set of lanes; lanes that return drop out.
struct Barrier {
  int expected = 0, arrived = 0, line = -1;
  long gen = 0;
  const char* what = "";
  void arrive(std::unique_lock<std::mutex>& lk, std::condition_variable& cv, int at) {
    if (arrived == 0) line = at;
    else if (line != at) fail("divergence", "%s reached from line %d and line %d", what, line, at);
    if (++arrived == expected) { release(cv); return; }
    long g = gen;
    if (!cv.wait_for(lk, std::chrono::milliseconds(timeout_ms()), [&] { return gen != g; }))
      fail("deadlock", "%s at line %d: %d of %d lanes arrived", what, line, arrived, expected);
  }
  void leave(std::condition_variable& cv) {
    --expected;
    if (arrived > 0 && arrived == expected) release(cv);
  }
  void release(std::condition_variable& cv) {
    arrived = 0;
    line = -1;
    ++gen;
    cv.notify_all();
  }
};

struct Simd {
  std::mutex mu;  // per simdgroup: a collective orders only its own lanes
  std::condition_variable cv;
  Barrier bar;
  uint64_t vals[32];
  bool active[32];
};

struct Group {
  std::mutex mu;
  std::condition_variable cv;
  Barrier tg;
  std::vector<Simd> simd;
  // Threadgroup arrays by declaration id, allocated by the first lane that reaches one.
  // Lock-free (relaxed) so allocation adds no happens-before edge that would hide a race
  // from ThreadSanitizer (a missing barrier must stay visible).
  std::atomic<unsigned char*> tg_mem[256];
  std::atomic<size_t> tg_bytes{0};
  Group() { for (auto& p : tg_mem) p.store(nullptr, std::memory_order_relaxed); }
};

#if defined(__SANITIZE_THREAD__)
// Order each lane's use of a threadgroup array after its allocation (and poisoning) only.
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#define EMU_TSAN_RELEASE(p) __tsan_release(p)
#define EMU_TSAN_ACQUIRE(p) __tsan_acquire(p)
#else
#define EMU_TSAN_RELEASE(p)
#define EMU_TSAN_ACQUIRE(p)
#endif

static thread_local Lane* cur_lane = nullptr;
static Group* cur_group = nullptr;

Lane& lane() { return *cur_lane; }

void* tg_alloc_raw(long id, unsigned long size) {
  Group& g = *cur_group;
  if (id < 0 || id >= 256) fail("threadgroup-memory", "too many threadgroup arrays");
  unsigned char* p = g.tg_mem[id].load(std::memory_order_relaxed);
  if (!p) {
    unsigned char* fresh = new unsigned char[size];  // exact size: ASan sees overruns
    std::memset(fresh, 0xff, size);                  // NaN / -1: reads before writes show
    EMU_TSAN_RELEASE(fresh);
    if (g.tg_mem[id].compare_exchange_strong(p, fresh, std::memory_order_relaxed)) {
      if (g.tg_bytes.fetch_add(size, std::memory_order_relaxed) + size > 32768)
        fail("threadgroup-memory", "%zu bytes > 32 KB", g.tg_bytes.load());
      p = fresh;
    } else {
      delete[] fresh;
    }
  }
  EMU_TSAN_ACQUIRE(p);
  return p;
}

void barrier(int line) {
  Group& g = *cur_group;
  std::unique_lock<std::mutex> lk(g.mu);
  g.tg.arrive(lk, g.cv, line);
}

void simd_exchange(const void* v, unsigned size, int line, void* out, bool* active) {
  Group& g = *cur_group;
  Lane& l = lane();
  Simd& s = g.simd[l.sgiitg];
  std::unique_lock<std::mutex> lk(s.mu);
  std::memcpy(&s.vals[l.tiisg], v, size);
  s.active[l.tiisg] = true;
  s.bar.arrive(lk, s.cv, line);
  auto* o = static_cast<unsigned char*>(out);
  for (int i = 0; i < 32; ++i) {
    if (s.active[i]) std::memcpy(o + i * size, &s.vals[i], size);
    else std::memset(o + i * size, 0xff, size);
    active[i] = s.active[i];
  }
  s.bar.arrive(lk, s.cv, line);  // nobody overwrites vals before all have read them
  s.active[l.tiisg] = false;
}

struct LaneArgs {
  Lane lane;
  void (*body)(void*);
  void* ctx;
};

static void lane_main(LaneArgs* a) {
  cur_lane = &a->lane;
  a->body(a->ctx);
  Group& g = *cur_group;
  {
    std::lock_guard<std::mutex> lk(g.mu);
    g.tg.leave(g.cv);
  }
  Simd& s = g.simd[a->lane.sgiitg];
  std::lock_guard<std::mutex> lk(s.mu);
  s.bar.leave(s.cv);
}

void run_grid(uint3 grid, uint3 tg, void (*body)(void*), void* ctx) {
  uint3 groups{(grid.x + tg.x - 1) / tg.x, (grid.y + tg.y - 1) / tg.y, (grid.z + tg.z - 1) / tg.z};
  for (uint gz = 0; gz < groups.z; ++gz)
    for (uint gy = 0; gy < groups.y; ++gy)
      for (uint gx = 0; gx < groups.x; ++gx) {
        // edge groups are smaller (dispatchThreads semantics)
        uint3 size{std::min(tg.x, grid.x - gx * tg.x), std::min(tg.y, grid.y - gy * tg.y),
                   std::min(tg.z, grid.z - gz * tg.z)};
        uint n = size.x * size.y * size.z;
        uint nsg = (n + 31) / 32;
        Group g;
        g.simd = std::vector<Simd>(nsg);
        g.tg.expected = int(n);
        g.tg.what = "threadgroup_barrier";
        for (uint s = 0; s < nsg; ++s) {
          g.simd[s].bar.expected = int(std::min(32u, n - s * 32));
          g.simd[s].bar.what = "simdgroup collective";
          for (int i = 0; i < 32; ++i) g.simd[s].active[i] = false;
        }
        cur_group = &g;
        std::vector<LaneArgs> args(n);
        for (uint z = 0; z < size.z; ++z)
          for (uint y = 0; y < size.y; ++y)
            for (uint x = 0; x < size.x; ++x) {
              uint t = x + size.x * (y + size.y * z);
              Lane& l = args[t].lane;
              l.tpitg = {x, y, z};
              l.tgpig = {gx, gy, gz};
              l.tpig = {gx * tg.x + x, gy * tg.y + y, gz * tg.z + z};
              l.tptg = size;
              l.tpg = grid;
              l.tgpg = groups;
              l.tiitg = t;
              l.tiisg = t % 32;
              l.sgiitg = t / 32;
              l.sgptg = nsg;
              args[t].body = body;
              args[t].ctx = ctx;
            }
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (uint t = 0; t < n; ++t) threads.emplace_back(lane_main, &args[t]);
        for (auto& th : threads) th.join();
        for (auto& p : g.tg_mem) delete[] p.load(std::memory_order_relaxed);
        cur_group = nullptr;
      }
}

}  // namespace emu
