"""Predict on your own images: photos, IDX files and .npy arrays -> top-k classes.

    items = load_images(["shirt.jpg", "t10k-images-idx3-ubyte", "batch.npy"])
    for result in predict_files(load_model("runs/<id>/models/cnn"), paths):
        result.error or result.predictions[0].classes   # ("Shirt", "T-shirt/top", "Pullover")

Every input becomes what the models were trained on: (N, 28, 28) float32 in [0, 1], a light
item on a black background. A photo goes through the steps that made Fashion-MNIST from
Zalando's product photos (trim to the item, longest side to 28 pixels, centre, negate):

  1. EXIF orientation applied; transparency composited onto white (a product-photo background);
     converted to grayscale.
  2. The background level is the median of the outer 2% of the picture. Light (> 127): the
     picture is inverted, so the item becomes light on dark.
  3. The background level (plus its noise) becomes 0; the item's bounding box is the region
     brighter than that by 5% of full scale (after a 3x3 median filter against specks).
     A picture that is already 28x28 is taken as it is after step 2 (a Fashion-MNIST image
     saved as PNG comes back unchanged).
  4. The box is padded to a square with the item centred (Fashion-MNIST items touch two
     opposite edges and are centred along the other axis), resized to 28x28 with a Lanczos
     filter (which averages over the pixels it reduces), and scaled so its brightest pixel
     is 1 (92% of Fashion-MNIST images have a pixel at 255).

IDX files (raw or .gz) and .npy arrays are taken as they are: (28, 28), (N, 28, 28), (N, 784)
or (N, 1, 28, 28), uint8 0-255 or float 0-1. Arrays are never unpickled.
"""

from __future__ import annotations

import io
import math
import os
import tokenize
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fashionlab.errors import FashionlabError, OutputError
from fashionlab.idx import idx_shape, looks_like_idx, read_idx
from fashionlab.serialize import folder_blocked, fresh_staging_path, why_not_written
from fashionlab.text import first_line

if TYPE_CHECKING:
    from PIL import Image

    from fashionlab.artifacts import SavedModel

__all__ = [
    "FilePredictions",
    "ImageFileError",
    "Item",
    "Prediction",
    "check_preview_path",
    "load_image",
    "load_images",
    "predict",
    "predict_files",
    "predictions_to_dict",
    "preprocess_photo",
    "preview",
    "write_preview",
]

SIDE = 28  # model input is SIDE x SIDE
WORKING_SIDE = 512  # photos are first reduced to at most this: plenty for a 28x28 result
BORDER = 0.02  # the outer 2% of each side is where the background level is read
TRIM = 0.05 * 255  # pixels this much above the background belong to the item (Fashion-MNIST's 5%)
MIN_CONTRAST = 8.0  # an item fainter than this (0-255) is not stretched: a blank picture stays dark
BLANK_LEVEL = TRIM / 255  # an input with no pixel this bright (in [0, 1]) shows no item
PREDICT_BATCH = 256  # images per forward pass: a CNN's activations stay small (see `evaluate`)
# The most images read from one IDX or .npy file: the whole test and training sets (70,000)
# fit; a file of a million images would take ~10 GB of memory as images, predictions and JSON.
MAX_FILE_IMAGES = 100_000

Kind = Literal["photo", "idx", "npy"]
_NPY_MAGIC = b"\x93NUMPY"
# (3.0 differs from 2.0 only in that its header may hold UTF-8: images' headers are ASCII)
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
                (3, 0): np.lib.format.read_array_header_2_0}
# PNG, JPEG, GIF, BMP, TIFF (both byte orders), WebP: a file starting so is a damaged image.
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


class ImageFileError(FashionlabError):
    """An input file cannot be read as an image, IDX file or .npy array."""


@dataclass(frozen=True, eq=False)
class Item:
    """One input file, loaded: `images` or `error`, never both."""

    path: Path
    kind: Kind | None  # None when the file could not be read
    images: np.ndarray | None  # (N, 28, 28) float32 in [0, 1], light item on black
    error: str | None  # one line naming the file and the problem


@dataclass(frozen=True)
class Prediction:
    """The top-k classes of one image, most probable first."""

    labels: tuple[int, ...]  # class indices
    classes: tuple[str, ...]  # their names
    probabilities: tuple[float, ...]  # softmax probabilities, descending; sum <= 1
    # Nothing in the image is brighter than an item's faintest pixel (BLANK_LEVEL): a flat
    # picture, an empty array. The model answers anyway, with confidence; the answer says
    # nothing about the picture.
    blank: bool = False

    def to_dict(self) -> list[dict[str, object]]:
        return [{"label": label, "class": name, "probability": p}
                for label, name, p in zip(self.labels, self.classes, self.probabilities)]


