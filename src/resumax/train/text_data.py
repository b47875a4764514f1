"""Two offline byte-level corpora for the language-model run: English prose from the standard
library's `pydoc_data.topics` and Python source from its own modules, as ArrayRecord token records.
"""

from __future__ import annotations

import glob
import os
import sysconfig

import numpy as np
from tqdm import tqdm

from resumax.train.datasets import write_atomically, write_split

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
                prefix = os.path.join(partial, name)
                write_split(prefix, texts, SHARDS_PER_CORPUS, progress, _tokens)

    return write_atomically(directory, write)
