"""Fast path of :mod:`methods.vispruner`: the selection after the similarity GEMM in one CUDA kernel.

After one torch sort of the similarity rows, the score ranking and every de-duplication round that
torch's CUDA sort ranks stably (those sorting more than 32 maxima; the last few at small budgets run in
torch, :func:`methods.vispruner.handover_length`) run in one kernel compiled with NVRTC (one block per image, the list and the first
entries of every sorted row in shared memory, two block barriers a round). ``results/selection_overhead.csv``
(H100, graph replay, B=1, extras + reduce): 0.248 / 0.276 / 0.293 ms at 192 / 128 / 64 kept, against
1.614 / 1.855 / 2.019 ms for the torch rounds (4 kernels a round); at 576 -> 64 the kernel is 166 us of
the selection's 199 us of device time (``results/profile_selection_h100.csv``), about 2.6 us for each of
the 64 rounds. (Two Triton versions of the rounds, kept for comparison until issue 22, were slower at
every measured batch and budget, 0.83-2.52 ms, and are gone.)
"""

from __future__ import annotations

import torch

_CUDA_SRC = r"""
#if KEY16
typedef unsigned short vbits_t;   // fp16 / bf16 similarity bits
typedef unsigned int ent_t;       // cached row entry: (key + 2^15) << 16 | token id
#else
typedef unsigned int vbits_t;     // fp32 similarity bits
typedef unsigned long long ent_t; // key << 32 | token id
#endif
#if SCORE16
typedef unsigned short sbits_t;
#else
typedef unsigned int sbits_t;
#endif
#if KEY16 && SCORE16
typedef unsigned int word_t;      // rank word: (key + 2^15) << 15 | (32767 - position), never 0
#else
typedef unsigned long long word_t; // rank word: (key + 2^31) << 32 | (2^32 - 1 - position), never 0
#endif
// NT: threads per block (defined by cuda_source from _CUDA_THREADS, the launch's block size)
// launch shape, picked on the H100 at 576 -> 64 (graph replay) from CH 4/8/16, rank spreads 1/2/4/8
// (2: 0.02-0.05 ms faster than 4 on the same machine) and FILL 4/8/16 (within the noise)
#define CH 4                      // sorted-row entries a thread reads per pass (a multiple of 4: 16-byte loads)
#define RANK_SPREAD 2             // rank_all gives a word at most NT / (RANK_SPREAD * m) threads
#define FILL 8                    // cached entries a thread loads at once
#define NONE 0x7fffffff

// an order-preserving integer of a float's bits: -0 == +0, NaN above every number (torch's sort)
__device__ __forceinline__ int key16(unsigned short v, int inf_bits) {
  const int s = (short)v, mag = s & 0x7fff;
  if (mag > inf_bits) return 0x7fff;
  if (mag == 0) return 0;
  return s < 0 ? (s ^ 0x7fff) : s;
}
__device__ __forceinline__ int key32(unsigned int v) {
  const int s = (int)v, mag = s & 0x7fffffff;
  if (mag > 0x7f800000) return 0x7fffffff;
  if (mag == 0) return 0;
  return s < 0 ? (s ^ 0x7fffffff) : s;
}
__device__ __forceinline__ int sim_key(vbits_t v) {
#if KEY16
  return key16(v, INF_BITS);
#else
  return key32(v);
#endif
}
__device__ __forceinline__ int score_key(sbits_t v) {
#if SCORE16
  return key16(v, SCORE_INF_BITS);
#else
  return key32(v);
#endif
}
// ordered by key, then by the lower position
__device__ __forceinline__ word_t rank_word(int key, int pos) {
#if KEY16 && SCORE16
  return ((word_t)(key + 32768) << 15) | (word_t)(32767 - pos);
#else
  return ((word_t)(unsigned int)(key ^ 0x80000000) << 32) | (word_t)(0xffffffffu - (unsigned int)pos);
#endif
}
__device__ __forceinline__ ent_t entry(int key, int id) {
#if KEY16
  return ((ent_t)(key + 32768) << 16) | (ent_t)id;
#else
  return ((ent_t)(unsigned int)key << 32) | (ent_t)(unsigned int)id;
#endif
}
__device__ __forceinline__ int entry_id(ent_t e) {
#if KEY16
  return (int)(e & 0xffffu);
#else
  return (int)(unsigned int)e;
#endif
}
__device__ __forceinline__ int entry_key(ent_t e) {
#if KEY16
  return (int)(e >> 16) - 32768;
#else
  return (int)(unsigned int)(e >> 32);
#endif
}

#define PER_VEC (16 / (int)sizeof(word_t))  // rank words per 16-byte shared load
#define PAD(m) (((m) + PER_VEC - 1) / PER_VEC * PER_VEC)

// log2 of the threads a work item gets: the count of k in 0..4 with (spread << k) * m <= NT (NT = 2^LOG_NT),
// in closed form and without a division (every warp computes it every round)
__device__ __forceinline__ int group_log2(int spread, int m) {
  const int x = spread * m;  // (x << k) <= 2^LOG_NT  <=>  k <= LOG_NT - ceil(log2(x))
  return x <= NT ? min(5, LOG_NT + 1 - (32 - __clz(x - 1))) : 0;
}

// rank of every word of words[0 .. m) among them (the count of larger words), G threads a word:
// calls fn(i, rank) once per word (lane 0 of its group). words is padded with zeros to PAD(m)
template <class F>
__device__ __forceinline__ void rank_all(const word_t* words, int m, int tid, F fn) {
  const int lg = group_log2(RANK_SPREAD, m);
  const int G = 1 << lg, lane = tid & (G - 1), mv = (m + PER_VEC - 1) / PER_VEC;
  const uint4* wv = (const uint4*)words;
  for (int base = 0; base < m * G; base += NT) {
    if (base + (tid & ~31) >= m * G) break;  // a warp with no word left: nothing to count or shuffle
    const int i = (base + tid) >> lg;
    const word_t w = i < m ? words[i] : 0;
    int cnt = 0;
    if (i < m) {
#pragma unroll 4
      for (int j = lane; j < mv; j += G) {
        const uint4 q = wv[j];
#if KEY16 && SCORE16
        cnt += (q.x > w) + (q.y > w) + (q.z > w) + (q.w > w);
#else
        cnt += ((((word_t)q.y << 32) | q.x) > w) + ((((word_t)q.w << 32) | q.z) > w);
#endif
      }
    }
    for (int o = 1; o < G; o <<= 1) cnt += __shfl_xor_sync(0xffffffffu, cnt, o);
    if (i < m && lane == 0) fn(i, cnt);
  }
}

extern "C" __global__ void __launch_bounds__(NT) vispruner_select(
    const sbits_t* __restrict__ score, const vbits_t* __restrict__ vals, const long long* __restrict__ order,
    long long* __restrict__ out, int n, int n_imp, int n_div, int step, int K) {
  // score: (B, n); vals / order: (B, n, n) similarity rows sorted descending and their token ids;
  // out: (B, n_imp + n_div) the important token ids, ascending, then the residual list after the rounds
  // that bring it down to n_div tokens, in list order. The residual list (tokens ranked n_imp on by
  // score) holds slots: positions in that ranking. Shared memory (16-byte multiples): the first K
  // entries of every slot's sorted row (stride K plus a 16-byte pad against bank conflicts), the rank
  // words, the list's double buffer, the slots' token ids, the stamps (token t is in a round's odd set
  // iff stamp[t] == mark; marks only grow, so no round clears them) and the kept flags
  extern __shared__ __align__(16) unsigned char smem[];
  const int r0 = n - n_imp;
  const int ks = K > 0 ? K + 16 / (int)sizeof(ent_t) : 0;
  ent_t* cache = (ent_t*)smem;
  word_t* words = (word_t*)(cache + r0 * ks);
  int* buf = (int*)(words + PAD(n));
  int* tok = buf + 2 * r0;
  int* stamp = tok + r0;
  int* kept = stamp + n;
  int* wsum = kept + n;
  const long long b = blockIdx.x;
  score += b * n;
  vals += b * n * n;
  order += b * n * n;
  out += b * (n_imp + n_div);
  const int tid = threadIdx.x;
  // 0. the score ranking (descending, ties to the lower index: a stable argsort): the first n_imp are
  //    kept, the rest is the residual list in that order (round 0's odd set: its odd positions)
  for (int t = tid; t < PAD(n); t += NT) {
    words[t] = t < n ? rank_word(score_key(score[t]), t) : 0;
    if (t < n) {
      kept[t] = 0;
      stamp[t] = 0;
    }
  }
  __syncthreads();
  rank_all(words, n, tid, [&](int t, int rk) {
    if (rk < n_imp) {
      kept[t] = 1;
    } else {
      tok[rk - n_imp] = t;
      buf[rk - n_imp] = rk - n_imp;
      if ((rk - n_imp) & 1) stamp[t] = 1;
    }
  });
  __syncthreads();
  const int kshift = K > 0 ? __ffs(K) - 1 : 0;  // K: a power of two (or 0)
  // the cache fill, FILL entries a thread at a time: their global loads are all in flight together
  // (one at a time, the fill is a chain of dependent L2 round trips)
  for (int i0 = 0; i0 < r0 * K; i0 += NT * FILL) {
    vbits_t v[FILL];
    long long o[FILL];
#pragma unroll
    for (int u = 0; u < FILL; ++u) {
      const int i = i0 + u * NT + tid, s = i >> kshift, p = i - (s << kshift);
      const bool ok = i < r0 * K && p < n;
      const long long at = ok ? (long long)tok[s] * n + p : 0;
      v[u] = ok ? vals[at] : (vbits_t)0;
      o[u] = ok ? order[at] : 0;
    }
#pragma unroll
    for (int u = 0; u < FILL; ++u) {
      const int i = i0 + u * NT + tid, s = i >> kshift, p = i - (s << kshift);
      if (i < r0 * K) cache[s * ks + p] = p < n ? entry(sim_key(v[u]), (int)o[u]) : (ent_t)0;
    }
  }
  __syncthreads();
  int length = r0, cur = 0, mark = 1;
  while (n_div > 0) {
    const int r = min(step, length - n_div);
    if (r <= 0) break;
    const int* src = buf + cur * r0;
    int* dst = buf + (cur ^ 1) * r0;
    const int ne = (length + 1) >> 1, no = length >> 1, n_surv = max(ne - r, 0);
    // 1. an even token's best similarity to the odd set: the first odd-set token of its sorted row
    //    (the cached prefix first, then global memory for groups without a hit there). G threads per
    //    even token (a power of two <= 32: a group is inside one warp) read G * CH entries a pass; the
    //    hit with the lowest position is the one
    const int lg = group_log2(2, ne);
    const int G = 1 << lg, lane = tid & (G - 1);
    for (int base = 0; base < ne * G; base += NT) {
      if (base + (tid & ~31) >= PAD(ne) * G) break;  // a warp past the (padded) evens: no word to write
      const int i = (base + tid) >> lg;
      bool done = i >= ne;
      const int s = done ? 0 : src[2 * i];
      int hit = NONE, key = 0;
      bool cached = K > 0;
      for (int p0 = lane * CH;;) {
        if (!done && p0 < (cached ? K : n)) {
          ent_t ents[CH];
          if (cached) {
#if KEY16
            const uint4* cv = (const uint4*)(cache + s * ks + p0);
#pragma unroll
            for (int v = 0; v < CH / 4; ++v) {
              const uint4 u = cv[v];
              ents[4 * v] = u.x;
              ents[4 * v + 1] = u.y;
              ents[4 * v + 2] = u.z;
              ents[4 * v + 3] = u.w;
            }
#else
#pragma unroll
            for (int c = 0; c < CH; ++c) ents[c] = cache[s * ks + p0 + c];
#endif
          } else {
            const long long row = (long long)tok[s] * n;
#pragma unroll
            for (int c = 0; c < CH; ++c)
              ents[c] = p0 + c < n ? entry(sim_key(vals[row + p0 + c]), (int)order[row + p0 + c]) : (ent_t)0;
          }
#pragma unroll
          for (int c = CH - 1; c >= 0; --c) {
            if (p0 + c < n && stamp[entry_id(ents[c])] == mark) {
              hit = p0 + c;
              key = entry_key(ents[c]);
            }
          }
        }
#if KEY16
        {  // (position, key) in one word: one shuffle a step (positions < 2^15, NONE the largest word)
          unsigned int hk = hit == NONE ? 0xffffffffu : ((unsigned int)hit << 16) | (unsigned int)(key + 32768);
          for (int o = 1; o < G; o <<= 1) hk = min(hk, __shfl_xor_sync(0xffffffffu, hk, o));
          hit = hk == 0xffffffffu ? NONE : (int)(hk >> 16);
          key = (int)(hk & 0xffffu) - 32768;
        }
#else
        for (int o = 1; o < G; o <<= 1) {
          const int h2 = __shfl_xor_sync(0xffffffffu, hit, o);
          const int k2 = __shfl_xor_sync(0xffffffffu, key, o);
          if (h2 < hit) {
            hit = h2;
            key = k2;
          }
        }
#endif
        if (hit != NONE) done = true;
        if (__all_sync(0xffffffffu, done)) break;
        p0 += G * CH;  // a pass starts at the same position in every group of the warp
        if (cached && p0 - lane * CH >= K) {  // the whole cached prefix read: on from K in global memory
          cached = false;
          p0 = K + lane * CH;
        }
      }
      if (lane == 0 && i < PAD(ne)) words[i] = i < ne ? rank_word(key, i) : 0;
    }
    __syncthreads();
    // 2. rank among the evens (higher similarity first, then the earlier position), write the survivors
    //    from rank r on and the odd tokens after them, stamping the next round's odd set
    rank_all(words, ne, tid, [&](int i, int rk) {
      const int q = rk - r;
      if (q >= 0) {
        const int s = src[2 * i];
        dst[q] = s;
        if (q & 1) stamp[tok[s]] = mark + 1;
      }
    });
    for (int j = tid; j < no; j += NT) {
      const int s = src[2 * j + 1];
      dst[n_surv + j] = s;
      if ((n_surv + j) & 1) stamp[tok[s]] = mark + 1;
    }
    __syncthreads();
    length = n_surv + no;
    cur ^= 1;
    ++mark;
  }
  // 3. the residual list (n_div tokens now) in its order after the important tokens, which go first in
  //    index order (a block-wide prefix sum over their flags): torch runs the rounds left from here
  for (int i = tid; i < n_div; i += NT) out[n_imp + i] = tok[buf[cur * r0 + i]];
  __syncthreads();
  const int warp = tid >> 5, wl = tid & 31;
  int before = 0;
  for (int c0 = 0; c0 < n; c0 += NT) {
    const int t = c0 + tid;
    const bool f = t < n && kept[t];
    const unsigned int bal = __ballot_sync(0xffffffffu, f);
    if (wl == 0) wsum[warp] = __popc(bal);
    __syncthreads();
    int pre = 0, tot = 0;
    for (int w = 0; w < NT / 32; ++w) {
      const int v = wsum[w];
      pre += w < warp ? v : 0;
      tot += v;
    }
    if (f) out[before + pre + __popc(bal & ((1u << wl) - 1))] = t;
    before += tot;
    __syncthreads();
  }
}
"""

