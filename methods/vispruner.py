"""VisPruner: important tokens by CLS attention, then diverse tokens by iterative de-duplication.

Paper: https://arxiv.org/abs/2412.01818v2 (ICCV'25, "Beyond Text-Visual Attention"; code:
Theia-4869/VisPruner, ``llava/model/llava_arch.py::encode_images``).

methods.md 1b: important tokens are the top ``int(T * r)`` by the FasterVLM score (head-mean CLS
attention at CLIP layer -2, CLS column dropped). The remaining tokens are processed in score-sorted
order (``argsort(descending)``), not raster: each round splits that list into even and odd positions,
drops the ``min(8, R - T_div)`` even-position tokens with the highest max-cosine to the odd set
(normalised layer -2 patch features, before the projector), and puts the surviving even tokens, in
descending-score order of that argsort, in front of the odd ones for the next round, until
``T - int(T * r)`` remain. Kept tokens reach the LLM in raster order.

Official defects handled here (methods.md policy): it crashes when the residual list has odd length
(``int(T * r)`` odd): the even half then has one more token, which is used as such; and the official
``prepare_inputs`` merges a batch of images into one sequence: every sample is separate here.

Speed: the rounds' count and sizes depend on lengths only (:func:`dedup_rounds`), so nothing syncs with
the host and the selection is CUDA-graph capturable. ``backend="auto"`` is ``cuda`` on CUDA: after the
similarity GEMM and one torch sort of its rows, the whole selection (the score ranking, all rounds, the
sorted kept set) is one CUDA kernel compiled with NVRTC (:func:`select_cuda`; one block per image, the
list and the first entries of every sorted row in shared memory, two block barriers a round).
``results/selection_overhead.csv`` (H100, graph replay, B=1, extras + reduce): 0.248 / 0.276 / 0.293 ms
at 192 / 128 / 64 kept, against 0.835 / 0.996 / 1.579 ms for ``triton_scan``; at 576 -> 64 the kernel is
166 us of the selection's 199 us of device time (``results/profile_selection_h100.csv``), about 2.6 us for
each of the 64 rounds. ``backend="triton_scan"`` / ``"triton"`` run the rounds in one Triton launch each
(the list in global memory: a chain of dependent L2 round trips per round, slower); ``"torch"`` runs them
as a few batched kernels each, 4 kernels a round. Every backend keeps the same tokens (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from bench.errors import ConfigError
from methods.base import PruningMethod, VisionContext


def dedup_rounds(n_res: int, n_div: int, step: int) -> list[int]:
    """Tokens dropped per de-duplication round, from ``n_res`` residual tokens down to ``n_div``.

    A round asks for ``r = min(step, L - n_div)`` and can drop at most the ``ceil(L / 2)`` even-position
    tokens; the count of rounds and their sizes depend on lengths only, never on values.
    """
    out, length = [], n_res
    while n_div > 0:
        r = min(step, length - n_div)
        if r <= 0:
            break
        out.append(r)
        length -= min(r, (length + 1) // 2)
    return out


def dedup_torch(sim: torch.Tensor, res: torch.Tensor, n_div: int, step: int) -> torch.Tensor:
    """The de-duplication rounds on ``(B, N, N)`` similarities: ``(B, R)`` residual list -> ``(B, n_div)`` survivors.

    Batched, fixed shapes per round, no host synchronisation (CUDA-graph capturable). Ties in the
    max-cosine ranking go to the earlier list position (a stable descending sort; the official
    ``argsort`` leaves them to the backend).
    """
    if n_div == 0:
        return res[:, :0]
    bi = torch.arange(res.shape[0], device=res.device).view(-1, 1, 1)
    for r in dedup_rounds(res.shape[1], n_div, step):
        ev, od = res[:, ::2], res[:, 1::2]
        best = sim[bi, ev.unsqueeze(-1), od.unsqueeze(1)].amax(dim=-1)
        survivors = best.sort(dim=-1, descending=True, stable=True).indices[:, r:]
        res = torch.cat([ev.gather(1, survivors), od], dim=1)
    return res


_TRITON_KERNEL = None
_SCAN_KERNEL = None


def _triton_kernel():
    global _TRITON_KERNEL
    if _TRITON_KERNEL is None:
        import triton
        import triton.language as tl

        # lengths as plain int32 (a value of 1 would otherwise be specialised into a constant, and
        # the loop-carried length must keep one type)
        @triton.jit(do_not_specialize=["n", "r0", "n_div", "n_rounds", "step"])
        def _dedup(sim_ptr, res_ptr, buf_ptr, best_ptr, out_ptr, n, r0, n_div, n_rounds, step, BE: tl.constexpr, BO: tl.constexpr):
            # one program per image; the list lives in a double buffer in global memory (a round
            # reads one half and writes the other), the even tokens' best similarities in best_ptr; the
            # survivors go to out_ptr as int64 (res_ptr is int64 too: no conversion kernels around the launch)
            b = tl.program_id(0).to(tl.int64)
            sim = sim_ptr + b * n * n
            buf = buf_ptr + b * 2 * r0
            bestb = best_ptr + b * BE
            ie = tl.arange(0, BE)
            jo = tl.arange(0, BO)
            for c0 in range(0, r0, BE):
                offs = c0 + ie
                tl.store(buf + offs, tl.load(res_ptr + b * r0 + offs, mask=offs < r0).to(tl.int32), mask=offs < r0)
            tl.debug_barrier()
            length = r0
            for it in range(n_rounds):
                src = buf + (it % 2) * r0
                dst = buf + ((it + 1) % 2) * r0
                ne = (length + 1) // 2
                no = length // 2
                r = tl.minimum(step, length - n_div)
                ev_ok = ie < ne
                e = tl.load(src + 2 * ie, mask=ev_ok, other=0).to(tl.int64)
                best = tl.full([BE], float("-inf"), tl.float32)
                for j0 in range(0, no, BO):
                    jj = j0 + jo
                    o_ok = jj < no
                    o = tl.load(src + 2 * jj + 1, mask=o_ok, other=0)
                    t = tl.load(sim + e[:, None] * n + o[None, :], mask=ev_ok[:, None] & o_ok[None, :], other=float("-inf"))
                    best = tl.maximum(best, tl.max(t.to(tl.float32), axis=1))
                tl.store(bestb + ie, best)
                tl.debug_barrier()
                # re-read rather than reuse the loop result: with a float32 ``sim`` (no cast in the
                # loop) a second use trips Triton 3.6's OptimizeThreadLocality pass (hasOneUse assert)
                best = tl.load(bestb + ie)
                # rank among the evens, descending, earlier position first on ties (stable sort)
                rank = tl.zeros([BE], tl.int32)
                for j0 in range(0, ne, BO):
                    jj = j0 + jo
                    bj = tl.load(bestb + jj, mask=jj < ne, other=float("-inf"))
                    ahead = (bj[None, :] > best[:, None]) | ((bj[None, :] == best[:, None]) & (jj[None, :] < ie[:, None]))
                    rank += tl.sum((ahead & (jj < ne)[None, :]).to(tl.int32), axis=1)
                tl.store(dst + rank - r, e.to(tl.int32), mask=ev_ok & (rank >= r))
                kept = tl.maximum(ne - r, 0)
                for j0 in range(0, no, BE):
                    jj = j0 + ie
                    tl.store(dst + kept + jj, tl.load(src + 2 * jj + 1, mask=jj < no), mask=jj < no)
                length = kept + no
                tl.debug_barrier()
            fin = buf + (n_rounds % 2) * r0
            for c0 in range(0, n_div, BE):
                offs = c0 + ie
                tl.store(out_ptr + b * n_div + offs, tl.load(fin + offs, mask=offs < n_div).to(tl.int64), mask=offs < n_div)

        _TRITON_KERNEL = _dedup
    return _TRITON_KERNEL


def _scan_kernel():
    """The sorted-row variant: one launch, the round body compiled for five list sizes."""
    global _SCAN_KERNEL
    if _SCAN_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, mark, BE: tl.constexpr, K: tl.constexpr, BO: tl.constexpr):
            # one de-duplication round on a list of ``length`` <= 2 * BE tokens (src -> dst). Token t is in
            # this round's odd set iff stamp[t] == mark (marks never repeat); the previous round (or the
            # kernel's start) stamped it while writing src, so no pass over the odd set is needed here
            ne = (length + 1) // 2
            no = length // 2
            r = tl.minimum(step, length - n_div)
            ie = tl.arange(0, BE)
            ev_ok = ie < ne
            e = tl.load(src + 2 * ie, mask=ev_ok, other=0).to(tl.int64)
            # an even token's best similarity to the odd set is the first odd token's value in its
            # descending row: read K entries at a time; the row's maximum over this chunk's odd hits is
            # that value (sorted), so no second, dependent load is needed
            kk = tl.arange(0, K)
            best = tl.full([BE], float("-inf"), tl.float32)
            todo = ev_ok
            p = tl.full([], 0, tl.int32)
            while tl.sum(todo.to(tl.int32)) > 0:
                cols = p + kk
                m = todo[:, None] & (cols < n)[None, :]
                offs = e[:, None] * n + cols[None, :]
                idx = tl.load(order + offs, mask=m, other=0)
                v = tl.load(vals + offs, mask=m, other=float("-inf")).to(tl.float32)
                hit = m & (tl.load(stamp + idx, mask=m, other=0) == mark)
                n_hit = tl.max(hit.to(tl.int32), axis=1)
                best = tl.where(todo & (n_hit > 0), tl.max(tl.where(hit, v, float("-inf")), axis=1), best)
                todo = todo & (n_hit == 0)
                p += K
            tl.store(bestb + ie, best)
            tl.debug_barrier()
            best = tl.load(bestb + ie)  # see _dedup: a second use of the loop result trips Triton 3.6
            # rank among the evens, descending, earlier position first on ties (stable sort)
            jo = tl.arange(0, BO)
            rank = tl.zeros([BE], tl.int32)
            for j0 in range(0, ne, BO):
                jj = j0 + jo
                bj = tl.load(bestb + jj, mask=jj < ne, other=float("-inf"))
                ahead = (bj[None, :] > best[:, None]) | ((bj[None, :] == best[:, None]) & (jj[None, :] < ie[:, None]))
                rank += tl.sum((ahead & (jj < ne)[None, :]).to(tl.int32), axis=1)
            # write dst and stamp the next round's odd set (odd positions of dst) with mark + 1
            nxt = tl.full([BE], 0, tl.int32) + (mark + 1)
            q = rank - r
            tl.store(dst + q, e.to(tl.int32), mask=ev_ok & (q >= 0))
            tl.store(stamp + e, nxt, mask=ev_ok & (q >= 0) & (q % 2 == 1))
            kept = tl.maximum(ne - r, 0)
            for j0 in range(0, no, BE):
                jj = j0 + ie
                o = tl.load(src + 2 * jj + 1, mask=jj < no, other=0)
                tl.store(dst + kept + jj, o, mask=jj < no)
                tl.store(stamp + o, nxt, mask=(jj < no) & ((kept + jj) % 2 == 1))
            tl.debug_barrier()
            return kept + no

        # a @triton.jit function calls others by their name in the module's globals (closures are not seen)
        globals()["_scan_round"] = _scan_round

        @triton.jit(do_not_specialize=["n", "r0", "n_div", "n_rounds", "step"])
        def _dedup_scan(vals_ptr, order_ptr, stamp_ptr, res_ptr, buf_ptr, best_ptr, out_ptr, n, r0, n_div, n_rounds, step, BE0: tl.constexpr):
            # one program per image; vals/order: every similarity row sorted descending and its token
            # ids; the list in a double buffer (a round reads one half, writes the other). The tile of a
            # round follows the list: an even set of ``ne`` tokens runs on the smallest of BE0/256/128/
            # 64/32 that holds it, with wider row chunks (K) where the odd set is sparse
            b = tl.program_id(0).to(tl.int64)
            vals = vals_ptr + b * n * n
            order = order_ptr + b * n * n
            stamp = stamp_ptr + b * n
            buf = buf_ptr + b * 2 * r0
            bestb = best_ptr + b * BE0
            ie = tl.arange(0, BE0)
            for c0 in range(0, r0, BE0):
                offs = c0 + ie
                tl.store(buf + offs, tl.load(res_ptr + b * r0 + offs, mask=offs < r0).to(tl.int32), mask=offs < r0)
            for c0 in range(0, n, BE0):  # stamps start at 0, below every round's mark (an uninitialised buffer)
                offs = c0 + ie
                tl.store(stamp + offs, tl.zeros([BE0], tl.int32), mask=offs < n)
            tl.debug_barrier()
            for c0 in range(0, r0, BE0):  # round 0's odd set (mark 1): odd positions of res
                offs = c0 + ie
                t = tl.load(res_ptr + b * r0 + offs, mask=(offs < r0) & (offs % 2 == 1), other=0)
                tl.store(stamp + t, tl.full([BE0], 1, tl.int32), mask=(offs < r0) & (offs % 2 == 1))
            tl.debug_barrier()
            length = r0
            for it in range(n_rounds):
                src = buf + (it % 2) * r0
                dst = buf + ((it + 1) % 2) * r0
                ne = (length + 1) // 2
                if ne > 256:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, BE0, 8, 64)
                elif ne > 128:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, 256, 16, 64)
                elif ne > 64:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, 128, 32, 128)
                elif ne > 32:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, 64, 64, 64)
                else:
                    length = _scan_round(vals, order, stamp, src, dst, bestb, n, length, n_div, step, it + 1, 32, 128, 32)
            fin = buf + (n_rounds % 2) * r0
            for c0 in range(0, n_div, BE0):
                offs = c0 + ie
                tl.store(out_ptr + b * n_div + offs, tl.load(fin + offs, mask=offs < n_div).to(tl.int64), mask=offs < n_div)

        _SCAN_KERNEL = _dedup_scan
    return _SCAN_KERNEL


def dedup_triton(sim: torch.Tensor, res: torch.Tensor, n_div: int, step: int, scan: bool = False) -> torch.Tensor:
    """Same result as :func:`dedup_torch`, all rounds in one Triton launch (one program per image).

    ``scan=False`` (``backend="triton"``): every round gathers the ``|even| x |odd|`` similarities.
    ``scan=True`` (``backend="triton_scan"``): ``sim`` is sorted once per row (descending) and every round
    reads, per even token, only its sorted row up to the first odd-set token: the same maximum, since a
    maximum does not depend on the order of ties. The round's tile shrinks with the list (5 compiled
    sizes), so the late rounds (a few dozen tokens) do not pay for the first ones' width.
    """
    import triton

    b, r0 = res.shape
    rounds = dedup_rounds(r0, n_div, step)
    if n_div == 0 or not rounds:
        return res[:, :n_div]
    n = sim.shape[1]
    be = max(16, triton.next_power_of_2((r0 + 1) // 2))
    # scratch only (no kernels): the list's double buffer, the evens' best similarities, the odd stamps
    buf = torch.empty(b, 2, r0, dtype=torch.int32, device=res.device)
    out = torch.empty(b, n_div, dtype=torch.long, device=res.device)
    res = res.contiguous()  # a view at B=1 (the argsort tail), a copy otherwise
    if scan:
        be = max(256, be)
        vals, order = sim.sort(dim=-1, descending=True)
        stamp = torch.empty(b, n, dtype=torch.int32, device=res.device)
        best = torch.empty(b, be, dtype=torch.float32, device=res.device)
        _scan_kernel()[(b,)](vals, order, stamp, res, buf, best, out, n, r0, n_div, len(rounds), step, BE0=be, num_warps=8)
    else:
        best = torch.empty(b, be, dtype=torch.float32, device=res.device)
        _triton_kernel()[(b,)](sim.contiguous(), res, buf, best, out, n, r0, n_div, len(rounds), step, BE=be, BO=16, num_warps=8)
    return out


# The CUDA path: after the similarity GEMM and one torch sort of its rows, the whole selection (the
# important tokens, every de-duplication round, the sorted kept set) is one CUDA kernel, one block of
# 1024 threads per image: the list, the odd-set stamps, the rank words and the first entries of every
# residual row live in shared memory, and a round is two block barriers. Triton has no shared arrays
# and no per-thread loops: its one-program kernels above keep the list in global memory and pay a chain
# of dependent L2 round trips per round (module docstring: 5x slower at 576 -> 64).
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
  // out: (B, n_imp + n_div) kept token ids, ascending. The residual list (tokens ranked n_imp on by
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
  // 3. the kept set (important + the first n_div of the list) in index order: a block-wide prefix sum
  for (int i = tid; i < n_div; i += NT) kept[tok[buf[cur * r0 + i]]] = 1;
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

#: values of ``VisPruner.backend``
BACKENDS = ("auto", "torch", "cuda", "triton", "triton_scan")


def cuda_source(sim_dtype: torch.dtype, score_dtype: torch.dtype) -> str:
    """The CUDA C source of :func:`select_cuda`'s kernel for these dtypes (compiled with NVRTC)."""
    if sim_dtype not in _FLOATS or score_dtype not in _FLOATS:
        raise ValueError(f"vispruner cuda: similarities and scores must be float16, bfloat16 or float32, got {sim_dtype}, {score_dtype}")
    inf = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}
    defs = f"#define KEY16 {int(sim_dtype in inf)}\n#define INF_BITS {inf.get(sim_dtype, 0):#x}\n"
    defs += f"#define SCORE16 {int(score_dtype in inf)}\n#define SCORE_INF_BITS {inf.get(score_dtype, 0):#x}\n"
    defs += f"#define NT {_CUDA_THREADS}\n#define LOG_NT {_CUDA_THREADS.bit_length() - 1}\n"
    return defs + _CUDA_SRC


