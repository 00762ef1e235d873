"""VGG16 import: torchvision key names and layouts mapped onto our encoder, checked numerically."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deconvnet_jax.configs import model_config
from deconvnet_jax.models import VGG16_PLAN, build_model, get_variables
from deconvnet_jax.weights import load_vgg16, read_state_dict, vgg16_variables

SMALL = dict(input_norm="torchvision_rgb")


def fake_vgg16(width=0.125, fc=64, k=2, batch_norm=False, seed=0):
  """A state dict with torchvision's key names and layouts (OIHW convs, [out, in] linears)."""
  rng = np.random.default_rng(seed)
  sd, index, cin = {}, 0, 3
  for plan in VGG16_PLAN:
    for cout in plan:
      cout = max(1, round(cout * width))
      sd[f"features.{index}.weight"] = rng.normal(size=(cout, cin, 3, 3)).astype(np.float32)
      sd[f"features.{index}.bias"] = rng.normal(size=cout).astype(np.float32)
      if batch_norm:
        for name in ("weight", "bias", "running_mean"):
          sd[f"features.{index + 1}.{name}"] = rng.normal(size=cout).astype(np.float32)
        sd[f"features.{index + 1}.running_var"] = rng.uniform(0.5, 2, size=cout).astype(np.float32)
        sd[f"features.{index + 1}.num_batches_tracked"] = np.array(7, np.int64)
      index += 3 if batch_norm else 2
      cin = cout
    index += 1  # the MaxPool2d entry
  sd["classifier.0.weight"] = rng.normal(size=(fc, cin * k * k)).astype(np.float32)
  sd["classifier.0.bias"] = rng.normal(size=fc).astype(np.float32)
  sd["classifier.3.weight"] = rng.normal(size=(fc, fc)).astype(np.float32)
  sd["classifier.3.bias"] = rng.normal(size=fc).astype(np.float32)
  sd["classifier.6.weight"] = rng.normal(size=(1000, fc)).astype(np.float32)
  sd["classifier.6.bias"] = rng.normal(size=1000).astype(np.float32)
  return sd


def conv3x3_reference(x, weight, bias):
  """NumPy, float64: PyTorch's Conv2d(pad=1) with an OIHW weight on an NHWC input."""
  x = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  h, w = x.shape[1] - 2, x.shape[2] - 2
  out = np.zeros((x.shape[0], h, w, weight.shape[0]))
  for dy in range(3):
    for dx in range(3):
      out += np.einsum("bhwi,oi->bhwo", x[:, dy:dy + h, dx:dx + w], weight[:, :, dy, dx])
  return out + bias


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg16_mapping_reproduces_torch_layers(tmp_path, batch_norm):
  sd = fake_vgg16(batch_norm=batch_norm)
  np.savez(tmp_path / "vgg.npz", **sd)
  model = build_model(model_config("small", **SMALL))
  names = load_vgg16(model, tmp_path / "vgg.npz")
  assert names[0] == "conv1_1" and names[-2:] == ["fc6", "fc7"] and len(names) == 15
  model.eval()
  rng = np.random.default_rng(1)

  x = rng.normal(size=(2, 6, 5, 3)).astype(np.float32)
  conv = model.encoder.conv1_1.layer
  np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))),
                             conv3x3_reference(x, sd["features.0.weight"], sd["features.0.bias"]),
                             rtol=1e-4, atol=1e-4)
  # The last conv of stage 5 too (index 28 plain / 40 with BN).
  last = max(int(k.split(".")[1]) for k in sd if k.endswith(".weight") and sd[k].ndim == 4)
  x5 = rng.normal(size=(1, 4, 4, 64)).astype(np.float32)
  np.testing.assert_allclose(np.asarray(model.encoder.conv5_3.layer(jnp.asarray(x5))),
                             conv3x3_reference(x5, sd[f"features.{last}.weight"],
                                               sd[f"features.{last}.bias"]), rtol=1e-4, atol=1e-4)

  # fc6: torch flattens pool5 in C, H, W order before its Linear.
  pool5 = rng.normal(size=(2, 2, 2, 64)).astype(np.float32)
  want = pool5.transpose(0, 3, 1, 2).reshape(2, -1) @ sd["classifier.0.weight"].T.astype(np.float64)
  got = model.encoder.fc6.layer(jnp.asarray(pool5))
  np.testing.assert_allclose(np.asarray(got)[:, 0, 0], want + sd["classifier.0.bias"], rtol=1e-4, atol=1e-3)
  h = rng.normal(size=(2, 1, 1, 64)).astype(np.float32)
  want7 = h[:, 0, 0] @ sd["classifier.3.weight"].T + sd["classifier.3.bias"]
  np.testing.assert_allclose(np.asarray(model.encoder.fc7.layer(jnp.asarray(h)))[:, 0, 0], want7,
                             rtol=1e-4, atol=1e-4)

  if batch_norm:  # BatchNorm of conv3_1 (features.14 -> features.15) in inference mode
    bn, p = model.encoder.conv3_1.bn, "features.15"
    z = rng.normal(size=(1, 2, 2, 32)).astype(np.float32)
    ref = (z - sd[f"{p}.running_mean"]) / np.sqrt(sd[f"{p}.running_var"] + 1e-5)
    ref = ref * sd[f"{p}.weight"] + sd[f"{p}.bias"]
    np.testing.assert_allclose(np.asarray(bn(jnp.asarray(z))), ref, rtol=1e-4, atol=1e-4)


