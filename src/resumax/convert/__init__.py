"""`resumax convert`: getting data in. Inputs of the formats corpora arrive in (JSON Lines,
Parquet, CSV, TFRecord, image folders, Hugging Face `save_to_disk`, .npz) become an ArrayRecord
shard set with its index, byte-identical whether the local engine or Apache Beam wrote it,
atomically and resumably.
"""

from resumax.convert.conversion import Conversion, convert
from resumax.convert.options import FORMATS, ConvertOptions

__all__ = ["FORMATS", "Conversion", "ConvertOptions", "convert"]
