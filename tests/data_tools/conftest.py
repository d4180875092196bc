"""Fixtures for data_tools tests: real JPEG/PNG bytes made with PIL, tiny sizes."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _image_bytes(
    fmt: str = "JPEG", size: tuple[int, int] = (12, 8), color: tuple[int, int, int] = (200, 30, 30), noise: bool = False
) -> bytes:
    if noise:  # pseudo-random, incompressible pixels (deterministic): file size grows with the area
        pixels = hashlib.shake_256(repr((size, color)).encode()).digest(size[0] * size[1] * 3)
        image = Image.frombytes("RGB", size, pixels)
    else:
        image = Image.new("RGB", size, color)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def image_bytes():
    """`image_bytes(fmt="JPEG", size=(w, h), color=(r, g, b), noise=False) -> bytes` of a real image."""
    return _image_bytes


@pytest.fixture
def tar_members():
    """`tar_members(path) -> list of member names` in file order."""

    def read(path: Path) -> list[str]:
        with tarfile.open(path) as tar:
            return tar.getnames()

    return read


@pytest.fixture
def read_member():
    """`read_member(tar_path, name) -> bytes`."""

    def read(path: Path, name: str) -> bytes:
        with tarfile.open(path) as tar:
            return tar.extractfile(name).read()

    return read


@pytest.fixture
def make_tar():
    """`make_tar(path, [(name, bytes), ...])`: a plain tar with exactly these members."""

    def make(path: Path, members: list[tuple[str, bytes]]) -> Path:
        with tarfile.open(path, "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        return path

    return make


def digest_dir(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def dir_digest():
    return digest_dir