#: threads per block of the CUDA kernel (``NT`` in its source, defined from this)
_CUDA_THREADS = 1024
#: most tokens per image the CUDA path takes (its cached row entries hold 16-bit token ids)
CUDA_MAX_N = 32767
_CUDA_KERNELS: dict = {}
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

def cuda_source(sim_dtype: torch.dtype, score_dtype: torch.dtype) -> str:
    """The CUDA C source of :func:`select_cuda`'s kernel for these dtypes (compiled with NVRTC)."""
    if sim_dtype not in _FLOATS or score_dtype not in _FLOATS:
        raise ValueError(f"vispruner cuda: similarities and scores must be float16, bfloat16 or float32, got {sim_dtype}, {score_dtype}")
    inf = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
    defs = f"#define KEY16 {int(sim_dtype in inf)}\n#define INF_BITS {inf.get(sim_dtype, 0):#x}\n"
    defs += f"#define SCORE16 {int(score_dtype in inf)}\n#define SCORE_INF_BITS {inf.get(score_dtype, 0):#x}\n"
    defs += f"#define NT {_CUDA_THREADS}\n#define LOG_NT {_CUDA_THREADS.bit_length() - 1}\n"
    return defs + _CUDA_SRC


def _cuda_kernel(device: torch.device, sim_dtype: torch.dtype, score_dtype: torch.dtype):
    key = (device.index, sim_dtype, score_dtype)
    kern = _CUDA_KERNELS.get(key)
    if kern is None:
        # torch.cuda._compile_kernel: NVRTC from torch's own CUDA libraries, launched on torch's current
        # stream (so a CUDA graph captures it); a private API, hence kernels.available's nvrtc check
        with torch.cuda.device(device):
            kern = torch.cuda._compile_kernel(cuda_source(sim_dtype, score_dtype), "vispruner_select")
        _CUDA_KERNELS[key] = kern
    return kern


