"""Raw image sources: the Omniglot archives (zipped or unpacked) and a user's folder-per-class images.

A source yields *classes*: one character (Omniglot) or one folder (image folder) with all its images as raw bytes.
Decoding and resizing happen here too, batched per class, so that ``prepare`` stays a thin loop.

Pixel convention (the whole project relies on it): images are stored as uint8 **ink intensity**, 0 = background,
255 = full stroke. Omniglot's PNGs are 1-bit with black strokes on white, so they are inverted on the way in. Ink-high
means zero padding and rotations add "no ink", and the mean pixel is small, which is what MAML-style Conv4s expect.
User images (``imagefolder``) are stored as they are (no inversion), in grayscale or RGB as asked.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from metatrain.tasks.errors import DataError
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

#: The two Omniglot archives as the authors published them, in class-id order.
OMNIGLOT_SPLITS = ("background", "evaluation")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
_DRAWING = re.compile(r"^(\d+)_(\d+)\.png$")


@dataclass(frozen=True)
class RawClass:
    """One class as found in a source, before decoding."""

    split: str
    """Partition the class belongs to (``background``/``evaluation`` for Omniglot, user-chosen otherwise)."""
    alphabet: str
    """Omniglot alphabet, or the image folder's parent name (``""`` for a flat folder of classes)."""
    character: str
    """Omniglot character folder (``character01``) or the class folder's name."""
    members: tuple[str, ...]
    """Where each image came from (archive member or relative path); used in error messages and stored."""
    drawers: tuple[int, ...]
    """Omniglot drawer number (1..20) per image; the image's index in the folder for user data."""
    blobs: tuple[bytes, ...]
    """The encoded image files."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tree(root: Path) -> str:
    """A digest of a folder: relative paths and bytes of every file, in sorted order."""
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(p).encode())
    return h.hexdigest()


def omniglot_inputs(source: Path) -> dict[str, Path]:
    """Each Omniglot split's archive (preferred) or unpacked folder under ``source``; errors name what is missing."""
    if not source.is_dir():
        raise DataError(f"Omniglot source folder {source} does not exist (pass --source DIR or set "
                        "METATRAIN_OMNIGLOT_SOURCE)")
    found = {}
    for split in OMNIGLOT_SPLITS:
        archive, folder = source / f"images_{split}.zip", source / f"images_{split}"
        if archive.is_file():
            found[split] = archive
        elif folder.is_dir():
            found[split] = folder
        else:
            raise DataError(f"{archive} is missing (nor is there an unpacked folder {folder})")
    return found


def _omniglot_member(split: str, name: str) -> tuple[str, str, int] | None:
    """(alphabet, character, drawer) of an archive member path, or None for anything that is not a drawing."""
    parts = name.strip("/").split("/")
    if len(parts) != 4 or parts[0] != f"images_{split}" or not parts[3].endswith(".png"):
        return None
    m = _DRAWING.match(parts[3])
    if m is None:
        raise DataError(f"unexpected file name {name!r}: Omniglot drawings are named NNNN_DD.png")
    return parts[1], parts[2], int(m.group(2))


def iter_omniglot(split: str, path: Path) -> Iterator[RawClass]:
    """Yield the characters of one Omniglot split from its zip archive or unpacked folder, sorted by name."""
    groups: dict[tuple[str, str], list[tuple[int, str, bytes]]] = {}
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    key = _omniglot_member(split, info.filename)
                    if key is None:
                        continue
                    try:
                        blob = zf.read(info)
                    except (zipfile.BadZipFile, OSError, EOFError) as e:
                        raise DataError(f"{path}: member {info.filename} cannot be read ({e})") from None
                    groups.setdefault(key[:2], []).append((key[2], info.filename, blob))
        except zipfile.BadZipFile as e:
            raise DataError(f"{path} is not a readable zip archive ({e})") from None
    else:
        for p in sorted(path.glob("*/*/*.png")):
            rel = p.relative_to(path.parent).as_posix()
            key = _omniglot_member(split, rel)
            if key is not None:
                groups.setdefault(key[:2], []).append((key[2], rel, p.read_bytes()))
    if not groups:
        raise DataError(f"{path} holds no Omniglot drawings (expected images_{split}/<alphabet>/<character>/*.png)")
    for (alphabet, character), items in sorted(groups.items()):
        items.sort()
        yield RawClass(split, alphabet, character, tuple(m for _, m, _ in items),
                       tuple(d for d, _, _ in items), tuple(b for _, _, b in items))


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _has_images(folder: Path) -> bool:
    return any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir())


def class_folders(root: Path) -> list[Path]:
    """The class folders of ``root`` (sorted; hidden ones skipped). A file beside them is refused, not skipped."""
    if stray := sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")):
        raise DataError(f"{stray[0]} lies outside the class folders of {root}: move it into its class's folder or "
                        "out of there")
    return _class_dirs(root)