@dataclass(frozen=True, eq=False)
class FilePredictions:
    """The predictions for the images of one file, or why there are none."""

    path: Path
    kind: Kind | None  # "photo" (one image), "idx" or "npy" (one or more); None: unreadable
    predictions: tuple[Prediction, ...]  # one per image in the file
    images: np.ndarray | None  # (N, 28, 28) float32: what the model saw
    error: str | None = None


# --------------------------------------------------------------------------------------------
# Loading


def load_images(paths: str | Path | Iterable[str | Path], *,
                invert: bool | None = None) -> list[Item]:
    """Load every file (one path, or many); a file that cannot be read gives an Item with its
    error, not a raise.

    invert: for photos, None decides from the background; True or False forces it. Arrays
    (IDX, .npy) are inverted only with True.
    """
    if isinstance(paths, (str, os.PathLike)):  # one file, not a string's characters
        paths = [paths]
    items = []
    for path in map(Path, paths):
        try:
            kind, images = _load(path, invert)
        except ImageFileError as error:
            items.append(Item(path, None, None, str(error)))
        else:
            items.append(Item(path, kind, images, None))
    return items


def load_image(path: str | Path, *, invert: bool | None = None) -> np.ndarray:
    """One file -> (N, 28, 28) float32 in [0, 1]; raises ImageFileError naming the file."""
    return _load(Path(path), invert)[1]


def _load(path: Path, invert: bool | None) -> tuple[Kind, np.ndarray]:
    try:
        if not path.is_dir() and path.exists() and not path.is_file():
            # A pipe (mkfifo) would block its reading forever, and a stream read once cannot
            # be read again after its first bytes told what it is.
            raise ImageFileError(f"{path}: not a regular file (a pipe, socket or device); "
                                 "save it to a file first")
        with open(path, "rb") as f:
            head = f.read(8)
    except FileNotFoundError:
        raise ImageFileError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ImageFileError(f"{path}: is a directory, not an image file") from None
    except OSError as error:
        raise ImageFileError(f"{path}: cannot read ({error.strerror or error})") from None
    name = path.name.lower()
    # Arrays are taken as they are, light items on black as the dataset's, unless inverted
    # on request (`invert=True`: dark items on white); None and False leave them.
    kind: Kind
    if head.startswith(_NPY_MAGIC) or name.endswith((".npy", ".npz")):
        kind, images = "npy", _load_npy(path, head)
    elif looks_like_idx(head) or name.endswith(".gz") or (
            head[:2] == b"\0\0" and "idx" in name):  # IDX, raw or gzip-compressed
        kind, images = "idx", _load_idx(path)
    else:
        return "photo", _load_photo(path, invert)[None]
    return kind, 1 - images if invert else images


def _load_npy(path: Path, head: bytes) -> np.ndarray:
    if head.startswith(b"PK"):
        raise ImageFileError(f"{path}: an .npz archive; save one array with numpy.save")
    if not head.startswith(_NPY_MAGIC):
        raise ImageFileError(f"{path}: not a valid .npy file (no NumPy header)")
    # (numpy reads the header with Python's own parser: a damaged one raises what that
    # parser raises, a SyntaxError or a tokenize error, not only a ValueError)
    try:
        with open(path, "rb") as f:
            read_header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
            header = read_header(f) if read_header is not None else None  # np.load says
        if header is not None:
            shape, _, dtype = header
            if dtype.hasobject:
                raise ImageFileError(f"{path}: holds Python objects, which are never unpickled")
            if dtype.kind not in "iuf" or dtype.itemsize > 8:  # said before memory is taken
                raise ImageFileError(f"{path}: holds {dtype} values; expected uint8 0-255 or "
                                     "float 0-1")
            _check_size(path, shape)
        array = np.load(path, allow_pickle=False)
    except ValueError as error:
        if "allow_pickle" in str(error):
            reason = "holds Python objects, which are never unpickled"
        elif "malformed node" in str(error):  # Python's literal parser, quoting a tree node
            reason = "not a valid .npy file (its header is damaged)"
        else:
            reason = f"not a valid .npy file ({error})"
        raise ImageFileError(f"{path}: {reason}") from None
    except (OSError, EOFError, SyntaxError, tokenize.TokenError) as error:
        raise ImageFileError(f"{path}: not a valid .npy file ({first_line(error)})") from None
    return _as_images(array, path)