def test_paper_model_takes_full_size_vgg16_shapes():
  """The real torchvision shapes (138 M values) fit the paper configuration's encoder."""
  sd = {k: np.zeros(v.shape, np.float32) if k != "classifier.0.weight" else v
        for k, v in fake_vgg16(width=1.0, fc=4096, k=7, batch_norm=True).items()}
  model = nnx.eval_shape(lambda: build_model(model_config("paper", **SMALL)))
  variables = jax.tree.map(lambda x: x, get_variables(model))
  vgg16_variables(sd, variables["params"], variables["batch_stats"])
  fc6 = variables["params"]["encoder"]["fc6"]["layer"]["kernel"]
  assert fc6.shape == (7, 7, 512, 4096)
  # Entry [y, x, c, o] comes from torch's column c * 49 + y * 7 + x.
  np.testing.assert_array_equal(fc6[2, 5, 300, 17], sd["classifier.0.weight"][17, 300 * 49 + 2 * 7 + 5])


def test_wrong_width_and_wrong_files_are_clear_errors(tmp_path):
  np.savez(tmp_path / "vgg.npz", **fake_vgg16(width=0.25))
  with pytest.raises(ValueError, match=r"features.0.weight has shape \(3, 3, 3, 16\) where the model "
                                       r"expects \(3, 3, 3, 8\)"):
    load_vgg16(build_model(model_config("small", **SMALL)), tmp_path / "vgg.npz")
  with pytest.raises(ValueError, match="input_norm='torchvision_rgb'"):
    load_vgg16(build_model(model_config("small")), tmp_path / "vgg.npz")
  np.savez(tmp_path / "bn.npz", **fake_vgg16(batch_norm=True))
  with pytest.raises(ValueError, match="vgg16_bn weights but the model has no BatchNorm"):
    load_vgg16(build_model(model_config("fcn8s-small", **SMALL)), tmp_path / "bn.npz")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
  with pytest.raises(ValueError, match="junk.pth: cannot read as a PyTorch state dict"):
    read_state_dict(tmp_path / "junk.pth")
  with pytest.raises(FileNotFoundError, match="missing.pth: no such weights file"):
    read_state_dict(tmp_path / "missing.pth")


@pytest.mark.parametrize("zip_format", [True, False])
def test_reads_torch_files_without_torch(tmp_path, zip_format):
  torch = pytest.importorskip("torch")
  sd = fake_vgg16(batch_norm=True)
  tensors = {k: torch.from_numpy(v) for k, v in sd.items()}
  tensors["features.0.weight"] = tensors["features.0.weight"].transpose(2, 3).contiguous().transpose(2, 3)
  torch.save(tensors, tmp_path / "vgg.pth", _use_new_zipfile_serialization=zip_format)
  got = read_state_dict(tmp_path / "vgg.pth")
  assert got.keys() == sd.keys()
  for k, v in sd.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
    np.testing.assert_array_equal(got[k], v)
  data = (tmp_path / "vgg.pth").read_bytes()
  (tmp_path / "cut.pth").write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="cut.pth: cannot read as a PyTorch state dict"):
    read_state_dict(tmp_path / "cut.pth")


def test_refuses_pickled_code(tmp_path):
  import pickle  # pylint: disable=import-outside-toplevel
  import zipfile  # pylint: disable=import-outside-toplevel

  class Evil:
    def __reduce__(self):
      return (print, ("pwned",))

  with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
    z.writestr("archive/data.pkl", pickle.dumps({"x": Evil()}))
  with pytest.raises(ValueError, match="refusing to load builtins.print"):
    read_state_dict(tmp_path / "evil.pth")
