"""Question/answer pairs as an instruct model sees them: its own chat template, answer-only targets.

TOFU's instruct checkpoints (open-unlearning's Llama-3.2-1B-Instruct models and the NPO models
unlearned from them) were trained and evaluated on prompts built by the tokenizer's
``apply_chat_template`` with a system prompt and a fixed date (open-unlearning,
``configs/model/Llama-3.2-1B-Instruct.yaml``: system prompt "You are a helpful assistant.",
``date_string`` "10 Apr 2025", so Llama-3 templates do not insert today's date). Here:

* the **prompt** is the template rendered for ``[system, user]`` with the generation prompt
  (the assistant header) appended;
* a **pair** is the template rendered for ``[system, user, assistant]``; its tokens after the
  prompt are the answer and the template's closing end-of-turn token, and only those are scored
  and trained on (open-unlearning's ``preprocess_chat_instance``: labels are the ids after the
  prompt; an EOS is appended when the rendering does not end in one);
* a tokenizer **without a template** gets ``Question: {question}\\nAnswer:`` with BOS, and the
  pair continues with `` {answer}`` and EOS.

Templates are rendered to text and tokenized with ``add_special_tokens=False`` (the template
writes its own BOS), as ``apply_chat_template(tokenize=True)`` does.

Padding. By default a batch is padded on the right for scoring and training (on the left for
generation) and only the padding is masked out of attention. :attr:`PromptSettings.eot_padding`
reproduces open-unlearning's Llama-3 input instead: pad with the EOS id (``<|eot_id|>``) and
mask *every* token equal to it out of attention (its collator uses ``input_ids != pad_id``), so
the template's own end-of-turn tokens after the system and user turns are hidden from the
model too. Its published figures carry that; it is not the input the model was built for, so it
is off unless asked for, and only for reproducing those figures. It applies to evaluation
(likelihoods and generation); training (defenses, attacks, the author world's models) always
sees the real input.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from benchmarks.core.errors import DataError, UsageError

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
DEFAULT_DATE_STRING = "10 Apr 2025"
PLAIN_PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class PromptSettings:
    """How questions become prompts (recorded in every TOFU result file)."""

    system_prompt: str = field(default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "System turn; '' leaves it out."})
    date_string: str = field(default=DEFAULT_DATE_STRING, metadata={"help": "date_string passed to the template."})
    eot_padding: bool = field(
        default=False,
        metadata={"help": "open-unlearning parity: pad with EOS and mask every EOS-id token out of attention "
                          "(not the model's real input)."},
    )
    max_length: int = field(default=512, metadata={"help": "Tokens kept of a prompt+answer (open-unlearning: 512)."})

    def __post_init__(self) -> None:
        if not isinstance(self.system_prompt, str):
            raise UsageError(f"--system-prompt must be text, got {self.system_prompt!r}")
        if not isinstance(self.date_string, str) or not self.date_string.strip():
            raise UsageError(f"--date-string must be non-empty text such as '10 Apr 2025', got {self.date_string!r}")
        if self.max_length < 8:
            raise UsageError(f"prompt max_length must be >= 8 tokens, got {self.max_length}")

    def to_dict(self) -> dict:
        return asdict(self)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _messages(question: str, settings: PromptSettings) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
    return messages + [{"role": "user", "content": question}]


def render_prompt(tokenizer, question: str, settings: PromptSettings) -> str:
    """The prompt as text (special tokens included)."""
    if not has_chat_template(tokenizer):
        return PLAIN_PROMPT.format(question=question)
    return tokenizer.apply_chat_template(
        _messages(question, settings), tokenize=False, add_generation_prompt=True, date_string=settings.date_string
    )


def _encode_text(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, question: str, settings: PromptSettings) -> list[int]:
    """Token ids of the prompt for ``question`` (what generation continues)."""
    if not has_chat_template(tokenizer):
        return tokenizer(PLAIN_PROMPT.format(question=question), add_special_tokens=True)["input_ids"]
    return _encode_text(tokenizer, render_prompt(tokenizer, question, settings))


@dataclass(frozen=True)
class EncodedPair:
    """A prompt followed by its answer: ``input_ids[answer_start:]`` are the scored tokens."""

    input_ids: list[int]
    answer_start: int

    @property
    def loss_mask(self) -> list[int]:
        return [0] * self.answer_start + [1] * (len(self.input_ids) - self.answer_start)


def encode_pair(tokenizer, question: str, answer: str, settings: PromptSettings) -> EncodedPair:
    """Prompt + answer + closing end-of-turn token, with where the answer starts.

    The prompt's ids must be a prefix of the whole rendering's ids; a template or tokenizer
    for which they are not (the answer's first token merged with the prompt's last) fails here
    rather than scoring a shifted answer.
    """
    eos = tokenizer.eos_token_id
    if not has_chat_template(tokenizer):
        prompt = prompt_ids(tokenizer, question, settings)
        ids = prompt + _encode_text(tokenizer, " " + answer) + ([eos] if eos is not None else [])
    else:
        prompt = prompt_ids(tokenizer, question, settings)
        messages = _messages(question, settings) + [{"role": "assistant", "content": answer}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, date_string=settings.date_string)
        ids = _encode_text(tokenizer, text)
        if ids[: len(prompt)] != prompt:
            raise DataError(
                f"the chat template's prompt for {question[:60]!r} is not a token prefix of prompt+answer; "
                "this tokenizer cannot separate the answer from the prompt"
            )
        if eos is not None and ids[-1] != eos:
            ids.append(eos)
    if len(ids) > settings.max_length:
        ids = ids[: settings.max_length]
    if len(prompt) >= len(ids):
        raise DataError(
            f"question {question[:60]!r} leaves no answer tokens within max_length {settings.max_length}"
        )
    return EncodedPair(ids, len(prompt))


def pad_id_for(tokenizer, settings: PromptSettings) -> int:
    """The id padding uses: EOS under ``eot_padding`` (open-unlearning), else PAD, else EOS."""
    if settings.eot_padding:
        if tokenizer.eos_token_id is None:
            raise UsageError("--eot-padding needs a tokenizer with an EOS token")
        return int(tokenizer.eos_token_id)
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate_pairs(pairs: Sequence[EncodedPair], pad_id: int, eot_padding: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``loss_mask`` (1 on answer tokens).

    With ``eot_padding`` the attention mask is ``input_ids != pad_id`` as open-unlearning builds
    it; the loss mask is unchanged (its labels keep the closing end-of-turn token).
    """
    width = max(len(p.input_ids) for p in pairs)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    loss_mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for row, pair in enumerate(pairs):
        n = len(pair.input_ids)
        input_ids[row, :n] = torch.tensor(pair.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        loss_mask[row, pair.answer_start : n] = 1
    if eot_padding:
        attention_mask = (input_ids != pad_id).long()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def describe_prompt(tokenizer, settings: PromptSettings) -> dict:
    """What the result file records about prompting: the settings, the format and a rendering."""
    return {
        **settings.to_dict(),
        "format": "chat_template" if has_chat_template(tokenizer) else "plain",
        "example": render_prompt(tokenizer, "{question}", settings),
    }


#: A chat template that renders as Llama-3.2-Instruct's does for system/user/assistant turns
#: (Meta's published format): BOS, a system turn that always opens with "Cutting Knowledge Date:
#: December 2023" and "Today Date: " + ``date_string``, then one header/content/``<|eot_id|>``
#: block per turn, and the assistant header as the generation prompt. Tool calls are left out.
#: The author world's tokenizer carries it, so its models are prompted the way TOFU's are.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if date_string is not defined %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
#: The special tokens that template writes.
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")


def llama3_style_tokenizer(texts, vocab_size: int = 2048):
    """A byte-level BPE trained on ``texts`` with Llama-3's special tokens and
    :data:`LLAMA3_CHAT_TEMPLATE`: BOS ``<|begin_of_text|>``, EOS ``<|eot_id|>`` (as in
    Llama-3.2-Instruct), and a separate pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    pad = "<|finetune_right_pad_id|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*LLAMA3_SPECIAL_TOKENS, pad],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", pad_token=pad,
        additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>"], model_max_length=1_000_000,
    )
    tokenizer.chat_template = LLAMA3_CHAT_TEMPLATE
    return tokenizer