def _cuda_smem(n: int, n_imp: int, sim_dtype: torch.dtype, score_dtype: torch.dtype, k: int) -> int:
    """Bytes of shared memory of the kernel (laid out as in its source) with ``k`` cached row entries."""
    ent = 4 if sim_dtype != torch.float32 else 8
    word = 4 if ent == 4 and score_dtype != torch.float32 else 8
    r0 = n - n_imp
    ks = k + 16 // ent if k > 0 else 0
    per_vec = 16 // word
    return r0 * ks * ent + word * (-(-n // per_vec) * per_vec) + 4 * (3 * r0 + 2 * n + 32)


def head_rounds(score: torch.Tensor, sim: torch.Tensor, n_imp: int, n_list: int, step: int) -> torch.Tensor:
    """:func:`methods.vispruner.head_rounds` in one CUDA kernel: ``(B, n_imp + n_list)``, the important tokens
    ascending, then the residual list after the rounds that bring it down to ``n_list`` tokens, in list order.

    ``score`` ``(B, N)``, ``sim`` ``(B, N, N)`` on CUDA (float16 / bfloat16 / float32 each). The kernel ranks
    the scores by integer keys of their bits (ties to the lower index, NaN first), then runs every round on
    the rows of ``sim`` sorted once (descending, one torch sort): an even token's best similarity to the odd
    set is the first odd-set token of its sorted row (a maximum does not depend on the order of ties), and the
    evens are ranked by integer keys of those values, ties to the earlier list position (exact: no arithmetic
    touches them). Both rankings are those of a stable descending sort: what torch's non-stable CUDA
    ``argsort`` (the rule's) does on rows of 33 to 4096 entries (warp merge and block radix sort), not on rows
    of up to 32 (a bitonic network). So the kernel declines ``N <= 32``, and its caller hands the rounds that
    sort 32 or fewer maxima to torch (:func:`methods.vispruner.handover_length`); the GPU tests check the
    kernel against the rule on inputs with exact ties. Compiled at first use per device and dtypes with
    NVRTC; no host synchronisation (CUDA-graph capturable).
    """
    b, n = score.shape
    if n > CUDA_MAX_N or n <= 32:
        return NotImplemented
    kern = _cuda_kernel(sim.device, sim.dtype, score.dtype)
    limit = torch.cuda.get_device_properties(sim.device).shared_memory_per_block_optin
    # the longest cached row prefix that fits (64 entries hold the first odd-set token of almost every row)
    fits = ((k, _cuda_smem(n, n_imp, sim.dtype, score.dtype, k)) for k in (64, 32, 16, 8, 0))
    k, smem = next(((k, m) for k, m in fits if m <= limit), (None, None))
    if k is None:
        raise ValueError(f"vispruner cuda: {n} tokens need more shared memory than the device has")
    vals, order = sim.sort(dim=-1, descending=True)
    out = torch.empty(b, n_imp + n_list, dtype=torch.long, device=sim.device)
    if smem > 48 * 1024:
        kern.set_shared_memory_config(smem)
    kern(grid=(b, 1, 1), block=(_CUDA_THREADS, 1, 1), args=[score.contiguous(), vals, order, out, n, n_imp, n_list, step, k],
         shared_mem=smem, stream=torch.cuda.current_stream(sim.device))
    return out