def _load_idx(path: Path) -> np.ndarray:
    try:
        _check_size(path, idx_shape(path))
        array = read_idx(path)
    except FashionlabError as error:  # read_idx's messages already name the file
        raise ImageFileError(str(error)) from None
    return _as_images(array, path)


def _check_size(path: Path, shape: tuple[int, ...] | None) -> None:
    """Refuse a file of more than MAX_FILE_IMAGES images before reading its pixels (its
    header says its shape; None: no header to read, the reading will say why)."""
    if shape is not None and math.prod(shape) > MAX_FILE_IMAGES * SIDE * SIDE:
        raise ImageFileError(f"{path}: an array of shape {shape}, more than the "
                             f"{MAX_FILE_IMAGES:,} images predict reads from one file; split "
                             "it, or predict it batch by batch with fashionlab.predict.predict")


def _as_images(array: np.ndarray, source: str | Path) -> np.ndarray:
    """An array of pixels -> (N, 28, 28) float32 in [0, 1], or an error naming `source` (a
    file, or "images" for an array given to `predict`)."""
    shape = array.shape
    if shape == (SIDE, SIDE) or shape == (SIDE * SIDE,):
        array = array.reshape(1, SIDE, SIDE)
    elif array.ndim == 2 and shape[1] == SIDE * SIDE:
        array = array.reshape(-1, SIDE, SIDE)
    elif array.ndim == 4 and shape[1:] == (1, SIDE, SIDE):
        array = array[:, 0]
    elif not (array.ndim == 3 and shape[1:] == (SIDE, SIDE)):
        raise ImageFileError(f"{source}: an array of shape {shape}; expected (28, 28), "
                             "(N, 28, 28), (N, 784) or (N, 1, 28, 28)")
    if len(array) == 0:
        raise ImageFileError(f"{source}: holds no images (shape {shape})")
    kind = array.dtype.kind
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ImageFileError(f"{source}: integer pixels must lie in 0..255 "
                                 f"(found {low}..{high})")
        return array.astype(np.float32) / np.float32(255)
    if kind == "f":
        array = array.astype(np.float32)
        if not np.isfinite(array).all():
            raise ImageFileError(f"{source}: holds NaN or infinite values")
        low, high = float(array.min()), float(array.max())
        if low < 0 or high > 1 + 1e-6:
            raise ImageFileError(f"{source}: float pixels must lie in [0, 1] (found "
                                 f"{low:g}..{high:g}); divide 0-255 pixels by 255")
        return np.clip(array, 0, 1)
    raise ImageFileError(f"{source}: holds {array.dtype} values; expected uint8 0-255 "
                         "or float 0-1")


