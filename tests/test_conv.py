"""conv2d and conv_transpose2d on each of their CPU paths (XLA's with our weight gradient, bfloat16 tap matmuls,
oneDNN's): against a float64 NumPy reference and XLA's own gradient."""

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deconvnet_jax import conv, onednn
from deconvnet_jax.conv import MATMUL_MIN_CHANNELS, conv2d, conv_transpose2d, matmul, weight_gradient


@pytest.fixture
def xla_paths(monkeypatch):
  """conv2d as without the oneDNN extra: XLA's convolutions and our matmul forms."""
  monkeypatch.setattr(onednn, "usable", lambda *args, **kwargs: False)


@pytest.fixture
def matmuls_at_any_size(monkeypatch, xla_paths):
  """The matmul weight gradient for the small shapes below (from 32 output channels, as ever)."""
  monkeypatch.setattr(conv, "MATMUL_MIN_FLOPS", 0)


def use_onednn(monkeypatch):
  """oneDNN's path at any size; skipped only where its wheels are not installed (the dev requirements install
  them), failing where they are but it does not build."""
  try:
    importlib.metadata.version("onednn-cpu-gomp")
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("the onednn extra is not installed")
  assert onednn.loaded(), "the oneDNN wheels are installed but onednn_conv.cc did not build or load"
  monkeypatch.setattr(onednn, "MIN_FLOPS", 0)  # the small shapes below


@pytest.fixture(params=["xla", "onednn"])
def backend(request, monkeypatch):
  """Each CPU path in turn: XLA's convolutions with our matmul weight gradient, then oneDNN's."""
  if request.param == "xla":
    monkeypatch.setattr(onednn, "usable", lambda *args, **kwargs: False)
    monkeypatch.setattr(conv, "MATMUL_MIN_FLOPS", 0)
  else:
    use_onednn(monkeypatch)
  return request.param


