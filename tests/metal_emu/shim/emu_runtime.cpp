// The scheduler: threadgroups in turn, every lane of a group an OS thread.
#include "msl_emu.h"

namespace emu {

struct LaneArgs {
  Lane lane;
  void (*body)(void*);
  void* ctx;
};

static void lane_main(LaneArgs* a) {
  cur_lane = &a->lane;
  a->body(a->ctx);
  Group& g = *cur_group;
  std::lock_guard<std::mutex> lk(g.mu);
  g.tg.leave(g.cv);
  g.simd[a->lane.sgiitg].bar.leave(g.cv);
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
        g.tg.expected = int(n);
        g.tg.what = "threadgroup_barrier";
        g.simd.resize(nsg);
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
        for (auto& kv : g.tg_mem) delete[] kv.second;
        cur_group = nullptr;
      }
}

}  // namespace emu
