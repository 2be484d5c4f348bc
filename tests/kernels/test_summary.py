import numpy as np
import torch

from featscope.kernels.summary import conv_summary


def test_conv_summary_matches_a_loop_over_channels():
    g = torch.Generator().manual_seed(0)
    act = torch.randn(3, 5, 7, 9, generator=g)
    s = conv_summary(act)
    a = act.numpy()
    for b in range(3):
        for c in range(5):
            m = a[b, c]
            y, x = np.unravel_index(np.argmax(m), m.shape)
            assert s.max[b, c] == m.max()
            assert (s.argmax_y[b, c], s.argmax_x[b, c]) == (y, x)
            np.testing.assert_allclose(s.mean[b, c], m.mean(dtype=np.float64), atol=1e-6)
    assert s.argmax_y.dtype == torch.int16


def test_ties_go_to_the_first_cell_in_row_major_order():
    act = torch.zeros(1, 1, 4, 4)
    act[0, 0, 1, 3] = act[0, 0, 2, 0] = 5.0
    s = conv_summary(act)
    assert (int(s.argmax_y), int(s.argmax_x)) == (1, 3)


def test_channels_last_and_bf16_inputs_give_the_same_cells():
    act = torch.randn(2, 4, 6, 6)
    ref = conv_summary(act)
    cl = conv_summary(act.contiguous(memory_format=torch.channels_last))
    assert torch.equal(ref.argmax_y, cl.argmax_y) and torch.equal(ref.argmax_x, cl.argmax_x)
    assert conv_summary(act.bfloat16()).max.dtype == torch.float32


def test_pixel_thumbnail_is_the_block_mean_of_the_input():
    from featscope.kernels.summary import pixel_thumbnail

    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    thumb = pixel_thumbnail(x, side=32)
    expected = x.double().reshape(2, 3, 32, 2, 32, 2).mean(dim=(3, 5)) / 255
    assert thumb.shape == (2, 3 * 32 * 32)
    np.testing.assert_allclose(thumb.numpy(), expected.reshape(2, -1).numpy(), atol=1e-6)
