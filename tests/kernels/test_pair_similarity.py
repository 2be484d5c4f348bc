"""The split of a pair's similarity into maps: it sums to the similarity, equals Stylianou et
al.'s pairwise sum written out, holds for grids and for resnet's pool, and falls back to
gradient x activation (computed here directly) for a fully connected layer."""

import pytest
import torch
import torch.nn.functional as F
import torchvision

from featscope.kernels.pair_similarity import (
    APPROXIMATE,
    EXACT,
    pair_maps,
    pairwise_contributions,
    pooled_pair_maps,
)


@pytest.fixture(scope="module")
def activations():
    return torch.rand(2, 16, 7, 5, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("similarity", ["cosine", "dot"])
def test_global_pool_split_sums_to_the_similarity_and_equals_the_pairwise_sum(activations, similarity):
    result = pooled_pair_maps(activations, similarity=similarity)
    fa, fb = activations.double().mean(dim=(2, 3))
    expected = (fa @ fb / (fa.norm() * fb.norm())) if similarity == "cosine" else fa @ fb
    assert result.method == EXACT and result.similarity == pytest.approx(expected.item(), rel=1e-12)
    for i in range(2):
        assert result.maps[i].sum().item() == pytest.approx(expected.item(), rel=1e-5)
    pairs = pairwise_contributions(activations, similarity=similarity)
    torch.testing.assert_close(result.maps[0].double().flatten(), pairs.sum(1), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(result.maps[1].double().flatten(), pairs.sum(0), rtol=1e-5, atol=1e-9)


def test_grid_pool_split_sums_to_the_similarity_even_where_cells_overlap(activations):
    result = pooled_pair_maps(activations, (2, 2))  # 7x5 into 2x2: adaptive cells share a row
    fa, fb = F.adaptive_avg_pool2d(activations.double(), (2, 2)).flatten(1)
    cosine = (fa @ fb / (fa.norm() * fb.norm())).item()
    assert result.maps[0].sum().item() == pytest.approx(cosine, rel=1e-5)
    assert result.maps[1].sum().item() == pytest.approx(cosine, rel=1e-5)


def test_resnet_pool_is_split_exactly_and_fc_by_gradient_times_activation():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    pooled = pair_maps(model, x, model.layer4, feature=model.avgpool)
    assert pooled.method == EXACT
    with torch.no_grad():
        vectors = torch.flatten(model.avgpool(_layer4(model, x)), 1)
    cosine = F.cosine_similarity(vectors[0], vectors[1], dim=0).item()
    assert pooled.similarity == pytest.approx(cosine, rel=1e-5)
    assert pooled.maps[0].sum().item() == pytest.approx(cosine, rel=1e-4)

    fc = pair_maps(model, x, model.layer4, feature=model.fc)
    assert fc.method == APPROXIMATE
    act = _layer4(model, x).requires_grad_(True)
    logits = model.fc(torch.flatten(model.avgpool(act), 1))
    value = F.cosine_similarity(logits[0], logits[1], dim=0)
    (grad,) = torch.autograd.grad(value, act)
    torch.testing.assert_close(fc.maps, (grad * act.detach()).sum(1), rtol=1e-4, atol=1e-6)
    assert fc.similarity == pytest.approx(value.item(), rel=1e-5)


def _layer4(model, x):
    with torch.no_grad():
        y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        return model.layer4(model.layer3(model.layer2(model.layer1(y))))
