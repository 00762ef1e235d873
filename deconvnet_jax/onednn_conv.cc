// oneDNN's stride-1 2-D convolution, its input gradient and its weight gradient as XLA FFI handlers.
//
// Layouts are the model's: activations NHWC, kernels HWIO, or OIHW for the decoder's transposed convolutions
// (PyTorch's ConvTranspose2d weight, run as this convolution's input gradient: KernelTag); oneDNN picks its own
// kernel layout and the kernels are reordered on each call (the activations, by far the larger tensors, are used
// in place, but for the weight gradient on CPUs without AVX-512: see HasAvx512). Scratch memory is ours, per call
// (Scratchpad). float32 and bfloat16; bfloat16 sums in float32 and rounds once. The weight gradient is float32.
// Built and loaded by onednn.py.

#include <cstdint>
#include <cstdlib>
#include <new>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// One convolution's geometry: x [n, h, w, ci], kernel [k, k, ci, co], `pad` zeros each side.
struct Geometry {
  int64_t n, h, w, ci, k, co, pad;
  memory::data_type dt;
  int64_t ho() const { return h + 2 * pad - k + 1; }
  int64_t wo() const { return w + 2 * pad - k + 1; }
  auto key() const { return std::make_tuple(n, h, w, ci, k, co, pad, static_cast<int>(dt)); }
  memory::desc x(tag layout = tag::nhwc) const { return memory::desc({n, ci, h, w}, dt, layout); }
  memory::desc y(tag layout = tag::nhwc) const { return memory::desc({n, co, ho(), wo()}, dt, layout); }
  memory::desc kernel(memory::data_type t, tag layout) const { return memory::desc({co, ci, k, k}, t, layout); }
  memory::dims strides() const { return {1, 1}; }
  memory::dims padding() const { return {pad, pad}; }
};

// The caller's kernel layout (the `kernel_layout` attribute): 0, HWIO [k, k, ci, co] (flax's); 1, OIHW [co, ci, k, k]
// (PyTorch's ConvTranspose2d weight [in, out, k, k] is the OIHW kernel of the convolution it transposes).
tag KernelTag(int64_t layout) { return layout ? tag::oihw : tag::hwio; }

// The geometry of x [n, h, w, ci] and a kernel of dimensions `kd` in `layout`.
template <typename Dims>
Geometry MakeGeometry(const Dims& xd, const Dims& kd, int64_t layout, int64_t pad, memory::data_type dt) {
  return Geometry{xd[0], xd[1], xd[2], xd[3], layout ? kd[2] : kd[0], layout ? kd[0] : kd[3], pad, dt};
}

// Whether oneDNN runs AVX-512 code here. Without it (AVX2) its weight gradient on NHWC activations is slow, 1.2-2x
// XLA's own: on a 2-core AMD EPYC (Zen 3), batch 4, conv1_2 833 ms, conv3_2 354. On oneDNN's blocked layout it took
// 200-250 and 210 there, the two reorders included (1.6-4x faster over VGG's layers), and the whole paper train step
// went from 14-15 s to 9-11.5 s. With AVX-512, NHWC was measured fast (conv1_2 105 ms) and is kept.
bool HasAvx512() {
  auto isa = static_cast<int>(dnnl::get_effective_cpu_isa()), avx512 = static_cast<int>(dnnl::cpu_isa::avx512_core);
  return (isa & avx512) == avx512;
}

// Whether the weight gradient is oneDNN's im2col + matmul ("gemm") implementation rather than its first choice, a
// direct jit kernel. Without AVX-512, from 256 input channels the gemm one was faster at every VGG shape on a 2-core
// AMD EPYC (Zen 3), batch 4, float32, reorders included: 56x56 256->256 159 ms against 207, 28x28 512->512 147 against
// 189, 14x14 512->512 39 against 42; below 256 channels (56x56 128->256: 86 against 90; 224x224 64->64: 316 against
// 202) the direct kernel stays. AVX-512 machines have a faster direct kernel (brgemm) and keep oneDNN's choice.
bool PrefersGemmWeightGradient(const Geometry& g) {
  return !HasAvx512() && g.dt == memory::data_type::f32 && g.ci >= 256;
}