def _load_photo(path: Path, invert: bool | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        # Pillow warns (two lines on stderr) of pictures between its pixel limit and twice it,
        # which decode fine; beyond, DecompressionBombError is the one line below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # A JPEG's damaged EXIF data ("Corrupt EXIF data"), read when it opens: ignored,
            # as if it had none (see preprocess_photo)
            warnings.simplefilter("ignore", UserWarning)
            with Image.open(path) as image:
                image.draft("L", (WORKING_SIDE, WORKING_SIDE))  # JPEG: at a reduced size
                image.load()
    except UnidentifiedImageError:
        with open(path, "rb") as f:
            head = f.read(8)
        if any(head.startswith(magic) for magic in _IMAGE_MAGIC):
            raise ImageFileError(f"{path}: corrupt or truncated image (its header names an "
                                 "image format, but the data cannot be decoded)") from None
        raise ImageFileError(f"{path}: not an image, IDX or .npy file "
                             "(no image format recognised)") from None
    except Image.DecompressionBombError as error:
        raise ImageFileError(f"{path}: too large to decode safely ({error})") from None
    except MemoryError:
        raise ImageFileError(f"{path}: too large to decode in this machine's memory") from None
    except Exception as error:  # noqa: BLE001 - Pillow's decoders, given damaged data, raise
        # OSError, SyntaxError and ValueError, but also NotImplementedError, struct.error,
        # IndexError...: each is this file's problem, not the others'
        raise ImageFileError(f"{path}: corrupt or truncated image ({first_line(error)})") \
            from None
    try:
        return preprocess_photo(image, invert=invert)
    except MemoryError:
        raise ImageFileError(f"{path}: too large to convert in this machine's memory") from None
    except Exception as error:  # noqa: BLE001 - a mode Pillow cannot convert, pixels that
        # are no numbers (a float TIFF's infinity): as above, one line for this file
        raise ImageFileError(f"{path}: cannot convert its {image.mode} pixels to grayscale "
                             f"({first_line(error)})") from None


# --------------------------------------------------------------------------------------------
# Photos


def preprocess_photo(image: Image.Image, *, invert: bool | None = None) -> np.ndarray:
    """A picture of any size and mode -> (28, 28) float32 in [0, 1], light item on black.

    invert: None decides from the background (light background: invert); True or False forces.
    """
    from PIL import ExifTags, Image, ImageFilter, ImageOps

    with warnings.catch_warnings():  # damaged EXIF data, where Pillow only warns of it
        warnings.simplefilter("ignore", UserWarning)
        try:
            orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
        except Exception:  # noqa: BLE001 - damaged EXIF data (a PNG's eXIf chunk): as if none
            orientation = 1
        if orientation != 1:  # (else no copy of a large one)
            image = ImageOps.exif_transpose(image)
    gray = _grayscale(image)  # (H, W) float32 in 0..255
    background = float(np.median(_border(gray)))
    if invert is None:
        invert = background > 127
    if invert:
        gray = 255 - gray
        background = 255 - background
    if gray.shape == (SIDE, SIDE):  # already Fashion-MNIST's size (a dataset image saved as PNG)
        return gray / np.float32(255)
    # The background and its noise (a robust spread of the border) become 0.
    border = _border(gray)
    noise = 1.4826 * float(np.median(np.abs(border - background)))
    item = np.clip(gray - (background + 3 * noise), 0, None)  # (H, W) >= 0
    mask_image = Image.fromarray(np.minimum(item, 255).astype(np.uint8)).filter(
        ImageFilter.MedianFilter(3))
    rows, cols = np.nonzero(np.asarray(mask_image) > TRIM)
    if rows.size:
        item = item[rows.min():rows.max() + 1, cols.min():cols.max() + 1]  # (h, w)
    h, w = item.shape
    side = max(h, w)
    square = np.zeros((side, side), dtype=np.float32)  # (side, side): item centred on black
    top, left = (side - h) // 2, (side - w) // 2
    square[top:top + h, left:left + w] = item
    small = np.asarray(Image.fromarray(square).resize(
        (SIDE, SIDE), Image.Resampling.LANCZOS), dtype=np.float32)  # (28, 28)
    small = np.clip(small, 0, None)  # Lanczos rings slightly below 0 next to edges
    peak = float(small.max())
    small = small / peak if peak >= MIN_CONTRAST else small / 255
    return np.clip(small, 0, 1).astype(np.float32)


def _grayscale(image: Image.Image) -> np.ndarray:
    """(H, W) float32 luma in 0..255; large pictures reduced to WORKING_SIDE first."""
    from PIL import Image

    image = _reduced(image)
    if _deep(image):
        gray = np.asarray(image, dtype=np.float32)
        high = float(gray.max()) if gray.size else 0.0
        if image.mode == "F" and high <= 1:
            scale = 255.0
        else:  # the fewest bits that hold its brightest pixel: 12-bit data in a 16-bit PNG
            scale = 255 / (2 ** max(8, int(high).bit_length()) - 1)
        image = Image.fromarray(np.clip(gray * scale, 0, 255).astype(np.uint8))
    elif image.mode == "LAB":  # Pillow converts it to nothing else; L is its lightness
        image = image.getchannel("L")
    elif _see_through(image):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("L")
    if max(image.size) > WORKING_SIDE:
        image = image.copy()
        image.thumbnail((WORKING_SIDE, WORKING_SIDE), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32)


def _reduced(image: Image.Image) -> Image.Image:
    """A picture at least four times WORKING_SIDE across, reduced by a whole factor (the mean
    of each block of pixels) to at least twice WORKING_SIDE before any conversion, each of
    which would copy every pixel of it (a 13000 x 13000 RGBA picture took 3.34 GB); the
    Lanczos filter still makes the last step, as it did. See-through pixels are averaged
    premultiplied by their opacity: what compositing them onto white first and then averaging
    gives. (16- and 32-bit pictures ignore transparency, as `_grayscale` does.)"""
    factor = max(image.size) // (2 * WORKING_SIDE)
    if factor < 2:
        return image
    if _deep(image):
        if image.mode.startswith("I;16"):  # as 32-bit integers, which reduce averages
            image = image.convert("I")
    elif _see_through(image):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        return rgba.convert("RGBa").reduce(factor).convert("RGBA")
    elif image.mode in ("1", "P"):  # their pixels are no levels to average: gray ones first
        image = image.convert("L")
    try:
        return image.reduce(factor)
    except ValueError:  # a mode it does not average: converted at full size, as before
        return image


def _deep(image: Image.Image) -> bool:
    """16- or 32-bit integer or float pixels (whose transparency, if any, is ignored)."""
    return image.mode.startswith("I") or image.mode == "F"


def _see_through(image: Image.Image) -> bool:
    """An alpha channel, or one colour or level marked transparent."""
    return image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info


def _border(gray: np.ndarray) -> np.ndarray:
    """The pixels of the outer BORDER fraction of each side (at least one pixel), flattened."""
    h, w = gray.shape
    dy, dx = max(1, round(BORDER * h)), max(1, round(BORDER * w))
    return np.concatenate([gray[:dy].ravel(), gray[-dy:].ravel(),
                           gray[dy:-dy, :dx].ravel(), gray[dy:-dy, -dx:].ravel()])


def check_preview_path(path: Path, images: Sequence[str | Path] = ()) -> Path:
    """`path` if a preview can be written there (an image format by its ending, in a folder
    that is or can be made, none of the `images` to predict), else OutputError: checked before
    predicting, not after."""
    from PIL import Image

    if path.is_dir():
        raise OutputError(f"{path}: is a directory; name the .png file to write")
    if any(_same_file(path, Path(image)) for image in images):
        raise OutputError(f"{path}: is one of the images to predict; name another file for "
                          "the preview")
    format = Image.registered_extensions().get(path.suffix.lower())
    if format is None:
        raise OutputError(f"{path}: not an image file name (use .png)")
    if not _writes_grayscale(format):  # Pillow reads some formats only (.psd, .fits, .h5)
        raise OutputError(f"{path}: Pillow cannot write a grayscale {format} image (use .png)")
    if (blocked := folder_blocked(path)) is not None:
        raise OutputError(blocked)
    return path


def _writes_grayscale(format: str) -> bool:
    """Whether Pillow writes a grayscale picture in this format: tried on a 1x1 one in memory
    (a format Pillow only reads has no writer, or a stub's that fails)."""
    from PIL import Image

    try:
        Image.new("L", (1, 1)).save(io.BytesIO(), format=format)
    except Exception:  # noqa: BLE001 - KeyError (no writer), OSError (a stub), ValueError...
        return False
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:  # a symlink loop, a file that cannot be looked at: not the same
        return False


def write_preview(images: np.ndarray, path: Path) -> None:
    """`preview(images)` saved to `path`, whole or not at all (under the staging name, then
    renamed: a full disk or a kill leaves no half image there); OutputError (one line) where
    it cannot be written."""
    from PIL import Image

    staging = None
    try:
        path = check_preview_path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = fresh_staging_path(path)
        preview(images).save(staging, format=Image.registered_extensions()[path.suffix.lower()])
        os.replace(staging, path)
    except OSError as error:
        raise OutputError(f"{path}: cannot write ({why_not_written(path, error)})") from None
    finally:
        if staging is not None:
            staging.unlink(missing_ok=True)


def preview(images: np.ndarray, *, columns: int = 10, scale: int = 4,
            limit: int = 100) -> Image.Image:
    """What the model sees: the first `limit` images (N, 28, 28) in [0, 1] as a grayscale grid."""
    from PIL import Image

    images = images[:limit]
    n = len(images)
    columns = max(1, min(columns, n))
    rows = -(-n // columns)
    grid = np.zeros((rows * (SIDE + 2), columns * (SIDE + 2)), dtype=np.uint8)
    grid[:] = 64  # a grey frame around each image shows where one ends
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (SIDE + 2) + 1:r * (SIDE + 2) + 1 + SIDE,
             c * (SIDE + 2) + 1:c * (SIDE + 2) + 1 + SIDE] = np.round(image * 255)
    picture = Image.fromarray(grid)
    return picture.resize((picture.width * scale, picture.height * scale),
                          Image.Resampling.NEAREST)


# --------------------------------------------------------------------------------------------
# Predicting


def predict(saved_model: SavedModel | str | Path, images: np.ndarray,
            top_k: int = 3) -> list[Prediction]:
    """The top_k classes of each image.

    saved_model: from `load_model`, or its directory. images: as a `.npy` file may hold them
    (`fashionlab predict`): (28, 28), (N, 28, 28), (N, 784) or (N, 1, 28, 28), uint8 0-255 or
    float 0-1; anything else (0-255 floats, NaN, another shape) is an ImageFileError, never
    a confident answer about pixels the model was not trained on.
    """
    # torch: only when predicting, not to read images
    import torch

    from fashionlab.artifacts import ModelFileError, as_saved_model

    saved_model = as_saved_model(saved_model)
    if isinstance(top_k, bool) or not isinstance(top_k, int | np.integer) or top_k < 1:
        raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}")
    if isinstance(images, str | os.PathLike):
        raise TypeError(f"images: an array of pixels, not the file {str(images)!r} "
                        "(predict_files reads picture and .npy files)")
    try:
        array = np.asarray(images)
    except ValueError:  # a list of arrays of different shapes
        raise ImageFileError("images: arrays of different shapes; give one array of shape "
                             "(N, 28, 28), or predict each") from None
    images = _as_images(array, "images")
    names = saved_model.class_names
    k = min(top_k, len(names))
    module = saved_model.module
    device = next(module.parameters()).device
    predictions: list[Prediction] = []
    with torch.inference_mode():
        for first in range(0, len(images), PREDICT_BATCH):
            x = torch.from_numpy(np.ascontiguousarray(images[first:first + PREDICT_BATCH]))
            x = x.to(device).unsqueeze(1)  # (B, 1, 28, 28)
            logits = module(x).float()  # (B, n_classes)
            if not torch.isfinite(logits).all():  # softmax would answer "Bag nan"
                raise ModelFileError(f"{saved_model.path}: the model's outputs are not finite "
                                     "(NaN or infinite logits): its weights overflow")
            probabilities = logits.softmax(-1)
            top = probabilities.topk(k, dim=-1)
            brightest = images[first:first + PREDICT_BATCH].reshape(len(x), -1).max(axis=1)
            for p, labels, peak in zip(top.values.cpu().tolist(), top.indices.cpu().tolist(),
                                       brightest.tolist()):
                predictions.append(Prediction(tuple(labels), tuple(names[i] for i in labels),
                                              tuple(p), blank=peak < BLANK_LEVEL))
    return predictions