def xla_conv(x, w, pad):
  """XLA's own stride-1 convolution, written apart from conv.py: the comparison's other side."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((pad, pad), (pad, pad)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def reference(x, kernel, g, pad):
  """(y, dx, dW) of a stride-1 zero-padded convolution, float64 NumPy over kernel taps."""
  x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
  kh, kw = kernel.shape[:2]
  xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  ho, wo = xp.shape[1] - kh + 1, xp.shape[2] - kw + 1
  y = np.zeros((x.shape[0], ho, wo, kernel.shape[3]))
  dxp = np.zeros_like(xp)
  dw = np.zeros_like(kernel)
  for i in range(kh):
    for j in range(kw):
      view = xp[:, i:i + ho, j:j + wo, :]  # [B, H', W', Ci]
      y += view @ kernel[i, j]
      dw[i, j] = np.einsum("bhwc,bhwd->cd", view, g)
      dxp[:, i:i + ho, j:j + wo, :] += g @ kernel[i, j].T
  return y, dxp[:, pad:xp.shape[1] - pad, pad:xp.shape[2] - pad, :], dw


@pytest.mark.parametrize("cout", [6, MATMUL_MIN_CHANNELS])  # XLA's weight gradient, then the matmuls
@pytest.mark.parametrize("k, pad, shape", [(3, 1, (2, 9, 7, 5)), (1, 0, (2, 6, 5, 4)), (3, 0, (1, 8, 8, 3)),
                                           (7, 0, (2, 7, 9, 4)), (3, 2, (2, 5, 6, 3)),
                                           (3, 1, (2, 5, 6, 256))])  # 256 in: oneDNN's gemm weight gradient on AVX2
def test_forward_and_gradients_match_float64_loops(k, pad, shape, cout, backend):
  rng = np.random.default_rng(k + pad)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(k, k, shape[3], cout)).astype(np.float32)
  y, vjp = jax.vjp(lambda x, w: conv2d(x, w, pad), x, kernel)
  g = rng.normal(size=y.shape).astype(np.float32)
  dx, dw = vjp(g)
  want_y, want_dx, want_dw = reference(x, kernel, g, pad)
  assert y.shape == want_y.shape and dx.shape == x.shape and dw.shape == kernel.shape
  assert dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4)
  # XLA's own gradient of the same convolution agrees as well.
  xla_dx, xla_dw = jax.vjp(lambda x, w: xla_conv(x, w, pad), x, kernel)[1](g)
  np.testing.assert_allclose(dw, xla_dw, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, xla_dx, rtol=1e-5, atol=1e-5)


def transpose_reference(x, kernel, g, pad):
  """(y, dx, dW) of a stride-1 transposed convolution with kernel [Ci, Co, k, k] (PyTorch's ConvTranspose2d:
  each input pixel scatters x @ kernel[:, :, i, j] to output pixel (h + i, w + j), then `pad` cropped each
  side), float64 NumPy over kernel taps."""
  x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
  b, h, w, _ = x.shape
  k = kernel.shape[2]
  full = np.zeros((b, h + k - 1, w + k - 1, kernel.shape[1]))
  g_full = np.pad(g, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dx, dw = np.zeros_like(x), np.zeros_like(kernel)
  for i in range(k):
    for j in range(k):
      full[:, i:i + h, j:j + w] += x @ kernel[:, :, i, j]
      dx += g_full[:, i:i + h, j:j + w] @ kernel[:, :, i, j].T
      dw[:, :, i, j] = np.einsum("bhwc,bhwd->cd", x, g_full[:, i:i + h, j:j + w])
  return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad], dx, dw


@pytest.mark.parametrize("k, pad, shape, cout", [(3, 1, (2, 9, 7, 5), 6), (3, 0, (1, 6, 8, 3), 32),
                                                 (1, 0, (2, 5, 4, 4), 7), (5, 2, (2, 6, 5, 3), 4)])
def test_transposed_forward_and_gradients_match_float64_loops(k, pad, shape, cout, backend):
  rng = np.random.default_rng(k + 3 * pad)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(shape[3], cout, k, k)).astype(np.float32)
  y, vjp = jax.vjp(lambda x, w: conv_transpose2d(x, w, pad), x, kernel)
  g = rng.normal(size=y.shape).astype(np.float32)
  dx, dw = vjp(g)
  want_y, want_dx, want_dw = transpose_reference(x, kernel, g, pad)
  assert y.shape == want_y.shape == (shape[0], shape[1] + k - 1 - 2 * pad, shape[2] + k - 1 - 2 * pad, cout)
  assert dx.shape == x.shape and dw.shape == kernel.shape and y.dtype == dx.dtype == dw.dtype == jnp.float32
  np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4)
  if backend == "onednn":  # the three custom calls on the kernel as it is: no XLA convolution, no flipped copy
    grad = jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(conv_transpose2d(x, w, pad) * g), (0, 1)))
    hlo = grad.lower(x, kernel).compile().as_text()  # the CPU's branches, optimized
    assert " convolution(" not in hlo and " reverse(" not in hlo
    assert all(f"deconvnet_onednn_conv_{t}" in hlo for t in onednn._TARGETS)


def test_second_use_inside_jit_grad_and_bfloat16_within_a_bound(backend):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 16, 32)).astype(np.float32)
  kernel = (rng.normal(size=(3, 3, 32, 32)) * 0.1).astype(np.float32)
  loss = lambda w, x: jnp.sum(conv2d(jax.nn.relu(conv2d(x, w, 1)), w, 1) ** 2)  # the kernel used twice
  grad = jax.jit(jax.grad(loss))(kernel, x)
  plain = lambda x, w: xla_conv(x, w, 1)
  want = jax.grad(lambda w, x: jnp.sum(plain(jax.nn.relu(plain(x, w)), w) ** 2))(kernel, x)
  np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-3)
  # bfloat16 compute: the weight gradient comes back in bfloat16, within 2% of float32's.
  g16 = jax.grad(lambda w, x: loss(w.astype(jnp.bfloat16), x.astype(jnp.bfloat16)).astype(jnp.float32))(kernel, x)
  assert g16.dtype == jnp.float32
  assert np.linalg.norm(g16 - want) / np.linalg.norm(want) < 0.02


@pytest.mark.parametrize("shape, k, cout, matmuls", [
    ((8, 16, 16, 64), 3, 64, True),  # 151 MFLOP, 64 channels
    ((8, 8, 8, 64), 3, 64, False),  # 38 MFLOP: too little work
    ((8, 64, 64, 16), 3, 16, False),  # 151 MFLOP but 16 channels
    ((8, 64, 64, 96), 1, 21, True),  # 1x1, 132 MFLOP: one matmul, at any width (the score layer's)
    ((8, 64, 64, 64), 1, 21, False),  # 1x1, 88 MFLOP: too little work
])
def test_weight_gradient_is_the_matmul_form_on_the_cpu_where_it_pays(shape, k, cout, matmuls, xla_paths):
  """On the CPU the custom rule's dW is `weight_gradient`'s, bit for bit, from 100 MFLOP and 32 output channels
  (any number for a 1x1 kernel); below either, XLA's own."""
  rng = np.random.default_rng(3)
  x = rng.normal(size=shape).astype(np.float32)
  kernel = rng.normal(size=(k, k, shape[3], cout)).astype(np.float32)
  pad = k // 2
  g = rng.normal(size=(*shape[:3], cout)).astype(np.float32)
  assert conv.uses_matmuls(kernel.shape, g.shape) == matmuls
  dw = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv2d(x, w, pad), w)[1](g)[0])(x, kernel, g)
  plain = lambda w: xla_conv(x, w, pad)
  want = (jax.jit(lambda x, g: weight_gradient(x, g, kernel.shape, pad))(x, g) if matmuls
          else jax.jit(lambda g: jax.vjp(plain, kernel)[1](g)[0])(g))
  np.testing.assert_array_equal(dw, want)


