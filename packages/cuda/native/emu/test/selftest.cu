// Self-test of the CUDA emulator (native/emu/cuda_emu.h). Built with the host compiler:
//   g++ -std=c++17 -O1 -x c++ -DMEGAPATCH_CUDA_EMULATOR=1 -I native/emu -I native/src/kernels
//       native/emu/test/selftest.cu native/emu/emu.cc -o selftest
// and, unchanged, with nvcc (nvcc -std=c++17 -arch=sm_90 selftest.cu), where it checks the same
// kernels on a GPU; the checks of emulator faults (divergent barriers, __trap) run only under the
// emulator, since on a GPU they are undefined behaviour or kill the context.
// Prints "ok N checks" and exits 0, or prints the first failed check and exits 1.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../../src/kernels/common.cuh"

#ifdef MEGAPATCH_CUDA_EMULATOR
#include <atomic>
#include <thread>
#endif

static int g_checks = 0;
#define CHECK(cond, ...)                                     \
  do {                                                       \
    g_checks++;                                              \
    if (!(cond)) {                                           \
      std::printf("FAILED %s:%d: %s: ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                              \
      std::printf("\n");                                     \
      std::exit(1);                                          \
    }                                                        \
  } while (0)
#define CUDA_OK(call)                                                                       \
  do {                                                                                      \
    cudaError_t e_ = (call);                                                                \
    CHECK(e_ == cudaSuccess, "%s -> %s", #call, cudaGetErrorString(e_));                    \
  } while (0)
#define LAUNCH_OK(what)                                                                   \
  do {                                                                                    \
    cudaError_t e_ = cudaGetLastError();                                                  \
    if (e_ == cudaSuccess) e_ = cudaDeviceSynchronize();                                  \
    CHECK(e_ == cudaSuccess, "launch of %s: %s", what, cudaGetErrorString(e_));           \
  } while (0)

template <typename T> struct DevBuf {
  T* p = nullptr;
  size_t n;
  explicit DevBuf(size_t count) : n(count) {
    CUDA_OK(cudaMalloc(&p, n * sizeof(T)));
    CUDA_OK(cudaMemset(p, 0, n * sizeof(T)));
  }
  ~DevBuf() { cudaFree(p); }
  std::vector<T> get() const {
    std::vector<T> h(n);
    CUDA_OK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  void put(const std::vector<T>& h) {
    CUDA_OK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
};

// ---- kernels ---------------------------------------------------------------------------------------

// per-block sum of in[block*256 + t] with a shared-memory tree; `n` is modified per thread to check
// that every thread gets its own copy of the parameters
__global__ void block_reduce(const int* in, int* out, int n) {
  __shared__ int s[256];
  unsigned t = threadIdx.x;
  n -= static_cast<int>(t);  // a per-thread parameter copy
  s[t] = in[blockIdx.x * 256 + t] + (n + static_cast<int>(t)) * 0;
  __syncthreads();
  for (unsigned stride = 128; stride > 0; stride >>= 1) {
    if (t < stride) s[t] += s[t + stride];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
  if (n + static_cast<int>(t) != 1000) out[blockIdx.x] = -1;  // the parameter was shared
}

template <typename T> __global__ void warp_ops(const T* in, T* out) {
  unsigned t = threadIdx.x;
  T v = in[t];
  T x = v;  // butterfly sum: every lane gets the warp's sum
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  T d = v;  // tree sum: lane 0 gets the warp's sum
  for (int off = 16; off > 0; off >>= 1) d += __shfl_down_sync(0xffffffffu, d, off);
  T u = v;  // inclusive scan
  for (int off = 1; off < 32; off <<= 1) {
    T y = __shfl_up_sync(0xffffffffu, u, off);
    if ((t & 31) >= static_cast<unsigned>(off)) u += y;
  }
  T b = __shfl_sync(0xffffffffu, v, 5, 16);  // lane 5 of each half warp
  T r = __shfl_sync(0xffffffffu, v, 31 - (t & 31));
  out[t * 5 + 0] = x;
  out[t * 5 + 1] = d;
  out[t * 5 + 2] = u;
  out[t * 5 + 3] = b;
  out[t * 5 + 4] = r;
}

__global__ void vote_ops(unsigned* out) {
  unsigned t = threadIdx.x, lane = t & 31;
  unsigned ballot = __ballot_sync(0xffffffffu, lane % 3 == 0);
  int any = __any_sync(0xffffffffu, lane == 7);
  int all = __all_sync(0xffffffffu, lane < 40);
  int none = __any_sync(0xffffffffu, 0);
  int notall = __all_sync(0xffffffffu, lane != 3);
  int cnt = __syncthreads_count(t % 4 == 0);
  int andv = __syncthreads_and(t < 1000);
  int orv = __syncthreads_or(t == 17);
  __syncwarp();
  out[t * 8 + 0] = ballot;
  out[t * 8 + 1] = any;
  out[t * 8 + 2] = all;
  out[t * 8 + 3] = none;
  out[t * 8 + 4] = notall;
  out[t * 8 + 5] = cnt;
  out[t * 8 + 6] = andv;
  out[t * 8 + 7] = orv;
}

// blockDim 48: the second warp has 16 lanes
__global__ void partial_warp(const int* in, int* out) {
  unsigned t = threadIdx.x;
  int v = in[t];
  int x = v;
  for (int off = 8; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  int d = v;
  for (int off = 16; off > 0; off >>= 1) d += __shfl_down_sync(0xffffffffu, d, off);
  unsigned ballot = __ballot_sync(0xffffffffu, 1);
  __syncwarp();
  __shared__ int s[48];
  s[t] = v;
  __syncthreads();
  out[t * 4 + 0] = x;
  out[t * 4 + 1] = d;
  out[t * 4 + 2] = static_cast<int>(ballot);
  out[t * 4 + 3] = s[47 - t];
}

// dynamic shared memory: reverse the block's values; also report the first word seen
__global__ void dyn_smem(const float* in, float* out, unsigned* first) {
  MP_DYNAMIC_SMEM(float, buf);
  unsigned t = threadIdx.x;
  if (t == 0) first[blockIdx.x] = mpc::f32_bits(buf[blockDim.x - 1]);
  __syncthreads();
  buf[t] = in[blockIdx.x * blockDim.x + t] * 2.0f;
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buf[blockDim.x - 1 - t];
}

__global__ void atomics(int* i, unsigned* u, unsigned long long* ull, float* f, double* d, long long* ll,
                        int* seen) {
  unsigned g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(&i[0], 1);
  atomicSub(&i[1], 2);
  atomicMax(&i[2], static_cast<int>(g));
  atomicMin(&i[3], -static_cast<int>(g));
  int old;  // increment through a CAS loop
  do {
    old = i[4];
  } while (atomicCAS(&i[4], old, old + 3) != old);
  int prev = atomicExch(&i[5], static_cast<int>(g));
  atomicAdd(&seen[prev < 0 ? 0 : 1], 1);
  atomicAdd(&u[0], 2u);
  atomicOr(&u[1], 1u << (g % 32));
  atomicAnd(&u[2], ~(1u << (g % 16)));
  atomicMax(&u[3], g * 7u);
  atomicMin(&u[4], g + 5u);
  atomicAdd(&ull[0], 1ull << 33);
  atomicMax(&ull[1], static_cast<unsigned long long>(g) << 40);
  atomicCAS(&ull[2], 0ull, 77ull);
  atomicAdd(&f[0], 0.5f);
  atomicExch(&f[1], 1.5f);
  atomicAdd(&d[0], 0.25);
  atomicMin(&ll[0], -static_cast<long long>(g) * 1000000000ll);
  atomicMax(&ll[1], static_cast<long long>(g) * 1000000000ll);
}

// every thread of a 3-D grid of 3-D blocks writes its coordinates at its linear index
__global__ void grid3d(unsigned* out) {
  unsigned bx = blockIdx.x, by = blockIdx.y, bz = blockIdx.z;
  unsigned block = (bz * gridDim.y + by) * gridDim.x + bx;
  unsigned thread = (threadIdx.z * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  unsigned n = blockDim.x * blockDim.y * blockDim.z;
  unsigned i = block * n + thread;
  out[i * 4 + 0] = bx | (by << 8) | (bz << 16);
  out[i * 4 + 1] = threadIdx.x | (threadIdx.y << 8) | (threadIdx.z << 16);
  out[i * 4 + 2] = gridDim.x | (gridDim.y << 8) | (gridDim.z << 16);
  out[i * 4 + 3] = blockDim.x | (blockDim.y << 8) | (blockDim.z << 16) | (warpSize << 24);
}

template <typename T> __global__ void scale(T* x, T a, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) x[i] *= a;
}

__global__ void intrinsics(float* f, unsigned* u, int* s) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  u[0] = __float_as_uint(1.0f);
  f[0] = __uint_as_float(0x40490fdbu);
  s[0] = __float_as_int(-2.0f);
  f[1] = __int_as_float(0x3f000000);
  s[1] = static_cast<int>(__double_as_longlong(1.0) >> 32);
  f[2] = static_cast<float>(__longlong_as_double(0x4000000000000000ll));
  s[2] = __float2int_rn(2.5f);
  s[3] = __float2int_rn(-3.5f);
  s[4] = __float2int_rz(-3.9f);
  u[1] = __float2uint_rn(7.5f);
  f[3] = __saturatef(1.5f);
  f[4] = __saturatef(-0.5f);
  f[5] = __fdividef(1.0f, 4.0f);
  f[6] = __frcp_rn(8.0f);
  f[7] = __fsqrt_rn(16.0f);
  f[8] = rsqrtf(4.0f);
  f[9] = __fmaf_rn(2.0f, 3.0f, 1.0f);
  f[10] = __expf(0.0f) + __logf(1.0f) + __sinf(0.0f) + __cosf(0.0f) + __powf(2.0f, 3.0f);
  f[11] = expf(1.0f) + logf(2.0f) + erff(0.5f) + tanhf(0.5f);
  f[12] = static_cast<float>(rsqrt(0.25));
  u[2] = __brev(1u);
  u[3] = __umulhi(0x80000000u, 6u);
  u[4] = static_cast<unsigned>(__umul64hi(1ull << 63, 10ull));
  s[5] = __mulhi(-65536 * 2, 65536 * 4);
  s[6] = __popc(0xf0f0u) + 100 * __popcll(0xffffffffffull);
  s[7] = __ffs(0) + 100 * __ffs(0x50);
  s[8] = __clz(1) + 100 * __clz(0);
  s[9] = __ldg(&s[2]);
  f[13] = isnan(nanf("")) ? 1.0f : 0.0f;
  f[14] = isinf(INFINITY) ? 1.0f : 0.0f;
  __threadfence();
  __threadfence_block();
}

// formats a double on every thread's stack (variadic calls need a 16-byte aligned stack)
__global__ void formatting(char* out) {
  char buf[32];
  unsigned t = threadIdx.x;
  int n = 0;
  for (int i = 0; i < 31; i++) buf[i] = ' ';
  buf[31] = 0;
  double v = 1.5 * t;  // "%.1f" by hand on the GPU, printf's formatting on the host
  long w = static_cast<long>(v);
  buf[n++] = static_cast<char>('0' + w / 10 % 10);
  buf[n++] = static_cast<char>('0' + w % 10);
  buf[n++] = '.';
  buf[n++] = static_cast<char>('0' + static_cast<long>(v * 10) % 10);
  buf[n] = 0;
#ifdef MEGAPATCH_CUDA_EMULATOR
  std::snprintf(buf, sizeof buf, "%04.1f", v);
#endif
  for (int i = 0; i < 8; i++) out[t * 8 + i] = buf[i];
}

// 256 threads that do nothing, and 256 threads with 8 barriers
__global__ void empty_kernel(int) {}
__global__ void barrier_kernel(int* out) {
  __shared__ int s[256];
  unsigned t = threadIdx.x;
  s[t] = t;
  for (int i = 0; i < 4; i++) {
    __syncthreads();
    int v = s[(t + 1) & 255];
    __syncthreads();
    s[t] = v;
  }
  out[t] = s[t];
}

// named barriers (mpc::bar_sync / bar_arrive), 256 threads: each half of the block rotates its 128
// values (half h: h + 1 times) meeting only its own threads at barrier 1 + h; then half 0 writes
// and signals barrier 3 (bar.arrive), which half 1 waits at before reading
__global__ void named_barriers(int* out) {
  __shared__ int s[256];
  const int t = threadIdx.x, half = t / 128, lt = t % 128;
  s[t] = t;
  for (int r = 0; r <= half; r++) {
    mpc::bar_sync(1 + half, 128);
    const int v = s[half * 128 + (lt + 1) % 128];
    mpc::bar_sync(1 + half, 128);
    s[t] = v;
  }
  __syncthreads();
  out[t] = s[t];
  __syncthreads();
  if (half == 0) {
    s[lt] = 1000 + lt;
    __threadfence_block();
    mpc::bar_arrive(3, 256);
  } else {
    mpc::bar_sync(3, 256);
    out[256 + lt] = s[127 - lt];
  }
}

#ifdef MEGAPATCH_CUDA_EMULATOR
// thread 0 writes what thread 1 reads, with no barrier between: thread 1 sees it when the
// scheduler runs thread 0 first (the usual order), not with MEGAPATCH_CUDA_EMU_SCHEDULE=reverse
__global__ void unsynchronised(int* out) {
  MP_DYNAMIC_SMEM(int, s);
  if (threadIdx.x == 0) s[0] = 7;
  if (threadIdx.x == 1) out[0] = s[0];
}
// two warps take four steps each, their lanes kept together by __syncwarp; lane 0 logs its warp at
// every step (out[0] counts the entries): the usual order alternates the warps step by step, the
// priority schedule runs the higher-ranked warp's steps first
__global__ void warp_steps(int* out) {
  for (int k = 0; k < 4; k++) {
    __syncwarp();
    if (threadIdx.x % 32 == 0) out[1 + atomicAdd(out, 1)] = threadIdx.x / 32;
  }
}
// setmaxnreg as the warp-specialised kernels use it: warpgroup 0 gives registers back (dec), the
// others take them (inc); 384 threads have 168 registers each at entry
__global__ void register_split(int* out, int give, int take) {
  if (threadIdx.x < 128) ::emu::setmaxnreg(give, false, __FILE__, __LINE__);
  else ::emu::setmaxnreg(take, true, __FILE__, __LINE__);
  out[threadIdx.x] = 1;
}
// half of warpgroup 0 asks, the other half does not
__global__ void register_half(int* out) {
  if (threadIdx.x < 64) ::emu::setmaxnreg(40, false, __FILE__, __LINE__);
  out[threadIdx.x] = 1;
}
// half the block waits at a named barrier of the whole block, the other half exits
__global__ void named_deadlock(int* out) {
  if (threadIdx.x < 64) mpc::bar_sync(5, 128);
  out[threadIdx.x] = 1;
}
__global__ void named_bad_count(int* out) {
  mpc::bar_sync(2, 48);
  out[threadIdx.x] = 1;
}
__global__ void divergent_exit(int* out) {
  if (threadIdx.x < 16) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}
__global__ void divergent_sites(int* out) {
  if (threadIdx.x % 2) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}
__global__ void divergent_shfl(int* out) {
  int v = threadIdx.x;
  if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
  out[threadIdx.x] = v;
}
__global__ void throwing(int* out) {
  std::vector<int> v(4);
  out[threadIdx.x] = v.at(threadIdx.x);
}
__global__ void trapping(int* out) {
  if (blockIdx.x == 1 && threadIdx.x == 3) __trap();
  out[blockIdx.x * blockDim.x + threadIdx.x] = 1;
}

static std::string last_error_text() {
  cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? std::string("success") : std::string(cudaGetErrorString(e));
}
#endif


int main() {
  int ndev = 0;
  CUDA_OK(cudaGetDeviceCount(&ndev));
  CHECK(ndev >= 1, "devices: %d", ndev);
  CUDA_OK(cudaSetDevice(0));
  cudaStream_t stream;
  CUDA_OK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));

  {  // block reduction with static shared memory and barriers
    const int blocks = 5;
    std::vector<int> h(blocks * 256);
    for (size_t i = 0; i < h.size(); i++) h[i] = static_cast<int>((i * 37) % 101) - 50;
    DevBuf<int> in(h.size()), out(blocks);
    in.put(h);
    MP_LAUNCH(block_reduce, blocks, 256, 0, stream, in.p, out.p, 1000);
    LAUNCH_OK("block_reduce");
    std::vector<int> r = out.get();
    for (int b = 0; b < blocks; b++) {
      int want = 0;
      for (int t = 0; t < 256; t++) want += h[b * 256 + t];
      CHECK(r[b] == want, "block %d: %d != %d", b, r[b], want);
    }
  }

  {  // warp shuffles (int, float, double, unsigned long long), 64 threads
    std::vector<double> h(64);
    for (int i = 0; i < 64; i++) h[i] = (i * 7) % 13;
    auto run = [&](auto zero, const char* name) {
      using T = decltype(zero);
      std::vector<T> hv(64);
      for (int i = 0; i < 64; i++) hv[i] = static_cast<T>(h[i]);
      DevBuf<T> in(64), out(64 * 5);
      in.put(hv);
      auto k = warp_ops<T>;
      MP_LAUNCH(k, 1, 64, 0, stream, in.p, out.p);
      LAUNCH_OK(name);
      std::vector<T> r = out.get();
      for (int t = 0; t < 64; t++) {
        int w = t / 32 * 32, lane = t % 32;
        T sum = 0, scan = 0;
        for (int j = 0; j < 32; j++) sum += hv[w + j];
        for (int j = 0; j <= lane; j++) scan += hv[w + j];
        CHECK(r[t * 5 + 0] == sum, "%s xor-sum t=%d", name, t);
        if (lane == 0) CHECK(r[t * 5 + 1] == sum, "%s down-sum t=%d", name, t);
        CHECK(r[t * 5 + 2] == scan, "%s up-scan t=%d", name, t);
        CHECK(r[t * 5 + 3] == hv[w + (lane / 16) * 16 + 5], "%s width-16 broadcast t=%d", name, t);
        CHECK(r[t * 5 + 4] == hv[w + 31 - lane], "%s reverse t=%d", name, t);
      }
    };
    run(0, "warp_ops<int>");
    run(0.0f, "warp_ops<float>");
    run(0.0, "warp_ops<double>");
    run(0ull, "warp_ops<unsigned long long>");
    run(0ll, "warp_ops<long long>");
    run(0u, "warp_ops<unsigned>");
  }

  {  // votes and counting barriers, 64 threads
    DevBuf<unsigned> out(64 * 8);
    MP_LAUNCH(vote_ops, 1, 64, 0, stream, out.p);
    LAUNCH_OK("vote_ops");
    std::vector<unsigned> r = out.get();
    unsigned want_ballot = 0;
    for (int l = 0; l < 32; l++)
      if (l % 3 == 0) want_ballot |= 1u << l;
    for (int t = 0; t < 64; t++) {
      CHECK(r[t * 8 + 0] == want_ballot, "ballot t=%d: %08x", t, r[t * 8 + 0]);
      CHECK(r[t * 8 + 1] == 1 && r[t * 8 + 2] == 1 && r[t * 8 + 3] == 0 && r[t * 8 + 4] == 0, "any/all t=%d", t);
      CHECK(r[t * 8 + 5] == 16 && r[t * 8 + 6] == 1 && r[t * 8 + 7] == 1, "syncthreads_count/and/or t=%d", t);
    }
  }

  {  // a partial last warp: blockDim 48
    std::vector<int> h(48);
    for (int i = 0; i < 48; i++) h[i] = i * 3 + 1;
    DevBuf<int> in(48), out(48 * 4);
    in.put(h);
    MP_LAUNCH(partial_warp, 1, 48, 0, stream, in.p, out.p);
    LAUNCH_OK("partial_warp");
    std::vector<int> r = out.get();
    for (int t = 0; t < 48; t++) {
      int w = t / 32 * 32, lane = t % 32;
      int seg = lane / 16 * 16, sum16 = 0;
      for (int j = 0; j < 16; j++) sum16 += h[w + seg + j];
      CHECK(r[t * 4 + 0] == sum16, "partial xor t=%d: %d != %d", t, r[t * 4 + 0], sum16);
#ifdef MEGAPATCH_CUDA_EMULATOR
      if (lane == 0) {
        // shfl_down: a source lane past the warp's end leaves the caller's value (on a GPU that
        // lane is inactive and the value undefined)
        int lanes = t < 32 ? 32 : 16;
        std::vector<int> d(h.begin() + w, h.begin() + w + lanes);
        for (int off = 16; off > 0; off >>= 1) {
          std::vector<int> nd(d);
          for (int l = 0; l < lanes; l++) nd[l] = d[l] + (l + off < lanes ? d[l + off] : d[l]);
          d = nd;
        }
        CHECK(r[t * 4 + 1] == d[0], "partial down t=%d: %d != %d", t, r[t * 4 + 1], d[0]);
      }
#endif
      unsigned want = t < 32 ? 0xffffffffu : 0xffffu;
      CHECK(static_cast<unsigned>(r[t * 4 + 2]) == want, "partial ballot t=%d: %08x", t, r[t * 4 + 2]);
      CHECK(r[t * 4 + 3] == h[47 - t], "partial shared t=%d", t);
    }
  }

  {  // dynamic shared memory
    const int blocks = 3, threads = 96;
    std::vector<float> h(blocks * threads);
    for (size_t i = 0; i < h.size(); i++) h[i] = static_cast<float>(i) * 0.5f;
    DevBuf<float> in(h.size()), out(h.size());
    DevBuf<unsigned> first(blocks);
    in.put(h);
    MP_LAUNCH(dyn_smem, blocks, threads, threads * sizeof(float), stream, in.p, out.p, first.p);
    LAUNCH_OK("dyn_smem");
    std::vector<float> r = out.get();
    for (int b = 0; b < blocks; b++)
      for (int t = 0; t < threads; t++)
        CHECK(r[b * threads + t] == h[b * threads + threads - 1 - t] * 2.0f, "dyn_smem b=%d t=%d", b, t);
#ifdef MEGAPATCH_CUDA_EMULATOR
    std::vector<unsigned> fw = first.get();
    for (int b = 0; b < blocks; b++) CHECK(fw[b] == 0xCDCDCDCDu, "smem garbage fill b=%d: %08x", b, fw[b]);
#endif
  }

  {  // atomics from many blocks
    const int blocks = 40, threads = 96, n = blocks * threads;
    DevBuf<int> i(8), seen(2);
    DevBuf<unsigned> u(8);
    DevBuf<unsigned long long> ull(4);
    DevBuf<float> f(2);
    DevBuf<double> d(1);
    DevBuf<long long> ll(2);
    i.put({0, 0, -1, 1, 0, -1, 0, 0});
    u.put({0, 0, 0xffffffffu, 0, 0xffffffffu, 0, 0, 0});
    MP_LAUNCH(atomics, blocks, threads, 0, stream, i.p, u.p, ull.p, f.p, d.p, ll.p, seen.p);
    LAUNCH_OK("atomics");
    std::vector<int> ri = i.get(), rs = seen.get();
    std::vector<unsigned> ru = u.get();
    std::vector<unsigned long long> rull = ull.get();
    std::vector<float> rf = f.get();
    std::vector<double> rd = d.get();
    std::vector<long long> rll = ll.get();
    CHECK(ri[0] == n && ri[1] == -2 * n && ri[2] == n - 1 && ri[3] == -(n - 1) && ri[4] == 3 * n,
          "int atomics %d %d %d %d %d", ri[0], ri[1], ri[2], ri[3], ri[4]);
    CHECK(ri[5] >= 0 && ri[5] < n && rs[0] == 1 && rs[1] == n - 1, "atomicExch %d %d %d", ri[5], rs[0], rs[1]);
    CHECK(ru[0] == 2u * n && ru[1] == 0xffffffffu && ru[2] == 0xffff0000u && ru[3] == 7u * (n - 1) && ru[4] == 5u,
          "unsigned atomics %u %08x %08x %u %u", ru[0], ru[1], ru[2], ru[3], ru[4]);
    CHECK(rull[0] == (static_cast<unsigned long long>(n) << 33) &&
              rull[1] == (static_cast<unsigned long long>(n - 1) << 40) && rull[2] == 77,
          "u64 atomics");
    CHECK(rf[0] == 0.5f * n && rf[1] == 1.5f && rd[0] == 0.25 * n, "float atomics %g %g %g", rf[0], rf[1], rd[0]);
    CHECK(rll[0] == -static_cast<long long>(n - 1) * 1000000000ll && rll[1] == static_cast<long long>(n - 1) * 1000000000ll,
          "long long atomics");
  }

  {  // 3-D grid of 3-D blocks
    dim3 grid(3, 4, 5), block(4, 2, 3);
    unsigned nb = 3 * 4 * 5, nt = 4 * 2 * 3;
    DevBuf<unsigned> out(nb * nt * 4);
    MP_LAUNCH(grid3d, grid, block, 0, stream, out.p);
    LAUNCH_OK("grid3d");
    std::vector<unsigned> r = out.get();
    for (unsigned bz = 0; bz < 5; bz++)
      for (unsigned by = 0; by < 4; by++)
        for (unsigned bx = 0; bx < 3; bx++)
          for (unsigned tz = 0; tz < 3; tz++)
            for (unsigned ty = 0; ty < 2; ty++)
              for (unsigned tx = 0; tx < 4; tx++) {
                unsigned i = ((bz * 4 + by) * 3 + bx) * nt + (tz * 2 + ty) * 4 + tx;
                CHECK(r[i * 4 + 0] == (bx | (by << 8) | (bz << 16)), "blockIdx at %u", i);
                CHECK(r[i * 4 + 1] == (tx | (ty << 8) | (tz << 16)), "threadIdx at %u", i);
                CHECK(r[i * 4 + 2] == (3u | (4u << 8) | (5u << 16)), "gridDim at %u", i);
                CHECK(r[i * 4 + 3] == (4u | (2u << 8) | (3u << 16) | (32u << 24)), "blockDim at %u", i);
              }
  }

  {  // a template kernel launched through a pointer, grid-stride loop
    const int n = 1000;
    std::vector<float> h(n);
    for (int k = 0; k < n; k++) h[k] = static_cast<float>(k);
    DevBuf<float> x(n);
    x.put(h);
    auto k = scale<float>;
    MP_LAUNCH(k, mpc::grid_for(n), mpc::kThreads, 0, stream, x.p, 3.0, n);  // 3.0 converts to float
    LAUNCH_OK("scale<float>");
    std::vector<float> r = x.get();
    for (int j = 0; j < n; j++) CHECK(r[j] == 3.0f * j, "scale at %d", j);
  }

  {  // intrinsics
    DevBuf<float> f(16);
    DevBuf<unsigned> u(8);
    DevBuf<int> s(16);
    MP_LAUNCH(intrinsics, 2, 32, 0, stream, f.p, u.p, s.p);
    LAUNCH_OK("intrinsics");
    std::vector<float> rf = f.get();
    std::vector<unsigned> ru = u.get();
    std::vector<int> rs = s.get();
    CHECK(ru[0] == 0x3f800000u && rf[0] == 3.14159274f && rs[0] == static_cast<int>(0xc0000000u) && rf[1] == 0.5f,
          "float bit casts");
    CHECK(rs[1] == 0x3ff00000 && rf[2] == 2.0f, "double bit casts");
    CHECK(rs[2] == 2 && rs[3] == -4 && rs[4] == -3 && ru[1] == 8u, "float2int %d %d %d %u", rs[2], rs[3], rs[4], ru[1]);
    CHECK(rf[3] == 1.0f && rf[4] == 0.0f && rf[5] == 0.25f && rf[6] == 0.125f && rf[7] == 4.0f && rf[8] == 0.5f &&
              rf[9] == 7.0f,
          "float intrinsics");
    CHECK(std::fabs(rf[10] - 10.0f) < 1e-5f, "fast math %g", rf[10]);
    float want11 = std::exp(1.0f) + std::log(2.0f) + std::erf(0.5f) + std::tanh(0.5f);
    CHECK(std::fabs(rf[11] - want11) < 1e-5f, "math %g %g", rf[11], want11);
    CHECK(rf[12] == 2.0f, "rsqrt(double)");
    CHECK(ru[2] == 0x80000000u && ru[3] == 3u && ru[4] == 5u, "brev/umulhi %08x %u %u", ru[2], ru[3], ru[4]);
    CHECK(rs[5] == -8, "mulhi %d", rs[5]);
    CHECK(rs[6] == 8 + 100 * 40 && rs[7] == 500 && rs[8] == 31 + 3200 && rs[9] == 2, "bit counts %d %d %d", rs[6],
          rs[7], rs[8]);
    CHECK(rf[13] == 1.0f && rf[14] == 1.0f, "isnan/isinf");
  }

  {  // a stack frame of a variadic call with doubles
    DevBuf<char> out(64 * 8);
    MP_LAUNCH(formatting, 1, 64, 0, stream, out.p);
    LAUNCH_OK("formatting");
    std::vector<char> r = out.get();
    for (int t = 0; t < 64; t++) {
      char want[16];
      std::snprintf(want, sizeof want, "%04.1f", 1.5 * t);
      CHECK(std::string(&r[t * 8]) == want, "formatting t=%d: %s != %s", t, &r[t * 8], want);
    }
  }

  {  // invalid configurations
    DevBuf<int> out(4);
    MP_LAUNCH(empty_kernel, 1, 2048, 0, stream, 0);
    cudaError_t e = cudaGetLastError();
    CHECK(e == cudaErrorInvalidConfiguration, "2048 threads: %s", cudaGetErrorString(e));
    CHECK(cudaGetLastError() == cudaSuccess, "the error was not cleared");
    MP_LAUNCH(empty_kernel, dim3(1, 0, 1), 32, 0, stream, 0);
    e = cudaGetLastError();
    CHECK(e == cudaErrorInvalidConfiguration, "grid.y 0: %s", cudaGetErrorString(e));
    MP_LAUNCH(empty_kernel, 1, 32, 300 * 1024, stream, 0);
    e = cudaGetLastError();
    CHECK(e == cudaErrorInvalidConfiguration || e == cudaErrorInvalidValue, "300 KB smem: %s", cudaGetErrorString(e));
  }

  {  // named barriers: independent halves, then a producer's bar.arrive and a consumer's bar.sync
    DevBuf<int> out(384);
    MP_LAUNCH(named_barriers, 2, 256, 0, stream, out.p);
    LAUNCH_OK("named_barriers");
    const std::vector<int> h = out.get();
    for (int t = 0; t < 128; t++) {
      CHECK(h[t] == (t + 1) % 128, "half 0, thread %d: %d", t, h[t]);
      CHECK(h[128 + t] == 128 + (t + 2) % 128, "half 1, thread %d: %d", t, h[128 + t]);
      CHECK(h[256 + t] == 1000 + 127 - t, "consumer thread %d: %d", t, h[256 + t]);
    }
  }

#ifdef MEGAPATCH_CUDA_EMULATOR
  {  // emulator faults: reported, and the next launch runs normally
    DevBuf<int> out(256);
    MP_LAUNCH(divergent_exit, 2, 64, 0, stream, out.p);
    CHECK(cudaPeekAtLastError() == cudaErrorLaunchFailure, "divergent exit not reported");
    std::string msg = last_error_text();
    CHECK(msg.find("divergent __syncthreads in block (0,0,0)") != std::string::npos, "message: %s", msg.c_str());
    CHECK(cudaGetLastError() == cudaSuccess, "the fault was not cleared");

    MP_LAUNCH(divergent_sites, 1, 64, 0, stream, out.p);
    msg = last_error_text();
    CHECK(msg.find("divergent __syncthreads") != std::string::npos, "message: %s", msg.c_str());

    MP_LAUNCH(divergent_shfl, 1, 64, 0, stream, out.p);
    msg = last_error_text();
    CHECK(msg.find("divergent __shfl_sync") != std::string::npos, "message: %s", msg.c_str());

    MP_LAUNCH(named_deadlock, 1, 128, 0, stream, out.p);
    msg = last_error_text();
    CHECK(msg.find("named barrier 5 in block (0,0,0): 64 of 128 threads arrived") != std::string::npos,
          "message: %s", msg.c_str());

    {  // the scheduling order: thread 0 first, or (MEGAPATCH_CUDA_EMU_SCHEDULE=reverse) last
      MP_LAUNCH(unsynchronised, 1, 64, 16, stream, out.p);
      LAUNCH_OK("unsynchronised");
      CHECK(out.get()[0] == 7, "usual order: %d", out.get()[0]);
      setenv("MEGAPATCH_CUDA_EMU_SCHEDULE", "reverse", 1);
      MP_LAUNCH(unsynchronised, 1, 64, 16, stream, out.p);
      unsetenv("MEGAPATCH_CUDA_EMU_SCHEDULE");
      LAUNCH_OK("unsynchronised, reversed");
      CHECK(out.get()[0] != 7, "reversed order: thread 1 ran after thread 0");
    }

    {  // the priority schedule: a warp runs ahead of the lower-ranked one; the ranks vary by seed
      auto steps = [&](const char* schedule) {
        if (schedule) setenv("MEGAPATCH_CUDA_EMU_SCHEDULE", schedule, 1);
        cudaMemset(out.p, 0, 9 * sizeof(int));
        MP_LAUNCH(warp_steps, 1, 64, 0, stream, out.p);
        unsetenv("MEGAPATCH_CUDA_EMU_SCHEDULE");
        LAUNCH_OK(schedule ? schedule : "warp_steps");
        std::vector<int> r = out.get();
        std::string log;
        for (int i = 1; i <= 8; i++) log += char('0' + r[i]);
        return log;
      };
      CHECK(steps(nullptr) == "01010101", "usual order: %s", steps(nullptr).c_str());
      CHECK(steps("reverse") == "10101010", "reversed: %s", steps("reverse").c_str());
      bool first0 = false, first1 = false;
      for (int seed = 1; seed <= 16; seed++) {
        std::string name = "priority:" + std::to_string(seed), log = steps(name.c_str());
        first0 = first0 || log == "00001111";
        first1 = first1 || log == "11110000";
      }
      CHECK(first0 && first1, "priority schedules: warp 0 all first in some, warp 1 in others (%d, %d)", first0,
            first1);
      const std::string plain = steps("priority");
      CHECK(plain == "00001111" || plain == "11110000" || plain.size() == 8, "priority without a seed: %s",
            plain.c_str());
      setenv("MEGAPATCH_CUDA_EMU_SCHEDULE", "priority:x", 1);
      MP_LAUNCH(warp_steps, 1, 64, 0, stream, out.p);
      unsetenv("MEGAPATCH_CUDA_EMU_SCHEDULE");
      msg = last_error_text();
      CHECK(msg.find("MEGAPATCH_CUDA_EMU_SCHEDULE=priority:x is not a schedule") != std::string::npos, "message: %s",
            msg.c_str());
    }

    {  // setmaxnreg: the counts, and the warpgroups' sum against the block's registers
      DevBuf<int> regs_out(384);
      MP_LAUNCH(register_split, 2, 384, 0, stream, regs_out.p, 40, 232);  // 128 (40 + 2 * 232) = 384 * 168
      LAUNCH_OK("register_split 40 / 232");
      MP_LAUNCH(register_split, 1, 384, 0, stream, regs_out.p, 40, 240);
      msg = last_error_text();
      CHECK(msg.find("the warpgroups hold 66560 registers, the block has 64512") != std::string::npos, "message: %s",
            msg.c_str());
      MP_LAUNCH(register_split, 1, 384, 0, stream, regs_out.p, 44, 232);
      msg = last_error_text();
      CHECK(msg.find("setmaxnreg.dec 44: a multiple of 8") != std::string::npos, "message: %s", msg.c_str());
      MP_LAUNCH(register_split, 1, 384, 0, stream, regs_out.p, 40, 160);
      msg = last_error_text();
      CHECK(msg.find("setmaxnreg.inc 160: the warpgroup holds 168 registers") != std::string::npos, "message: %s",
            msg.c_str());
      MP_LAUNCH(register_half, 1, 128, 0, stream, regs_out.p);
      msg = last_error_text();
      CHECK(msg.find("64 of warpgroup 0's 128 threads asked for 40 registers") != std::string::npos, "message: %s",
            msg.c_str());
    }

    MP_LAUNCH(named_bad_count, 1, 64, 0, stream, out.p);
    msg = last_error_text();
    CHECK(msg.find("bar.sync: thread count 48 (a multiple of 32") != std::string::npos, "message: %s", msg.c_str());

    MP_LAUNCH(trapping, 3, 32, 0, stream, out.p);
    msg = last_error_text();
    CHECK(msg.find("__trap in block (1,0,0), thread (3,0,0)") != std::string::npos, "message: %s", msg.c_str());

    MP_LAUNCH(throwing, 1, 8, 0, stream, out.p);
    msg = last_error_text();
    CHECK(msg.find("C++ exception thrown by a kernel in block (0,0,0), thread (4,0,0)") != std::string::npos,
          "message: %s", msg.c_str());

    DevBuf<int> in(256), red(1);
    std::vector<int> ones(256, 1);
    in.put(ones);
    MP_LAUNCH(block_reduce, 1, 256, 0, stream, in.p, red.p, 1000);
    LAUNCH_OK("block_reduce after faults");
    CHECK(red.get()[0] == 256, "block_reduce after faults");
  }
  {  // launches from several OS threads serialize; the sticky error is per thread
    std::atomic<int> bad{0};
    auto worker = [&](int id) {
      std::vector<int> ones(512, id + 1);
      int *in = nullptr, *red = nullptr;
      if (cudaMalloc(&in, 512 * sizeof(int)) || cudaMalloc(&red, 2 * sizeof(int))) bad++;
      cudaMemcpy(in, ones.data(), 512 * sizeof(int), cudaMemcpyHostToDevice);
      for (int r = 0; r < 20; r++) {
        if (id == 0 && r == 10) MP_LAUNCH(divergent_exit, 1, 64, 0, nullptr, in);  // fault on thread 0
        if (id == 0 && r == 10 && cudaGetLastError() != cudaErrorLaunchFailure) bad++;
        MP_LAUNCH(block_reduce, 2, 256, 0, nullptr, in, red, 1000);
        if (cudaGetLastError() != cudaSuccess) bad++;
        int h[2];
        cudaMemcpy(h, red, sizeof h, cudaMemcpyDeviceToHost);
        if (h[0] != 256 * (id + 1) || h[1] != 256 * (id + 1)) bad++;
        if (id == 0 && r == 10) cudaMemcpy(in, ones.data(), 512 * sizeof(int), cudaMemcpyHostToDevice);
      }
      cudaFree(in);
      cudaFree(red);
    };
    std::thread a(worker, 0), b(worker, 1), c(worker, 2);
    a.join();
    b.join();
    c.join();
    CHECK(bad.load() == 0, "concurrent launches: %d failures", bad.load());
  }
  {  // runtime API
    int x;
    CHECK(cudaFree(&x) == cudaErrorInvalidValue, "cudaFree of an unknown pointer");
    CHECK(cudaGetLastError() == cudaErrorInvalidValue, "the API error is the last error");
    CUDA_OK(cudaFree(nullptr));
    size_t free0, total, free1;
    CUDA_OK(cudaMemGetInfo(&free0, &total));
    void* p;
    CUDA_OK(cudaMalloc(&p, 1 << 20));
    CUDA_OK(cudaMemGetInfo(&free1, &total));
    CHECK(free0 - free1 == (1 << 20) && total == (size_t(16) << 30), "cudaMemGetInfo");
    CHECK((reinterpret_cast<uintptr_t>(p) & 255) == 0, "cudaMalloc alignment");
    CHECK(static_cast<unsigned char*>(p)[100] == 0xCD, "cudaMalloc garbage fill");
    CHECK(cudaMemcpy(p, &x, (1 << 20) + 1, cudaMemcpyHostToDevice) == cudaErrorInvalidValue, "copy past the end");
    cudaGetLastError();
    CUDA_OK(cudaFree(p));
    CHECK(cudaSetDevice(ndev) == cudaErrorInvalidDevice, "cudaSetDevice out of range");
    cudaGetLastError();
    CUDA_OK(cudaSetDevice(ndev - 1));
    int dev = -1;
    CUDA_OK(cudaGetDevice(&dev));
    CHECK(dev == ndev - 1, "cudaGetDevice");
    if (ndev > 1) {  // a stream of another device
      MP_LAUNCH(empty_kernel, 1, 32, 0, stream, 0);
      CHECK(cudaGetLastError() == cudaErrorInvalidResourceHandle, "stream of another device");
    }
    CUDA_OK(cudaSetDevice(0));
  }
#endif

  {  // cost of launches (printed, not checked)
    cudaEvent_t e0, e1;
    CUDA_OK(cudaEventCreate(&e0));
    CUDA_OK(cudaEventCreate(&e1));
    DevBuf<int> out(256);
    // best of 5 rounds of 100 launches (the machine may be busy)
    const int reps = 100;
    float ms_empty = 1e30f, ms_bar = 1e30f, ms = 0;
    MP_LAUNCH(empty_kernel, 1, 256, 0, stream, 0);
    for (int round = 0; round < 5; round++) {
      CUDA_OK(cudaEventRecord(e0, stream));
      for (int r = 0; r < reps; r++) MP_LAUNCH(empty_kernel, 1, 256, 0, stream, r);
      CUDA_OK(cudaEventRecord(e1, stream));
      CUDA_OK(cudaEventSynchronize(e1));
      LAUNCH_OK("empty_kernel");
      CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
      ms_empty = ms < ms_empty ? ms : ms_empty;
      CUDA_OK(cudaEventRecord(e0, stream));
      for (int r = 0; r < reps; r++) MP_LAUNCH(barrier_kernel, 1, 256, 0, stream, out.p);
      CUDA_OK(cudaEventRecord(e1, stream));
      CUDA_OK(cudaEventSynchronize(e1));
      LAUNCH_OK("barrier_kernel");
      CUDA_OK(cudaEventElapsedTime(&ms, e0, e1));
      ms_bar = ms < ms_bar ? ms : ms_bar;
    }
    std::vector<int> r = out.get();
    for (int t = 0; t < 256; t++) CHECK(r[t] == ((t + 4) & 255), "barrier_kernel t=%d: %d", t, r[t]);
    std::printf("launch of one 256-thread block: empty %.1f us, with 8 __syncthreads %.1f us\n",
                1000.0 * ms_empty / reps, 1000.0 * ms_bar / reps);
    CUDA_OK(cudaEventDestroy(e0));
    CUDA_OK(cudaEventDestroy(e1));
  }

  CUDA_OK(cudaStreamDestroy(stream));
  std::printf("ok %d checks\n", g_checks);
  return 0;
}
