"""The small demo language model that ships with llminstr.

The model is a standard :class:`transformers.GPT2LMHeadModel` (4 layers, width 128)
with a byte-level vocabulary: ids ``0..255`` are raw UTF-8 bytes and ``256`` is the
end-of-text token, which doubles as beginning-of-text and padding. It was trained
on the help texts that ship with Python itself (:mod:`pydoc_data.topics`) by
``python tools/train_demo_model.py``; ``training.json`` next to the weights records
how.

It exists so that examples, tests and benchmarks have a real (if tiny) trained
transformer to record, without downloading anything::

    from llminstr.demo import generate_text, load_demo_model

    model, tokenizer = load_demo_model()
    print(generate_text(model, tokenizer, ["The for statement"], max_new_tokens=40))
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from llminstr.errors import LlminstrError

__all__ = [
    "DEMO_MODEL_DIR",
    "EOT_ID",
    "VALIDATION_FRACTION",
    "VOCAB_SIZE",
    "ByteTokenizer",
    "DemoModelMissingError",
    "corpus_digest",
    "corpus_ids",
    "corpus_split",
    "demo_config",
    "generate_text",
    "load_demo_model",
]

#: Folder holding the shipped demo model (``config.json``, ``model.safetensors``,
#: ``training.json``).
DEMO_MODEL_DIR: Path = Path(__file__).resolve().parent / "demo_model"

#: Id of the end-of-text token (also used as beginning-of-text and padding).
EOT_ID: int = 256

#: Number of ids in the byte vocabulary: 256 bytes plus end-of-text.
VOCAB_SIZE: int = 257

#: Fraction of the corpus (at its end) held out for validation.
VALIDATION_FRACTION: float = 0.05

_RETRAIN_HINT = "run `python tools/train_demo_model.py` from the repository root to regenerate it"


class DemoModelMissingError(LlminstrError, FileNotFoundError):
    """A file of the demo model (weights or config) is missing."""


class ByteTokenizer:
    """Byte-level tokenizer of the demo model.

    Text is encoded as its UTF-8 bytes (ids ``0..255``); id ``256`` is end-of-text,
    used as beginning-of-text, end-of-text and padding. Decoding is exact for any
    sequence produced by :meth:`encode`.
    """

    eos_token_id: int = EOT_ID
    bos_token_id: int = EOT_ID
    pad_token_id: int = EOT_ID
    vocab_size: int = VOCAB_SIZE

    def encode(self, text: str) -> list[int]:
        """Return the UTF-8 bytes of *text* as a list of ids (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"ByteTokenizer.encode expects a str, got {type(text).__name__}")
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Turn *ids* back into text.

        Ids ``>= 256`` (end-of-text / padding) are skipped; the remaining bytes are
        decoded as UTF-8 with ``errors="replace"``, so a sequence cut in the middle of
        a multi-byte character yields U+FFFD rather than an exception.
        """
        if isinstance(ids, torch.Tensor):
            if ids.dim() != 1:
                raise ValueError(
                    f"ByteTokenizer.decode expects a 1-D sequence of ids, got shape {tuple(ids.shape)}"
                )
            values: list[int] = [int(i) for i in ids.tolist()]
        else:
            values = [int(i) for i in ids]
        negative = [i for i in values if i < 0]
        if negative:
            raise ValueError(f"token ids must be >= 0, got {negative[0]}")
        return bytes(i for i in values if i < EOT_ID).decode("utf-8", errors="replace")

    def batch_decode(self, batch: Sequence[Sequence[int]] | torch.Tensor) -> list[str]:
        """Decode each row of *batch* with :meth:`decode`."""
        return [self.decode(row) for row in batch]

    def __call__(
        self,
        texts: Sequence[str] | str,
        padding_side: Literal["left", "right"] = "left",
        add_bos: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Encode one text or a batch of texts into padded tensors.

        Returns a dict with ``input_ids`` and ``attention_mask``, both ``torch.long`` of
        shape ``(batch, longest)``. Shorter rows are padded with :attr:`pad_token_id`
        on *padding_side* (``"left"`` by default, as batched generation needs) and
        their padding has attention mask 0. With ``add_bos=True`` every row starts
        with the end-of-text id, the way documents start in the training corpus.
        """
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        batch = [texts] if isinstance(texts, str) else list(texts)
        if not batch:
            raise ValueError("ByteTokenizer needs at least one text")
        rows = [([EOT_ID] if add_bos else []) + self.encode(t) for t in batch]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if not row:
                continue
            if padding_side == "left":
                input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
                attention_mask[i, width - len(row) :] = 1
            else:
                input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                attention_mask[i, : len(row)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}


def load_demo_model(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    model_dir: str | Path | None = None,
) -> tuple[GPT2LMHeadModel, ByteTokenizer]:
    """Load the shipped demo model (in eval mode) and its tokenizer.

    The model is read with ``GPT2LMHeadModel.from_pretrained`` from
    :data:`DEMO_MODEL_DIR` (or *model_dir*), local files only, then moved to
    *device* and cast to *dtype*.

    Raises:
        DemoModelMissingError: ``config.json`` or ``model.safetensors`` is missing.
    """
    folder = Path(model_dir) if model_dir is not None else DEMO_MODEL_DIR
    for name in ("config.json", "model.safetensors"):
        path = folder / name
        if not path.is_file():
            raise DemoModelMissingError(
                f"the demo model file {path} does not exist; {_RETRAIN_HINT}"
            )
    model = GPT2LMHeadModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
    # Through nn.Module's annotations: transformers wraps ``to``/``eval`` in ways
    # mypy mis-types; the calls still dispatch to the model's own methods.
    module: torch.nn.Module = model
    module.to(device)
    module.eval()
    return model, ByteTokenizer()


@torch.no_grad()
def generate_text(
    model: GPT2LMHeadModel,
    tokenizer: ByteTokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    greedy: bool = True,
) -> list[str]:
    """Continue each prompt by up to *max_new_tokens* bytes; return the continuations.

    The prompts are batched (left-padded, each preceded by the end-of-text id) and
    passed to ``model.generate``. Greedy decoding is used unless ``greedy=False``,
    which samples (seed :mod:`torch` for reproducibility). Generation of a row stops
    at end-of-text. Only the new text is returned, not the prompt; a continuation
    cut inside a multi-byte character ends in U+FFFD.
    """
    if isinstance(prompts, str):
        raise TypeError("generate_text expects a list of prompts, not a single str")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompts:
        return []
    if max_new_tokens == 0:
        return ["" for _ in prompts]
    device = next(model.parameters()).device
    enc = tokenizer(list(prompts), padding_side="left", add_bos=True)
    input_ids = enc["input_ids"].to(device)
    attention_mask = enc["attention_mask"].to(device)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        do_sample=not greedy,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    assert isinstance(out, torch.Tensor)
    new = out[:, input_ids.shape[1] :].cpu()
    return tokenizer.batch_decode(new)


def corpus_ids() -> torch.Tensor:
    """The demo model's training corpus as a 1-D ``torch.long`` tensor of ids.

    The values of :data:`pydoc_data.topics.topics` in sorted key order, each encoded
    as UTF-8 bytes and followed by the end-of-text id. The text depends on the
    Python version (``training.json`` records the one used and a digest).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # some distributions strip pydoc_data
        raise LlminstrError(
            "the demo corpus needs the standard-library module pydoc_data, which this "
            "Python installation lacks"
        ) from exc
    ids: list[int] = []
    for key in sorted(topics):
        ids.extend(topics[key].encode("utf-8"))
        ids.append(EOT_ID)
    return torch.tensor(ids, dtype=torch.long)


def corpus_split(ids: torch.Tensor, split: Literal["train", "val"]) -> torch.Tensor:
    """The training part (first 95 %) or the validation part (last 5 %) of *ids*."""
    cut = len(ids) - int(len(ids) * VALIDATION_FRACTION)
    if split == "train":
        return ids[:cut]
    if split == "val":
        return ids[cut:]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def corpus_digest(ids: torch.Tensor) -> str:
    """SHA-256 (hex) of the corpus ids, stored as little-endian uint16."""
    return hashlib.sha256(ids.to(torch.int16).numpy().astype("<u2").tobytes()).hexdigest()


def demo_config() -> GPT2Config:
    """The :class:`~transformers.GPT2Config` of the demo model (before training)."""
    return GPT2Config(
        vocab_size=VOCAB_SIZE,
        n_positions=256,
        n_embd=128,
        n_layer=4,
        n_head=4,
        n_inner=512,
        activation_function="gelu_new",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        tie_word_embeddings=True,
    )
