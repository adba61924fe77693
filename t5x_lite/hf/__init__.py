"""Hugging Face interop: import and export checkpoints with numerical parity, tokenizers, datasets (docs/hf.md).

    network, vocabulary = t5x_lite.hf.from_pretrained("/models/flan-t5-small")
    logits = network(encoder_input_tokens, decoder_input_tokens)    # int32 ids, 0 = padding
    t5x_lite.hf.save_pretrained(network, "/tmp/exported", vocabulary=vocabulary)

One converter module per family (`registry.supported_model_types()`): T5 v1.0 / v1.1 / Flan-T5 / UL2, mT5 and umT5, BERT
(the head, and with it the trainer's model, comes from the checkpoint), GPT-2, BART and ELECTRA (its head
likewise). `INITIAL_CHECKPOINT_PATH` and `CHECKPOINT_PATH` take `hf:/path/to/dir` (see `restore_params`); `tools/convert_hf.py` converts both ways.
"""

from t5x_lite.hf.convert import (
    from_pretrained,
    load_model,
    model_gin,
    open_checkpoint,
    restore_params,
    save_pretrained,
    write_pretrained,
)
from t5x_lite.hf.data_source import HuggingFaceDataSource
from t5x_lite.hf.vocabularies import TokenizersVocabulary, load_vocabulary, save_vocabulary

__all__ = [
    "HuggingFaceDataSource",
    "TokenizersVocabulary",
    "from_pretrained",
    "load_model",
    "load_vocabulary",
    "model_gin",
    "open_checkpoint",
    "restore_params",
    "save_pretrained",
    "save_vocabulary",
    "write_pretrained",
]
