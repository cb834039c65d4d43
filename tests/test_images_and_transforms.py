"""Decoding real and odd images, mode conversion, and the eval transform built from a bundle."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from model.images import ImageDecodeError, decode_image
from model.pixels import to_model_mode
from model.preprocessing import Preprocessing
from model.transforms import TrainAugment, build_eval_transform, build_train_transform

PREP = Preprocessing(resize=36, crop=32, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], interpolation="bilinear",
                     channels=3)  # fmt: skip


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def test_real_photo_decodes(photos) -> None:
    img = decode_image(photos["chelsea"].read_bytes())
    assert img.size == (451, 300)


def test_jpeg_draft_decodes_large_photo_smaller_but_not_below_target(photos) -> None:
    big = Image.open(photos["china"]).resize((1280, 854))
    data = _encode(big, "JPEG", quality=90)
    full = decode_image(data)
    drafted = decode_image(data, draft_size=256)
    assert full.size == (1280, 854)
    assert min(drafted.size) >= 256 and drafted.size[0] < 1280


@pytest.mark.parametrize(
    "data,code",
    [
        (b"", "empty_file"),
        (b"just some text, not an image", "not_an_image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", "not_an_image"),
    ],
)
def test_decode_errors(data: bytes, code: str) -> None:
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data)
    assert info.value.code == code


def test_truncated_png_is_rejected(photos) -> None:
    data = photos["coffee"].read_bytes()
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data[: len(data) // 2])
    assert info.value.code == "corrupt_image"


def test_pixel_limit_checked_from_header() -> None:
    data = _encode(Image.new("L", (4000, 3000)), "PNG")  # 12 MP, tiny file
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, max_pixels=10_000_000)
    assert info.value.code == "too_many_pixels"
    assert decode_image(data, max_pixels=20_000_000).size == (4000, 3000)


def test_exif_orientation_applied(photos) -> None:
    upright = Image.open(photos["chelsea"]).convert("RGB")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # how a camera stores a rotated shot
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img = decode_image(_encode(stored, "JPEG", exif=exif.tobytes(), quality=95))
    assert img.size == upright.size


def test_first_frame_of_animated_gif() -> None:
    frames = [Image.new("RGB", (20, 20), c) for c in ("red", "blue")]
    data = _encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    img = decode_image(data)
    assert to_model_mode(img, 3).getpixel((5, 5)) == (255, 0, 0)


@pytest.mark.parametrize(
    "img,expected",
    [
        (Image.new("RGBA", (4, 4), (0, 0, 0, 0)), (255, 255, 255)),  # transparent -> white, not black
        (Image.new("LA", (4, 4), (0, 0)), (255, 255, 255)),
        (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("1", (4, 4), 1), (255, 255, 255)),
        (Image.new("I;16", (4, 4), 65535), (255, 255, 255)),
    ],
)
def test_every_mode_becomes_rgb(img: Image.Image, expected) -> None:
    out = to_model_mode(img, 3)
    assert out.mode == "RGB"
    assert out.getpixel((1, 1)) == expected


def test_palette_with_transparency() -> None:
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0] * 256)
    img.info["transparency"] = 0
    assert to_model_mode(img, 3).getpixel((0, 0)) == (255, 255, 255)
    assert to_model_mode(img, 1).mode == "L"


def test_eval_transform_follows_the_bundle(photos) -> None:
    x = build_eval_transform(PREP)(Image.open(photos["coffee"]))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= (0 - 0.5) / 0.25 - 1e-6 and x.max() <= (1 - 0.5) / 0.25 + 1e-6
    grey = build_eval_transform(dataclasses.replace(PREP, channels=1, mean=[0.5], std=[0.25]))
    assert grey(Image.open(photos["coffee"])).shape == (1, 32, 32)


@pytest.mark.parametrize("policy", ["none", "trivialaugment", "randaugment", "autoaugment"])
def test_train_transform_shapes(photos, policy: str) -> None:
    aug = TrainAugment(auto_augment=policy, color_jitter=0.2, random_erasing=0.5)
    t = build_train_transform(PREP, aug)
    assert t(Image.open(photos["flower"])).shape == (3, 32, 32)


def _steps(transform, kind):
    return [t for t in transform.transforms if isinstance(t, kind)]


def test_vertical_flip_turns_the_input_upside_down(photos) -> None:
    img = Image.open(photos["chelsea"])
    flipped = build_train_transform(PREP, TrainAugment(crop="center", hflip=0, vflip=1.0))(img)
    never = build_train_transform(PREP, TrainAugment(crop="center", hflip=0, vflip=0))
    assert not _steps(never, v2.RandomVerticalFlip)
    assert torch.equal(flipped, never(img).flip(-2)) and not torch.equal(flipped, never(img))


def test_rotation_turns_each_image_by_its_own_angle_about_the_centre(photos) -> None:
    img = Image.open(photos["coffee"])
    transform = build_train_transform(PREP, TrainAugment(crop="center", hflip=0, rotation=30))
    (rotation,) = _steps(transform, v2.RandomRotation)
    assert rotation.degrees == [-30.0, 30.0] and rotation.interpolation == v2.InterpolationMode.BILINEAR
    plain = build_train_transform(PREP, TrainAugment(crop="center", hflip=0))(img)  # the same, unaugmented
    torch.manual_seed(0)
    turned = [transform(img) for _ in range(8)]
    fill = (0 - 0.5) / 0.25  # the black a rotation uncovers in the corners, normalised
    uncovered = 0
    for out in turned:
        assert out.shape == plain.shape and not torch.equal(out, plain)
        uncovered += any((out[:, y, x] == fill).all() for y in (0, -1) for x in (0, -1))
        centre = (out - plain)[:, 14:18, 14:18].abs().mean()
        assert centre < (out - plain).abs().mean(), "the centre moved more than the rest: not about the centre"
    assert uncovered >= 6, "angles beyond a few degrees uncover a corner"
    assert len({out.sum().item() for out in turned}) == 8, "the angle is not drawn per image"


def test_hue_shifts_colours_and_keeps_brightness(photos) -> None:
    """A hue shift turns the colour circle: each pixel's brightest channel (HSV value) stays, the colours move."""
    img = Image.open(photos["astronaut"])
    transform = build_train_transform(PREP, TrainAugment(crop="center", hflip=0, hue=0.5))
    (jitter,) = _steps(transform, v2.ColorJitter)
    assert jitter.hue == (-0.5, 0.5) and jitter.brightness is None and jitter.saturation is None
    plain = build_train_transform(PREP, TrainAugment(crop="center", hflip=0))(img)  # the same, unaugmented
    torch.manual_seed(0)
    shifted = transform(img)
    assert (shifted - plain).abs().mean() > 0.1, "the colours did not move"
    value_step = 2 / 255 / 0.25  # HSV round trip in 8 bits
    assert (shifted.max(0).values - plain.max(0).values).abs().max() <= value_step + 1e-6
    grey = dataclasses.replace(PREP, channels=1, mean=[0.5], std=[0.25])
    with pytest.raises(ValueError, match="--hue needs colour input"):
        build_train_transform(grey, TrainAugment(hue=0.1))


def test_small_images_use_padded_random_crop() -> None:
    prep = dataclasses.replace(PREP, resize=28, crop=28, channels=1, mean=[0.3], std=[0.35])
    aug = TrainAugment()
    assert aug.resolved_crop(prep) == "pad"
    assert build_train_transform(prep, aug)(Image.new("L", (28, 28))).shape == (1, 28, 28)


def test_file_paths_decode(photos) -> None:
    assert decode_image(photos["flower"]).size == (640, 427)
