"""Text data for pre-training: sources, tokenizers, packing and the on-disk corpus cache."""

from .corpus import num_blocks, split_of
from .datamodule import BlockDataset, ShuffledBlockStream, TextDataModule
from .sources import stdlib_files
from .tokenizer import EOT_TEXT, ByteTokenizer, HFTokenizer, load_hf_tokenizer, train_bpe

__all__ = [
    "BlockDataset",
    "ByteTokenizer",
    "EOT_TEXT",
    "HFTokenizer",
    "ShuffledBlockStream",
    "TextDataModule",
    "load_hf_tokenizer",
    "num_blocks",
    "split_of",
    "stdlib_files",
    "train_bpe",
]
