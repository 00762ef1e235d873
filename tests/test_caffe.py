""".caffemodel import: the wire format, layer names and layouts, BN conventions, checked against
NumPy loops with Caffe's semantics on small files written here in the real protobuf format."""

import math
import os

import jax
import numpy as np
import pytest
from flax import nnx, traverse_util

from deconvnet_jax.cli import convert_caffe
from deconvnet_jax import checkpoints
from deconvnet_jax.caffe import CaffeError, infer_config, load_caffe, read_caffemodel
from deconvnet_jax.configs import ModelConfig
from deconvnet_jax.models import DECODER_PLAN, VGG16_PLAN, build_model, get_variables, set_variables

WIDTH, FC = 0.125, 16


# ---- a tiny protobuf writer: written from caffe.proto, independent of the reader ----

def varint(n):
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def tag(field, wire):
  return varint(field << 3 | wire)


def record(field, payload):
  return tag(field, 2) + varint(len(payload)) + payload


def text(field, s):
  return record(field, s.encode())


def number(field, n):
  return tag(field, 0) + varint(n)


def blob_proto(a, packed=True, legacy=False, double=False):
  """BlobProto: shape (7: BlobShape.dim 1) or legacy num/channels/height/width (1-4);
  data 5 or double_data 8."""
  a = np.asarray(a)
  if legacy:
    head = b"".join(number(i + 1, d) for i, d in enumerate((1,) * (4 - a.ndim) + a.shape))
  elif packed:
    head = record(7, record(1, b"".join(varint(d) for d in a.shape)))
  else:
    head = record(7, b"".join(number(1, d) for d in a.shape))
  values = a.ravel().astype("<f8" if double else "<f4")
  field, wire = (8, 1) if double else (5, 5)
  if packed:
    return head + record(field, values.tobytes())
  return head + b"".join(tag(field, wire) + v.tobytes() for v in values)


V1_ENUM = {"Convolution": 4, "Deconvolution": 39, "InnerProduct": 14, "BN": 43, "ReLU": 18,
           "Pooling": 17, "Unpooling": 42, "Data": 5}


def layer_proto(layer, version, packed, legacy):
  blobs = [blob_proto(b, packed, legacy, double=layer.get("double", False)) for b in layer["blobs"]]
  bottoms, tops = layer.get("bottom", ()), layer.get("top", (layer["name"],))
  if version == "V2":  # LayerParameter: name 1, type 2, bottom 3, top 4, blobs 7
    return (text(1, layer["name"]) + text(2, layer["type"]) + b"".join(text(3, b) for b in bottoms)
            + b"".join(text(4, t) for t in tops) + record(6, number(3, 0))  # a ParamSpec, skipped
            + b"".join(record(7, b) for b in blobs) + layer.get("extra", b""))
  body = b"".join(text(2, b) for b in bottoms) + b"".join(text(3, t) for t in tops)
  if version == "V0":  # V1LayerParameter.layer (1): V0LayerParameter name 1, type 2 (string), blobs 50
    return body + record(1, text(1, layer["name"]) + text(2, {"Convolution": "conv"}[layer["type"]])
                         + b"".join(record(50, b) for b in blobs))
  # V1LayerParameter: bottom 2, top 3, name 4, type 5 (enum), blobs 6, blobs_lr 7 (skipped)
  return (body + text(4, layer["name"]) + number(5, V1_ENUM[layer["type"]])
          + b"".join(record(6, b) for b in blobs) + tag(7, 5) + np.float32(1).tobytes()
          + layer.get("extra", b""))


def write_net(path, layers, version="V2", packed=True, legacy=False):
  data = text(1, "net")
  for layer in layers:  # NetParameter: V2 layers in field 100, V1 (and V0 inside V1) in field 2
    v = layer.get("version", version)
    data += record(100 if v == "V2" else 2, layer_proto(layer, v, packed, legacy))
  path.write_bytes(data)
  return path


# ---- small models with the reference layer names ----

def ch(n):
  return max(1, round(n * WIDTH))