def cuda_available(score: torch.Tensor, feats: torch.Tensor) -> bool:
    """Whether :func:`select_cuda` can run on these inputs (CUDA, dtypes, size, torch's NVRTC wrapper, not tracing)."""
    return (feats.is_cuda and score.is_cuda and feats.dtype in _FLOATS and score.dtype in _FLOATS and feats.shape[1] <= CUDA_MAX_N
            and hasattr(torch.cuda, "_compile_kernel") and not torch.compiler.is_compiling())


def _cuda_kernel(device: torch.device, sim_dtype: torch.dtype, score_dtype: torch.dtype):
    key = (device.index, sim_dtype, score_dtype)
    kern = _CUDA_KERNELS.get(key)
    if kern is None:
        # torch.cuda._compile_kernel: NVRTC from torch's own CUDA libraries, launched on torch's current
        # stream (so a CUDA graph captures it); a private API, hence cuda_available's hasattr check
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


def select_cuda(score: torch.Tensor, sim: torch.Tensor, n_imp: int, n_div: int, step: int) -> torch.Tensor:
    """VisPruner's selection from scores and similarities in one CUDA kernel: ``(B, n_imp + n_div)`` kept indices, ascending.

    ``score`` ``(B, N)``, ``sim`` ``(B, N, N)`` on CUDA (float16 / bfloat16 / float32 each). The same
    picks as :func:`dedup_torch` on the stable descending argsort of ``score`` (GPU-tested): the kernel
    ranks the scores by integer keys of their bits (ties to the lower index, NaN first, as the stable
    sort), then runs every round on the rows of ``sim`` sorted once (descending, one torch sort): an even
    token's best similarity to the odd set is the first odd-set token of its sorted row (a maximum does
    not depend on the order of ties), and the evens are ranked by integer keys of those values (exact: no
    arithmetic touches them). Compiled at first use per device and dtypes with NVRTC; no host
    synchronisation (CUDA-graph capturable).
    """
    b, n = score.shape
    if n > CUDA_MAX_N:
        raise ValueError(f"vispruner cuda: at most {CUDA_MAX_N} tokens per image, got {n}")
    kern = _cuda_kernel(sim.device, sim.dtype, score.dtype)
    limit = torch.cuda.get_device_properties(sim.device).shared_memory_per_block_optin
    # the longest cached row prefix that fits (64 entries hold the first odd-set token of almost every row)
    fits = ((k, _cuda_smem(n, n_imp, sim.dtype, score.dtype, k)) for k in (64, 32, 16, 8, 0))
    k, smem = next(((k, m) for k, m in fits if m <= limit), (None, None))
    if k is None:
        raise ValueError(f"vispruner cuda: {n} tokens need more shared memory than the device has")
    vals, order = sim.sort(dim=-1, descending=True)
    out = torch.empty(b, n_imp + n_div, dtype=torch.long, device=sim.device)
    if smem > 48 * 1024:
        kern.set_shared_memory_config(smem)
    kern(grid=(b, 1, 1), block=(_CUDA_THREADS, 1, 1), args=[score.contiguous(), vals, order, out, n, n_imp, n_div, step, k],
         shared_mem=smem, stream=torch.cuda.current_stream(sim.device))
    return out


