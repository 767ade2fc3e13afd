import pytest
import torch

from pixelrnn.training.masks import MaskedConv1dRow, MaskedConv2d, causal_mask, channel_groups


def test_grey_masks_match_the_paper_pictures():
    one = torch.zeros(1, dtype=torch.long)
    a = causal_mask("A", (5, 5), one, one)[0, 0]
    b = causal_mask("B", (5, 5), one, one)[0, 0]
    expected_a = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]).float()
    assert torch.equal(a, expected_a)
    expected_b = expected_a.clone()
    expected_b[2, 2] = 1
    assert torch.equal(b, expected_b)


@pytest.mark.parametrize("mask_type, allowed", [("A", {(1, 0), (2, 0), (2, 1)}), ("B", {(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)})])
def test_colour_grouping_at_the_centre_tap(mask_type, allowed):
    # 3 input channels (R, G, B), 6 output features (2 per group).
    m = causal_mask(mask_type, (3, 3), channel_groups(3, 3), channel_groups(6, 3))
    centre = m[:, :, 1, 1]
    for out in range(6):
        for inp in range(3):
            assert centre[out, inp] == ((out // 2, inp) in allowed), (out, inp)
    # Off-centre taps do not depend on colour groups.
    assert torch.all(m[:, :, 0, :] == 1) and torch.all(m[:, :, 1, 0] == 1) and torch.all(m[:, :, 2, :] == 0)


def test_channel_groups_rejects_indivisible_counts():
    with pytest.raises(ValueError, match="cannot be split"):
        channel_groups(10, 3)


def test_even_kernel_and_unknown_mask_type_are_refused():
    g = channel_groups(1, 1)
    with pytest.raises(ValueError, match="odd"):
        causal_mask("A", (4, 4), g, g)
    with pytest.raises(ValueError, match="mask_type"):
        causal_mask("C", (3, 3), g, g)


def test_masked_taps_get_no_gradient_and_output_keeps_size():
    conv = MaskedConv2d(1, 2, 3, "A")
    x = torch.randn(2, 1, 6, 5)
    y = conv(x)
    assert y.shape == (2, 2, 6, 5)
    y.sum().backward()
    assert torch.all(conv.weight.grad[:, :, 1, 1:] == 0) and torch.all(conv.weight.grad[:, :, 2, :] == 0)
    assert torch.any(conv.weight.grad[:, :, 0, :] != 0)


def test_row_conv_reads_only_left_and_centre():
    conv = MaskedConv1dRow(1, 1, 3, "B")
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    x = torch.zeros(1, 1, 2, 5)
    x[0, 0, 0, 2] = 1.0  # a single hot pixel
    y = conv(x)[0, 0]
    assert y[0].tolist() == [0, 0, 1, 1, 0]  # seen by itself (mask B) and the pixel to its right
    assert torch.all(y[1] == 0)  # a 1 x 3 kernel never reaches another row
