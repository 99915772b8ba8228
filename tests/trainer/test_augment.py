"""trainer/augment.py: batched per-sample SimCLR views on real colour photo patches (CPU here; the
same code runs on the GPU). Shapes, per-sample randomness, seeding, normalisation, and each op on
its own."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.augment import Augment, normalize_uint8
from trainer.data import dataset_stats

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def batch(ood_images):
    """256 real colour photo patches, uint8 [256, 32, 32, 3], and their per-channel mean/std: the
    256 of the 300 with the most pixel variation (a zoomed view of a patch of clear sky would look
    like the patch)."""
    detail = ood_images.reshape(len(ood_images), -1).std(axis=1)
    imgs = ood_images[np.sort(np.argsort(-detail, kind="stable")[:256])]
    mean, std = dataset_stats(imgs)
    return torch.from_numpy(imgs), mean, std


def _plain(mean, std, **kw) -> Augment:
    """No randomness left unless named: full-image crop, no flip, no jitter, no grayscale."""
    args = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter_p=0.0, gray_p=0.0, flip_p=0.0)
    args.update(kw)
    return Augment(32, mean, std, **args)


def test_shape_dtype_and_size(batch):
    x, mean, std = batch
    out = Augment(32, mean, std)(x[:16])
    assert out.shape == (16, 3, 32, 32) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    up = Augment(40, mean, std)(x[:3])
    assert up.shape == (3, 3, 40, 40)


def test_rejects_wrong_input(batch):
    x, mean, std = batch
    aug = Augment(32, mean, std)
    with pytest.raises(ValueError, match="uint8"):
        aug(x[:2].float())
    with pytest.raises(ValueError, match="uint8"):
        aug(x[:2].permute(0, 3, 1, 2).contiguous())


def test_full_crop_without_jitter_is_the_evaluation_transform(batch):
    x, mean, std = batch
    ref = normalize_uint8(x[:8], torch.tensor(mean), torch.tensor(std))
    torch.testing.assert_close(_plain(mean, std)(x[:8]), ref, atol=1e-5, rtol=0)


def test_flip_mirrors_the_normalised_image(batch):
    x, mean, std = batch
    ref = normalize_uint8(x[:8], torch.tensor(mean), torch.tensor(std))
    flipped = _plain(mean, std, flip_p=1.0)(x[:8])
    torch.testing.assert_close(flipped, ref.flip(-1), atol=1e-5, rtol=0)
    assert not torch.allclose(flipped, ref, atol=1e-2)        # real images are not symmetric
    # at p = 0.5 about half the images of a batch are mirrored
    torch.manual_seed(0)
    half = _plain(mean, std, flip_p=0.5)(x)
    n_flipped = sum(bool(torch.allclose(half[i], ref_i.flip(-1), atol=1e-5))
                    for i, ref_i in enumerate(normalize_uint8(x, torch.tensor(mean), torch.tensor(std))))
    assert 90 < n_flipped < 166


def test_grayscale_makes_channels_equal_before_normalisation(batch):
    x, mean, std = batch
    out = _plain(mean, std, gray_p=1.0)(x[:8])
    raw = out * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    torch.testing.assert_close(raw[:, 0], raw[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(raw[:, 1], raw[:, 2], atol=1e-5, rtol=0)
    luma = (x[:8].float() / 255) @ torch.tensor([0.299, 0.587, 0.114])
    torch.testing.assert_close(raw[:, 0], luma, atol=1e-5, rtol=0)


def test_crop_zooms_into_part_of_the_image(batch):
    x, mean, std = batch
    torch.manual_seed(1)
    out = _plain(mean, std, scale=(0.2, 0.3))(x[:8])
    ref = normalize_uint8(x[:8], torch.tensor(mean), torch.tensor(std))
    assert ((out - ref).abs().mean(dim=(1, 2, 3)) > 0.1).all()
    # a zoomed view of a constant image is the same constant
    flat = torch.full((2, 32, 32, 3), 77, dtype=torch.uint8)
    z = _plain((0.0,) * 3, (1.0,) * 3, scale=(0.2, 0.3))(flat)
    torch.testing.assert_close(z, torch.full_like(z, 77 / 255), atol=1e-6, rtol=0)


def test_each_sample_gets_its_own_random_parameters(batch):
    x, mean, std = batch
    same = x[:1].expand(8, -1, -1, -1).contiguous()          # one image, eight times
    torch.manual_seed(0)
    out = Augment(32, mean, std)(same)
    diffs = [(out[i] - out[j]).abs().max().item() for i in range(8) for j in range(i + 1, 8)]
    assert min(diffs) > 1e-3
    # the crop alone is per sample too
    crops = _plain(mean, std, scale=(0.2, 0.5))(same)
    assert (crops[0] - crops[1]).abs().max() > 1e-3


def test_two_calls_give_two_different_views(batch):
    x, mean, std = batch
    aug = Augment(32, mean, std)
    assert not torch.allclose(aug(x[:16]), aug(x[:16]))


def test_deterministic_under_a_seed(batch):
    x, mean, std = batch
    aug = Augment(32, mean, std)
    torch.manual_seed(123)
    a = aug(x[:32])
    torch.manual_seed(123)
    b = aug(x[:32])
    torch.manual_seed(124)
    c = aug(x[:32])
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_values_are_normalised_sensibly(batch):
    x, mean, std = batch
    torch.manual_seed(0)
    out = torch.cat([Augment(32, mean, std)(x) for _ in range(2)])
    # the data's own mean/std: augmented views stay centred and near unit scale
    assert out.mean(dim=(0, 2, 3)).abs().max() < 0.25
    s = out.std(dim=(0, 2, 3))
    assert ((s > 0.6) & (s < 1.4)).all()
    lo = (0 - torch.tensor(mean)) / torch.tensor(std)
    hi = (1 - torch.tensor(mean)) / torch.tensor(std)
    per_channel = out.transpose(0, 1).reshape(3, -1)
    assert (per_channel.min(1).values >= lo - 1e-5).all()
    assert (per_channel.max(1).values <= hi + 1e-5).all()


def test_jitter_changes_colour_statistics_per_image(batch):
    x, mean, std = batch
    torch.manual_seed(0)
    jit = _plain(mean, std, jitter_p=1.0)(x[:64])
    ref = normalize_uint8(x[:64], torch.tensor(mean), torch.tensor(std))
    shift = (jit.mean(dim=(2, 3)) - ref.mean(dim=(2, 3))).abs().max(dim=1).values
    assert (shift > 1e-3).float().mean() > 0.9
    # jitter_p = 0 with jitter amounts set changes nothing
    torch.testing.assert_close(_plain(mean, std, jitter_p=0.0)(x[:8]), ref[:8], atol=1e-5, rtol=0)


def test_hue_rotation_keeps_gray_pixels_and_luma():
    g = torch.full((2, 3, 4, 4), 0.4)
    out = Augment._rotate_hue(g, torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(out, g, atol=1e-5, rtol=0)
    rgb = torch.rand(3, 3, 4, 4)
    rot = Augment._rotate_hue(rgb, torch.tensor([0.3, 1.2, -2.0]))
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    torch.testing.assert_close((rot * w).sum(1), (rgb * w).sum(1), atol=1e-4, rtol=0)
    back = Augment._rotate_hue(rot, -torch.tensor([0.3, 1.2, -2.0]))
    torch.testing.assert_close(back, rgb, atol=1e-4, rtol=0)


def test_normalize_uint8_is_channel_first_and_exact():
    img = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    out = normalize_uint8(torch.from_numpy(img), torch.tensor([0.1, 0.2, 0.3]),
                          torch.tensor([0.5, 0.25, 2.0]))
    want = (img.transpose(0, 3, 1, 2) / 255.0 - np.array([0.1, 0.2, 0.3]).reshape(1, 3, 1, 1)) \
        / np.array([0.5, 0.25, 2.0]).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(out.numpy(), want, atol=1e-6)