// The primitives' scratch memory, passed on each call ("user" scratchpad mode). oneDNN's own ("library" mode, in
// its default build) is common to all primitives, and its documentation allows a primitive to run only on the
// thread that created it; XLA runs a handler on whichever of its threads. With the gemm weight gradient, whose
// im2col buffer is large, the paper's train step aborted ("munmap_chunk(): invalid pointer") or hung. User mode is
// thread-safe while no two executions share a buffer: one buffer per thread, grown as needed (a thread runs one
// handler at a time).
memory Scratchpad(const memory::desc& desc) {
  thread_local std::unique_ptr<char, decltype(&std::free)> buffer(nullptr, &std::free);
  thread_local size_t capacity = 0;
  size_t size = desc.get_size();
  if (size > capacity) {
    capacity = (size + 4095) / 4096 * 4096;
    buffer.reset(static_cast<char*>(std::aligned_alloc(4096, capacity)));
    if (!buffer) throw std::bad_alloc();
  }
  return memory(desc, Engine(), buffer.get());
}

// The three primitives of one geometry, created on first use.
struct Conv {
  dnnl::convolution_forward::primitive_desc fwd;
  dnnl::convolution_backward_data::primitive_desc bwd_data;
  dnnl::convolution_backward_weights::primitive_desc bwd_weights;
  dnnl::convolution_forward fwd_p;
  dnnl::convolution_backward_data bwd_data_p;
  dnnl::convolution_backward_weights bwd_weights_p;

  explicit Conv(const Geometry& g) {
    auto& e = Engine();
    auto any = g.kernel(g.dt, tag::any);
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // see Scratchpad
    fwd = dnnl::convolution_forward::primitive_desc(e, dnnl::prop_kind::forward_training,
                                                    dnnl::algorithm::convolution_direct, g.x(), any, g.y(),
                                                    g.strides(), g.padding(), g.padding(), attr);
    bwd_data = dnnl::convolution_backward_data::primitive_desc(e, dnnl::algorithm::convolution_direct, g.x(), any,
                                                               g.y(), g.strides(), g.padding(), g.padding(), fwd,
                                                               attr);
    static const tag activations = HasAvx512() ? tag::nhwc : tag::any;  // any: oneDNN's layout, reordered into
    auto weights_pd = [&] {
      return dnnl::convolution_backward_weights::primitive_desc(
          e, dnnl::algorithm::convolution_direct, g.x(activations), g.kernel(memory::data_type::f32, tag::any),
          g.y(activations), g.strides(), g.padding(), g.padding(), fwd, attr);
    };
    bwd_weights = weights_pd();
    if (PrefersGemmWeightGradient(g)) {
      while (std::string(bwd_weights.impl_info_str()).find("gemm") == std::string::npos) {
        if (!bwd_weights.next_impl()) {  // no gemm implementation in this build: oneDNN's first choice
          bwd_weights = weights_pd();
          break;
        }
      }
    }
    fwd_p = dnnl::convolution_forward(fwd);
    bwd_data_p = dnnl::convolution_backward_data(bwd_data);
    bwd_weights_p = dnnl::convolution_backward_weights(bwd_weights);
  }
};

const Conv& Get(const Geometry& g) {
  static std::mutex mutex;
  static std::map<decltype(g.key()), std::unique_ptr<Conv>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = cache[g.key()];
  if (!slot) slot = std::make_unique<Conv>(g);
  return *slot;
}

// float32 or bfloat16 (undef: neither).
memory::data_type DataType(ffi::DataType t) {
  if (t == ffi::DataType::F32) return memory::data_type::f32;
  if (t == ffi::DataType::BF16) return memory::data_type::bf16;
  return memory::data_type::undef;
}

const ffi::Error kBadType = ffi::Error::InvalidArgument("onednn_conv: float32 or bfloat16 only");

// `user` as the layout `want`: itself, or a reordered copy in `scratch`.
memory AsLayout(const memory& user, const memory::desc& want, memory& scratch, dnnl::stream& s) {
  if (user.get_desc() == want) return user;
  scratch = memory(want, Engine());
  dnnl::reorder(user, scratch).execute(s, const_cast<memory&>(user), scratch);
  return scratch;
}

template <typename F>
ffi::Error Guarded(F body) {
  try {
    body();
    return ffi::Error::Success();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN: ") + e.what());
  }
}

