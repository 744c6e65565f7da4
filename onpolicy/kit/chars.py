"""A character-level tokenizer in Hugging Face format, for the embedded tasks.

Built with the `tokenizers` library (a WordLevel model over single characters) and wrapped in
`PreTrainedTokenizerFast`, so vLLM and transformers load it from a model folder exactly as they would a
real model's tokenizer. Encoding prepends BOS.
"""

from __future__ import annotations

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]


def char_tokenizer(chars: str, model_max_length: int = 128):
    """A `PreTrainedTokenizerFast` over SPECIALS (ids 0-3) + `chars` (ids 4.., in order)."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + list(chars))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   model_max_length=model_max_length, clean_up_tokenization_spaces=False)
