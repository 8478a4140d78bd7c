"""Stand-ins for the heavy objects a stage receives: a word-level tokenizer and a loaded model.

They let a test drive the pure parts of a stage (captions, batching, holdout text) without
loading transformers, and let it see what the stage asked of them (``FakeTokenizer.calls``).
"""

from __future__ import annotations

from typing import Any, cast

from auto_quantize_model.artifacts import LoadedModel


class FakeTokenizer:
    """Word-level: one id per distinct word, handed out from ``first_id`` in order of appearance.

    Asked for special tokens, it prepends ``bos_id`` (so a test can tell whether the stage asked);
    with ``forbid_special_tokens`` such a call fails the test instead, for code that must never ask.
    Every call is recorded in :attr:`calls`.
    """

    def __init__(
        self,
        *,
        first_id: int = 10,
        bos_id: int = 1,
        pad_token_id: int | None = 0,
        eos_token_id: int | None = 2,
        forbid_special_tokens: bool = False,
    ) -> None:
        self.first_id = first_id
        self.bos_id = bos_id
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.forbid_special_tokens = forbid_special_tokens
        self.vocab: dict[str, int] = {}
        self.calls: list[dict[str, Any]] = []

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        self.calls.append({"texts": list(texts), "add_special_tokens": add_special_tokens})
        assert not (add_special_tokens and self.forbid_special_tokens), "special tokens were asked for"
        out = []
        for text in texts:
            ids = [self.vocab.setdefault(word, self.first_id + len(self.vocab)) for word in text.split()]
            out.append(([self.bos_id] if add_special_tokens else []) + ids)
        return {"input_ids": out}


def fake_loaded(tokenizer: Any, model: Any = None) -> LoadedModel:
    """A :class:`LoadedModel` around ``tokenizer`` on CPU; ``model`` only if the code under test runs it."""
    return LoadedModel(
        model=cast(Any, model),
        tokenizer=cast(Any, tokenizer),
        source="fake",
        architecture="Fake",
        dtype="float32",
        device="cpu",
    )
