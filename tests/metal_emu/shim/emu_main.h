// Harness I/O: inputs in DIR/inN.bin, exact-size buffers (ASan sees overruns); outputs
// poisoned with 0xFF (NaN for floats) before the run, written to DIR/outN.bin after.
#pragma once
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <string>

static void** emu_load(int argc, char** argv, int n_in, int n_out) {
  if (argc < 2) emu::fail("usage", "%s DIR", argv[0]);
  void** bufs = new void*[n_in + n_out];
  for (int i = 0; i < n_in + n_out; ++i) {
    bool in = i < n_in;
    std::string path = std::string(argv[1]) + (in ? "/in" : "/out") + std::to_string(in ? i : i - n_in) + (in ? ".bin" : ".size");
    FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) emu::fail("io", "cannot open %s", path.c_str());
    size_t n = 0;
    if (in) { std::fseek(f, 0, SEEK_END); n = size_t(std::ftell(f)); std::fseek(f, 0, SEEK_SET); }
    else if (std::fscanf(f, "%zu", &n) != 1) emu::fail("io", "bad size file %s", path.c_str());
    unsigned char* p = static_cast<unsigned char*>(std::malloc(n ? n : 1));
    if (in) { if (std::fread(p, 1, n, f) != n) emu::fail("io", "short read %s", path.c_str()); }
    else std::memset(p, 0xff, n);
    std::fclose(f);
    bufs[i] = p;
  }
  return bufs;
}

static void emu_store(int argc, char** argv, void** bufs, int n_in, int n_out) {
  (void)argc;
  for (int i = 0; i < n_out; ++i) {
    std::string sp = std::string(argv[1]) + "/out" + std::to_string(i) + ".size";
    FILE* f = std::fopen(sp.c_str(), "rb");
    size_t n = 0;
    if (!f || std::fscanf(f, "%zu", &n) != 1) emu::fail("io", "bad size file");
    std::fclose(f);
    std::string path = std::string(argv[1]) + "/out" + std::to_string(i) + ".bin";
    f = std::fopen(path.c_str(), "wb");
    if (std::fwrite(bufs[n_in + i], 1, n, f) != n) emu::fail("io", "short write");
    std::fclose(f);
  }
}
