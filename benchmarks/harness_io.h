// File input of the standalone kernel harnesses (select_harness.cu, fwd_long_harness.cu):
// the raw arrays their dump scripts write.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>
#include <utility>
#include <vector>

#include <cuda_runtime.h>

// Reads n values of <dir>/<name>.bin into a new device buffer (exits if the file is short);
// with `host`, also keeps the values there.
template <typename T>
static T* load(const std::string& dir, const char* name, size_t n, std::vector<T>* host = nullptr) {
  std::vector<T> h(n);
  FILE* f = fopen((dir + "/" + name + ".bin").c_str(), "rb");
  if (!f || fread(h.data(), sizeof(T), n, f) != n) {
    fprintf(stderr, "cannot read %s/%s.bin (%zu values)\n", dir.c_str(), name, n);
    exit(1);
  }
  fclose(f);
  T* d = nullptr;
  cudaMalloc(&d, n * sizeof(T));
  cudaMemcpy(d, h.data(), n * sizeof(T), cudaMemcpyHostToDevice);
  if (host) *host = std::move(h);
  return d;
}
