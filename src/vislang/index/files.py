"""Which files an index may read and serve, and what of them leaves the server.

Why: an index records file paths, and ``/v1/images/{id}`` sends those files to whoever asks. A CSV row may name any
path (``/home/me/.ssh/id_rsa.png``, ``../../secret.jpg``), a folder may hold a symlink that points elsewhere, and a
file may be swapped for a symlink or grow after it was indexed. So a build records the folders it indexed from (the
*roots*: the source folder, the CSV's folder, the shards' folders) and refuses paths that leave them unless the user
passes ``--allow-outside-root``; the server then re-checks every file at read time (real path inside a root, no
symlink on the way, a regular file, a size cap) and strips the metadata photos carry (EXIF with GPS position, XMP,
text chunks) before the bytes go out.
"""

from __future__ import annotations

import io
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOTS_STATE = "roots"  # index state: the resolved folders its files may come from
MAX_SERVED_MB = 50  # the largest image file the server sends
JPEG_DROP = {0xE1, 0xED, 0xFE}  # APP1 (EXIF, XMP), APP13 (IPTC / Photoshop), COM; JFIF, ICC and Adobe stay
PNG_DROP = {b"eXIf", b"tEXt", b"iTXt", b"zTXt", b"tIME"}
WEBP_DROP = {b"EXIF", b"XMP "}


class OutsideRoot(ValueError):
    """An image path leaves the folders being indexed (absolute, ``~``, ``..`` or a symlink out)."""


def is_inside(path: str | os.PathLike, root: str | os.PathLike) -> bool:
    """Whether ``path`` is ``root`` or below it (both taken as given: resolve them first)."""
    try:
        Path(path).relative_to(root)
    except ValueError:
        return False
    return True


def confine(file: Path, root: Path, where: str, allow_outside_root: bool) -> Path:
    """``file`` resolved; ``OutsideRoot`` naming ``where`` when it leaves ``root`` and that was not allowed."""
    real = file.resolve()
    if not allow_outside_root and not is_inside(real, root.resolve()):
        raise OutsideRoot(
            f"{where}: the image {file} lies outside {root} (an absolute, ~, .. or symlinked path), so it is not "
            "indexed: a server would send it to its clients; pass --allow-outside-root if you mean to index it"
        )
    return real


def track_roots(items: Iterable, roots: set[str]) -> Iterator:
    """Pass items through, adding the folder of any that lies outside ``roots`` (allowed by --allow-outside-root)."""
    for it in items:
        folder = str(Path(it.path).parent)
        if not any(is_inside(it.path, r) for r in roots):
            roots.add(folder)
        yield it


def servable_path(path: str | os.PathLike, roots: Iterable[str] | None) -> str:
    """``path`` made absolute, if a server may send it: inside a recorded root, no symlink on the way.

    Raises:
        PermissionError: the index records no roots, the file lies outside them, or a symlink is on its path.
    """
    if not roots:
        raise PermissionError("this index records no folders its files may be served from (built before they were "
                              "recorded); run its `vislang index build` again to record them")  # fmt: skip
    p = os.path.abspath(path)
    if os.path.realpath(p) != p:
        raise PermissionError("a symlink lies on the file's path; the server does not follow links")
    if not any(is_inside(p, r) for r in roots):
        raise PermissionError("the file lies outside the folders the index was built from")
    return p


def served_bytes(
    path: str | os.PathLike,
    offset: int | None,
    size: int | None,
    roots: Iterable[str] | None,
    max_bytes: int = MAX_SERVED_MB * 2**20,
) -> bytes:
    """The bytes of an indexed image, read only when they may be served.

    Raises:
        PermissionError: the index records no roots, the file lies outside them, a symlink is on its path, or it is
            not a regular file.
        ValueError: the file (or tar member) is over ``max_bytes``.
        OSError: it cannot be read (gone).
    """
    p = servable_path(path, roots)
    fd = os.open(p, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise PermissionError("the image is not a regular file")
        length = st.st_size if offset is None else int(size or 0)
        if length > max_bytes:
            raise ValueError(f"the image is {length / 2**20:.1f} MB, over the {max_bytes / 2**20:g} MB served")
        if offset is not None:
            f.seek(offset)
        return f.read(length)


def strip_metadata(data: bytes, max_pixels: int = 40_000_000) -> bytes:
    """Image bytes without what identifies where, when and with what a photo was taken.

    JPEG, PNG and WebP lose their EXIF / XMP / IPTC / text parts byte for byte (the pixels are not re-encoded); a
    TIFF, where EXIF is part of the format, is re-encoded as PNG; GIF and BMP carry none and pass as they are.
    """
    if data.startswith(b"\xff\xd8"):
        return _strip_jpeg(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return _strip_png(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _strip_webp(data)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        from PIL import Image

        img = Image.open(io.BytesIO(data))
        if img.size[0] * img.size[1] > max_pixels:
            raise ValueError(f"the TIFF is {img.size[0]}x{img.size[1]} pixels, over the {max_pixels} the server sends")
        out = io.BytesIO()
        img.save(out, format="PNG")
        return out.getvalue()
    return data


def _strip_jpeg(data: bytes) -> bytes:
    out, i = [data[:2]], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xDA or 0xD0 <= marker <= 0xD9:  # start of scan (or a stray marker): the rest is image data
            break
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker not in JPEG_DROP:
            out.append(data[i : i + 2 + length])
        i += 2 + length
    out.append(data[i:])
    return b"".join(out)


def _strip_png(data: bytes) -> bytes:
    out, i = [data[:8]], 8
    while i + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[i : i + 8])
        end = i + 12 + length  # length, type, data, CRC
        if kind not in PNG_DROP:
            out.append(data[i:end])
        i = end
    return b"".join(out)


def _strip_webp(data: bytes) -> bytes:
    chunks, i = [], 12
    while i + 8 <= len(data):
        kind, length = data[i : i + 4], struct.unpack("<I", data[i + 4 : i + 8])[0]
        end = i + 8 + length + (length & 1)  # chunks are padded to an even size
        chunk = data[i:end]
        if kind == b"VP8X":  # its flags announce EXIF (bit 3) and XMP (bit 2): clear both
            chunk = chunk[:8] + bytes([chunk[8] & ~0x0C]) + chunk[9:]
        if kind not in WEBP_DROP:
            chunks.append(chunk)
        i = end
    body = b"WEBP" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body)) + body
