"""Tests of llminstr.sites: site discovery over tiny random transformers models."""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from llminstr.config import HookGranularity
from llminstr.errors import ConfigError, LlminstrError, NoSitesFoundError, SiteNotFoundError
from llminstr.sites import ARCHITECTURES, SiteSpec, find_sites, resolve_modules

transformers = pytest.importorskip("transformers")

HIDDEN = 32
BATCH, SEQ = 2, 5
G = HookGranularity

_DECODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=100,
)
_MOE = dict(num_experts_per_tok=2)


class Arch(NamedTuple):
    """A tiny model and the sites it must yield (paths relative to a block)."""

    config: str
    model: str
    kwargs: dict[str, Any]
    blocks: str
    block_class: str
    attention: tuple[str, str]  # (relative path, class name)
    ffn: tuple[str, str]
    flat_ffn: bool = False


ARCHS: dict[str, Arch] = {
    "gpt2": Arch(
        "GPT2Config", "GPT2LMHeadModel",
        dict(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
        "transformer.h", "GPT2Block", ("attn", "GPT2Attention"), ("mlp", "GPT2MLP"),
    ),
    "gpt_neo": Arch(
        "GPTNeoConfig", "GPTNeoForCausalLM",
        dict(hidden_size=HIDDEN, num_layers=2, num_heads=4, vocab_size=100,
             max_position_embeddings=64, attention_types=[[["global", "local"], 1]]),
        "transformer.h", "GPTNeoBlock", ("attn", "GPTNeoAttention"), ("mlp", "GPTNeoMLP"),
    ),
    "gpt_bigcode": Arch(
        "GPTBigCodeConfig", "GPTBigCodeForCausalLM",
        dict(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=100, n_positions=64),
        "transformer.h", "GPTBigCodeBlock", ("attn", "GPTBigCodeAttention"),
        ("mlp", "GPTBigCodeMLP"),
    ),
    "gptj": Arch(
        "GPTJConfig", "GPTJForCausalLM",
        dict(n_embd=HIDDEN, n_layer=2, n_head=4, vocab_size=100, n_positions=64, rotary_dim=4),
        "transformer.h", "GPTJBlock", ("attn", "GPTJAttention"), ("mlp", "GPTJMLP"),
    ),
    "gpt_neox": Arch(
        "GPTNeoXConfig", "GPTNeoXForCausalLM",
        dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, vocab_size=100, max_position_embeddings=64),
        "gpt_neox.layers", "GPTNeoXLayer", ("attention", "GPTNeoXAttention"),
        ("mlp", "GPTNeoXMLP"),
    ),
    "opt": Arch(
        "OPTConfig", "OPTForCausalLM",
        dict(hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
             vocab_size=100, word_embed_proj_dim=HIDDEN, max_position_embeddings=64),
        "model.decoder.layers", "OPTDecoderLayer", ("self_attn", "OPTAttention"),
        ("fc2", "Linear"), flat_ffn=True,
    ),
    "llama": Arch(
        "LlamaConfig", "LlamaForCausalLM", _DECODER, "model.layers", "LlamaDecoderLayer",
        ("self_attn", "LlamaAttention"), ("mlp", "LlamaMLP"),
    ),
    "mistral": Arch(
        "MistralConfig", "MistralForCausalLM", _DECODER, "model.layers", "MistralDecoderLayer",
        ("self_attn", "MistralAttention"), ("mlp", "MistralMLP"),
    ),
    "mixtral": Arch(
        "MixtralConfig", "MixtralForCausalLM", {**_DECODER, **_MOE, "num_local_experts": 4},
        "model.layers", "MixtralDecoderLayer", ("self_attn", "MixtralAttention"),
        ("mlp", "MixtralSparseMoeBlock"),
    ),
    "qwen2": Arch(
        "Qwen2Config", "Qwen2ForCausalLM", _DECODER, "model.layers", "Qwen2DecoderLayer",
        ("self_attn", "Qwen2Attention"), ("mlp", "Qwen2MLP"),
    ),
    "qwen2_moe": Arch(
        "Qwen2MoeConfig", "Qwen2MoeForCausalLM",
        {**_DECODER, **_MOE, "num_experts": 4, "moe_intermediate_size": 16,
         "shared_expert_intermediate_size": 32},
        "model.layers", "Qwen2MoeDecoderLayer", ("self_attn", "Qwen2MoeAttention"),
        ("mlp", "Qwen2MoeSparseMoeBlock"),
    ),
    "qwen3": Arch(
        "Qwen3Config", "Qwen3ForCausalLM", {**_DECODER, "head_dim": 8}, "model.layers",
        "Qwen3DecoderLayer", ("self_attn", "Qwen3Attention"), ("mlp", "Qwen3MLP"),
    ),
    "qwen3_moe": Arch(
        "Qwen3MoeConfig", "Qwen3MoeForCausalLM",
        {**_DECODER, **_MOE, "head_dim": 8, "num_experts": 4, "moe_intermediate_size": 16},
        "model.layers", "Qwen3MoeDecoderLayer", ("self_attn", "Qwen3MoeAttention"),
        ("mlp", "Qwen3MoeSparseMoeBlock"),
    ),
    "gemma": Arch(
        "GemmaConfig", "GemmaForCausalLM", {**_DECODER, "head_dim": 8}, "model.layers",
        "GemmaDecoderLayer", ("self_attn", "GemmaAttention"), ("mlp", "GemmaMLP"),
    ),
    "gemma2": Arch(
        "Gemma2Config", "Gemma2ForCausalLM", {**_DECODER, "head_dim": 8}, "model.layers",
        "Gemma2DecoderLayer", ("self_attn", "Gemma2Attention"), ("mlp", "Gemma2MLP"),
    ),
    "gemma3_text": Arch(
        "Gemma3TextConfig", "Gemma3ForCausalLM", {**_DECODER, "head_dim": 8}, "model.layers",
        "Gemma3DecoderLayer", ("self_attn", "Gemma3Attention"), ("mlp", "Gemma3MLP"),
    ),
    "phi": Arch(
        "PhiConfig", "PhiForCausalLM", {**_DECODER, "num_key_value_heads": 4}, "model.layers",
        "PhiDecoderLayer", ("self_attn", "PhiAttention"), ("mlp", "PhiMLP"),
    ),
    "phi3": Arch(
        "Phi3Config", "Phi3ForCausalLM", {**_DECODER, "pad_token_id": 0}, "model.layers",
        "Phi3DecoderLayer", ("self_attn", "Phi3Attention"), ("mlp", "Phi3MLP"),
    ),
    "phimoe": Arch(
        "PhimoeConfig", "PhimoeForCausalLM", {**_DECODER, **_MOE, "num_local_experts": 4},
        "model.layers", "PhimoeDecoderLayer", ("self_attn", "PhimoeAttention"),
        ("mlp", "PhimoeSparseMoeBlock"),
    ),
    "olmo2": Arch(
        "Olmo2Config", "Olmo2ForCausalLM", _DECODER, "model.layers", "Olmo2DecoderLayer",
        ("self_attn", "Olmo2Attention"), ("mlp", "Olmo2MLP"),
    ),
    "starcoder2": Arch(
        "Starcoder2Config", "Starcoder2ForCausalLM", _DECODER, "model.layers",
        "Starcoder2DecoderLayer", ("self_attn", "Starcoder2Attention"), ("mlp", "Starcoder2MLP"),
    ),
    "falcon": Arch(
        "FalconConfig", "FalconForCausalLM",
        dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4, vocab_size=100),
        "transformer.h", "FalconDecoderLayer", ("self_attention", "FalconAttention"),
        ("mlp", "FalconMLP"),
    ),
    "bloom": Arch(
        "BloomConfig", "BloomForCausalLM",
        dict(hidden_size=HIDDEN, n_layer=2, n_head=4, vocab_size=100),
        "transformer.h", "BloomBlock", ("self_attention.dense", "Linear"),
        ("mlp.dense_4h_to_h", "Linear"),
    ),
    "bert": Arch(
        "BertConfig", "BertForMaskedLM",
        dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, vocab_size=100, max_position_embeddings=64),
        "bert.encoder.layer", "BertLayer", ("attention.output.dense", "Linear"),
        ("output.dense", "Linear"),
    ),
    "roberta": Arch(
        "RobertaConfig", "RobertaForMaskedLM",
        dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, vocab_size=100, max_position_embeddings=64),
        "roberta.encoder.layer", "RobertaLayer", ("attention.output.dense", "Linear"),
        ("output.dense", "Linear"),
    ),
    "distilbert": Arch(
        "DistilBertConfig", "DistilBertForMaskedLM",
        dict(dim=HIDDEN, hidden_dim=64, n_layers=2, n_heads=4, vocab_size=100,
             max_position_embeddings=64),
        "distilbert.transformer.layer", "TransformerBlock",
        ("attention", "DistilBertSelfAttention"), ("ffn", "FFN"),
    ),
}  # fmt: skip


