// Host-side helpers shared by the CPU and CUDA kernels of every op: how x is viewed as
// planes, and how parameters are checked and their gradients returned. ATen only, so both
// the C++ compiler and nvcc's host pass can include it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace unirep {

// x as N x C planes of S values: NCS (contiguous, planes of S values) or NSC (channels_last:
// per sample an S x C block with channels innermost).
struct PlaneView {
  at::Tensor x;  // dense: contiguous (NCS) or channels_last (NSC)
  int64_t N = 0, C = 0, S = 1;
  bool channels_last = false;
};

// Views x as planes without copying when it is contiguous or channels_last (4-d or 5-d);
// any other strides are made contiguous (one copy, documented in the README).
inline PlaneView plane_view(const at::Tensor& x) {
  PlaneView v;
  v.N = x.size(0);
  v.C = x.size(1);
  v.S = v.N * v.C == 0 ? 0 : x.numel() / (v.N * v.C);
  if (x.dim() == 2) {
    v.x = x.contiguous();
    v.channels_last = true;  // (N, C) rows: the NSC walk with S = 1 vectorizes over C
  } else if (v.S == 1 && x.is_contiguous()) {
    // (N, C, 1, 1), e.g. features after global pooling: NCS and NSC are the same memory,
    // and the NSC walk vectorizes over C instead of visiting N * C one-value planes
    v.x = x;
    v.channels_last = true;
  } else if (x.is_contiguous()) {
    v.x = x;
  } else if ((x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast)) ||
             (x.dim() == 5 && x.is_contiguous(at::MemoryFormat::ChannelsLast3d))) {
    v.x = x;
    v.channels_last = true;
  } else {
    v.x = x.contiguous();
  }
  return v;
}

// grad_y in x's layout (and dtype), so both are walked with the same indices.
inline at::Tensor same_layout(const at::Tensor& grad_y, const PlaneView& v) {
  at::Tensor g = grad_y.to(v.x.scalar_type());
  if (v.channels_last && v.x.dim() == 4) return g.contiguous(at::MemoryFormat::ChannelsLast);
  if (v.channels_last && v.x.dim() == 5) return g.contiguous(at::MemoryFormat::ChannelsLast3d);
  return g.contiguous();
}


// A parameter's gradient accumulated in float64 as (rows, C), returned in the parameter's
// shape and dtype; (C,) in the accumulation dtype when the parameter is absent.
inline at::Tensor param_grad(const at::Tensor& grad, const c10::optional<at::Tensor>& param, at::ScalarType acc) {
  const bool given = param.has_value() && param->defined();
  at::Tensor g = grad.to(given ? param->scalar_type() : acc);
  return given ? g.reshape(param->sizes()) : g.reshape({grad.size(1)});
}

// A weight/bias (or running stat) must be (rows, C) per domain or (C,) universal.
inline void check_param_shape(const c10::optional<at::Tensor>& p, int64_t rows, int64_t C, const char* name) {
  if (!p.has_value() || !p->defined()) return;
  TORCH_CHECK_VALUE((p->dim() == 1 && p->size(0) == C) || (p->dim() == 2 && p->size(0) == rows && p->size(1) == C),
                    name, " must have shape (num_domains, C) = (", rows, ", ", C, ") or (C,) = (", C, ",), got ",
                    p->sizes());
}

// Rows of a parameter's gradient: num_domains for a (num_domains, C) parameter, else 1.
inline int64_t param_grad_rows(const c10::optional<at::Tensor>& p, int64_t num_domains) {
  return p.has_value() && p->defined() && p->dim() == 2 ? num_domains : 1;
}

}  // namespace unirep
