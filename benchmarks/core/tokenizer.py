"""A byte-level BPE tokenizer trained on a corpus, saved in standard Hugging Face format.

The embedded world trains its own tokenizer so that everything runs offline. Byte-level BPE
(as Llama-3 and GPT-2 use) means the KnowMem prompt's trailing space after ``Answer:`` is a
token of its own, exactly as with the real models MUSE evaluates (DESIGN §3).
"""

from __future__ import annotations

from typing import Iterable

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Train a byte-level BPE on ``texts`` and wrap it as a ``PreTrainedTokenizerFast``.

    The tokenizer prepends BOS (``add_special_tokens=True`` behaves as with Llama) and has
    distinct EOS and PAD tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1_000_000,
    )


#: What a KnowMem prompt ends with (DESIGN §3); its trailing space is a token of its own.
ANSWER_MARKER = "Answer: "


def cut_after(text: str, marker: str = ANSWER_MARKER) -> list[str]:
    """``text`` in pieces that end right after each ``marker`` (their concatenation is ``text``)."""
    pieces = text.split(marker)
    return [piece + marker for piece in pieces[:-1]] + ([pieces[-1]] if pieces[-1] else [])


def encode_cut_after(tokenizer, text: str, marker: str = ANSWER_MARKER, add_special_tokens: bool = True) -> list[int]:
    """Token ids of ``text`` tokenized in pieces that end right after every ``marker``.

    Decoding gives ``text`` back; unlike tokenizing it whole, each ``marker`` ends a piece, so
    with a byte-level BPE the marker's trailing space is a token of its own, as at the end of a
    KnowMem prompt. This is the second view the embedded world's models learn their facts
    from. With ``add_special_tokens`` a BOS (if the tokenizer has one) comes first.
    """
    ids = [tokenizer.bos_token_id] if add_special_tokens and tokenizer.bos_token_id is not None else []
    for piece in cut_after(text, marker):
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids
