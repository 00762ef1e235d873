"""DeconvNet / FCN-8s: layer semantics against NumPy, sizes, parameter count, and learning."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deconvnet_jax.configs import model_config
from deconvnet_jax.models import (Deconv, bilinear_kernel, FullyConv, build_model, gaussian, get_variables, he_normal,
                                  min_input_size, set_variables, with_compute_dtype)


forward = nnx.jit(lambda model, x: model(x))


def deconv_reference(x, kernel, stride, pad):
  """NumPy loop of Caffe's deconvolution (kernel [in, out, kh, kw]): scatter, then crop pad."""
  b, h, w, _ = x.shape
  k = kernel.shape[2]
  full = np.zeros((b, (h - 1) * stride + k, (w - 1) * stride + k, kernel.shape[1]), np.float64)
  for i in range(h):
    for j in range(w):
      full[:, i * stride:i * stride + k, j * stride:j * stride + k] += np.einsum(
          "bc,coyx->byxo", x[:, i, j], kernel)
  return full[:, pad:full.shape[1] - pad, pad:full.shape[2] - pad]


@pytest.mark.parametrize("hw,k,stride,pad", [((1, 1), 7, 1, 0), ((3, 4), 7, 1, 0), ((5, 4), 3, 1, 1),
                                             ((3, 3), 4, 2, 0), ((2, 3), 16, 8, 0)])
def test_deconv_matches_caffe_semantics(hw, k, stride, pad):
  rng = np.random.default_rng(0)
  layer = Deconv(3, 5, k, stride=stride, pad=pad, dtype=jnp.float32,
                 kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(rng.normal(size=5), jnp.float32)
  x = rng.normal(size=(2, *hw, 3)).astype(np.float32)
  want = deconv_reference(x, np.asarray(layer.kernel[...], np.float64), stride, pad)
  want = want + np.asarray(layer.bias[...])
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("hw", [(1, 1), (3, 4)])
def test_fc6_deconv_matmul_gradients_match_xla_transposed_convolution(hw):
  rng = np.random.default_rng(3)
  layer = Deconv(6, 4, 7, dtype=jnp.float32, kernel_init=nnx.initializers.normal(1.0), rngs=nnx.Rngs(0))
  x = jnp.asarray(rng.normal(size=(2, *hw, 6)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, hw[0] + 6, hw[1] + 6, 4)), jnp.float32)
  xla = lambda x, w: jax.lax.conv_general_dilated(x, w[:, :, ::-1, ::-1], (1, 1), ((6, 6), (6, 6)),
                                                  dimension_numbers=("NHWC", "IOHW", "NHWC"))
  want = jax.vjp(xla, x, layer.kernel[...])[1](g)
  got = _layer_gradients(layer, x, g)
  for a, b in zip(got, want):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_deconv_matches_pytorch():
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(1)
  weight = rng.normal(size=(4, 6, 4, 4)).astype(np.float32)  # PyTorch/Caffe [in, out, kh, kw]
  x = rng.normal(size=(2, 5, 3, 4)).astype(np.float32)
  layer = Deconv(4, 6, 4, stride=2, pad=1, use_bias=False, dtype=jnp.float32,
                 kernel_init=he_normal, rngs=nnx.Rngs(0))
  layer.kernel[...] = jnp.asarray(weight)
  want = torch.nn.functional.conv_transpose2d(
      torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(weight), stride=2, padding=1)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))),
                             want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)


def test_bilinear_kernel_upsamples_a_constant_to_a_constant():
  layer = Deconv(2, 2, 4, stride=2, pad=1, use_bias=False, dtype=jnp.float32,
                 kernel_init=bilinear_kernel, rngs=nnx.Rngs(0))
  out = np.asarray(layer(jnp.ones((1, 5, 5, 2))))
  np.testing.assert_allclose(out[0, 1:-1, 1:-1], 1.0, rtol=1e-6)  # interior: exact interpolation