def predict_files(saved_model: SavedModel | str | Path,
                  paths: str | Path | Iterable[str | Path], top_k: int = 3, *,
                  invert: bool | None = None) -> list[FilePredictions]:
    """Load and predict every file (one path, or many); unreadable files carry their error,
    the others go on."""
    from fashionlab.artifacts import as_saved_model  # torch: only when predicting

    saved_model = as_saved_model(saved_model)  # once, not once a file
    results = []
    for item in load_images(paths, invert=invert):
        if item.images is None:
            results.append(FilePredictions(item.path, None, (), None, item.error))
        else:
            results.append(FilePredictions(item.path, item.kind, tuple(
                predict(saved_model, item.images, top_k)), item.images))
    return results


def predictions_to_dict(saved_model: SavedModel | str | Path,
                        results: Sequence[FilePredictions],
                        top_k: int | None = None) -> dict[str, object]:
    """The predictions of `predict_files` as `fashionlab predict --json` prints them:
    `{model, top_k, predictions, errors}`, one prediction row per image (`index`: its place
    in its file; `blank`: it shows no item) and one error row per file that could not be
    read. `top_k`: the classes each row shows (at most the model's classes), as many as the
    predictions hold when None; more than they hold is a ValueError (predict them with it)."""
    from fashionlab.artifacts import as_saved_model  # torch: only with a model

    saved_model = as_saved_model(saved_model)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    held = max((len(p.labels) for r in results for p in r.predictions), default=None)
    k = len(saved_model.class_names) if top_k is None else min(top_k, len(saved_model.class_names))
    if top_k is None and held is not None:
        k = held
    elif held is not None and held < k:
        raise ValueError(f"top_k={top_k}: the predictions hold {held} classes each; predict "
                         f"them with top_k={top_k}")
    rows = [{"file": str(r.path), "kind": r.kind, "index": i, "top": p.to_dict()[:k],
             "blank": p.blank} for r in results for i, p in enumerate(r.predictions)]
    errors = [{"file": str(r.path), "error": r.error} for r in results if r.error]
    return {"model": str(saved_model.path), "top_k": k,
            "predictions": rows, "errors": errors}
