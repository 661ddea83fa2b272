"""Predicting on your own files: photo preprocessing, IDX and .npy inputs, per-file errors,
and `fashionlab predict` end to end."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_one_line_error, run_cli
from PIL import Image, ImageDraw, ImageOps

from fashionlab.artifacts import ModelFileError, SavedModel, load_model, save_model
from fashionlab.config import DenseLayer, ModelSpec
from fashionlab.data import CLASS_NAMES, DEBIAN_DIR, read_idx, write_idx
from fashionlab.models import build_module
from fashionlab.predict import (
    ImageFileError,
    load_image,
    load_images,
    predict,
    predict_files,
    predictions_to_dict,
    preprocess_photo,
    preview,
)

needs_real_data = pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"the Debian package dataset-fashion-mnist is not installed ({DEBIAN_DIR})")


# --- synthetic photos ------------------------------------------------------------------------


def shirt_photo(size: tuple[int, int] = (300, 200), item: int = 40, background: int = 255,
                mode: str = "RGB") -> Image.Image:
    """A shirt-like polygon filling the middle of a (width, height) picture: wider than tall."""
    w, h = size
    image = Image.new(mode, size, (background,) * len(mode) if len(mode) > 1 else background)
    outline = [(0.37, 0.2), (0.63, 0.2), (0.77, 0.4), (0.7, 0.5), (0.63, 0.42), (0.63, 0.85),
               (0.37, 0.85), (0.37, 0.42), (0.3, 0.5), (0.23, 0.4)]
    fill = (item, item, item + 20)[:len(mode)] if len(mode) > 1 else item
    ImageDraw.Draw(image).polygon([(x * w, y * h) for x, y in outline], fill=fill)
    return image


def trousers_photo(size: tuple[int, int] = (150, 400)) -> Image.Image:
    """Two dark legs on white: much taller than wide."""
    w, h = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([0.3 * w, 0.1 * h, 0.7 * w, 0.3 * h], fill=(30, 30, 50))
    draw.rectangle([0.3 * w, 0.3 * h, 0.48 * w, 0.9 * h], fill=(30, 30, 50))
    draw.rectangle([0.52 * w, 0.3 * h, 0.7 * w, 0.9 * h], fill=(30, 30, 50))
    return image


def _extent(image: np.ndarray, axis: int) -> tuple[int, int]:
    """First and last index along `axis` (0: rows, 1: columns) holding a lit pixel."""
    lit = np.flatnonzero((image > 0.05).any(axis=1 - axis))
    return int(lit[0]), int(lit[-1])


# --- preprocessing ---------------------------------------------------------------------------


def test_a_dark_item_on_a_light_background_is_inverted_and_padded_to_square():
    out = preprocess_photo(shirt_photo())
    assert out.shape == (28, 28) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() == 1
    assert out[14, 14] > 0.9  # the item is bright
    assert out[0, 0] == 0 and out[27, 27] == 0  # on black
    # Wider than tall: the item spans all columns and is centred between empty rows.
    assert _extent(out, 1) == (0, 27)
    top, bottom = _extent(out, 0)
    assert top > 1 and bottom < 26 and abs(top - (27 - bottom)) <= 1


def test_a_light_item_on_a_dark_background_is_not_inverted():
    light = shirt_photo()
    out = preprocess_photo(ImageOps.invert(light))
    assert out[14, 14] > 0.9 and out[0, 0] == 0
    np.testing.assert_allclose(out, preprocess_photo(light), atol=0.02)


def test_inversion_can_be_forced():
    dark_background = ImageOps.invert(shirt_photo())
    assert preprocess_photo(dark_background, invert=True)[14, 14] < 0.1


def test_a_tall_item_spans_all_rows_and_is_centred_between_empty_columns():
    out = preprocess_photo(trousers_photo())
    assert _extent(out, 0) == (0, 27)
    left, right = _extent(out, 1)
    assert left > 3 and right < 24 and abs(left - (27 - right)) <= 1


def test_transparency_is_a_white_background():
    photo = shirt_photo()
    rgba = photo.convert("RGBA")
    alpha = np.where(np.asarray(photo.convert("L")) > 128, 0, 255).astype(np.uint8)
    rgba.putalpha(Image.fromarray(alpha))  # background fully transparent, item opaque
    buffer = io.BytesIO()
    rgba.save(buffer, "PNG")
    out = preprocess_photo(Image.open(buffer))
    np.testing.assert_allclose(out, preprocess_photo(photo), atol=0.02)


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "I;16 see-through", "1", "L"])
@pytest.mark.parametrize("side", [2600, 4096])
def test_a_picture_far_larger_than_needed_is_averaged_down_first_to_the_same_result(
        mode: str, side: int):
    # A picture 4x WORKING_SIDE across or more is reduced (block means) before it is converted,
    # to spare memory: what comes out is what converting the whole picture first and then
    # shrinking it gives (a side that is no multiple of the block too).
    photo = shirt_photo().resize((side, side), Image.Resampling.BICUBIC).convert("L")
    if mode == "RGBA":  # a see-through background, in a colour compositing must not show
        alpha = np.where(np.asarray(photo) > 128, 0, 255).astype(np.uint8)
        pixels = np.dstack([np.asarray(photo)] * 3 + [alpha])
        picture = Image.fromarray(np.where(alpha[..., None] == 0, 0, pixels).astype(np.uint8))
        on_white = Image.fromarray(np.where(alpha == 0, 255, np.asarray(photo)).astype(np.uint8))
    elif mode.startswith("I;16"):
        picture = Image.fromarray(np.asarray(photo, np.uint16) * 257)
        if mode.endswith("see-through"):  # a tRNS level, which 16-bit pictures ignore
            picture.info["transparency"] = 0
        on_white = photo
    else:
        picture = photo.convert(mode)
        on_white = picture.convert("L")
    shrunk = on_white.copy()
    shrunk.thumbnail((512, 512), Image.Resampling.LANCZOS)
    np.testing.assert_allclose(preprocess_photo(picture), preprocess_photo(shrunk), atol=0.03)


def test_exif_orientation_is_applied(tmp_path: Path):
    upright = trousers_photo()
    sideways = upright.transpose(Image.Transpose.ROTATE_90)  # as a camera stores it
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "trousers.jpg"
    sideways.save(path, exif=exif, quality=95)
    out = load_image(path)[0]
    assert _extent(out, 0) == (0, 27)  # tall again
    np.testing.assert_allclose(out, preprocess_photo(upright), atol=0.06)


def test_damaged_exif_data_are_ignored(tmp_path: Path):
    """A PNG whose eXIf chunk is no EXIF: predicted as if it had none, not a traceback."""
    path = tmp_path / "bad-exif.png"
    shirt_photo().save(path, exif=b"garbage!garbage!")
    with Image.open(path) as image, pytest.raises(SyntaxError):
        image.getexif()  # what Pillow makes of it
    assert np.array_equal(load_image(path)[0], preprocess_photo(shirt_photo()))


def test_a_jpegs_damaged_exif_data_are_ignored_without_a_warning(tmp_path: Path):
    """Pillow reads a JPEG's EXIF data as it opens it, and only warns of damaged ones
    ("UserWarning: Corrupt EXIF data", two lines on stderr): predicted as if it had none."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    trousers_photo().save(buffer, format="JPEG", exif=exif, quality=95)
    data = bytearray(buffer.getvalue())
    start = data.index(b"Exif") + 10
    data[start:start + 20] = b"\xff" * 20  # the EXIF entries overwritten
    path = tmp_path / "damaged-exif.jpg"
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="Corrupt EXIF"):
        image = Image.open(path)  # what Pillow does with it
    with image:
        plain = tmp_path / "plain.png"
        image.convert("RGB").save(plain)  # the same pixels, no EXIF
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load_image(path)
    # (not turned: the orientation is lost with the entries; a JPEG decodes in its own gray)
    np.testing.assert_allclose(loaded, load_image(plain), atol=0.06)