def bfloat16_operands(k: int, pad: int, shape) -> tuple:
  """Random bfloat16 (x [shape], kernel [k, k, C, 16], output gradient g) for a k x k convolution padded by pad."""
  rng = np.random.default_rng(k + pad)
  x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  kernel = jnp.asarray(rng.normal(size=(k, k, shape[3], 16)), jnp.bfloat16)
  out_hw = [n + 2 * pad - k + 1 for n in shape[1:3]]
  g = jnp.asarray(rng.normal(size=(shape[0], *out_hw, 16)), jnp.bfloat16)
  return x, kernel, g


def assert_bfloat16_rounds_float64_once(k: int, pad: int, shape) -> tuple:
  """conv2d's forward and both gradients in bfloat16 are float64's result rounded once (relative error at most
  2^-8 an element); returns the operands (x, kernel, g)."""
  x, kernel, g = bfloat16_operands(k, pad, shape)
  y, vjp = jax.vjp(lambda x, w: conv2d(x, w, pad), x, kernel)
  dx, dw = vjp(g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  want_y, want_dx, want_dw = reference(*(np.asarray(a, np.float32) for a in (x, kernel, g)), pad)
  for got, want in [(y, want_y), (dx, want_dx), (dw, want_dw)]:
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8, atol=1e-5)
  return x, kernel, g


@pytest.fixture
def taps_at_any_size(monkeypatch, xla_paths):
  """The bfloat16 tap-matmul path for the few input channels below (from 256 in the library)."""
  monkeypatch.setattr(conv, "TAP_MIN_CHANNELS", 8)


@pytest.mark.parametrize("k, pad, shape", [(3, 1, (2, 9, 7, 8)), (1, 0, (2, 6, 5, 8)), (3, 0, (1, 8, 8, 8)),
                                           (3, 2, (2, 5, 6, 8))])
