"""A whole Engine in seconds without SmolLM2: a tiny random Llama and a small byte-level BPE tokenizer
trained here with `tokenizers`, wrapped as a transformers tokenizer with a chat template."""

from __future__ import annotations

from functools import cache

CORPUS = [
    "The river bends north at the old stone bridge, where the lamp keepers meet.",
    "Maple trees line the quartz road; the orbit of the moon sets the tide.",
    "Alpha, beta and gamma are letters; delta is the mouth of a river.",
    "You will be asked a question after reading several passages. Answer directly.",
    "Question: where does the river bend? Answer: at the stone bridge.",
]
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>"]  # ids 0..4: pad, bos, eos, roles
VOCAB_SIZE = 384  # 5 special tokens + 256 byte symbols + merges learned from CORPUS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok.to_str()


def tiny_tokenizer():
    """A byte-level BPE tokenizer (any text encodes) with bos `<s>`=1, eos `</s>`=2 and a chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tok.chat_template = CHAT_TEMPLATE
    assert len(tok) <= VOCAB_SIZE and tok.bos_token_id == 1 and tok.eos_token_id == 2
    return tok


def tiny_engine_adapter(seed: int = 0):
    """The tiny random Llama (vocab 384) with the tiny tokenizer; sink = `<s>`."""
    from tiny_models import tiny_model

    from ragkv.models import adapter_for

    return adapter_for(tiny_model("llama", seed=seed, vocab_size=VOCAB_SIZE), tiny_tokenizer())


def tiny_engine(store=None, **config):
    """An Engine over the tiny adapter; default store: one memory tier."""
    from ragkv.engine.config import EngineConfig
    from ragkv.engine.engine import Engine
    from ragkv.storage import MemoryTier, TieredStore

    config.setdefault("max_new_tokens", 8)
    return Engine(tiny_engine_adapter(), store or TieredStore([MemoryTier()]), EngineConfig(**config))


PASSAGES = [
    "The river bends north at the old stone bridge.",
    "Maple trees line the quartz road near the tide pools.",
    "Delta is the mouth of a river; gamma is a letter.",
]
