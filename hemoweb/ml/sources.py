"""Reading image collections safely: a folder or a .zip, with checks made before anything is decoded.

Zip entries with `../` or absolute paths, zip bombs (too many entries, too many bytes, a suspicious
compression ratio) and oversized entries are refused with a message a lab user understands.
"""

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}
IMAGE_FORMATS = {"JPEG", "PNG", "TIFF", "BMP", "MPO"}


class SourceError(ValueError):
    """The whole source is unusable (a bad archive, a zip bomb): nothing is imported."""


class BadImage(ValueError):
    """One file is not a usable image; the reason is in the message."""


@dataclass(frozen=True)
class Limits:
    max_entries: int = 200_000
    max_uncompressed: int = 4 * 1024**3
    max_ratio: int = 200
    max_entry_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000


@dataclass(frozen=True)
class SourceFile:
    """A file inside a source, named by its POSIX path relative to the source's root."""

    path: str
    size: int
    _source: "ImageSource"

    def read(self) -> bytes:
        return self._source.read(self.path)


class ImageSource:
    """A folder or a .zip of images, iterated in a stable order."""

    def __init__(self, location: Path | str | io.IOBase, limits: Limits = Limits()):
        self.limits = limits
        self._zip: zipfile.ZipFile | None = None
        self._folder: Path | None = None
        if isinstance(location, (str, Path)) and Path(location).is_dir():
            self._folder = Path(location).resolve()
            return
        try:
            self._zip = zipfile.ZipFile(location)
        except FileNotFoundError as error:
            raise SourceError(f"{location} does not exist.") from error
        except (zipfile.BadZipFile, OSError) as error:
            raise SourceError(f"{getattr(location, 'name', location)} is neither a folder nor a readable .zip: {error}") from error
        self._check_zip()

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()

    def _check_zip(self) -> None:
        infos = [info for info in self._zip.infolist() if not info.is_dir()]
        if len(infos) > self.limits.max_entries:
            raise SourceError(f"The archive holds {len(infos)} files; at most {self.limits.max_entries} are accepted.")
        total = 0
        for info in infos:
            name = info.filename
            if name.startswith(("/", "\\")) or PurePosixPath(name.replace("\\", "/")).is_absolute() or ":" in name.split("/")[0]:
                raise SourceError(f"The archive entry {name!r} has an absolute path; nothing was imported.")
            if ".." in PurePosixPath(name.replace("\\", "/")).parts:
                raise SourceError(f"The archive entry {name!r} points outside the archive ('..'); nothing was imported.")
            if info.file_size > self.limits.max_entry_bytes:
                raise SourceError(
                    f"The archive entry {name!r} unpacks to {info.file_size} bytes; at most "
                    f"{self.limits.max_entry_bytes} are accepted per file."
                )
            if info.compress_size and info.file_size / info.compress_size > self.limits.max_ratio and info.file_size > 1024**2:
                raise SourceError(
                    f"The archive entry {name!r} expands {info.file_size // info.compress_size}× "
                    "(a zip bomb?); nothing was imported."
                )
            total += info.file_size
        if total > self.limits.max_uncompressed:
            raise SourceError(
                f"The archive unpacks to {total} bytes; at most {self.limits.max_uncompressed} are accepted."
            )

    def files(self) -> Iterator[SourceFile]:
        """Every regular file, hidden files and macOS resource forks excluded."""
        if self._folder is not None:
            for path in sorted(self._folder.rglob("*")):
                if path.is_file() and not path.is_symlink():
                    relative = path.relative_to(self._folder).as_posix()
                    if not _hidden(relative):
                        yield SourceFile(relative, path.stat().st_size, self)
            return
        for info in sorted(self._zip.infolist(), key=lambda info: info.filename):
            if not info.is_dir() and not _hidden(info.filename):
                yield SourceFile(info.filename.replace("\\", "/"), info.file_size, self)

    def read(self, path: str) -> bytes:
        if self._folder is not None:
            target = (self._folder / path).resolve()
            if not target.is_relative_to(self._folder):
                raise BadImage(f"{path} points outside the source folder.")
            if target.stat().st_size > self.limits.max_entry_bytes:
                raise BadImage(f"{path} is larger than {self.limits.max_entry_bytes} bytes.")
            return target.read_bytes()
        with self._zip.open(path) as handle:
            data = handle.read(self.limits.max_entry_bytes + 1)
        if len(data) > self.limits.max_entry_bytes:
            raise SourceError(f"The archive entry {path!r} is larger than it claims; nothing was imported.")
        return data

    def exists(self, path: str) -> bool:
        if self._folder is not None:
            target = (self._folder / path).resolve()
            return target.is_relative_to(self._folder) and target.is_file()
        try:
            self._zip.getinfo(path)
            return True
        except KeyError:
            return False


def _hidden(path: str) -> bool:
    return any(part.startswith(".") or part == "__MACOSX" for part in PurePosixPath(path).parts)


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def _over_limit(error: Image.DecompressionBombError, max_pixels: int) -> BadImage:
    """Pillow's own bomb check fired first: say so with hemoweb's limit (MAX_IMAGE_PIXELS), not Pillow's."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"has {int(found.group(1)):,} pixels" if found else "is too large"
    return BadImage(f"the image {size}, over the limit of {max_pixels:,} pixels (MAX_IMAGE_PIXELS)")


def read_header(data: bytes, max_pixels: int = Limits.max_pixels) -> tuple[Image.Image, str, int, int]:
    """Open image bytes without decoding the pixels: (lazy image, format, width, height), checked.

    Known formats only and the pixel limit checked from the header (no decompression bombs); BadImage
    with the reason otherwise.
    """
    if not data:
        raise BadImage("the file is empty")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (the content is not a known image format)") from None
    except Image.DecompressionBombError as error:
        raise _over_limit(error, max_pixels) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"the image is damaged or truncated ({error})") from None
    fmt, (width, height) = image.format, image.size
    if fmt not in IMAGE_FORMATS:
        raise BadImage(f"unsupported image format {fmt}")
    if width * height > max_pixels:
        raise BadImage(f"the image is {width}×{height} pixels, over the limit of {max_pixels} pixels")
    return image, ("JPEG" if fmt == "MPO" else fmt), width, height


def decode_checked(data: bytes, max_pixels: int = Limits.max_pixels,
                   draft_size: int = 0) -> tuple[Image.Image, str, int, int]:
    """Check and decode image bytes in one pass, without trusting them: (RGB image, format, width, height).

    The header is checked first (read_header); truncation is caught by a full decode. With `draft_size`,
    a JPEG is decoded by the codec at the smallest DCT scale that still covers draft_size × draft_size
    (2–4× faster for small model inputs).
    """
    image, fmt, width, height = read_header(data, max_pixels)
    try:
        if draft_size and fmt == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()  # decodes fully: a truncated file fails here
        rgb = image.convert("RGB")
    except Image.DecompressionBombError as error:
        raise _over_limit(error, max_pixels) from None
    except (OSError, SyntaxError, ValueError) as error:
        raise BadImage(f"the image is damaged or truncated ({error})") from None
    return rgb, fmt, width, height


def check_image(data: bytes, max_pixels: int = Limits.max_pixels) -> ImageInfo:
    """Verify that `data` is a whole image of a known format and sane size."""
    _, fmt, width, height = decode_checked(data, max_pixels)
    return ImageInfo(fmt, width, height)


def open_rgb(data: bytes, max_pixels: int = Limits.max_pixels) -> Image.Image:
    """Decode image bytes to RGB after the size check (no decompression bombs)."""
    return decode_checked(data, max_pixels)[0]
