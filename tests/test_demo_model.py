"""Tests of the shipped demo model (llminstr/demo_model) and its helpers in llminstr.demo."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from llminstr.demo import (
    DEMO_MODEL_DIR,
    EOT_ID,
    ByteTokenizer,
    DemoModelMissingError,
    corpus_ids,
    corpus_split,
    generate_text,
    load_demo_model,
)
from llminstr.errors import LlminstrError

TRAINING = json.loads((DEMO_MODEL_DIR / "training.json").read_text())


@pytest.fixture(scope="module")
def demo() -> tuple[GPT2LMHeadModel, ByteTokenizer]:
    return load_demo_model()


def test_shipped_files() -> None:
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "training.json"} <= names
    total = sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir() if p.is_file())
    assert total <= 5 * 1024 * 1024
    with safe_open(str(DEMO_MODEL_DIR / "model.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            assert f.get_slice(key).get_dtype() == "F32", key


def test_config_matches_record() -> None:
    config = GPT2Config.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    assert isinstance(config, GPT2Config)
    recorded = TRAINING["model"]
    for field in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size"):
        assert getattr(config, field) == recorded[field], field
    assert (config.n_layer, config.n_embd, config.n_head) == (4, 128, 4)
    assert config.vocab_size == 257
    assert config.bos_token_id == config.eos_token_id == config.pad_token_id == EOT_ID


def test_training_record() -> None:
    for key in (
        "seed",
        "steps",
        "hyperparameters",
        "runtime_seconds",
        "final_train_loss",
        "final_val_loss",
        "unigram_baseline",
        "versions",
        "date",
        "command",
    ):
        assert key in TRAINING, key
    assert TRAINING["command"].startswith("python tools/train_demo_model.py")
    assert TRAINING["final_val_loss"] < TRAINING["unigram_baseline"]["val_cross_entropy"]


def test_loads_with_auto_class(demo: tuple[GPT2LMHeadModel, ByteTokenizer]) -> None:
    model, _ = demo
    auto = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, local_files_only=True)
    assert isinstance(auto, GPT2LMHeadModel)
    assert isinstance(model, GPT2LMHeadModel)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ref = dict(model.state_dict())
    for name, value in auto.state_dict().items():
        assert torch.equal(value, ref[name]), name


@pytest.mark.parametrize(
    "text",
    [
        "",
        "hello world",
        "def f(x):\n\treturn x ** 2\n",
        "naïve café — Ωμέγα, 日本語, 🙂🚀",
        "\x00\x7f",
    ],
)
def test_tokenizer_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_tokenizer_decode_skips_special_and_replaces() -> None:
    tok = ByteTokenizer()
    assert tok.decode([EOT_ID, *b"ab", EOT_ID, *b"c"]) == "abc"
    assert tok.decode(list("é".encode())[:1]) == "\ufffd"
    assert (tok.eos_token_id, tok.pad_token_id, tok.vocab_size) == (256, 256, 257)


def test_tokenizer_batch_padding() -> None:
    tok = ByteTokenizer()
    enc = tok(["a", "abc", ""])
    assert set(enc) == {"input_ids", "attention_mask"}
    assert enc["input_ids"].dtype == enc["attention_mask"].dtype == torch.long
    assert enc["input_ids"].tolist() == [[256, 256, 97], [97, 98, 99], [256, 256, 256]]
    assert enc["attention_mask"].tolist() == [[0, 0, 1], [1, 1, 1], [0, 0, 0]]
    right = tok("ab", padding_side="right")
    assert right["input_ids"].tolist() == [[97, 98]]
    assert tok(["x", "yz"], padding_side="right")["attention_mask"].tolist() == [[1, 0], [1, 1]]
    assert tok("a", add_bos=True)["input_ids"].tolist() == [[256, 97]]
    with pytest.raises(ValueError):
        tok("a", padding_side="middle")  # type: ignore[arg-type]


def test_batched_greedy_generate(demo: tuple[GPT2LMHeadModel, ByteTokenizer]) -> None:
    model, tok = demo
    prompts = ["The ", "The for statement", "Lists are mutable sequences, "]
    batched = generate_text(model, tok, prompts, max_new_tokens=24)
    assert len(batched) == len(prompts)
    assert all(isinstance(s, str) and s for s in batched)
    # Left padding must not change what each prompt generates.
    single = [generate_text(model, tok, [p], max_new_tokens=24)[0] for p in prompts]
    assert batched == single
    # Greedy decoding is deterministic.
    assert generate_text(model, tok, prompts, max_new_tokens=24) == batched
    # Mostly printable text, not byte soup.
    joined = "".join(batched)
    assert sum(c.isprintable() or c.isspace() for c in joined) / len(joined) > 0.9


def test_sampling_generate_runs(demo: tuple[GPT2LMHeadModel, ByteTokenizer]) -> None:
    model, tok = demo
    torch.manual_seed(0)
    out = generate_text(model, tok, ["x", ""], max_new_tokens=8, greedy=False)
    assert len(out) == 2
    assert generate_text(model, tok, ["x"], max_new_tokens=0) == [""]
    assert generate_text(model, tok, [], max_new_tokens=5) == []


def test_validation_loss_beats_unigram(demo: tuple[GPT2LMHeadModel, ByteTokenizer]) -> None:
    model, _ = demo
    try:
        ids = corpus_ids()
    except LlminstrError as exc:
        pytest.skip(str(exc))
    train, val = corpus_split(ids, "train"), corpus_split(ids, "val")
    counts = torch.bincount(train, minlength=257).double() + 1
    unigram = float(-(counts / counts.sum()).log()[val].mean())
    window, n = 256, 12
    starts = torch.linspace(0, len(val) - window - 1, n).long().tolist()
    batch = torch.stack([val[s : s + window + 1] for s in starts])
    with torch.no_grad():
        inputs = batch[:, :-1]
        logits = model(inputs, attention_mask=torch.ones_like(inputs)).logits
    loss = float(
        torch.nn.functional.cross_entropy(logits.reshape(-1, 257), batch[:, 1:].reshape(-1))
    )
    assert math.isfinite(loss)
    assert 3.0 < unigram < 3.5
    assert loss < unigram - 1.0, (loss, unigram)


def test_missing_weights_error(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((DEMO_MODEL_DIR / "config.json").read_text())
    with pytest.raises(DemoModelMissingError) as info:
        load_demo_model(model_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path / "model.safetensors") in message
    assert "tools/train_demo_model.py" in message
    assert isinstance(info.value, FileNotFoundError)