def test_a_model_whose_outputs_overflow_is_an_error_not_a_nan_answer(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """Finite weights whose logits are infinite: softmax gave "Bag nan", exit 0."""
    spec = ModelSpec(layers=(DenseLayer(16),))
    module = build_module(spec)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.mul_(1e30)
    model = save_model(tmp_path / "model", spec=spec, state=module.state_dict(),
                       class_names=CLASS_NAMES, metadata={})
    image = tmp_path / "shirt.png"
    shirt_photo().save(image)
    with pytest.raises(ModelFileError, match="outputs are not finite"):
        predict(load_model(model), load_image(image))
    for options in ([], ["--json"]):  # --json: no bare NaN for JSON parsers to refuse
        code, out, err = run_cli(capsys, "predict", str(model), str(image), *options)
        assert_one_line_error(code, err, "outputs are not finite")
        assert out == ""


def test_a_lab_picture_is_read_by_its_lightness(tmp_path: Path):
    """Pillow reads LAB TIFFs but converts LAB to no other mode: its L channel is the gray."""
    gray = shirt_photo().convert("L")
    neutral = Image.new("L", gray.size, 128)  # a and b at 128: no colour
    path = tmp_path / "lab.tif"
    Image.merge("LAB", (gray, neutral, neutral)).save(path)
    gray.save(tmp_path / "gray.png")
    assert np.array_equal(load_image(path), load_image(tmp_path / "gray.png"))


def test_any_failure_of_pillows_decoders_is_one_line(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch):
    """Pillow's decoders raise many kinds of error on damaged data (a DDS file with pixel
    flags it does not know: NotImplementedError): each is that file's one line."""
    path = tmp_path / "odd.png"
    shirt_photo().save(path)

    def unknown(self: Image.Image) -> None:
        raise NotImplementedError("Unknown pixel format flags 16384")

    monkeypatch.setattr(Image.Image, "load", unknown)
    monkeypatch.setattr("PIL.PngImagePlugin.PngImageFile.load", unknown)
    with pytest.raises(ImageFileError) as error:
        load_image(path)
    assert str(error.value) == (f"{path}: corrupt or truncated image (Unknown pixel format "
                                "flags 16384)")


def test_sixteen_bit_pictures():
    eight = np.asarray(shirt_photo().convert("L"), dtype=np.uint16)
    sixteen = Image.fromarray(eight * 257)  # (H, W) uint16: mode I;16
    np.testing.assert_allclose(preprocess_photo(sixteen), preprocess_photo(
        Image.fromarray(eight.astype(np.uint8))), atol=0.01)


@pytest.mark.parametrize(("factor", "mode"), [(16, "I;16"), (100, "I")])
def test_pictures_with_fewer_bits_than_their_container(factor: int, mode: str):
    """12-bit data in a 16-bit PNG (a camera's raw), 15 bits in a 32-bit TIFF: read at their
    own depth, not as a nearly black 16-bit picture."""
    eight = np.asarray(shirt_photo().convert("L"), dtype=np.int32)
    deep = Image.fromarray((eight * factor).astype(np.uint16 if mode == "I;16" else np.int32))
    assert deep.mode == mode
    expected = preprocess_photo(Image.fromarray(eight.astype(np.uint8)))
    assert expected.max() == 1
    np.testing.assert_allclose(preprocess_photo(deep), expected, atol=0.02)


def test_a_blank_picture_stays_dark():
    out = preprocess_photo(Image.new("RGB", (64, 48), (250, 250, 250)))
    assert out.shape == (28, 28) and out.max() == 0


@needs_real_data
def test_a_fashion_mnist_image_saved_as_png_comes_back_unchanged(tmp_path: Path):
    images = read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")[:5]  # (5, 28, 28) uint8
    for i, image in enumerate(images):
        for name, pixels in (("plain", image), ("inverted", 255 - image)):
            path = tmp_path / f"{name}-{i}.png"
            Image.fromarray(pixels).save(path)
            np.testing.assert_array_equal(load_image(path)[0], image / np.float32(255))


@needs_real_data
def test_fashion_mnist_images_photographed_come_back_close(real_model: SavedModel):
    """Reference check: each image as a product photo (negated, enlarged, off-centre on a
    larger, noisy, light canvas, JPEG) is turned back into nearly the original."""
    images = read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")[:40]  # (40, 28, 28) uint8
    rng = np.random.default_rng(0)
    recovered = []
    for image in images:
        scale = int(rng.integers(6, 14))
        big = np.asarray(Image.fromarray(255 - image).resize(
            (28 * scale, 28 * scale), Image.Resampling.BICUBIC), dtype=np.float32)
        height, width = 28 * scale + rng.integers(20, 200, size=2)
        paper = float(rng.integers(200, 250))
        canvas = np.full((height, width), paper, dtype=np.float32)
        top, left = rng.integers(0, height - 28 * scale + 1), rng.integers(0, width - 28 * scale + 1)
        canvas[top:top + 28 * scale, left:left + 28 * scale] = big * paper / 255
        canvas += rng.normal(0, 3, canvas.shape)
        rgb = np.repeat(np.clip(canvas, 0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, "JPEG", quality=85)
        recovered.append(preprocess_photo(Image.open(buffer)))
    recovered = np.stack(recovered)
    original = images / np.float32(255)
    assert np.abs(recovered - original).mean() < 0.08
    same = [a.labels[0] == b.labels[0] for a, b in
            zip(predict(real_model, recovered), predict(real_model, original))]
    assert np.mean(same) >= 0.85


# --- a model trained on real data --------------------------------------------------------------


@pytest.fixture(scope="module")
def real_model(tmp_path_factory: pytest.TempPathFactory) -> SavedModel:
    """dense(64) fitted to 12,000 real training images for 3 epochs (about a second): ~80%."""
    if not (DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the Debian package dataset-fashion-mnist is not installed ({DEBIAN_DIR})")
    torch.manual_seed(0)
    images = read_idx(DEBIAN_DIR / "train-images-idx3-ubyte.gz")[:12000]
    labels = read_idx(DEBIAN_DIR / "train-labels-idx1-ubyte.gz")[:12000]
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)  # (12000, 1, 28, 28)
    y = torch.from_numpy(labels).long()  # (12000,)
    spec = ModelSpec(layers=(DenseLayer(64),))
    module = build_module(spec)
    optimizer = torch.optim.Adam(module.parameters(), lr=2e-3)
    for _ in range(3):
        for batch in torch.randperm(len(x)).split(128):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(module(x[batch]), y[batch]).backward()
            optimizer.step()
    directory = save_model(tmp_path_factory.mktemp("model") / "dense", spec=spec,
                           state=module.state_dict(), class_names=CLASS_NAMES,
                           metadata={"study": "test"})
    return load_model(directory)


@pytest.fixture(scope="module")
def test_images() -> tuple[np.ndarray, np.ndarray]:
    """The first 20 real test images (20, 28, 28) uint8 and labels (20,)."""
    if not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"the Debian package dataset-fashion-mnist is not installed ({DEBIAN_DIR})")
    return (read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")[:20],
            read_idx(DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz")[:20])


def _write_pngs(directory: Path, images: np.ndarray) -> list[Path]:
    paths = []
    for i, image in enumerate(images):
        paths.append(directory / f"item-{i:02d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_predictions_from_png_files_are_sensible(
        tmp_path: Path, real_model: SavedModel, test_images: tuple[np.ndarray, np.ndarray]):
    images, labels = test_images
    results = predict_files(real_model, _write_pngs(tmp_path, images))
    assert [r.kind for r in results] == ["photo"] * len(images)
    correct = 0
    for result, label in zip(results, labels):
        assert result.error is None and len(result.predictions) == 1
        prediction = result.predictions[0]
        p = np.array(prediction.probabilities)
        assert len(p) == 3 and (np.diff(p) <= 0).all() and p.sum() <= 1 + 1e-6 and p.min() >= 0
        assert len(set(prediction.labels)) == 3
        assert prediction.classes == tuple(CLASS_NAMES[i] for i in prediction.labels)
        correct += prediction.labels[0] == label
    assert correct >= 14  # of 20; the model scores ~80%


def test_idx_npy_and_png_inputs_agree(
        tmp_path: Path, real_model: SavedModel, test_images: tuple[np.ndarray, np.ndarray]):
    images = test_images[0][:6]  # (6, 28, 28) uint8
    np.save(tmp_path / "batch.npy", images)
    np.save(tmp_path / "float.npy", images.reshape(6, 784) / np.float32(255))
    np.save(tmp_path / "one.npy", images[0])
    write_idx(tmp_path / "items-idx3-ubyte", images)
    write_idx(tmp_path / "items-idx3-ubyte.gz", images)
    write_idx(tmp_path / "one.idx", images[0])
    pngs = _write_pngs(tmp_path, images)
    names = ["batch.npy", "float.npy", "items-idx3-ubyte", "items-idx3-ubyte.gz"]
    items = load_images([tmp_path / n for n in names] + [tmp_path / "one.npy",
                                                          tmp_path / "one.idx", *pngs])
    assert [i.kind for i in items] == ["npy", "npy", "idx", "idx", "npy", "idx"] + ["photo"] * 6
    # Formats that start with two zero bytes too are photos, not broken IDX files.
    photos = []
    for suffix in (".avif", ".jp2", ".ico", ".tga"):
        photos.append(tmp_path / f"item{suffix}")
        Image.open(pngs[0]).convert("RGB").resize((56, 56)).save(photos[-1])
        assert photos[-1].read_bytes()[:2] == b"\0\0"
    for item in load_images(photos):
        assert item.kind == "photo" and item.error is None, (item.path, item.error)
    # One path is one file, not its characters.
    (item,) = load_images(str(photos[0]))
    assert item.kind == "photo" and item.path == photos[0]
    (result,) = predict_files(real_model, photos[0])
    assert result.error is None and result.predictions
    expected = images / np.float32(255)
    for item in items[:4]:
        assert item.error is None and item.images.dtype == np.float32
        np.testing.assert_allclose(item.images, expected, atol=1e-7)
    for item in items[4:6]:
        np.testing.assert_allclose(item.images, expected[:1], atol=1e-7)
    np.testing.assert_array_equal(np.concatenate([i.images for i in items[6:]]), expected)
    by_array = predict(real_model, expected)
    for result in predict_files(real_model, [tmp_path / n for n in names]):
        assert [p.labels for p in result.predictions] == [p.labels for p in by_array]
        np.testing.assert_allclose([p.probabilities for p in result.predictions],
                                   [p.probabilities for p in by_array], atol=1e-6)


@pytest.mark.filterwarnings("error")
def test_a_picture_pillow_warns_of_decodes_without_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # between it and twice it: a warning
    Image.new("L", (40, 30), 255).save(tmp_path / "large.png")
    (item,) = load_images([tmp_path / "large.png"])
    assert item.kind == "photo" and item.error is None
    Image.new("L", (60, 40), 255).save(tmp_path / "bomb.png")  # beyond twice: refused
    (item,) = load_images([tmp_path / "bomb.png"])
    assert "too large to decode safely" in item.error


def test_top_k():
    module = build_module(ModelSpec()).eval()
    model = SavedModel(module, ModelSpec(), CLASS_NAMES, {}, Path("."))
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    assert [len(p.labels) for p in predict(model, x, top_k=1)] == [1] * 4
    everything = predict(model, x, top_k=50)  # no more than there are classes
    assert all(sorted(p.labels) == list(range(10)) for p in everything)
    assert all(abs(sum(p.probabilities) - 1) < 1e-5 for p in everything)
    assert len(predict(model, x[0])) == 1
    with pytest.raises(ValueError, match="top_k"):
        predict(model, x, top_k=0)


# --- unreadable inputs ----------------------------------------------------------------------


def _bad_files(directory: Path) -> dict[str, Path]:
    jpeg = io.BytesIO()
    shirt_photo().save(jpeg, "JPEG")
    files = {
        "text": ("notes.txt", b"not an image\n"),
        "corrupt png": ("broken.png", b"\x89PNG\r\n\x1a\n" + bytes(64)),
        "truncated jpeg": ("cut.jpg", jpeg.getvalue()[:len(jpeg.getvalue()) // 2]),
        "empty": ("empty.png", b""),
    }
    paths = {}
    for case, (name, payload) in files.items():
        paths[case] = directory / name
        paths[case].write_bytes(payload)
    np.save(directory / "pixels-255.npy", np.full((2, 28, 28), 200.0, np.float32))
    np.save(directory / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(directory / "shape.npy", np.zeros((3, 32, 32), np.uint8))
    np.save(directory / "nan.npy", np.full((28, 28), np.nan, np.float32))
    np.savez(directory / "archive.npz", a=np.zeros((28, 28)))
    (directory / "fake.npy").write_bytes(b"plain text with the wrong name")
    write_idx(directory / "wide-idx3-ubyte", np.zeros((2, 28, 30), np.uint8))
    (directory / "short-idx3-ubyte").write_bytes(
        (directory / "wide-idx3-ubyte").read_bytes()[:100])
    # A header numpy's parser chokes on (a tokenize error, not a ValueError).
    np.save(directory / "header.npy", np.zeros((5, 28, 28), np.uint8))
    (directory / "header.npy").write_bytes((directory / "header.npy").read_bytes().replace(
        b"'shape': (5", b"'shape':  5", 1))
    # A name where a value should be: Python's parser quoted its parse tree's node object.
    np.save(directory / "name.npy", np.zeros((5, 28, 28), np.uint8))
    (directory / "name.npy").write_bytes((directory / "name.npy").read_bytes().replace(
        b"'descr': '|u1'", b"'descr': abcde", 1))
    # Headers of a million images, and only a little of their data: refused by the header.
    with open(directory / "million.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": (1_000_000, 28, 28)})
        f.write(bytes(784))
    header = b"{'descr': '|u1', 'fortran_order': False, 'shape': (1000000, 28, 28), }"
    header += b" " * (-(len(header) + 13) % 64) + b"\n"  # (version 3.0: numpy's own layout)
    (directory / "million-v3.npy").write_bytes(
        b"\x93NUMPY\x03\x00" + len(header).to_bytes(4, "little") + header + bytes(784))
    (directory / "million-idx3-ubyte.gz").write_bytes(gzip.compress(
        bytes([0, 0, 8, 3]) + np.array([1_000_000, 28, 28], ">u4").tobytes() + bytes(784)))
    # Items of 100 kB each, or 100 MB: refused by the header, not by a MemoryError.
    for name, descr, shape in (("strings.npy", "<U100000", (100_000, 784)),
                               ("void.npy", "|V100000000", (28, 28))):
        with open(directory / name, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": descr, "fortran_order": False, "shape": shape})
            f.write(bytes(64))
    # Pixels that are no numbers, which Pillow decodes: an infinity in a float TIFF.
    pixels = np.zeros((40, 40), np.float32)
    pixels[0, 0] = np.inf
    Image.fromarray(pixels).save(directory / "infinite.tiff")
    for name in ("pixels-255.npy", "objects.npy", "shape.npy", "nan.npy", "archive.npz",
                 "fake.npy", "wide-idx3-ubyte", "short-idx3-ubyte", "header.npy", "name.npy",
                 "million.npy",
                 "million-v3.npy", "million-idx3-ubyte.gz", "strings.npy", "void.npy",
                 "infinite.tiff"):
        paths[name] = directory / name
    paths["pipe"] = directory / "pipe.png"  # reading it would wait for a writer forever
    os.mkfifo(paths["pipe"])
    paths["missing"] = directory / "missing.png"
    paths["directory"] = directory / "a-folder"
    paths["directory"].mkdir()
    return paths


EXPECTED_ERRORS = {
    "text": "not an image, IDX or .npy file",
    "corrupt png": "corrupt or truncated image",
    "truncated jpeg": "corrupt or truncated image",
    "empty": "not an image, IDX or .npy file",
    "pixels-255.npy": "float pixels must lie in [0, 1] (found 200..200)",
    "objects.npy": "never unpickled",
    "shape.npy": "shape (3, 32, 32)",
    "nan.npy": "NaN",
    "archive.npz": "an .npz archive",
    "fake.npy": "not a valid .npy file (no NumPy header)",
    "wide-idx3-ubyte": "shape (2, 28, 30)",
    "short-idx3-ubyte": "truncated",
    "header.npy": "not a valid .npy file (",
    "name.npy": "not a valid .npy file (its header is damaged)",
    "million.npy": "an array of shape (1000000, 28, 28), more than the 100,000 images predict "
                   "reads from one file; split it",
    "million-v3.npy": "an array of shape (1000000, 28, 28), more than the 100,000 images",
    "million-idx3-ubyte.gz": "an array of shape (1000000, 28, 28), more than the 100,000 images",
    "strings.npy": "holds <U100000 values; expected uint8 0-255 or float 0-1",
    "void.npy": "holds |V100000000 values; expected uint8 0-255 or float 0-1",
    "infinite.tiff": "cannot convert its F pixels to grayscale",
    "pipe": "not a regular file (a pipe, socket or device); save it to a file first",
    "missing": "file not found",
    "directory": "is a directory",
}


def test_every_unreadable_file_gets_its_own_one_line_error(tmp_path: Path):
    paths = _bad_files(tmp_path)
    good = tmp_path / "good.png"
    shirt_photo().save(good)
    ordered = list(paths.values())
    items = load_images([good, *ordered, good])
    assert items[0].error is None and items[-1].error is None and items[0].kind == "photo"
    for case, item in zip(paths, items[1:-1]):
        assert item.images is None and item.kind is None
        assert item.error.startswith(f"{paths[case]}: "), (case, item.error)
        assert EXPECTED_ERRORS[case] in item.error and "\n" not in item.error, (case, item.error)
    with pytest.raises(ImageFileError, match="not an image"):
        load_image(paths["text"])


def test_preview_grid():
    picture = preview(np.ones((12, 28, 28), np.float32), columns=5, scale=2)
    assert picture.size == (5 * 30 * 2, 3 * 30 * 2) and picture.mode == "L"


# --- fashionlab predict ------------------------------------------------------------------------


def test_predict_json(tmp_path: Path, real_model: SavedModel,
                      test_images: tuple[np.ndarray, np.ndarray],
                      capsys: pytest.CaptureFixture[str]):
    images = test_images[0]
    pngs = _write_pngs(tmp_path, images[:2])
    np.save(tmp_path / "three.npy", images[2:5])
    code, out, err = run_cli(capsys, "predict", str(real_model.path), *map(str, pngs),
                             str(tmp_path / "three.npy"), "--device", "cpu", "--json")
    assert code == 0 and err == ""
    result = json.loads(out)
    assert result["model"] == str(real_model.path) and result["top_k"] == 3
    assert result["errors"] == []
    rows = result["predictions"]
    assert [(r["file"], r["kind"], r["index"]) for r in rows] == [
        (str(pngs[0]), "photo", 0), (str(pngs[1]), "photo", 0),
        *[(str(tmp_path / "three.npy"), "npy", i) for i in range(3)]]
    for row in rows:
        assert [set(t) for t in row["top"]] == [{"label", "class", "probability"}] * 3
        assert all(t["class"] == CLASS_NAMES[t["label"]] for t in row["top"])
        p = [t["probability"] for t in row["top"]]
        assert p == sorted(p, reverse=True) and sum(p) <= 1 + 1e-6
    # The library builds that object; the command only prints it.
    files = [*pngs, tmp_path / "three.npy", tmp_path / "missing.png"]
    from_api = predictions_to_dict(real_model, predict_files(real_model, files), 3)
    assert json.loads(json.dumps(from_api))["predictions"] == rows
    assert [e["file"] for e in from_api["errors"]] == [str(tmp_path / "missing.png")]
    assert predictions_to_dict(str(real_model.path), [], 50)["top_k"] == len(CLASS_NAMES)


def test_a_file_it_cannot_read_is_reported_with_the_others_predicted(
        tmp_path: Path, real_model: SavedModel, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch):
    good, locked = tmp_path / "shirt.jpg", tmp_path / "locked.png"
    shirt_photo().save(good)
    shirt_photo().save(locked)
    # chmod 000, as the superuser (who reads it anyway) cannot see it
    real_access, real_open = os.access, open

    def access(path: object, mode: int, **kwargs: object) -> bool:
        return Path(str(path)) != locked and real_access(path, mode, **kwargs)  # type: ignore

    def opening(path: object, *args: object, **kwargs: object) -> object:
        if Path(str(path)) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(os, "access", access)
    # (the package's `fashionlab.predict` is the function; the module is in sys.modules)
    monkeypatch.setattr(sys.modules["fashionlab.predict"], "open", opening, raising=False)
    code, out, err = run_cli(capsys, "predict", str(real_model.path), str(locked), str(good),
                             "--device", "cpu", "--json")
    assert code == 1, err
    result = json.loads(out)
    assert [r["file"] for r in result["predictions"]] == [str(good)]
    assert err == f"error: {locked}: cannot read (Permission denied)\n"


def test_a_picture_that_shows_no_item_is_said_to_be_blank(
        tmp_path: Path, real_model: SavedModel, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch):
    shirt, flat = tmp_path / "shirt.png", tmp_path / "white.png"
    shirt_photo().save(shirt)
    Image.new("RGB", (64, 48), (250, 250, 250)).save(flat)
    np.save(tmp_path / "two.npy", np.stack([np.zeros((28, 28), np.uint8),
                                            np.full((28, 28), 200, np.uint8)]))
    code, out, err = run_cli(capsys, "predict", str(real_model.path), str(shirt), str(flat),
                             str(tmp_path / "two.npy"), "--device", "cpu", "--json")
    assert code == 0, err
    rows = json.loads(out)["predictions"]
    assert [(Path(r["file"]).name, r["index"], r["blank"]) for r in rows] == [
        ("shirt.png", 0, False), ("white.png", 0, True), ("two.npy", 0, True),
        ("two.npy", 1, False)]
    assert all(r["top"] for r in rows)  # answered all the same: the flag says what it is worth
    monkeypatch.chdir(tmp_path)  # a short name: the table folds a long one across lines
    code, out, _ = run_cli(capsys, "predict", str(real_model.path), flat.name,
                           "--device", "cpu")
    assert code == 0 and "white.png (blank: no item seen)" in out


def test_predict_table_and_top(tmp_path: Path, real_model: SavedModel,
                               test_images: tuple[np.ndarray, np.ndarray],
                               capsys: pytest.CaptureFixture[str]):
    png = _write_pngs(tmp_path, test_images[0][:1])[0]
    code, out, _ = run_cli(capsys, "predict", str(real_model.path), str(png), "--top", "2",
                           "--device", "cpu")
    assert code == 0
    assert png.name in out and "top 2" in out and "top 3" not in out
    assert CLASS_NAMES[test_images[1][0]] in out


def test_predict_reports_bad_files_and_exits_1(
        tmp_path: Path, real_model: SavedModel, capsys: pytest.CaptureFixture[str]):
    good = tmp_path / "shirt.jpg"
    shirt_photo().save(good)
    text, corrupt = tmp_path / "notes.txt", tmp_path / "broken.png"
    text.write_text("hello\n")
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    code, out, err = run_cli(capsys, "predict", str(real_model.path), str(text), str(good),
                             str(corrupt), "--device", "cpu", "--json")
    assert code == 1
    result = json.loads(out)
    assert [r["file"] for r in result["predictions"]] == [str(good)]
    assert [e["file"] for e in result["errors"]] == [str(text), str(corrupt)]
    lines = err.splitlines()
    assert len(lines) == 2 and "Traceback" not in err
    assert lines[0].startswith(f"error: {text}: ") and lines[1].startswith(f"error: {corrupt}: ")
    code, out, err = run_cli(capsys, "predict", str(real_model.path), str(text), "--device", "cpu")
    assert code == 1 and err.startswith(f"error: {text}: ") and err.count("\n") == 1


def test_a_file_named_with_a_newline_is_said_on_one_line(
        tmp_path: Path, real_model: SavedModel, capsys: pytest.CaptureFixture[str]):
    bad = tmp_path / "bad\nname.png"
    bad.write_bytes(b"")
    code, _, err = run_cli(capsys, "predict", str(real_model.path), str(bad), "--device", "cpu")
    assert code == 1 and err.count("\n") == 1
    assert err.startswith(f"error: {tmp_path}/bad\\nname.png: not an image")


def test_predictions_to_dict_shows_what_the_predictions_hold(tmp_path: Path,
                                                             real_model: SavedModel):
    image = tmp_path / "shirt.png"
    shirt_photo().save(image)
    five = predict_files(real_model, [image], top_k=5)
    assert predictions_to_dict(real_model, five)["top_k"] == 5
    cut = predictions_to_dict(real_model, five, 2)
    assert cut["top_k"] == 2 and len(cut["predictions"][0]["top"]) == 2
    with pytest.raises(ValueError, match=r"^top_k=10: the predictions hold 5 classes each"):
        predictions_to_dict(real_model, five, 10)
    with pytest.raises(ValueError, match=r"^top_k must be at least 1, got 0$"):
        predictions_to_dict(real_model, five, 0)


def test_predict_preview_and_invert(tmp_path: Path, real_model: SavedModel,
                                    capsys: pytest.CaptureFixture[str]):
    photo = tmp_path / "shirt.png"
    shirt_photo().save(photo)
    np.save(tmp_path / "two.npy", np.zeros((2, 28, 28), np.uint8))
    code, _, _ = run_cli(capsys, "predict", str(real_model.path), str(photo),
                         str(tmp_path / "two.npy"), "--preview",
                         str(tmp_path / "new" / "seen.png"),  # its folder made
                         "--no-invert", "--device", "cpu")
    assert code == 0
    seen = Image.open(tmp_path / "new" / "seen.png")
    assert seen.size == (3 * 30 * 4, 30 * 4)


@pytest.mark.skipif(os.name != "posix", reason="a file size limit (RLIMIT_FSIZE) is POSIX")
def test_a_preview_the_disk_refuses_keeps_the_predictions_and_leaves_no_half_image(
        tmp_path: Path, real_model: SavedModel):
    # A real write failure, in a process whose files may not grow past 16 KB (as a full disk
    # refuses a write): the predictions are printed all the same, the preview is one line
    # on stderr, and nothing is left under its name or a staging name.
    noise = np.random.default_rng(0).integers(0, 256, (100, 28, 28), dtype=np.uint8)
    np.save(tmp_path / "noise.npy", noise)  # ~80 KB, and a preview far larger than 16 KB
    target = tmp_path / "out" / "seen.png"
    script = f"""
import resource, signal
from fashionlab.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (16384, resource.RLIM_INFINITY))
main(["predict", {str(real_model.path)!r}, {str(tmp_path / "noise.npy")!r}, "--preview",
      {str(target)!r}, "--json", "--device", "cpu"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=False, timeout=300)
    assert done.returncode == 2, done.stderr
    assert done.stderr == f"error: {target}: cannot write (File too large)\n"
    shown = json.loads(done.stdout)
    assert len(shown["predictions"]) == 100 and shown["errors"] == []
    assert list((tmp_path / "out").iterdir()) == []


def test_a_preview_that_cannot_be_written_is_refused_before_predicting(
        tmp_path: Path, real_model: SavedModel, capsys: pytest.CaptureFixture[str]):
    photo = tmp_path / "shirt.png"
    shirt_photo().save(photo)
    for target, problem in ((photo, "is one of the images to predict"),
                            (tmp_path / "." / "shirt.png", "is one of the images to predict"),
                            (tmp_path, "is a directory"),
                            (tmp_path / "seen.txt", "not an image file name"),
                            (tmp_path / "seen.psd", "Pillow cannot write a grayscale PSD image"),
                            (tmp_path / "seen.h5", "Pillow cannot write a grayscale HDF5 image"),
                            (photo / "seen.png", f"{photo} is a file, not a folder"),
                            # sysfs makes no new files, even for root: found before, not after
                            (Path("/sys/fashionlab/seen.png"), "/sys: cannot write there")):
        code, out, err = run_cli(capsys, "predict", str(real_model.path), str(photo),
                                 "--preview", str(target), "--device", "cpu")
        assert_one_line_error(code, err, problem)
        assert out == ""  # refused before any prediction


def test_predict_with_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code, _, err = run_cli(capsys, "predict", str(tmp_path / "nothing"), str(tmp_path / "x.png"))
    assert_one_line_error(code, err, "not a model directory")


def test_predict_in_python_reads_arrays_as_a_npy_file_is_read(real_model: SavedModel):
    pixels = read_idx(DEBIAN_DIR / "t10k-images-idx3-ubyte.gz")[:20]  # uint8 (20, 28, 28)
    expected = predict(real_model, pixels.astype(np.float32) / 255)
    assert predict(real_model, pixels) == expected  # 0-255 integers are scaled
    assert predict(real_model, pixels.reshape(20, 784)) == expected
    assert predict(real_model, pixels[:, None]) == expected  # (N, 1, 28, 28)
    assert predict(real_model.path, pixels) == expected  # the model's directory will do
    assert predict_files(str(real_model.path), []) == []
    nan = np.full((1, 28, 28), np.nan, dtype=np.float32)
    for bad, says in [(pixels.astype(np.float32), r"float pixels must lie in \[0, 1\]"),
                      (nan, "holds NaN or infinite values"),
                      (pixels[:, :27], r"an array of shape \(20, 27, 28\)")]:
        with pytest.raises(ImageFileError, match=f"^images: {says}"):
            predict(real_model, bad)


def test_arrays_are_inverted_only_when_asked(tmp_path: Path):
    pixels = np.arange(2 * 28 * 28, dtype=np.uint16).reshape(2, 28, 28) % 256
    np.save(tmp_path / "items.npy", pixels.astype(np.uint8))
    write_idx(tmp_path / "items-idx3-ubyte", pixels.astype(np.uint8))
    for name in ("items.npy", "items-idx3-ubyte"):
        as_is = load_image(tmp_path / name)
        assert as_is.max() == 1.0 and np.array_equal(as_is * 255, pixels)
        np.testing.assert_array_equal(load_image(tmp_path / name, invert=False), as_is)
        np.testing.assert_array_equal(load_image(tmp_path / name, invert=True), 1 - as_is)
