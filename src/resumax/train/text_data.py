"""Two offline byte-level corpora for the language-model run: English prose from the standard
library's `pydoc_data.topics` and Python source from its own modules, as ArrayRecord token records.
"""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Iterator
from typing import Any

import numpy as np
from tqdm import tqdm

from resumax.records import shard_paths, write_array_record
from resumax.train.datasets import write_atomically

# Code records are runs of blank-line separated blocks of one module, cut near this many bytes.
CODE_CHUNK_BYTES = 1024
SHARDS_PER_CORPUS = 2
CORPORA = ("prose", "code")


def _tokens(text: str) -> dict[str, np.ndarray]:
    return {"tokens": np.frombuffer(text.encode("utf-8"), dtype=np.uint8).copy()}


def prose_texts() -> list[str]:
    """The non-empty paragraphs of every help topic of `pydoc_data.topics`, in topic order."""
    from pydoc_data.topics import topics

    return [
        paragraph.strip("\n")
        for name in sorted(topics)
        for paragraph in topics[name].split("\n\n")
        if paragraph.strip()
    ]


def code_texts() -> list[str]:
    """The top-level standard library modules (`<stdlib>/*.py`, sorted), cut into chunks of about
    CODE_CHUNK_BYTES at blank lines (a longer single block stays whole)."""
    chunks = []
    for path in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as file:
            blocks = [block for block in file.read().split("\n\n") if block.strip()]
        current = ""
        for block in blocks:
            if current and len(current) + len(block) > CODE_CHUNK_BYTES:
                chunks.append(current)
                current = ""
            current = f"{current}\n\n{block}" if current else block
        if current:
            chunks.append(current)
    return chunks


def _write_corpus(prefix: str, texts: list[str], progress: tqdm) -> None:
    bounds = np.linspace(0, len(texts), SHARDS_PER_CORPUS + 1).astype(int)
    paths = shard_paths(prefix, SHARDS_PER_CORPUS)
    for path, start, stop in zip(paths, bounds[:-1], bounds[1:], strict=True):

        def records(first: int = start, last: int = stop) -> Iterator[dict[str, Any]]:
            for text in texts[first:last]:
                progress.update(1)
                yield _tokens(text)

        write_array_record(path, records())


def prepare_stdlib_text(directory: str | os.PathLike) -> bool:
    """Writes `prose-*` and `code-*` shards of {"tokens": uint8 bytes} records into `directory`.

    Returns True if it wrote them, False if `directory` already existed (complete: it appears
    only by an atomic rename of a fully written temporary directory).
    """

    def write(partial: str) -> None:
        corpora = {"prose": prose_texts(), "code": code_texts()}
        total = sum(map(len, corpora.values()))
        with tqdm(total=total, desc="preparing stdlib_text", unit="rec") as progress:
            for name, texts in corpora.items():
                _write_corpus(os.path.join(partial, name), texts, progress)

    return write_atomically(directory, write)