def vgg_layers(rng, k=7, fc_as="conv", bn=None):
  """conv1_1 ... fc7 (+ pools, ReLUs) in Caffe layouts; fc6/fc7 as InnerProduct if fc_as="ip";
  `bn(rng, name, channels)` gives the normalisation layers put after each."""
  layers, cin, bottom = [], 3, "data"
  for s, plan in enumerate(VGG16_PLAN, 1):
    for i, cout in enumerate(plan, 1):
      layers += conv_layer(rng, f"conv{s}_{i}", cin, ch(cout), 3, bottom, bn)
      cin, bottom = ch(cout), f"conv{s}_{i}"
    layers.append(dict(name=f"pool{s}", type="Pooling", blobs=[], bottom=(bottom,), top=(f"pool{s}",)))
    bottom = f"pool{s}"
  for name, cin_, kk in (("fc6", cin, k), ("fc7", FC, 1)):
    layers += conv_layer(rng, name, cin_, FC, kk, bottom, bn)
    if fc_as == "ip":
      w = next(layer for layer in layers if layer["name"] == name)
      w["type"] = "InnerProduct"
      w["blobs"][0] = w["blobs"][0].reshape(FC, -1)
    bottom = name
  return layers


def conv_layer(rng, name, cin, cout, k, bottom, bn=None, type="Convolution"):
  shape = (cin, cout, k, k) if type == "Deconvolution" else (cout, cin, k, k)
  blobs = [rng.normal(0, 0.3, shape).astype(np.float32), rng.normal(0, 0.1, cout).astype(np.float32)]
  layers = [dict(name=name, type=type, bottom=(bottom,), top=(name,), blobs=blobs)]
  layers.append(dict(name=f"relu_{name}", type="ReLU", blobs=[], bottom=(name,), top=(name,)))
  if bn is not None:
    layers[1:1] = bn(rng, name, cout)
  return layers


def fork_bn(rng, name, c):
  """The DeconvNet fork's BN: scale and shift, each [1, C, 1, 1]."""
  return [dict(name=f"bn_{name}", type="BN", bottom=(name,), top=(name,),
               blobs=[rng.uniform(0.5, 1.5, (1, c, 1, 1)).astype(np.float32),
                      rng.normal(0, 0.2, (1, c, 1, 1)).astype(np.float32)])]


BN_EPS = 1e-3


def bvlc_bn(rng, name, c):
  """BVLC BatchNorm (mean, variance, factor; eps in batch_norm_param 139) + Scale (gamma, beta)."""
  factor = np.float32(rng.uniform(2, 5))
  eps = record(139, tag(3, 5) + np.float32(BN_EPS).tobytes())
  return [dict(name=f"{name}/norm", type="BatchNorm", bottom=(name,), top=(name,), extra=eps,
               blobs=[rng.normal(0, 0.2, c).astype(np.float32) * factor,
                      rng.uniform(0.5, 2, c).astype(np.float32) * factor, np.array([factor], np.float32)]),
          dict(name=f"{name}/affine", type="Scale", bottom=(name,), top=(name,),
               blobs=[rng.uniform(0.5, 1.5, c).astype(np.float32), rng.normal(0, 0.2, c).astype(np.float32)])]


def fcn8s_layers(rng, n=21):
  layers = vgg_layers(rng)
  for name, cin, bottom in (("score_fr", FC, "fc7"), ("score_pool4", ch(512), "pool4"),
                            ("score_pool3", ch(256), "pool3")):
    layers += conv_layer(rng, name, cin, n, 1, bottom)[:1]
  for name, k in (("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)):
    layers.append(dict(name=name, type="Deconvolution", bottom=("x",), top=(name,),
                       blobs=[rng.normal(0, 0.3, (n, n, k, k)).astype(np.float32)]))
  return layers


def deconvnet_layers(rng, bn=fork_bn, n=21):
  layers = [dict(name="data", type="Data", blobs=[], top=("data",))]
  layers += vgg_layers(rng, k=2, bn=bn)
  layers += conv_layer(rng, "fc6-deconv", FC, ch(512), 2, "fc7", bn, type="Deconvolution")
  cin, bottom = ch(512), "fc6-deconv"
  for s, plan in zip(range(5, 0, -1), DECODER_PLAN):
    layers.append(dict(name=f"unpool{s}", type="Unpooling", blobs=[], bottom=(bottom, f"pool{s}_mask"),
                       top=(f"unpool{s}",)))
    bottom = f"unpool{s}"
    for i, cout in enumerate(plan, 1):
      layers += conv_layer(rng, f"deconv{s}_{i}", cin, ch(cout), 3, bottom, bn, type="Deconvolution")
      cin, bottom = ch(cout), f"deconv{s}_{i}"
  score = conv_layer(rng, "seg-score-voc", cin, n, 1, bottom)[0]
  layers.append(score | dict(top=("seg-score",)))
  return layers


def blobs_of(layers):
  return {layer["name"]: layer["blobs"] for layer in layers}


# ---- NumPy references with Caffe's semantics (float64 loops) ----

def caffe_conv(x, w, b, pad):
  """Caffe Convolution: x [C, H, W], w [O, C, kh, kw] (cross-correlation), stride 1."""
  x = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad)))
  o, _, kh, kw = w.shape
  out = np.zeros((o, x.shape[1] - kh + 1, x.shape[2] - kw + 1))
  for y in range(out.shape[1]):
    for xx in range(out.shape[2]):
      out[:, y, xx] = np.tensordot(w, x[:, y:y + kh, xx:xx + kw], axes=3) + b
  return out