@pytest.mark.parametrize("hw,k", [((3, 3), 3), ((5, 4), 3), ((4, 6), 1)])
def test_fully_conv_matches_a_numpy_convolution_and_its_gradients(hw, k):
  # (k, k): the input is the one patch; larger: the patch matrix; k = 1: fc7 over positions.
  rng = np.random.default_rng(2)
  layer = FullyConv(6, 4, k, dtype=jnp.float32, kernel_init=he_normal, rngs=nnx.Rngs(0))
  layer.bias[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
  x = rng.normal(size=(2, *hw, 6)).astype(np.float32)
  kernel = np.asarray(layer.kernel[...], np.float64)
  ho, wo = hw[0] - k + 1, hw[1] - k + 1
  want = np.zeros((2, ho, wo, 4)) + np.asarray(layer.bias[...])
  for i in range(ho):
    for j in range(wo):
      want[:, i, j] += np.einsum("byxc,yxco->bo", x[:, i:i + k, j:j + k], kernel)
  np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
  # Gradients against XLA's convolution of the same kernel.
  g = rng.normal(size=(2, ho, wo, 4)).astype(np.float32)
  conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  want_dx, want_dw = jax.vjp(conv, jnp.asarray(x), layer.kernel[...])[1](jnp.asarray(g))
  dx, dw = _layer_gradients(layer, jnp.asarray(x), g)
  np.testing.assert_allclose(np.asarray(dx), np.asarray(want_dx), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(dw), np.asarray(want_dw), rtol=1e-4, atol=1e-5)


def _layer_gradients(layer, x, g):
  """(d/dx, d/dkernel) of sum(layer(x) * g), by jax.grad through the layer's own call."""
  graphdef, state = nnx.split(layer)

  def loss(x, kernel):
    state["kernel"] = nnx.Param(kernel)
    return jnp.sum(nnx.merge(graphdef, state)(x) * g)

  return jax.grad(loss, (0, 1))(x, layer.kernel[...])


def test_paper_config_parameter_count_and_output_shape():
  model = nnx.eval_shape(lambda: build_model(model_config("paper")))
  params = nnx.state(model, nnx.Param)
  count = sum(x.size for x in jax.tree.leaves(params))
  # ~252 M: 14.7 M VGG convs, 102.8 M fc6, 16.8 M fc7, 102.8 M fc6-deconv, 14.6 M decoder.
  assert 251.0e6 < count < 253.0e6, count
  fc_layers = [params["encoder"]["fc6"], params["encoder"]["fc7"], params["fc6_deconv"]]
  fc = sum(x.size for x in jax.tree.leaves(fc_layers))
  assert 222.0e6 < fc < 223.0e6, fc  # the three fc layers hold ~223 M of them (SPEC.md)
  graphdef, state = nnx.split(model)
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state,
                       jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert out.shape == (2, 224, 224, 21) and out.dtype == jnp.float32


def test_initializers_draw_he_and_reference_normals_from_the_seed():
  """He's fan-in std and the reference's 0.01, within 2% of a 1.2 M-value sample; the seed decides the draw."""
  shape = (3, 3, 256, 512)  # HWIO: fan_in 2,304
  w = np.asarray(he_normal(jax.random.key(0), shape), np.float64)
  assert w.shape == shape and he_normal(jax.random.key(0), shape).dtype == jnp.float32
  assert abs(w.std() / np.sqrt(2 / 2304) - 1) < 0.02 and abs(w.mean()) < 0.01 * w.std()
  g = np.asarray(gaussian(jax.random.key(0), (64, 128, 3, 3)), np.float64)
  assert abs(g.std() / 0.01 - 1) < 0.02 and abs(np.mean(np.abs(g) > 0.03) - 0.0027) < 0.001  # 3 sigma tail
  np.testing.assert_array_equal(he_normal(jax.random.key(0), shape), w.astype(np.float32))
  traced = jax.jit(lambda key: he_normal(key, shape))(jax.random.key(0))  # a host callback under jit
  np.testing.assert_array_equal(traced, w.astype(np.float32))
  assert np.abs(np.asarray(he_normal(jax.random.key(1), shape)) - w).max() > 0.01
  a, b = (get_variables(build_model(model_config("small"), seed=s)) for s in (0, 0))
  c = get_variables(build_model(model_config("small"), seed=1))
  kernels = [v["params"]["encoder"]["conv3_1"]["layer"]["kernel"] for v in (a, b, c)]
  np.testing.assert_array_equal(kernels[0], kernels[1])
  assert not np.array_equal(kernels[0], kernels[2])
  layers = [a["params"]["encoder"][f"conv{s}_1"]["layer"]["kernel"] for s in (2, 3)]
  assert not np.array_equal(np.ravel(layers[0])[:100], np.ravel(layers[1])[:100])  # layers draw apart


@pytest.mark.parametrize("hw", [(64, 64), (65, 71), (97, 80)])
def test_small_deconvnet_restores_any_size(hw):
  model = build_model(model_config("small"))
  out = forward(model, jnp.ones((1, *hw, 3)))
  assert out.shape == (1, *hw, 21) and bool(jnp.all(jnp.isfinite(out)))


def test_too_small_input_is_a_clear_error():
  model = build_model(model_config("small"))
  with pytest.raises(ValueError, match=f"at least {min_input_size(model.config)} pixels"):
    model(jnp.ones((1, 31, 64, 3)))


@pytest.mark.parametrize("hw", [(32, 32), (64, 75), (113, 97)])
def test_fcn8s_crop_offsets_give_the_input_size_back(hw):
  model = build_model(model_config("fcn8s-small", num_classes=5))
  out = forward(model, jnp.ones((1, *hw, 3)))
  assert out.shape == (1, *hw, 5) and out.dtype == jnp.float32


def test_bfloat16_compute_keeps_float32_parameters():
  model = build_model(model_config("small", dtype="bfloat16"))
  out = forward(model, jnp.ones((1, 64, 64, 3)))
  assert out.dtype == jnp.float32
  dtypes = {x.dtype for x in jax.tree.leaves(get_variables(model))}
  assert dtypes == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("arch", ["small", "fcn8s-small"])
def test_with_compute_dtype_holds_bfloat16_layers_and_computes_the_same(arch):
  model = build_model(model_config(arch, dtype="bfloat16", num_classes=5))
  model.eval()
  cast = with_compute_dtype(model)
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 3))
  np.testing.assert_array_equal(np.asarray(forward(cast, x)), np.asarray(forward(model, x)))
  params = nnx.to_flat_state(nnx.state(cast, nnx.Param))
  fc = ("fc6", "fc7", "fc6_deconv")  # matmuls of float32 weights as they are
  layers = {path: v.get_value().dtype for path, v in params if path[-2] != "bn"}
  assert {d for path, d in layers.items() if not set(fc) & set(path)} == {jnp.dtype(jnp.bfloat16)}
  assert {d for path, d in layers.items() if set(fc) & set(path)} == {jnp.dtype(jnp.float32)}
  # BatchNorm computes from float32 statistics, and the given model is left as it was.
  bn = {v.get_value().dtype for path, v in params if path[-2] == "bn"}
  assert bn == ({jnp.dtype(jnp.float32)} if model.config.batch_norm else set())
  assert {x.dtype for x in jax.tree.leaves(get_variables(model))} == {jnp.dtype(jnp.float32)}
  float32 = build_model(model_config(arch, num_classes=5))
  assert with_compute_dtype(float32) is float32


