// Output allocation and views shared by the CPU op implementations.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <cstdint>

#include "divergence_kernel.h"  // RowsView

namespace pykernels {
namespace cpu {

// The kernel is the first to touch a fresh N x V gradient; with 4 KB pages the page faults
// cost more than the kernel itself (about 80 ms for 262 MB on the development VM). Advising
// transparent huge pages before the first touch, as PyTorch does for all allocations under
// THP_MEM_ALLOC_ENABLE=1, cuts that about five-fold. Only advice: nothing changes if the
// kernel ignores it.
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  if (t.nbytes() < 4 * kHuge) return;
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + t.nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#endif
}

// A gradient output of x's shape (or an empty placeholder when not wanted), huge-page advised.
inline at::Tensor empty_grad(const at::Tensor& x, bool wanted) {
  at::Tensor g = at::empty(wanted ? x.sizes() : at::IntArrayRef{0}, x.options());
  if (wanted) advise_huge_pages(g);
  return g;
}

inline RowsView rows_view(const at::Tensor& x) { return {x.const_data_ptr(), x.stride(0), x.stride(1)}; }

}  // namespace cpu
}  // namespace pykernels