def caffe_deconv(x, w, b, stride, pad):
  """Caffe Deconvolution (col2im of W^T x): w [in, out, kh, kw]; each input pixel scatters a kernel."""
  cin, cout, kh, kw = w.shape
  h, wd = (x.shape[1] - 1) * stride + kh - 2 * pad, (x.shape[2] - 1) * stride + kw - 2 * pad
  out = np.zeros((cout, h, wd))
  for y in range(x.shape[1]):
    for xx in range(x.shape[2]):
      for ky in range(kh):
        for kx in range(kw):
          oy, ox = y * stride - pad + ky, xx * stride - pad + kx
          if 0 <= oy < h and 0 <= ox < wd:
            out[:, oy, ox] += w[:, :, ky, kx].T @ x[:, y, xx]
  return out + (0 if b is None else b[:, None, None])


def nhwc(chw):
  return np.asarray(chw, np.float32).transpose(1, 2, 0)[None]


def flat(variables):
  return traverse_util.flatten_dict(jax.tree.map(np.asarray, variables), sep="/")


def model_from(config, variables):
  """The model holding `variables`, in eval mode, built without running (compiling) its initialisers."""
  model = nnx.eval_shape(lambda: build_model(config))
  set_variables(model, variables)
  model.eval()
  return model


forward = nnx.jit(lambda model, x: model(x))


# ---- tests ----

def test_reader_handles_v2_v1_v0_packed_unpacked_and_legacy_blobs(tmp_path):
  rng = np.random.default_rng(0)
  a, b, c = (rng.normal(size=s).astype(np.float32) for s in ((4, 3, 2, 2), (4,), (5, 6)))
  layers = [dict(name="conv_v2", type="Convolution", blobs=[a, b], version="V2"),
            dict(name="conv_v1", type="Convolution", blobs=[a, b], version="V1", bottom=("x",)),
            dict(name="conv_v0", type="Convolution", blobs=[a], version="V0"),
            dict(name="ip", type="InnerProduct", blobs=[c], version="V1", double=True),
            dict(name="relu", type="ReLU", blobs=[], version="V1")]
  for packed in (True, False):
    for legacy in (False, True):
      net = read_caffemodel(write_net(tmp_path / "m.caffemodel", layers, packed=packed, legacy=legacy))
      assert list(net) == ["conv_v2", "conv_v1", "conv_v0", "ip", "relu"]
      assert [layer.type for layer in net.values()] == [
          "Convolution", "Convolution", "Convolution", "InnerProduct", "ReLU"]
      assert net["conv_v1"].bottom == ("x",) and net["conv_v1"].top == ("conv_v1",)
      for name, blobs in (("conv_v2", [a, b]), ("conv_v1", [a, b]), ("conv_v0", [a]), ("ip", [c])):
        got = net[name].blobs
        assert len(got) == len(blobs)
        for g, want in zip(got, blobs):
          assert g.dtype == np.float32
          np.testing.assert_array_equal(g.reshape(want.shape), want)
          shape = ((1,) * (4 - want.ndim) + want.shape) if legacy else want.shape
          assert g.shape == shape


