"""Export registry entries for use outside align: a Hugging Face directory (`hf`) or a GGUF file (`gguf`).

`command.export_model` is what `align export` runs; `hf` and `gguf` write and verify one format each,
`gguf_vocab` turns a tokenizer into GGUF metadata.
"""

from align.export.command import FORMATS, export_model

__all__ = ["FORMATS", "export_model"]