def test_bfloat16_tap_matmuls_round_float64_once(k, pad, shape, taps_at_any_size):
  """bfloat16 on the CPU: the forward and input gradient as tap matmuls summed in float32 are float64's result
  rounded once to bfloat16 (relative error at most 2^-8 an element), and no convolution is left in the program."""
  x, kernel, g = assert_bfloat16_rounds_float64_once(k, pad, shape)
  hlo = jax.jit(lambda x, w, g: jax.vjp(lambda x: conv2d(x, w, pad), x)[1](g)).lower(x, kernel, g).as_text()
  assert "convolution" not in hlo and "dot_general" in hlo
  # float32 keeps XLA's convolution.
  hlo = jax.jit(lambda x, w: conv2d(x, w, pad)).lower(x.astype(jnp.float32), kernel.astype(jnp.float32)).as_text()
  assert "convolution" in hlo


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2**-8)])
def test_matmul_and_its_gradients_match_float64(dtype, rtol):
  """conv.matmul sums in float32 and returns its operands' dtype, gradients included: in bfloat16, float64's
  result rounded once."""
  rng = np.random.default_rng(5)
  a, b = jnp.asarray(rng.normal(size=(5, 40)), dtype), jnp.asarray(rng.normal(size=(40, 3)), dtype)
  y, vjp = jax.vjp(matmul, a, b)
  g = jnp.asarray(rng.normal(size=y.shape), dtype)
  da, db = vjp(g)
  assert y.dtype == da.dtype == db.dtype == dtype
  a, b, g = (np.asarray(v, np.float64) for v in (a, b, g))
  for got, want in [(y, a @ b), (da, g @ b.T), (db, a.T @ g)]:
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("k, pad, shape", [(3, 1, (2, 9, 7, 8)), (1, 0, (2, 6, 5, 8)), (3, 2, (2, 5, 6, 3))])
def test_onednn_bfloat16_rounds_float64_once_and_portable_programs_keep_xla(k, pad, shape, monkeypatch):
  """oneDNN in bfloat16: the forward and both gradients are float64's result rounded once to bfloat16 (relative
  error at most 2^-8 an element), through its custom calls alone; under `onednn.portable()` (jax.export) the
  program keeps XLA's convolution. On a CPU without bf16 units oneDNN's bfloat16 is not used, so there only the
  choice of path is checked, on programs compiled as if it had them."""
  use_onednn(monkeypatch)
  if onednn.cpu_has_bf16():
    x, kernel, g = assert_bfloat16_rounds_float64_once(k, pad, shape)
  else:
    monkeypatch.setattr(onednn, "cpu_has_bf16", lambda: True)
    x, kernel, g = bfloat16_operands(k, pad, shape)
  step = jax.jit(lambda x, w, g: jax.vjp(lambda x, w: conv2d(x, w, pad), x, w)[1](g))
  hlo = step.lower(x, kernel, g).compile().as_text()  # the CPU's branches, optimized
  assert " convolution(" not in hlo and "deconvnet_onednn_conv_BackwardData" in hlo
  assert "deconvnet_onednn_conv_BackwardWeights" in hlo
  with onednn.portable():
    hlo = jax.jit(lambda x, w: conv2d(x, w, pad)).lower(x, kernel).as_text()
  assert "convolution" in hlo and "deconvnet_onednn" not in hlo
  assert "deconvnet_onednn_conv_Forward" in jax.jit(lambda x, w: conv2d(x, w, pad)).lower(x, kernel).as_text()
  # Padding of k zeros or more a side (FCN-8s's conv1_1 pads 100) stays XLA's: oneDNN 3.2 crashed on it.
  hlo = jax.jit(lambda x, w: conv2d(x, w, k)).lower(x, kernel).as_text()
  assert "convolution" in hlo and "deconvnet_onednn" not in hlo
  # So does a kernel that is not square (onednn_conv.cc takes k x k).
  oblong = jnp.zeros((k + 1, k, *kernel.shape[2:]), kernel.dtype)
  hlo = jax.jit(lambda x, w: conv2d(x, w, 0)).lower(x, oblong).as_text()
  assert "convolution" in hlo and "deconvnet_onednn" not in hlo
  # So does bfloat16 on a CPU without bf16 units (oneDNN would emulate it there).
  monkeypatch.setattr(onednn, "cpu_has_bf16", lambda: False)
  hlo = jax.jit(lambda x, w: conv2d(x, w, pad)).lower(x, kernel).as_text()
  assert "convolution" in hlo and "deconvnet_onednn" not in hlo
  assert "deconvnet_onednn" in jax.jit(lambda x, w: conv2d(x, w, pad)).lower(*(a.astype(jnp.float32) for a in (
      x, kernel))).as_text()  # float32 still runs on oneDNN there
  monkeypatch.setattr(onednn, "cpu_has_bf16", lambda: True)
  # So does a convolution under the library's 100 MFLOP (these are under 0.1).
  monkeypatch.setattr(onednn, "MIN_FLOPS", 1e8)
  hlo = jax.jit(lambda x, w: conv2d(x, w, pad)).lower(x, kernel).as_text()
  assert "convolution" in hlo and "deconvnet_onednn" not in hlo