def test_deconv_layers_compute_what_caffe_computes(tmp_path):
  rng = np.random.default_rng(1)
  # FCN-8s upscore2: stride 2, no pad, no bias.
  layers = fcn8s_layers(rng, n=3)
  model = model_from(*load_caffe(write_net(tmp_path / "fcn.caffemodel", layers), "fcn8s"))
  x = rng.normal(size=(3, 4, 5))
  np.testing.assert_allclose(model.upscore2(nhwc(x))[0],
                             nhwc(caffe_deconv(x, blobs_of(layers)["upscore2"][0], None, 2, 0))[0],
                             rtol=1e-4, atol=1e-4)

  # DeconvNet without BN layers in the file: deconv5_1 (pad 1) and fc6-deconv on a 1x1 map.
  layers = deconvnet_layers(rng, bn=None)
  config, variables = load_caffe(write_net(tmp_path / "dn.caffemodel", layers, "V1"), "deconvnet")
  assert not config.batch_norm
  model = model_from(config, variables)
  for name, module, shape, pad in (("deconv5_1", model.deconv5_1.layer, (ch(512), 3, 4), 1),
                                   ("fc6-deconv", model.fc6_deconv.layer, (FC, 1, 1), 0)):
    x = rng.normal(size=shape)
    w, b = blobs_of(layers)[name]
    np.testing.assert_allclose(module(nhwc(x))[0], nhwc(caffe_deconv(x, w, b, 1, pad))[0],
                               rtol=1e-4, atol=1e-4)


def vgg_expected(blobs, prefix="params/encoder", ip=False):
  """Our encoder entries from Caffe blobs, by explicit index arithmetic."""
  out = {}
  names = [f"conv{s}_{i}" for s, p in enumerate(VGG16_PLAN, 1) for i in range(1, len(p) + 1)]
  for name in names + ["fc6", "fc7"]:
    w, b = blobs[name]
    if w.ndim == 2:  # InnerProduct [O, C*k*k], flattened C, H, W
      cin = ch(512) if name == "fc6" else FC
      k = math.isqrt(w.shape[1] // cin)
      h, ww, c = np.meshgrid(np.arange(k), np.arange(k), np.arange(cin), indexing="ij")
      w = w[:, (c * k + h) * k + ww].transpose(1, 2, 3, 0)
    else:
      w = np.einsum("oihw->hwio", w)
    out[f"{prefix}/{name}/layer/kernel"], out[f"{prefix}/{name}/layer/bias"] = w, b
  return out


def test_fcn8s_mapping_round_trips_every_blob(tmp_path):
  layers = fcn8s_layers(np.random.default_rng(2))
  blobs = blobs_of(layers)
  config, variables = load_caffe(write_net(tmp_path / "fcn.caffemodel", layers, packed=False), "fcn8s")
  assert config == ModelConfig(arch="fcn8s", batch_norm=False, width=WIDTH, fc_dim=FC, num_classes=21)
  expected = vgg_expected(blobs)
  for name in ("score_fr", "score_pool4", "score_pool3"):
    expected[f"params/{name}/kernel"] = np.einsum("oihw->hwio", blobs[name][0])
    expected[f"params/{name}/bias"] = blobs[name][1]
  for name in ("upscore2", "upscore_pool4", "upscore8"):
    expected[f"params/{name}/kernel"] = blobs[name][0]
  got = flat(variables)
  assert got.keys() == expected.keys()  # nothing missing, nothing extra
  used = sum(len(b) for b in blobs.values())
  assert used == len(expected)  # every blob went to exactly one parameter
  for key, value in expected.items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)

  layers.append(dict(name="score_extra", type="Convolution", blobs=blobs["score_fr"]))
  with pytest.raises(CaffeError, match="score_extra.*no place"):
    load_caffe(write_net(tmp_path / "extra.caffemodel", layers), "fcn8s")


def test_vgg16_fills_the_encoder_and_leaves_the_rest_initialised(tmp_path):
  """VGG_ILSVRC_16_layers: V1, legacy 4-D blobs, fc6/fc7 InnerProduct, fc8 not imported."""
  rng = np.random.default_rng(3)
  layers = vgg_layers(rng, fc_as="ip")
  layers += conv_layer(rng, "fc8", FC, 1000, 1, "fc7")[:1]
  layers[-1]["type"], layers[-1]["blobs"][0] = "InnerProduct", layers[-1]["blobs"][0].reshape(1000, FC)
  path = write_net(tmp_path / "vgg.caffemodel", layers, "V1", legacy=True)
  # By default a DeconvNet of the file's widths (21 classes, BatchNorm); here into an FCN-8s.
  assert infer_config(read_caffemodel(path), "vgg16") == ModelConfig(width=WIDTH, fc_dim=FC)
  config = ModelConfig(arch="fcn8s", batch_norm=False, width=WIDTH, fc_dim=FC, num_classes=5)
  got_config, variables = load_caffe(path, "vgg16", config, seed=3)
  assert got_config == config
  fresh_model = build_model(config, seed=3)
  got, fresh = flat(variables), flat(get_variables(fresh_model))
  expected = vgg_expected(blobs_of(layers))
  assert got.keys() == fresh.keys() and expected.keys() < got.keys()
  for key in got:
    np.testing.assert_array_equal(got[key], expected.get(key, fresh[key]), err_msg=key)

  set_variables(fresh_model, variables)
  x = rng.normal(0, 50, (3, 7, 9))  # BGR, mean subtracted: what Caffe's data layer feeds
  w, b = blobs_of(layers)["conv1_1"]
  y = fresh_model.encoder.conv1_1.layer(nhwc(x))[0]  # FCN's pad 100: out[j + 99] is Caffe's pad-1 out[j]
  np.testing.assert_allclose(y[99:106, 99:108], nhwc(caffe_conv(x, w, b, 1))[0], rtol=1e-4, atol=1e-3)


