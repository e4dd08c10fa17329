"""Tiny models and data for CPU tests: :mod:`hf_lowmem.testing`, which plugin authors use too."""

from hf_lowmem.testing import RandomTokens, logged_losses, tiny_config, tiny_model, train_args  # noqa: F401


def word_tokenizer(vocab_size: int = 128):
    """A word-level tokenizer over ``t0`` .. ``t{vocab_size-1}`` (pad/unk ``t0``, eos ``t1``): what TRL's trainers need
    as ``processing_class`` in CPU tests, without a Hub download."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                   pad_token="t0", eos_token="t1", unk_token="t0")
