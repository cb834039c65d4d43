"""The photos the load benches send: "small" (web-sized real photos) and "phone" (12 MP camera JPEGs).

    python -m bench.workloads [--workload small,phone]    # make (once) and list them

"small" is what bench/serve.py always sent: the real photos that scikit-image, scikit-learn and
matplotlib install (PNG and JPEG, 50-560 KB) and one 3 MP JPEG made from one of them. "phone" is what a
phone camera uploads: 12 MP JPEGs (4000 x 3000 and 3000 x 4000) of 2-5 MB, made from the same real
photos (centre-cut to 4:3 or 3:4, upscaled, with signal-dependent sensor-like noise, encoded at quality
90 with 4:2:0 chroma like a phone's camera app), some stored sideways or upside down with the EXIF
orientation tag that turns them upright, as phones do. The noise is what makes their size and their
decode cost real: an upscaled photo without it compresses to a fraction of a camera JPEG. They are
made from a fixed seed, so every run sends the same bytes, and cached under bench/.cache/phone/ (ignored
by git) since making them takes seconds.
"""

from __future__ import annotations

import argparse
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

Photo = tuple[str, bytes, str]  # (file name, bytes, content type)
WORKLOADS = ("small", "phone")
CACHE = Path(__file__).resolve().parent / ".cache" / "phone"
# Bump when the recipe changes, so that cached photos from an older recipe are not reused.
PHONE_RECIPE = "v1"
PHONE_SEED = 20261127
PHONE_LONG, PHONE_SHORT = 4000, 3000
PHONE_QUALITY = 90
# (source photo, upright layout, EXIF orientation): the orientation says how the stored pixels must be
# turned to be upright (1 upright, 3 upside down, 6 turn 90° clockwise, 8 counter-clockwise).
PHONE_LAYOUT = (
    ("chelsea.png", "landscape", None),
    ("coffee.png", "portrait", 6),
    ("astronaut.png", "portrait", None),
    ("china.jpg", "landscape", 1),
    ("flower.jpg", "landscape", 3),
    ("grace_hopper.jpg", "portrait", 8),
)
# Stored pixels -> what a reader sees after applying the orientation; saving applies the inverse.
_STORE = {1: None, 3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}


def real_photo_paths() -> list[Path]:
    """The real photos installed with the project's dependencies (model.export's and matplotlib's)."""
    import matplotlib

    from model.export import sample_photos

    return [*sample_photos(), Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"]


def small_photos() -> list[Photo]:
    """The real photos as they are, and a 3 MP JPEG made from china.jpg (quality 90)."""
    paths = real_photo_paths()
    photos = [(p.name, p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg") for p in paths]
    china = Image.open(next(p for p in paths if p.name == "china.jpg")).convert("RGB")
    big = china.resize((2048, 1536), Image.Resampling.LANCZOS)  # 3.1 MP
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=90)
    photos.append(("generated-3MP.jpg", buf.getvalue(), "image/jpeg"))
    return photos


def phone_photos(cache: Path = CACHE) -> list[Photo]:
    """12 MP camera-like JPEGs, one per entry of PHONE_LAYOUT, made once and then read from ``cache``."""
    sources = {p.name: p for p in real_photo_paths()}
    folder = cache / PHONE_RECIPE
    photos = []
    for index, (source, layout, orientation) in enumerate(PHONE_LAYOUT):
        if source not in sources:
            continue
        width, height = (PHONE_LONG, PHONE_SHORT) if layout == "landscape" else (PHONE_SHORT, PHONE_LONG)
        name = f"phone-{Path(source).stem}-{width}x{height}-o{orientation or 0}.jpg"
        path = folder / name
        if not path.is_file():
            data = make_phone_jpeg(sources[source], (width, height), orientation, seed=PHONE_SEED + index)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)  # atomic: a concurrent run reads a whole file or makes its own
        photos.append((name, path.read_bytes(), "image/jpeg"))
    return photos


def make_phone_jpeg(source: Path, size: tuple[int, int], orientation: int | None, *, seed: int) -> bytes:
    """``source`` centre-cut to ``size``'s aspect, upscaled to ``size``, noised, and encoded as a camera does."""
    img = Image.open(source).convert("RGB")
    width, height = size
    scale = max(width / img.width, height / img.height)
    cut_w, cut_h = width / scale, height / scale
    left, top = (img.width - cut_w) / 2, (img.height - cut_h) / 2
    img = img.resize(size, Image.Resampling.BICUBIC, box=(left, top, left + cut_w, top + cut_h))
    img = Image.fromarray(add_sensor_noise(np.asarray(img), np.random.default_rng(seed)))
    exif = Image.Exif()
    exif[0x010F] = "bench"  # Make
    exif[0x0110] = "phone-12MP"  # Model
    if orientation is not None:
        exif[0x0112] = orientation
        if _STORE[orientation] is not None:
            img = img.transpose(_STORE[orientation])
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=PHONE_QUALITY, subsampling="4:2:0", exif=exif.tobytes())
    return buf.getvalue()


def add_sensor_noise(rgb: np.ndarray, rng: np.random.Generator, rows: int = 500) -> np.ndarray:
    """Photon-like noise (stronger in bright areas) plus a read-noise floor, per pixel and channel.

    A standard deviation of 3-9 grey levels, like a phone's processed output in indoor light (and
    what brings the files to a phone's 2-5 MB); done in strips of ``rows`` rows so the float temporaries stay small.
    """
    out = np.empty_like(rgb)
    for y in range(0, rgb.shape[0], rows):
        strip = rgb[y : y + rows].astype(np.float32)
        sigma = 3.0 + 6.0 * np.sqrt(strip / 255.0)
        strip += sigma * rng.standard_normal(strip.shape, dtype=np.float32)
        np.clip(strip, 0, 255, out=strip)
        out[y : y + rows] = strip.astype(np.uint8)
    return out


def load_workload(name: str) -> list[Photo]:
    if name == "small":
        return small_photos()
    if name == "phone":
        return phone_photos()
    raise ValueError(f"unknown workload {name!r} (known: {', '.join(WORKLOADS)})")


def parse_workloads(text: str) -> list[str]:
    """'small,phone' -> ['small', 'phone'], refusing unknown names (for the benches' --workload)."""
    names = [w for w in text.split(",") if w]
    unknown = [w for w in names if w not in WORKLOADS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--workload takes {', '.join(WORKLOADS)} (comma-separated)")
    return names


def describe(photos: list[Photo]) -> list[dict[str, object]]:
    """Name, bytes, stored size and EXIF orientation of each photo (for the results JSON)."""
    out = []
    for name, data, _ in photos:
        with Image.open(io.BytesIO(data)) as img:
            orientation = img.getexif().get(0x0112)
            out.append({"name": name, "bytes": len(data), "size": list(img.size), "orientation": orientation})
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Make (once) and list the bench workloads' photos.")
    p.add_argument("--workload", default=",".join(WORKLOADS), help="workloads to list (default: %(default)s)")
    return p


def main(args: argparse.Namespace) -> None:
    for workload in parse_workloads(args.workload):
        photos = load_workload(workload)
        total = sum(len(d) for _, d, _ in photos)
        print(f"{workload}: {len(photos)} photos, {total / 1e6:.1f} MB")
        for row in describe(photos):
            print(
                f"  {row['name']}: {row['bytes'] / 1e3:.0f} KB, stored {row['size']}, orientation {row['orientation']}"
            )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
