"""An image folder: one sub-directory per class, holding that class's images (at any depth).
Each image is a record `{"image": its encoded bytes, "label": np.int64}`, labels numbering the
sorted class names, which go into the index metadata as `class_names`; with `decode_images`
the image is a uint8 array (H, W) or (H, W, C) instead. Files are taken in sorted path order;
hidden files and names without an image extension are left out."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from resumax.convert import inputs
from resumax.convert.formats.base import Item, Reader
from resumax.convert.values import BadRecord
from resumax.errors import ConfigError, DataFileNotFoundError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
# Modes kept as they are; any other (palette, CMYK, 16-bit, ...) is converted to RGB.
_KEPT_MODES = ("L", "LA", "RGB", "RGBA")


class ImageFolderReader(Reader):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.root = ""
        self.class_names: list[str] = []
        self._labels: dict[str, np.int64] = {}  # each class name's label, made on first read

    def units(self, paths: Sequence[str]) -> list[str]:
        if len(paths) != 1:
            raise ConfigError(
                f"an image folder is one directory with a sub-directory per class, got {paths}"
            )
        self.root = paths[0].rstrip("/")
        files = [
            path
            for path in inputs.list_dir(self.root, self.storage_options, recursive=True)
            if path.lower().endswith(IMAGE_EXTENSIONS) and "/" in self._relative(path)
        ]
        if not files:
            raise DataFileNotFoundError(
                f"{self.root!r} holds no images in class sub-directories "
                f"(<root>/<class>/<image>, extensions {IMAGE_EXTENSIONS})"
            )
        self.class_names = sorted({self._class_name(path) for path in files})
        return files

    def _class_name(self, path: str) -> str:
        return self._relative(path).split("/", 1)[0]

    def prepare(self) -> None:
        if self.options.decode_images:
            import PIL.Image  # noqa: F401 (imported for `read`)

    def _relative(self, path: str) -> str:
        return path[len(self.root) + 1 :].replace("\\", "/")

    def count(self, unit: str) -> int:
        return 1

    def read(self, unit: str, start: int = 0, stop: int | None = None) -> Iterator[Item]:
        if start > 0 or stop == 0:
            return
        if len(self._labels) != len(self.class_names):
            self._labels = {name: np.int64(label) for label, name in enumerate(self.class_names)}
        relative = unit[len(self.root) + 1 :]  # _class_name inlined: it runs once per image
        if "\\" in relative:
            relative = relative.replace("\\", "/")
        label = self._labels[relative[: relative.index("/")]]
        with self.open(unit) as file:
            data = file.read()
        if not self.options.decode_images:
            yield {"image": data, "label": label}
            return
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.mode not in _KEPT_MODES:
                    image = image.convert("RGB")
                pixels = np.asarray(image, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError) as error:
            yield BadRecord(unit, f"not an image PIL can decode: {error}")
            return
        yield {"image": pixels, "label": label}

    def sources(self, units: Sequence[str], counts: Sequence[int]) -> list[dict[str, Any]]:
        return [{"path": self.root, "files": len(units), "records": sum(counts)}]

    def metadata(self) -> dict[str, Any]:
        return {"class_names": list(self.class_names)}