def vispruner_select(score: torch.Tensor, feats: torch.Tensor, n_keep: int, important_ratio: float, step: int = 8, backend: str = "torch") -> torch.Tensor:
    """``(B, N)`` scores and ``(B, N, C)`` patch features -> ``(B, n_keep)`` sorted kept indices.

    The cosine similarities of all token pairs are computed once (``(B, N, N)``, one GEMM) and every
    round indexes them, instead of one GEMM per round on the gathered halves as the official code does:
    the same dot products, and the rounds become gathers that one kernel can run back to back.
    """
    n_imp = int(n_keep * important_ratio)
    n_div = n_keep - n_imp
    xn = feats / feats.norm(dim=-1, keepdim=True)
    sim = xn @ xn.transpose(1, 2)
    if backend == "cuda":
        return select_cuda(score, sim, n_imp, n_div, step)
    order = score.argsort(dim=-1, descending=True, stable=True)
    imp, res = order[:, :n_imp], order[:, n_imp:]
    if backend.startswith("triton"):
        res = dedup_triton(sim, res, n_div, step, scan=backend == "triton_scan")
    else:
        res = dedup_torch(sim, res, n_div, step)
    return torch.cat([imp, res], dim=1).sort(dim=1).values


@dataclass
class VisPruner(PruningMethod):
    """Keep ``T = round(N * (1 - prune_ratio))`` tokens: ``int(T * important_ratio)`` important + the rest diverse.

    Parameters
    ----------
    important_ratio : float
        ``r``, the share of important tokens (0.5 official default; the README uses 0.75 at 64).
    layer : int
        CLIP layer of the CLS attention and of the features used for similarity (-2).
    step : int
        Even-position tokens dropped per de-duplication round (8).
    backend : {"auto", "torch", "cuda", "triton", "triton_scan"}
        Implementation (identical picks): ``cuda``, the whole selection after the similarity GEMM and
        its row sort in one NVRTC-compiled kernel (:func:`select_cuda`), is ``auto``'s choice on CUDA
        (float16 / bfloat16 / float32, up to :data:`CUDA_MAX_N` tokens); ``torch`` (batched torch ops,
        a few kernels a round) everywhere else. ``triton_scan`` / ``triton``: the rounds in one Triton
        launch (:func:`dedup_triton`; slower on the H100, kept for comparison).
    """

    important_ratio: float = 0.5
    layer: int = -2
    step: int = 8
    backend: str = "auto"

    requires_cls: ClassVar[bool] = True
    graph_safe: ClassVar[bool] = True
    select_reads_shape_only: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= float(self.important_ratio) <= 1.0:
            raise ConfigError(f"vispruner: important_ratio must be in [0, 1], got {self.important_ratio}")
        if int(self.step) < 1:
            raise ConfigError("vispruner: step must be >= 1")
        if self.backend not in BACKENDS:
            raise ConfigError(f"vispruner: backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")

    def selection_flops(self, cost) -> int:
        """The CLS row and the cosine matrix of all ``N`` patch features (one GEMM whose entries every round
        then indexes; the official code runs one smaller GEMM per round instead)."""
        if self.prune_ratio == 0.0:
            return 0
        return cost.batch * (cost.vision_extras(self.needs) + 2 * cost.n_visual * cost.n_visual * cost.vision_width)

    @property
    def needs(self) -> frozenset[str]:  # type: ignore[override]
        return frozenset({f"cls_attn:{self.layer}", f"hidden:{self.layer}"})

    def select(self, vis: torch.Tensor, ctx: VisionContext) -> torch.Tensor:
        """``(B, N, D)`` -> ``(B, K)`` sorted indices (features come from ``hidden:<layer>``, CLS dropped)."""
        n = vis.shape[1]
        score = ctx.get(f"cls_attn:{self.layer}").mean(dim=1)[:, 1:]
        feats = ctx.get(f"hidden:{self.layer}")[:, 1:]
        if feats.shape[1] != n or score.shape[1] != n:
            raise ValueError(f"vispruner: tower tensors do not match the {n} visual tokens")
        from methods.divprune import _triton_ok

        backend = self.backend
        if backend == "auto":
            backend = "cuda" if cuda_available(score, feats) else "torch"
        if backend == "cuda" and not cuda_available(score, feats):
            raise ConfigError("vispruner: backend=cuda needs CUDA tensors and torch.cuda._compile_kernel (NVRTC); use backend=auto or torch")
        if backend.startswith("triton") and not _triton_ok(feats):
            raise ConfigError(f"vispruner: backend={backend} needs CUDA tensors and Triton; use backend=auto or torch")
        return vispruner_select(score, feats, self.n_keep(n), float(self.important_ratio), int(self.step), backend)