def _build(config_name: str, model_name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        config = getattr(transformers, config_name)(**kwargs)
        model: nn.Module = getattr(transformers, model_name)(config)
    except Exception as exc:  # pragma: no cover - depends on the transformers version
        pytest.skip(
            f"{model_name} cannot be built in transformers {transformers.__version__}: {exc!r}"
        )
    return model.eval()


@functools.cache
def _model(arch: str, model_name: str | None = None) -> nn.Module:
    a = ARCHS[arch]
    torch.manual_seed(0)
    return _build(a.config, model_name or a.model, a.kwargs)


def _expected(
    arch: str,
    granularity: HookGranularity,
    prefix: str | None = None,
    layers: Sequence[int] = (0, 1),
) -> list[tuple[str, str, int, str, bool]]:
    a = ARCHS[arch]
    blocks = a.blocks if prefix is None else prefix
    out = []
    for i in layers:
        block = f"{blocks}.{i}" if blocks else str(i)
        if granularity in (G.ALL, G.ATTENTION_ONLY):
            out.append((f"{block}.{a.attention[0]}", "attention", i, a.attention[1], False))
        if granularity in (G.ALL, G.FFN_ONLY):
            out.append((f"{block}.{a.ffn[0]}", "ffn", i, a.ffn[1], a.flat_ffn))
        if granularity is G.ALL:
            out.append((block, "residual", i, a.block_class, False))
    return out


def _summary(sites: list[SiteSpec]) -> list[tuple[str, str, int | None, str, bool]]:
    for s in sites:
        assert s.name == s.module_path
        assert s.tuple_index == 0
    return [(s.name, s.kind, s.layer, s.module_class, s.flat_tokens) for s in sites]


def _capture(
    model: nn.Module, sites: list[SiteSpec], **inputs: Any
) -> dict[str, list[torch.Tensor]]:
    """Run a forward pass, returning every site's taken output (a clone) per call."""
    seen: dict[str, list[torch.Tensor]] = {s.name: [] for s in sites}
    handles = []
    for site, module in resolve_modules(model, sites):

        def hook(_m: nn.Module, _i: Any, out: Any, site: SiteSpec = site) -> None:
            taken = out[site.tuple_index] if isinstance(out, (tuple, list)) else out
            seen[site.name].append(taken.detach().clone())

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def _ids() -> torch.Tensor:
    return torch.randint(0, 100, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- per architecture


def test_every_registry_entry_is_tested() -> None:
    assert set(ARCHS) == set(ARCHITECTURES)


@pytest.mark.parametrize("granularity", list(HookGranularity), ids=lambda g: g.name)
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_sites_per_architecture(arch: str, granularity: HookGranularity) -> None:
    sites = find_sites(_model(arch), granularity)
    assert _summary(sites) == _expected(arch, granularity)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_site_outputs_are_batch_seq_hidden(arch: str) -> None:
    model = _model(arch)
    sites = find_sites(model, G.ALL)
    seen = _capture(model, sites, input_ids=_ids())
    for site in sites:
        assert len(seen[site.name]) == 1, f"{site.name} fired {len(seen[site.name])} times"
        out = seen[site.name][0]
        if site.flat_tokens:
            assert out.shape == (BATCH * SEQ, HIDDEN), site.name
            out = out.view(BATCH, SEQ, HIDDEN)
        assert out.shape == (BATCH, SEQ, HIDDEN), site.name


def test_llama_example_from_the_brief() -> None:
    cfg = transformers.LlamaConfig(**_DECODER)
    names = [s.name for s in find_sites(transformers.LlamaForCausalLM(cfg), G.ALL)]
    assert names == [
        "model.layers.0.self_attn",
        "model.layers.0.mlp",
        "model.layers.0",
        "model.layers.1.self_attn",
        "model.layers.1.mlp",
        "model.layers.1",
    ]


@pytest.mark.parametrize(
    ("arch", "base", "prefix"),
    [
        ("llama", "LlamaModel", "layers"),
        ("gpt2", "GPT2Model", "h"),
        ("opt", "OPTModel", "decoder.layers"),
        ("bert", "BertModel", "encoder.layer"),
        ("mixtral", "MixtralModel", "layers"),
    ],
)
def test_base_models_without_head(arch: str, base: str, prefix: str) -> None:
    model = _model(arch, base)
    for granularity in HookGranularity:
        sites = find_sites(model, granularity)
        assert _summary(sites) == _expected(arch, granularity, prefix=prefix)
    seen = _capture(model, find_sites(model, G.ALL), input_ids=_ids())
    for name, outs in seen.items():
        assert outs[0].reshape(BATCH, SEQ, HIDDEN).shape == (BATCH, SEQ, HIDDEN), name


def test_model_without_config_is_recognised_by_block_class() -> None:
    class Wrapper(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

    model = Wrapper(_model("opt", "OPTModel"))
    assert not hasattr(model, "config")
    sites = find_sites(model, G.FFN_ONLY)
    # fc2 is not found by the name heuristics: this proves the table was used.
    assert _summary(sites) == _expected("opt", G.FFN_ONLY, prefix="inner.decoder.layers")


def test_registry_names_missing_fall_back_to_heuristics() -> None:
    """A model_type in the table whose attention child has another name (a future rename)."""
    model = _build("LlamaConfig", "LlamaForCausalLM", _DECODER)
    blocks = model.get_submodule("model.layers")
    assert isinstance(blocks, nn.ModuleList)
    for layer in blocks:
        layer.attn = layer.self_attn
        del layer.self_attn
    sites = find_sites(model, G.ATTENTION_ONLY)
    assert [s.name for s in sites] == ["model.layers.0.attn", "model.layers.1.attn"]


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize(
    ("layers", "expected"),
    [
        ([0], [0]),
        ([-1], [1]),
        ([1, -2], [0, 1]),
        ((-1, 1), [1]),
        ([1, 0], [0, 1]),
        ([np.int64(-1)], [1]),
    ],
)
def test_layer_subsets(layers: list[int], expected: list[int]) -> None:
    sites = find_sites(_model("llama"), G.ALL, layers=layers)
    assert _summary(sites) == _expected("llama", G.ALL, layers=expected)


@pytest.mark.parametrize("bad", [[2], [-3], [0, 5]])
def test_layer_out_of_range(bad: list[int]) -> None:
    with pytest.raises(ConfigError, match=r"out of range.*2 blocks.*0\.\.1.*-2\.\.-1"):
        find_sites(_model("llama"), G.ALL, layers=bad)


@pytest.mark.parametrize("bad", [[], ["0"], [True], [0.0], "0"])
def test_layer_malformed(bad: Any) -> None:
    with pytest.raises(ConfigError):
        find_sites(_model("llama"), G.ALL, layers=bad)


def test_granularity_must_be_enum() -> None:
    with pytest.raises(ConfigError, match="HookGranularity"):
        find_sites(_model("llama"), "all")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- module_names


def test_module_names_override() -> None:
    model = _model("llama")
    names = [
        "lm_head",
        "model.layers.1.mlp",
        "model.layers.0",
        "model.layers.0.self_attn.q_proj",
        "model.embed_tokens",
        "model.layers.1.input_layernorm",
    ]
    for granularity in HookGranularity:  # the granularity is ignored
        sites = find_sites(model, granularity, module_names=names)
        assert _summary(sites) == [
            ("model.embed_tokens", "other", None, "Embedding", False),
            ("model.layers.0.self_attn.q_proj", "other", 0, "Linear", False),
            ("model.layers.0", "residual", 0, "LlamaDecoderLayer", False),
            ("model.layers.1.mlp", "ffn", 1, "LlamaMLP", False),
            ("model.layers.1.input_layernorm", "other", 1, "LlamaRMSNorm", False),
            ("lm_head", "other", None, "Linear", False),
        ]


def test_module_names_inside_attention_or_ffn_are_other() -> None:
    """Projections inside an attention or FFN module are parts of it, not its output."""
    sites = find_sites(
        _model("gpt2"),
        G.ALL,
        module_names=[
            "transformer.h.1.attn.c_attn",
            "transformer.h.1.attn",
            "transformer.h.0.mlp.c_fc",
        ],
    )
    assert [(s.name, s.kind, s.layer) for s in sites] == [
        ("transformer.h.0.mlp.c_fc", "other", 0),
        ("transformer.h.1.attn.c_attn", "other", 1),
        ("transformer.h.1.attn", "attention", 1),
    ]


def test_module_names_use_the_registry_for_kinds() -> None:
    sites = find_sites(
        _model("opt"),
        G.ALL,
        module_names=["model.decoder.layers.1.fc2", "model.decoder.layers.1.fc1"],
    )
    assert _summary(sites) == [
        ("model.decoder.layers.1.fc1", "other", 1, "Linear", False),
        ("model.decoder.layers.1.fc2", "ffn", 1, "Linear", True),
    ]


def test_module_names_with_layers_filter() -> None:
    model = _model("llama")
    names = ["model.layers.0.mlp", "model.layers.1.mlp", "model.norm"]
    sites = find_sites(model, G.ALL, module_names=names, layers=[-1])
    assert [s.name for s in sites] == ["model.layers.1.mlp", "model.norm"]
    with pytest.raises(ConfigError, match="excludes every module"):
        find_sites(model, G.ALL, module_names=["model.layers.0.mlp"], layers=[1])
    with pytest.raises(ConfigError, match="out of range"):
        find_sites(model, G.ALL, module_names=["model.layers.0.mlp"], layers=[7])


def test_module_names_on_a_model_without_blocks() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    sites = find_sites(model, G.ALL, module_names=["1", "0"])
    assert _summary(sites) == [
        ("0", "other", None, "Linear", False),
        ("1", "other", None, "ReLU", False),
    ]
    with pytest.raises(ConfigError, match="no recognisable block list"):
        find_sites(model, G.ALL, module_names=["0"], layers=[0])


def test_missing_module_name_lists_close_matches() -> None:
    model = _model("llama")
    with pytest.raises(SiteNotFoundError) as info:
        find_sites(model, G.ALL, module_names=["model.layers.0.mlp", "model.layers.0.mpl"])
    message = str(info.value)
    assert "'model.layers.0.mpl' not found" in message
    assert "'model.layers.0.mlp'" in message
    assert isinstance(info.value, LlminstrError) and isinstance(info.value, KeyError)
    # A path relative to the base model, given for the head model: the full path is suggested.
    with pytest.raises(SiteNotFoundError, match=r"'model\.layers\.1\.self_attn'"):
        find_sites(model, G.ALL, module_names=["layers.1.self_attn"])
    with pytest.raises(SiteNotFoundError, match="named_modules"):
        find_sites(model, G.ALL, module_names=["zzzzzzzzzzzzzzzzzzzzzzzz"])


@pytest.mark.parametrize("bad", [[], "model.norm", ["model.norm", "model.norm"], [""], [3]])
def test_module_names_malformed(bad: Any) -> None:
    with pytest.raises(ConfigError):
        find_sites(_model("llama"), G.ALL, module_names=bad)


# --------------------------------------------------------------------------- fallback


class ToyAttention(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        w = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return self.out(w @ v), None


class ToyBlock(nn.Module):
    """An unusual block: odd child names, a list of expert MLPs, returns a tuple."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(d)
        self.attn_dropout = nn.Dropout(0.0)  # a distractor whose name contains "attn"
        self.token_mixer_attention = ToyAttention(d)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.GELU()) for _ in range(8))
        self.feed_forward = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        a, _ = self.token_mixer_attention(self.pre_norm(x))
        x = x + self.attn_dropout(a)
        x = x + self.feed_forward(x) + sum(e(x) for e in self.experts)
        return x, 0


class ToyTransformer(nn.Module):
    def __init__(self, d: int = 8, n: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, d)
        self.backbone = nn.ModuleDict(
            {"stack": nn.ModuleDict({"blocks": nn.ModuleList(ToyBlock(d) for _ in range(n))})}
        )
        self.heads = nn.ModuleList(nn.Linear(d, 50) for _ in range(4))  # 4 same-class leaves

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embed(input_ids)
        for block in self.get_submodule("backbone.stack.blocks").children():
            x, _ = block(x)
        out: torch.Tensor = self.get_submodule("heads.0")(x)
        return out


def test_fallback_on_a_toy_transformer() -> None:
    torch.manual_seed(0)
    model = ToyTransformer().eval()
    p = "backbone.stack.blocks"
    assert _summary(find_sites(model, G.ALL)) == [
        row
        for i in range(3)
        for row in [
            (f"{p}.{i}.token_mixer_attention", "attention", i, "ToyAttention", False),
            (f"{p}.{i}.feed_forward", "ffn", i, "Sequential", False),
            (f"{p}.{i}", "residual", i, "ToyBlock", False),
        ]
    ]
    assert [s.name for s in find_sites(model, G.FFN_ONLY, layers=[-1])] == [f"{p}.2.feed_forward"]
    sites = find_sites(model, G.ALL)
    seen = _capture(model, sites, input_ids=torch.randint(0, 50, (BATCH, SEQ)))
    assert all(outs[0].shape == (BATCH, SEQ, 8) for outs in seen.values())


def test_fallback_blocks_without_recognisable_children() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mixer = nn.Linear(4, 4)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList(Block() for _ in range(2))

    model = Net()
    assert _summary(find_sites(model, G.ALL)) == [
        ("layers.0", "residual", 0, "Block", False),
        ("layers.1", "residual", 1, "Block", False),
    ]
    with pytest.raises(
        NoSitesFoundError, match=r"No ATTENTION_ONLY sites.*'layers'.*module_names="
    ):
        find_sites(model, G.ATTENTION_ONLY)


def test_no_sites_found_message() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    for granularity in HookGranularity:
        with pytest.raises(NoSitesFoundError) as info:
            find_sites(model, granularity)
        message = str(info.value)
        assert "No block list found in Sequential" in message
        assert "No nn.ModuleList found" in message
        assert "<root> (Sequential), 0 (Linear)" in message
        assert "module_names=" in message
        assert isinstance(info.value, LlminstrError)


def test_no_sites_found_lists_module_lists() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    with pytest.raises(NoSitesFoundError, match=r"heads \(3 x Linear\)"):
        find_sites(Net(), G.ALL)


# --------------------------------------------------------------------------- SiteSpec / resolve


def test_site_spec_to_dict_is_json() -> None:
    site = find_sites(_model("opt"), G.FFN_ONLY, layers=[0])[0]
    d = site.to_dict()
    assert d == {
        "name": "model.decoder.layers.0.fc2",
        "module_path": "model.decoder.layers.0.fc2",
        "layer": 0,
        "kind": "ffn",
        "module_class": "Linear",
        "tuple_index": 0,
        "flat_tokens": True,
    }
    assert SiteSpec(**json.loads(json.dumps(d))) == site
    with pytest.raises(ConfigError, match="kind"):
        SiteSpec("x", "x", None, "mlp", "Linear", 0)


def test_resolve_modules() -> None:
    model = _model("gpt2")
    sites = find_sites(model, G.ALL)
    pairs = resolve_modules(model, sites)
    assert [s for s, _ in pairs] == sites
    for site, module in pairs:
        assert module is model.get_submodule(site.module_path)
        assert type(module).__name__ == site.module_class
    ghost = SiteSpec("transformer.h.9.mlp", "transformer.h.9.mlp", 9, "ffn", "GPT2MLP", 0)
    with pytest.raises(SiteNotFoundError, match=r"transformer\.h\.9\.mlp"):
        resolve_modules(model, [ghost])


def test_docs_cover_every_architecture() -> None:
    doc = Path(__file__).resolve().parents[1] / "docs" / "architectures.md"
    text = doc.read_text(encoding="utf-8")
    for arch, a in ARCHS.items():
        assert f"`{arch}`" in text, arch
        assert f"`{a.ffn[0]}`" in text and f"`{a.attention[0]}`" in text, arch