def test_onednn_is_optional_and_a_failed_build_falls_back_to_xla_with_a_warning(monkeypatch, tmp_path):
  """DECONVNET_ONEDNN=0 turns it off; a compiler that fails is a warning naming the source file, not an error;
  a fresh cache folder is built into without leaving temporaries."""
  monkeypatch.setenv(onednn.ENV, "0")
  assert onednn.loaded.__wrapped__() is False
  monkeypatch.delenv(onednn.ENV)
  try:
    lib_dir, include_dir = onednn._wheel_dirs()
  except importlib.metadata.PackageNotFoundError:
    pytest.skip("the onednn extra is not installed")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv("CXX", "false")
  with pytest.warns(UserWarning, match="building onednn_conv.cc failed"):
    assert onednn.loaded.__wrapped__() is False
  monkeypatch.delenv("CXX")
  built = onednn._build(lib_dir, include_dir)
  assert built.parent == tmp_path / "deconvnet_jax" and list(built.parent.iterdir()) == [built]
  assert onednn._build(lib_dir, include_dir) == built  # cached: the same file, not rebuilt


@pytest.mark.parametrize("b_dtype", [jnp.bfloat16, jnp.float32])
def test_bfloat16_matmul_with_a_float32_or_bfloat16_weight_rounds_float64_once(b_dtype):
  # fc6 and fc6-deconv pass float32 weights as they are; each result is the float64 product rounded once to
  # bfloat16, and the weight's gradient comes back in the weight's dtype.
  rng = np.random.default_rng(5)
  a = jnp.asarray(rng.normal(size=(6, 40)), jnp.bfloat16)
  b = jnp.asarray(rng.normal(size=(40, 24)), b_dtype)
  g = jnp.asarray(rng.normal(size=(6, 24)), jnp.bfloat16)
  y, vjp = jax.vjp(matmul, a, b)
  da, db = vjp(g)
  assert (y.dtype, da.dtype, db.dtype) == (jnp.bfloat16, jnp.bfloat16, b_dtype)
  a64, b64, g64 = (np.asarray(v, np.float64) for v in (a, b, g))
  for got, want in [(y, a64 @ b64), (da, g64 @ b64.T), (db, a64.T @ g64)]:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8, atol=1e-6)


def test_float32_matmul_with_a_bfloat16_weight_keeps_float32():
  # Mixed operands the other way round (a bfloat16 weight in a float32 network): a is not rounded to bfloat16.
  rng = np.random.default_rng(6)
  a = jnp.asarray(rng.normal(size=(6, 40)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(40, 24)), jnp.bfloat16)
  g = jnp.asarray(rng.normal(size=(6, 24)), jnp.float32)
  y, vjp = jax.vjp(matmul, a, b)
  da, db = vjp(g)
  assert (y.dtype, da.dtype, db.dtype) == (jnp.float32, jnp.float32, jnp.bfloat16)
  a64, b64, g64 = (np.asarray(v, np.float64) for v in (a, b, g))
  np.testing.assert_allclose(np.asarray(y, np.float64), a64 @ b64, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(da, np.float64), g64 @ b64.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(db, np.float64), a64.T @ g64, rtol=2**-8, atol=1e-6)  # in b's dtype
