"""Each saliency method against an independent, straightforward reference written here."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.guided import guided_relus
from featscope.kernels.occlusion import covered_per_pass
from featscope.kernels.saliency import attribute, copies_per_pass
from featscope.kernels.segment import grabcut_mask

ARCHS = ["alexnet", "vgg16", "resnet18", "mobilenet_v2"]
SIZE = 64  # the smallest input every one of the four architectures accepts, quick on a CPU


@pytest.fixture(scope="module")
def models():
    built = {}
    for arch in ARCHS:
        torch.manual_seed(0)
        built[arch] = torchvision.models.get_model(arch, weights=None).eval()
    return built


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE, generator=g)


def targets(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def plain_gradient_map(model, x, target):
    x = x.clone().requires_grad_(True)
    logits = model(x)
    logits[torch.arange(len(x)), target].sum().backward()
    return x.grad.abs().amax(1)


def close(actual, expected, rel=1e-4):
    scale = expected.abs().max().item()
    assert scale > 0, "the reference map is all zeros: the test would prove nothing"
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


def differs(a, b):
    """Maps that differ by more than 1% of their range somewhere (scale-free: random-weight
    models can have gradients of 1e-12)."""
    return not torch.allclose(a / a.abs().max(), b / b.abs().max(), rtol=0, atol=0.01)


@pytest.mark.parametrize("arch", ARCHS)
def test_gradient_is_the_plain_autograd_input_gradient(models, images, arch):
    model = models[arch]
    t = targets(model, images)
    close(attribute(model, images, t, "gradient"), plain_gradient_map(model, images, t))


class _ReferenceGuidedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, upper):
        ctx.save_for_backward(x)
        ctx.upper = upper
        return x.clamp(0, upper) if upper is not None else x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        open_range = (x > 0) if ctx.upper is None else (x > 0) & (x < ctx.upper)
        return grad * open_range * (grad > 0), None


class ReferenceGuidedReLU(nn.Module):
    def __init__(self, upper=None):
        super().__init__()
        self.upper = upper

    def forward(self, x):
        return _ReferenceGuidedReLU.apply(x, self.upper)


def swapped_guided_model(model):
    """A copy of `model` whose every ReLU/ReLU6 module is replaced by a guided one."""
    guided = copy.deepcopy(model)
    for name, module in list(guided.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(module, child_name, ReferenceGuidedReLU(6.0))
            elif isinstance(child, nn.ReLU):
                setattr(module, child_name, ReferenceGuidedReLU())
    return guided


@pytest.mark.parametrize("arch", ARCHS)
def test_guided_backprop_equals_a_model_with_swapped_guided_relus(models, images, arch):
    model = models[arch]
    t = targets(model, images)
    expected = plain_gradient_map(swapped_guided_model(model), images, t)
    actual = attribute(model, images, t, "guided")
    close(actual, expected)
    assert differs(actual, plain_gradient_map(model, images, t)), "guiding changed nothing"


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_guided_backprop_leaves_the_model_as_it_was_even_when_it_raises(models, images, arch):
    model = models[arch]
    before = ({k: v.clone() for k, v in model.state_dict().items()},
              [(type(m), getattr(m, "inplace", None)) for m in model.modules()])
    t = targets(model, images)
    attribute(model, images, t, "guided")
    with pytest.raises(RuntimeError):
        attribute(model, images[:, :2], t, "guided")  # two channels: the first conv raises
    assert _hooks(model) == 0
    assert [(type(m), getattr(m, "inplace", None)) for m in model.modules()] == before[1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[0][k])
    close(attribute(model, images, t, "gradient"), plain_gradient_map(model, images, t))


def test_guiding_a_model_without_rectifier_modules_is_refused():
    with pytest.raises(FeatscopeError, match="guided backprop is not defined for Sequential"):
        with guided_relus(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Tanh())):
            pass


def reference_occlusion(model, x, target, window, stride, baseline, score="logit"):
    """One forward pass per window position, in a Python loop."""
    _, _, h, w = x.shape

    def starts(n):
        s = list(range(0, n - window + 1, stride))
        return s + [n - window] if s[-1] + window < n else s

    def value(inp):
        logits = model(inp)
        if score == "probability":
            logits = logits.softmax(1)
        return logits[torch.arange(len(inp)), target]

    total, count = torch.zeros(len(x), h, w), torch.zeros(h, w)
    with torch.no_grad():
        clean = value(x)
        for y0 in starts(h):
            for x0 in starts(w):
                covered = x.clone()
                covered[:, :, y0:y0 + window, x0:x0 + window] = baseline[:, :, y0:y0 + window, x0:x0 + window]
                total[:, y0:y0 + window, x0:x0 + window] += (clean - value(covered)).view(-1, 1, 1)
                count[y0:y0 + window, x0:x0 + window] += 1
    return total / count


@pytest.mark.parametrize("arch", ARCHS)
def test_occlusion_equals_a_loop_over_window_positions(models, images, arch):
    model = models[arch]
    t = targets(model, images)
    baseline = torch.zeros_like(images)
    # window 24, stride 16 on 64 px: starts 0, 16, 32 and the far edge 40, so windows overlap
    expected = reference_occlusion(model, images, t, 24, 16, baseline)
    close(attribute(model, images, t, "occlusion", window=24, stride=16, batch=5), expected)


def test_occlusion_with_a_blurred_baseline_and_probabilities(models, images):
    model = models["resnet18"]
    t = targets(model, images)
    blurred = torchvision.transforms.functional.gaussian_blur(images, kernel_size=15, sigma=5.0)
    expected = reference_occlusion(model, images, t, 16, 16, blurred, score="probability")
    actual = attribute(model, images, t, "occlusion", window=16, stride=16, baseline=blurred, score="probability")
    close(actual, expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothgrad_is_the_mean_gradient_map_over_the_same_noise(models, images, arch):
    model = models[arch]
    t = targets(model, images)
    samples, noise = 3, 0.2
    g = torch.Generator().manual_seed(3)
    expected = torch.zeros(len(images), SIZE, SIZE)
    for b in range(len(images)):
        spread = (images[b].max() - images[b].min()) * noise
        draws = torch.randn((samples, 3, SIZE, SIZE), generator=g) * spread
        for s in range(samples):
            expected[b] += plain_gradient_map(model, images[b:b + 1] + draws[s:s + 1], t[b:b + 1])[0] / samples
    # batch=1: the reference runs one noisy copy at a time, and a batched forward pass rounds
    # differently, which can send a max-pool gradient to another pixel
    actual = attribute(model, images, t, "smoothgrad", samples=samples, noise=noise, seed=3, batch=1)
    close(actual, expected)
    assert differs(actual, plain_gradient_map(model, images, t))


@pytest.mark.parametrize("method, copies", [("smoothgrad", "samples"), ("integrated_gradients", "steps")])
def test_copies_a_pass_change_speed_not_maps(models, images, method, copies):
    """SmoothGrad's noisy copies and integrated gradients' path points go `copies_per_pass` a
    pass (4 on a CPU, where a larger batch costs more an image): the maps equal those of one
    pass over all copies, a short last pass included."""
    model = models["mobilenet_v2"]  # no max-pool, whose gradient a rounding can move to another pixel
    t = targets(model, images)
    assert copies_per_pass(images.device) == 4
    ours = attribute(model, images, t, method, **{copies: 10})  # passes of 4, 4 and 2
    close(ours, attribute(model, images, t, method, **{copies: 10}, batch=10))


def test_occlusion_windows_a_pass_change_speed_not_maps(models, images):
    """Occlusion's covered images go `covered_per_pass` a forward pass (8 on a CPU): the maps
    equal those of one pass over all windows."""
    model = models["mobilenet_v2"]
    t = targets(model, images)
    assert covered_per_pass(images.device) == 8
    ours = attribute(model, images, t, "occlusion", window=24, stride=8, cut=None)  # 36 windows: 4 passes of 8, 1 of 4
    close(ours, attribute(model, images, t, "occlusion", window=24, stride=8, cut=None, batch=36))


def _split(model, arch):
    """(body, head, layer): the model cut after its Grad-CAM layer, written out by hand."""
    if arch in ("alexnet", "vgg16"):
        cut = len(model.features) - 1  # the last ReLU, before the final max-pool
        return (model.features[:cut],
                lambda a: model.classifier(torch.flatten(model.avgpool(model.features[cut:](a)), 1)),
                model.features[cut - 1])
    if arch == "resnet18":
        body = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                             model.layer1, model.layer2, model.layer3, model.layer4)
        return body, lambda a: model.fc(torch.flatten(model.avgpool(a), 1)), model.layer4
    return (model.features, lambda a: model.classifier(F.adaptive_avg_pool2d(a, 1).flatten(1)), model.features[-1])


def hand_gradcam(model, arch, images, t):
    """Grad-CAM by its formula on the hand-split model, upsampled to the input."""
    body, head, _ = _split(model, arch)
    a = body(images).detach().requires_grad_(True)
    head(a)[torch.arange(len(a)), t].sum().backward()
    cam = F.relu((a.grad.mean((2, 3), keepdim=True) * a).sum(1, keepdim=True))
    return F.interpolate(cam, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[:, 0].detach()


@pytest.mark.parametrize("arch", ARCHS)
def test_gradcam_equals_the_formula_on_a_hand_split_model(models, images, arch):
    model = models[arch]
    t = targets(model, images)
    _, _, layer = _split(model, arch)
    expected = hand_gradcam(model, arch, images, t)
    if arch in ("alexnet", "vgg16"):
        layer = model.features[len(model.features) - 2]  # that ReLU's module
    close(attribute(model, images, t, "gradcam", layer=layer), expected)


def test_unknown_method_and_mismatched_targets_are_named_errors(models, images):
    with pytest.raises(FeatscopeError, match="unknown saliency method 'lime'"):
        attribute(models["resnet18"], images, torch.tensor([0, 1]), "lime")
    with pytest.raises(FeatscopeError, match="one target each"):
        attribute(models["resnet18"], images, torch.tensor([0]), "gradient")


def test_grabcut_mask_of_a_salient_square_covers_the_square():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 90, (120, 160, 3), dtype=np.uint8)
    square = np.zeros((120, 160), bool)
    square[30:80, 50:110] = True
    image[square] = rng.integers(200, 255, (square.sum(), 3), dtype=np.uint8)
    saliency = square.astype(np.float32) + rng.normal(0, 0.05, square.shape).astype(np.float32)
    saliency[square] *= rng.uniform(0.2, 1.0, square.sum())  # only part of the square is "sure"
    mask = grabcut_mask(image, saliency, foreground=97, background=40)
    assert mask[square].mean() > 0.97
    assert mask[~square].mean() < 0.02


@pytest.mark.parametrize("arch", ARCHS)
def test_occlusion_recomputing_only_the_window_region_equals_the_loop_at_every_cut(models, arch):
    """Cut after early, middle and late blocks; windows at the borders and overlapping."""
    from featscope.kernels.occlusion import _trunk

    model = models[arch]
    x = torch.randn(1, 3, 80, 112, generator=torch.Generator().manual_seed(2))
    t = targets(model, x)
    expected = reference_occlusion(model, x, t, 24, 20, torch.zeros_like(x))
    blocks = len(_trunk(model).blocks)
    for cut in sorted({0, blocks // 4, blocks // 2, blocks - 2}):
        close(attribute(model, x, t, "occlusion", window=24, stride=20, cut=cut, batch=7), expected)
    names = [type(m).__name__ for m in model.modules()]
    with pytest.raises(RuntimeError):  # class 5000 does not exist: raises inside the cut-model block
        attribute(model, x, torch.tensor([5000]), "occlusion", window=24, stride=20, cut=blocks // 2)
    assert [type(m).__name__ for m in model.modules()] == names, "a swapped block was left behind"


def test_integrated_gradients_is_complete_and_matches_captum():
    """Completeness (Sundararajan et al.): the map sums to score(x) - score(baseline); and the
    map equals Captum's IntegratedGradients with the same path rule on a seeded ResNet-18."""
    captum_attr = pytest.importorskip("captum.attr")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))
    t = targets(model, x)
    maps = attribute(model, x, t, "integrated_gradients", steps=64)
    with torch.no_grad():
        gap = model(x).gather(1, t[:, None])[:, 0] - model(torch.zeros_like(x)).gather(1, t[:, None])[:, 0]
    assert torch.allclose(maps.sum(dim=(1, 2)), gap, rtol=0.01), (maps.sum(dim=(1, 2)), gap)
    theirs = captum_attr.IntegratedGradients(model).attribute(x, baselines=torch.zeros_like(x), target=t,
                                                               n_steps=64, method="riemann_middle").sum(1)
    for ours, ref in zip(maps, theirs):
        assert np.corrcoef(ours.flatten().numpy(), ref.detach().flatten().numpy())[0, 1] >= 0.99
    blurred = attribute(model, x, t, "integrated_gradients", steps=64, baseline="blur")
    assert not torch.allclose(blurred, maps)  # the baseline option reaches the kernel


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_guided_gradcam_is_the_swapped_relu_guided_map_times_the_hand_split_gradcam(models, images, arch):
    """Selvaraju et al.: guided backprop (the independent swapped-ReLU reference above) times
    Grad-CAM (the hand-split formula above), at the default layer of the architecture."""
    model = models[arch]
    t = targets(model, images)
    expected = plain_gradient_map(swapped_guided_model(model), images, t) * hand_gradcam(model, arch, images, t)
    close(attribute(model, images, t, "guided_gradcam"), expected)