def test_released_deconvnet_folds_bn_exactly(tmp_path):
  """The inference release: BN blobs are the folded scale/shift, y = scale * conv(x) + shift."""
  rng = np.random.default_rng(5)
  layers = deconvnet_layers(rng)
  path = write_net(tmp_path / "DeconvNet_trainval_inference.caffemodel", layers, "V1", legacy=True)
  config, variables = load_caffe(path, "deconvnet")
  assert (config.arch, config.batch_norm, config.fc_kernel, config.num_classes) == ("deconvnet", False, 2, 21)
  bn_config, bn_variables = load_caffe(path, "deconvnet", batch_norm=True)
  assert bn_config.batch_norm and set(flat(bn_variables)) > set(flat(variables))

  blobs = blobs_of(layers)
  x = rng.normal(0, 50, (3, 6, 5))
  w, b = blobs["conv1_1"]
  scale, shift = (v.reshape(-1, 1, 1) for v in blobs["bn_conv1_1"])
  want = np.maximum(caffe_conv(x, w, b, 1) * scale + shift, 0)  # conv -> BN (INFERENCE) -> ReLU
  images = rng.normal(0, 50, (1, 64, 64, 3)).astype(np.float32)
  outputs = []
  for cfg, var in ((config, variables), (bn_config, bn_variables)):
    model = model_from(cfg, var)
    np.testing.assert_allclose(model.encoder.conv1_1(nhwc(x))[0], nhwc(want)[0], rtol=1e-4, atol=1e-2)
    outputs.append(np.asarray(forward(model, images)))
  assert outputs[0].shape == (1, 64, 64, 21) and np.isfinite(outputs[0]).all()
  np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-3, atol=1e-3 * np.abs(outputs[0]).max())


def test_training_snapshot_keeps_gamma_beta_without_statistics(tmp_path):
  layers = deconvnet_layers(np.random.default_rng(6))
  path = write_net(tmp_path / "stage_2_train_result.caffemodel", layers, "V1")
  config, variables = load_caffe(path, "deconvnet-train")
  assert config.batch_norm
  got, blobs = flat(variables), blobs_of(layers)
  for ours, theirs in (("encoder/conv1_1", "conv1_1"), ("fc6_deconv", "fc6-deconv"),
                       ("deconv1_2", "deconv1_2")):
    np.testing.assert_array_equal(got[f"params/{ours}/bn/scale"], blobs[f"bn_{theirs}"][0].ravel())
    np.testing.assert_array_equal(got[f"params/{ours}/bn/bias"], blobs[f"bn_{theirs}"][1].ravel())
    np.testing.assert_array_equal(got[f"batch_stats/{ours}/bn/mean"], 0)
    np.testing.assert_array_equal(got[f"batch_stats/{ours}/bn/var"], 1)
  np.testing.assert_array_equal(got["params/deconv5_1/layer/kernel"], blobs["deconv5_1"][0])
  with pytest.raises(CaffeError, match="bn_conv1_1.*without statistics"):
    load_caffe(path, "deconvnet-train", batch_norm=False)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_batchnorm_scale_pairs_found_by_topology(tmp_path, batch_norm):
  rng = np.random.default_rng(7)
  layers = deconvnet_layers(rng, bn=bvlc_bn)
  config, variables = load_caffe(write_net(tmp_path / "bvlc.caffemodel", layers), "deconvnet",
                                 batch_norm=batch_norm)
  assert config.batch_norm == batch_norm
  model = model_from(config, variables)
  blobs = blobs_of(layers)
  mean, var, factor = blobs["conv1_1/norm"]
  gamma, beta = blobs["conv1_1/affine"]
  x = rng.normal(0, 50, (3, 5, 6))
  y = caffe_conv(x, *blobs["conv1_1"], 1)
  norm = lambda v: v.reshape(-1, 1, 1)  # noqa: E731
  want = np.maximum(norm(gamma) * (y - norm(mean / factor)) / np.sqrt(norm(var / factor) + BN_EPS)
                    + norm(beta), 0)
  np.testing.assert_allclose(model.encoder.conv1_1(nhwc(x))[0], nhwc(want)[0], rtol=1e-4, atol=1e-3)


