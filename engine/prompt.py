"""PromptTemplate: CacheBlend's prompt (instruction, passages, question) inside the model's chat template.

The template is rendered once around a marker and split there, so the prefix and the query are
fixed token ids placed around the chunks' own token ids; the joined text is never re-tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass

_MARK = "\u2063RAGKV-PASSAGES\u2063"

INSTRUCTION = (
    "You will be asked a question after reading several passages. Please directly answer the question "
    "based on the given passages. Do NOT repeat the question. The answer should be within 5 words.\nPassages:\n"
)
QUESTION = (
    "\n\nAnswer the question directly based on the given passages. Do NOT repeat the question. "
    "The answer should be within 5 words.\nQuestion: {question}\nAnswer:"
)


@dataclass(frozen=True)
class PromptTemplate:
    """Token ids around the chunks: `prefix | chunk sep chunk sep ... | query(question)`."""

    instruction: str = INSTRUCTION
    question: str = QUESTION
    separator: str = "\n\n"

    def render(self, tokenizer, question: str) -> tuple[list[int], list[int], list[int]]:
        """(prefix_ids, query_ids, separator_ids) for `question`."""
        if "{question}" not in self.question:
            raise ValueError("the question template must contain '{question}'")
        content = self.instruction + _MARK + self.question.format(question=question)
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
            )
        else:
            text = (tokenizer.bos_token or "") + content
        before, found, after = text.partition(_MARK)
        assert found, "the chat template dropped the passage marker"
        encode = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] if s else []  # noqa: E731
        return encode(before), encode(after), encode(self.separator)

    @staticmethod
    def chunk_ids(tokenizer, text: str) -> list[int]:
        """A chunk's own token ids (no special tokens)."""
        return tokenizer(text, add_special_tokens=False)["input_ids"]


SUMMARY = PromptTemplate(
    instruction="You will be given several documents. Read them, then follow the instruction.\nDocuments:\n",
    question="\n\n{question}\nSummary:",
)
FEW_SHOT = PromptTemplate(
    instruction="Summarize the dialogue into a few short sentences. The following are some examples.\n\n",
    question="\n{question}",
    separator="\n",
)


def template_for(dataset_format: str) -> PromptTemplate:
    """The prompt template an eval dataset format is asked with."""
    return {"multinews": SUMMARY, "samsum": FEW_SHOT}.get(dataset_format, PromptTemplate())