def image_files(folder: Path, recursive: bool) -> list[Path]:
    """The images of ``folder`` (of its sub-folders too if ``recursive``), sorted. Every other entry is refused
    rather than skipped, so no file the user put there is silently left out; hidden names (``.DS_Store``) are
    skipped."""
    entries = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir())
                     if not any(part.startswith(".") for part in p.relative_to(folder).parts))
    for p in entries:
        if p.is_dir() and not recursive:
            raise DataError(f"class folder {folder} holds a sub-folder {p.name}: a class's images sit directly in "
                            "its folder (move them up, or make the sub-folder a class of its own)")
        if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{p} is not an image ({', '.join(IMAGE_SUFFIXES)}); move it out of the task's folders")
    return [p for p in entries if p.is_file()]


def imagefolder_partitions(source: Path, split: str) -> list[tuple[str, Path]]:
    """(partition, class-folder root) pairs: ``source`` itself as ``split``, or, when every sub-folder of ``source``
    holds only class folders (the train/ val/ test/ layout mini-ImageNet is shipped in), one partition per
    sub-folder, named after it."""
    if not source.is_dir():
        raise DataError(f"image folder {source} does not exist")
    subs = _class_dirs(source)
    if not subs:
        raise DataError(f"{source} has no class folders (expected one sub-folder of images per class)")
    nested = all(not _has_images(d) and _class_dirs(d) for d in subs)
    return [(d.name, d) for d in subs] if nested else [(split, source)]


def iter_imagefolder(source: Path, split: str) -> Iterator[RawClass]:
    """Yield one class per sub-folder of ``source`` (sorted), with every image file inside it (sorted); a folder of
    split folders (see :func:`imagefolder_partitions`) yields each split's classes in its own partition."""
    for part, root in imagefolder_partitions(source, split):
        for d in class_folders(root):
            files = image_files(d, recursive=False)
            if not files:
                raise DataError(f"class folder {d} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            yield RawClass(part, "", d.name, tuple(p.relative_to(source).as_posix() for p in files),
                           tuple(range(1, len(files) + 1)), tuple(p.read_bytes() for p in files))


# i / 255 for every uint8 value, as the CPU's float32 division rounds it. Why a table and not ``x / 255``: CUDA
# divides a tensor by a scalar by multiplying with its reciprocal, which rounds 126 of the 256 values one ulp
# differently, so a GPU worker's episodes (and from there its gradients) would differ from a CPU worker's in the last
# bit. A gather from this table gives the GPU the CPU's floats.
_UNIT = torch.arange(256, dtype=torch.float32) / 255
_UNIT_ON: dict[torch.device, torch.Tensor] = {}


def unit_pixels(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1] (value / 255), bit-identical on every device."""
    if x.dtype != torch.uint8:
        raise TypeError(f"unit_pixels: expected uint8 images, got {x.dtype}")
    if x.device.type == "cpu":  # the CPU divides exactly (the table's own values), ~18x faster than the gather
        return x.to(torch.float32).div_(255.0)
    if x.device not in _UNIT_ON:
        _UNIT_ON[x.device] = _UNIT.to(x.device)
    return _UNIT_ON[x.device][x.to(torch.int64)]


def decode_class(raw: RawClass, size: int, channels: int, invert: bool) -> torch.Tensor:
    """Decode and resize all images of a class to ``(n, channels, size, size)`` uint8, antialiased.

    Resizing is done in float on the whole class at once (one interpolation call, not one per image), then rounded.
    """
    # PIL decodes (torchvision.io's decoders are deprecated since 0.29 in favour of TorchCodec, which has no 1-bit
    # PNG path); torchvision does the tensor conversion and the antialiased resize.
    mode = "L" if channels == 1 else "RGB"
    decoded = []
    for member, blob in zip(raw.members, raw.blobs):
        try:
            with warnings.catch_warnings():
                # PIL only warns between MAX_IMAGE_PIXELS and twice that, then decodes it all: refuse it instead.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(blob)) as im:
                    decoded.append(TF.pil_to_tensor(im.convert(mode)))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise DataError(f"image {member} has more than {Image.MAX_IMAGE_PIXELS:,} pixels (PIL's limit against "
                            "decompression bombs); shrink it or leave it out") from None
        except UnidentifiedImageError:
            raise DataError(f"cannot decode image {member} (not a recognised image format)") from None
        except (OSError, ValueError, SyntaxError) as e:
            reason = str(e).splitlines()[0][:120] if str(e) else ""
            raise DataError(f"cannot decode image {member} ({type(e).__name__}: {reason})") from None
    # Omniglot's drawings all share one size, so the common case is a single batched interpolation; user images may
    # differ in size and are then resized one by one (to size x size: the aspect ratio is not kept).
    if len({tuple(t.shape) for t in decoded}) == 1:
        batches = [torch.stack(decoded).float()]
    else:
        batches = [t.unsqueeze(0).float() for t in decoded]
    out = []
    for x in batches:
        if invert:
            x = 255.0 - x
        if tuple(x.shape[-2:]) != (size, size):
            x = TF.resize(x, [size, size], antialias=True)
        out.append(x)
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)