def test_imported_fcn8s_crops_back_to_the_input_size(tmp_path):
  path = write_net(tmp_path / "fcn.caffemodel", fcn8s_layers(np.random.default_rng(8)))
  model = model_from(*load_caffe(path, "fcn8s"))
  rng = np.random.default_rng(0)
  for h, w in ((32, 32), (45, 61), (70, 33)):
    out = forward(model, rng.normal(0, 50, (1, h, w, 3)).astype(np.float32))
    assert out.shape == (1, h, w, 21) and np.isfinite(np.asarray(out)).all()


def test_bad_files_raise_caffe_error_naming_file_layer_and_shapes(tmp_path):
  notes = tmp_path / "notes.caffemodel"
  notes.write_text("this is not a Caffe model, just some text\n")
  noise = tmp_path / "noise.caffemodel"
  noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
  for path in (notes, noise):
    with pytest.raises(CaffeError, match=str(path)):
      load_caffe(path, "fcn8s")

  full = write_net(tmp_path / "fcn.caffemodel", fcn8s_layers(np.random.default_rng(9)))
  truncated = tmp_path / "truncated.caffemodel"
  truncated.write_bytes(full.read_bytes()[:len(full.read_bytes()) * 3 // 5])
  with pytest.raises(CaffeError, match=f"{truncated}.*truncated"):
    load_caffe(truncated, "fcn8s")

  layers = [layer for layer in fcn8s_layers(np.random.default_rng(9)) if layer["name"] != "score_pool3"]
  with pytest.raises(CaffeError, match="no layer 'score_pool3'"):
    load_caffe(write_net(tmp_path / "missing.caffemodel", layers), "fcn8s")

  with pytest.raises(CaffeError, match=r"fcn.caffemodel: layer 'score_fr' weights has shape "
                                       r"\(21, 16, 1, 1\) where the model expects \(5, 16, 1, 1\)"):
    load_caffe(full, "fcn8s", num_classes=5)

  layers = fcn8s_layers(np.random.default_rng(9))
  blobs_of(layers)["conv3_1"][0] = np.zeros((ch(256), 7, 3, 3), np.float32)
  with pytest.raises(CaffeError, match=r"'conv3_1' weights has shape \(32, 7, 3, 3\).*\(32, 16, 3, 3\)"):
    load_caffe(write_net(tmp_path / "wrong.caffemodel", layers), "fcn8s")

  with pytest.raises(CaffeError, match="no layer 'seg-score-voc'"):
    load_caffe(full, "deconvnet")


def test_cli_writes_a_checkpoint_load_model_reads_and_nothing_on_failure(tmp_path, capsys):
  path = write_net(tmp_path / "fcn.caffemodel", fcn8s_layers(np.random.default_rng(10)))
  out = tmp_path / "runs" / "fcn8s_caffe"
  assert convert_caffe.main([str(path), "--kind", "fcn8s", "--out", str(out), "--num-classes", "21"]) == 0
  model, meta = checkpoints.load_model(out)
  assert meta["input_norm"] == "caffe_bgr" and meta["model"]["arch"] == "fcn8s"
  assert meta["class_names"][15] == "person"
  _, expected = load_caffe(path, "fcn8s")
  got = flat(get_variables(model))
  assert got.keys() == flat(expected).keys()
  for key, value in flat(expected).items():
    np.testing.assert_array_equal(got[key], value, err_msg=key)

  assert convert_caffe.main([str(path), "--kind", "fcn8s", "--out", str(out)]) == 2  # exists
  assert "already exists" in capsys.readouterr().err
  bad = tmp_path / "bad.caffemodel"
  bad.write_bytes(path.read_bytes()[:5000])
  for argv in ([str(bad), "--kind", "fcn8s"], [str(path), "--kind", "fcn8s", "--num-classes", "5"]):
    assert convert_caffe.main(argv + ["--out", str(tmp_path / "runs" / "failed")]) == 2
  assert "score_fr" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path / "runs")) == ["fcn8s_caffe"]  # no partial or temporary output