// Runs the forward (`backward` false: a = x, b = y) or the input gradient (true: a = dx, b = dy) of the
// convolution of `kernel` (in `layout`), with x-shaped `a` and y-shaped `b` [n, ho, wo, co].
ffi::Error WithKernel(bool backward, ffi::AnyBuffer in, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> out,
                      int64_t pad, int64_t layout) {
  auto dt = DataType(in.element_type());
  if (dt == memory::data_type::undef) return kBadType;
  auto g = MakeGeometry(backward ? out->dimensions() : in.dimensions(), kernel.dimensions(), layout, pad, dt);
  return Guarded([&] {
    const Conv& c = Get(g);
    auto& e = Engine();
    dnnl::stream s(e);
    memory a(g.x(), e, backward ? out->untyped_data() : in.untyped_data());
    memory b(g.y(), e, backward ? in.untyped_data() : out->untyped_data());
    memory km(g.kernel(g.dt, KernelTag(layout)), e, kernel.untyped_data()), scratch;
    memory kw = AsLayout(km, backward ? c.bwd_data.weights_desc() : c.fwd.weights_desc(), scratch, s);
    if (backward) {
      c.bwd_data_p.execute(s, {{DNNL_ARG_DIFF_DST, b}, {DNNL_ARG_WEIGHTS, kw}, {DNNL_ARG_DIFF_SRC, a},
                               {DNNL_ARG_SCRATCHPAD, Scratchpad(c.bwd_data.scratchpad_desc())}});
    } else {
      c.fwd_p.execute(s, {{DNNL_ARG_SRC, a}, {DNNL_ARG_WEIGHTS, kw}, {DNNL_ARG_DST, b},
                          {DNNL_ARG_SCRATCHPAD, Scratchpad(c.fwd.scratchpad_desc())}});
    }
    s.wait();
  });
}

// y [n, ho, wo, co] = x [n, h, w, ci] (*) kernel ([k, k, ci, co] or [co, ci, k, k]).
ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y, int64_t pad,
                   int64_t layout) {
  return WithKernel(false, x, kernel, y, pad, layout);
}

// dx [n, h, w, ci] from dy [n, ho, wo, co] and the kernel.
ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> dx, int64_t pad,
                        int64_t layout) {
  return WithKernel(true, dy, kernel, dx, pad, layout);
}

// dkernel float32, in `layout`, from x [n, h, w, ci] and dy [n, ho, wo, co].
ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dkernel, int64_t pad,
                           int64_t layout) {
  auto dt = DataType(x.element_type());
  if (dt == memory::data_type::undef) return kBadType;
  if (dkernel->element_type() != ffi::DataType::F32) return ffi::Error::InvalidArgument("dkernel: float32");
  auto g = MakeGeometry(x.dimensions(), dkernel->dimensions(), layout, pad, dt);
  return Guarded([&] {
    const Conv& c = Get(g);
    auto& e = Engine();
    dnnl::stream s(e);
    memory xm(g.x(), e, x.untyped_data()), dym(g.y(), e, dy.untyped_data());
    memory out(g.kernel(memory::data_type::f32, KernelTag(layout)), e, dkernel->untyped_data());
    auto want = c.bwd_weights.diff_weights_desc();
    bool direct = want == out.get_desc();
    memory dk = direct ? out : memory(want, e);
    memory x_scratch, dy_scratch;
    memory xw = AsLayout(xm, c.bwd_weights.src_desc(), x_scratch, s);
    memory dyw = AsLayout(dym, c.bwd_weights.diff_dst_desc(), dy_scratch, s);
    c.bwd_weights_p.execute(s, {{DNNL_ARG_SRC, xw}, {DNNL_ARG_DIFF_DST, dyw}, {DNNL_ARG_DIFF_WEIGHTS, dk},
                                {DNNL_ARG_SCRATCHPAD, Scratchpad(c.bwd_weights.scratchpad_desc())}});
    if (!direct) dnnl::reorder(dk, out).execute(s, dk, out);
    s.wait();
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeconvnetOnednnConvForward, Forward,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad").Attr<int64_t>("kernel_layout"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DeconvnetOnednnConvBackwardData, BackwardData,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad").Attr<int64_t>("kernel_layout"));
XLA_FFI_DEFINE_HANDLER_SYMBOL(DeconvnetOnednnConvBackwardWeights, BackwardWeights,
                              ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("pad").Attr<int64_t>("kernel_layout"));