def test_variables_round_trip_and_mismatch_errors():
  a, b = build_model(model_config("small"), seed=0), build_model(model_config("small"), seed=1)
  x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 64, 64, 3)), jnp.float32)
  a.eval(), b.eval()
  variables = jax.tree.map(np.asarray, get_variables(a))  # plain NumPy, as after a restore
  set_variables(b, variables)
  np.testing.assert_array_equal(np.asarray(forward(a, x)), np.asarray(forward(b, x)))

  other = build_model(model_config("small", num_classes=5))
  with pytest.raises(ValueError, match=r"score/bias has shape \(21,\).*expects \(5,\).*score/kernel"):
    set_variables(other, variables, source="ckpt")
  wider = build_model(model_config("small", width=0.25))
  with pytest.raises(ValueError, match="another class count or width"):
    set_variables(wider, variables)


def test_small_deconvnet_overfits_one_batch():
  """Loss falls by a large factor: pooling indices, unpooling and deconvs all learn."""
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, 64, 64, 3)).astype(np.float32) * 0.1
  labels = np.zeros((2, 64, 64), np.int32)
  for n, (top, left, size, cls) in enumerate([(8, 10, 30, 3), (30, 20, 25, 7)]):
    images[n, top:top + size, left:left + size] += 1.0
    labels[n, top:top + size, left:left + size] = cls
  model = build_model(model_config("small"))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt = optax.adam(1e-2)
  opt_state = opt.init(params)

  @jax.jit
  def step(params, rest, opt_state):
    def loss_fn(params, rest):
      logits, new_rest = _apply(graphdef, params, rest, images)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
      return loss, new_rest
    (loss, rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss

  losses = []
  for _ in range(80):
    params, rest, opt_state, loss = step(params, rest, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] / 20, losses[::10]


def _apply(graphdef, params, rest, x):
  model = nnx.merge(graphdef, params, rest, copy=True)
  logits = model(x)
  return logits, nnx.state(model, nnx.Not(nnx.Param))
