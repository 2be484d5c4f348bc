import torch

from featscope.kernels.topk import RunningTopK, merge_topk


def brute_force(values, ids, k):
    """Per channel, the k best (value desc, image_id asc) pairs."""
    return [sorted((-float(values[j, c]), int(ids[j])) for j in range(len(ids)))[:k] for c in range(values.shape[1])]


def as_pairs(result, channels):
    return [[(-float(v), int(i)) for v, i, ch in zip(result["value"], result["image_id"], result["channel"]) if ch == c]
            for c in range(channels)]


def test_running_topk_equals_a_full_sort_with_ties_to_the_smaller_id():
    g = torch.Generator().manual_seed(0)
    values = torch.randint(0, 4, (60, 5), generator=g).float()  # many ties
    ids = torch.randperm(60, generator=g) + 1000
    cells = torch.randint(0, 7, (60, 5), generator=g)
    for batch in (1, 7, 60):
        top = RunningTopK(5, 4)
        for i in range(0, 60, batch):
            top.update(values[i:i + batch], ids[i:i + batch], cells[i:i + batch], cells[i:i + batch] + 1)
        result = top.result()
        assert as_pairs(result, 5) == brute_force(values, ids, 4)
        for v, i, ch, fy, fx in zip(result["value"], result["image_id"], result["channel"], result["fy"], result["fx"]):
            j = int((ids == i).nonzero())
            assert cells[j, ch] == fy and fx == fy + 1


def test_fewer_images_than_k_keep_only_filled_slots():
    top = RunningTopK(2, 5)
    top.update(torch.tensor([[1.0, 2.0], [3.0, 0.5]]), torch.tensor([7, 8]))
    r = top.result()
    assert r["channel"].tolist() == [0, 0, 1, 1] and r["image_id"].tolist() == [8, 7, 7, 8]
    assert r["rank"].tolist() == [0, 1, 0, 1]


def test_merging_shard_candidates_equals_one_pass_over_everything():
    g = torch.Generator().manual_seed(1)
    values, ids = torch.randint(0, 5, (90, 3), generator=g).float(), torch.arange(90)
    whole = RunningTopK(3, 6)
    whole.update(values, ids)
    shards = []
    for s in range(3):
        part = RunningTopK(3, 6)
        part.update(values[s * 30:(s + 1) * 30], ids[s * 30:(s + 1) * 30])
        shards.append(part.result())
    cat = {k: torch.cat([r[k] for r in shards]) for k in shards[0]}
    keep = merge_topk(cat["channel"], cat["value"], cat["image_id"], 6)
    expected = whole.result()
    assert torch.equal(cat["image_id"][keep], expected["image_id"])
    assert torch.equal(cat["channel"][keep], expected["channel"])
