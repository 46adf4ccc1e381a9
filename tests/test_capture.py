"""Capture engine: rows during generate() match independent hooks bit for bit, across
architectures and dtypes; instrumentation never changes outputs; context-manager semantics."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest
import torch
import transformers

from llminstr import HookGranularity, InstrumentationConfig, InstrumentationFramework
from llminstr.errors import CaptureStateError, ConfigError, FormatError, LlminstrError
from llminstr.reader import open_capture

transformers.logging.set_verbosity_error()


_DECODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_DECODER, intermediate_size=64, num_key_value_heads=2)
#: arch -> (config class, model class, sizes): tiny models with random weights.
_TINY: dict[str, tuple[str, str, dict[str, Any]]] = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=2, n_embd=32, n_head=4, n_positions=64)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", _GQA),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _GQA),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(_DECODER, intermediate_size=64)),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(_DECODER, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", _GQA),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(_GQA, head_dim=8)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _GQA),
}


def _tiny(arch: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    config_cls, model_cls, sizes = _TINY[arch]
    common = dict(vocab_size=97, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, config_cls)(**sizes, **common)
    model: torch.nn.Module = getattr(transformers, model_cls)(cfg)
    return model.to(dtype).eval()


PROMPTS = torch.tensor([[0, 0, 0, 5, 6, 7], [9, 8, 7, 6, 5, 4], [0, 11, 12, 13, 14, 15]])
MASK = (PROMPTS != 0).long()
MASK[1] = 1  # row 1 has no padding


def _generate(model: torch.nn.Module, new: int = 4) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            PROMPTS,
            attention_mask=MASK,
            max_new_tokens=new,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=None,
        )


def _reference_rows(
    model: torch.nn.Module, modules: dict[str, torch.nn.Module]
) -> dict[str, np.ndarray]:
    """Independent hooks: record every output, then keep real tokens by a plain loop."""
    outputs: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    masks: list[torch.Tensor] = []

    def pre(mod, args, kwargs):
        masks.append(kwargs["attention_mask"].cpu().clone())

    handles = [model.register_forward_pre_hook(pre, with_kwargs=True)]
    for name, mod in modules.items():

        def hook(m, a, out, name=name):
            t = out[0] if isinstance(out, tuple) else out
            outputs[name].append(t.detach().cpu().clone())

        handles.append(mod.register_forward_hook(hook))
    try:
        _generate(model)
    finally:
        for h in handles:
            h.remove()
    rows: dict[str, np.ndarray] = {}
    for name, outs in outputs.items():
        kept = []
        for out, mask in zip(outs, masks, strict=True):
            if out.dim() == 2:  # a site that returns (batch*seq, hidden), like OPT's fc2
                out = out.reshape(mask.shape[0], -1, out.shape[-1])
            s = out.shape[1]
            for b in range(out.shape[0]):
                for j in range(s):
                    if mask[b, mask.shape[1] - s + j]:
                        kept.append(out[b, j])
        stacked = torch.stack(kept)
        if stacked.dtype == torch.bfloat16:
            rows[name] = stacked.view(torch.uint16).numpy()
        else:
            rows[name] = stacked.numpy()
    return rows


@pytest.mark.parametrize(
    "arch", ["gpt2", "llama", "qwen2", "gpt_neox", "opt", "mistral", "gemma", "phi3"]
)
def test_generate_rows_match_independent_hooks_fp32(arch: str, tmp_path) -> None:
    _check_rows_match(arch, torch.float32, tmp_path / "cap.zarr")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "qwen2"])
def test_generate_rows_match_independent_hooks_bf16(arch: str, tmp_path) -> None:
    _check_rows_match(arch, torch.bfloat16, tmp_path / "cap.h5")


def _check_rows_match(arch: str, dtype: torch.dtype, path) -> None:
    model = _tiny(arch, dtype)
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=8))
    specs = fw.instrument_model(model)
    assert {s.kind for s in specs} == {"attention", "ffn", "residual"}
    modules = dict(model.named_modules())
    expected = _reference_rows(model, {s.name: modules[s.module_path] for s in specs})
    plain = _generate(model)
    with fw.capture_activations(path):
        captured = _generate(model)
    assert torch.equal(plain, captured), "instrumentation changed the generated tokens"
    cap = open_capture(path)
    assert cap.status == "complete"
    # 3 prompts with 3, 6, 5 real tokens, then 3 decode steps x 3 sequences
    assert cap.num_rows == 14 + 9
    for s in specs:
        got = cap.activations(s.name, logical=False).compute()
        want = expected[s.name]
        assert got.dtype == want.dtype, s.name
        assert got.shape == want.shape, s.name
        assert np.array_equal(got, want), f"{arch} {s.name}: rows differ from independent hooks"
        info = cap.site_info(s.name)
        assert info["logical_dtype"] == str(dtype).removeprefix("torch.")
        assert info["module_class"] == type(modules[s.module_path]).__name__
    tok = cap.token_table()
    # generated tokens appear in the token_id column at their positions
    gen = captured[:, PROMPTS.shape[1] :]
    for b in range(3):
        sel = tok["sequence"] == b
        ids = tok["token_id"][sel][np.argsort(tok["position"][sel])]
        real_prompt = PROMPTS[b][MASK[b].bool()].tolist()
        assert ids.tolist() == real_prompt + gen[b, :-1].tolist()


def test_a_compiled_model_with_an_attention_mask(tmp_path) -> None:
    """torch.compile traced into the hooks (and failed on their numpy bookkeeping with a
    mask: cumsum of a bool array); the hooks now run eagerly. Rows match independent hooks
    on the uncompiled model to float32 rounding (the compiled graph may order its float
    operations differently), token by token."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _tiny("llama")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=8))
    specs = fw.instrument_model(model)
    modules = dict(model.named_modules())
    with torch.no_grad():
        expected = _reference_rows(model, {s.name: modules[s.module_path] for s in specs})
    compiled = torch.compile(model, backend="eager")
    try:
        with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
            compiled(PROMPTS, attention_mask=MASK)
    finally:
        torch._dynamo.reset()
    cap = open_capture(tmp_path / "c.zarr")
    assert (cap.status, cap.num_rows) == ("complete", int(MASK.sum()))
    for s in specs:
        np.testing.assert_allclose(
            cap.read(s.name), expected[s.name][: cap.num_rows], rtol=1e-5, atol=1e-6, err_msg=s.name
        )
    real = MASK.bool()
    assert np.array_equal(cap.token_table()["token_id"], PROMPTS[real].numpy())


def test_a_model_compiled_and_run_before_instrumenting_gets_a_hint(tmp_path) -> None:
    import torch._dynamo

    torch._dynamo.reset()
    model = _tiny("llama")
    compiled = torch.compile(model, backend="eager")
    ids = torch.randint(3, 90, (2, 5))
    try:
        with torch.no_grad():
            compiled(ids)  # its graph is cached without llminstr's hooks
        fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
        fw.instrument_model(model)
        with (
            pytest.raises(FormatError, match=r"None of them ran: .*torch\.compile"),
            fw.capture_activations(tmp_path / "c.zarr"),
            torch.no_grad(),
        ):
            compiled(ids)
    finally:
        torch._dynamo.reset()


def test_a_site_whose_dtype_changes_between_passes_is_named(tmp_path) -> None:
    model = _tiny("llama")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw.instrument_model(model)
    ids = torch.randint(3, 90, (2, 5))
    with (
        pytest.raises(
            FormatError,
            match=r"produced torch.float32 rows in an earlier pass and "
            r"torch.bfloat16 now .*Set storage_dtype",
        ),
        fw.capture_activations(tmp_path / "c.zarr"),
        torch.no_grad(),
    ):
        model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids)
    cap = open_capture(tmp_path / "c.zarr")
    assert (cap.status, cap.num_rows) == ("aborted", 10)  # the first pass is kept
    # storage_dtype converts every pass to one dtype
    fw2 = InstrumentationFramework(
        InstrumentationConfig(max_memory_gb=0.1, storage_dtype="float32")
    )
    fw2.instrument_model(model)
    with fw2.capture_activations(tmp_path / "d.zarr"), torch.no_grad():
        model(ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids)
    assert open_capture(tmp_path / "d.zarr").num_rows == 20


def test_token_columns_and_sequences_across_calls(tmp_path) -> None:
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model.generate(
            PROMPTS, attention_mask=MASK, max_new_tokens=3, do_sample=False, pad_token_id=0
        )
        model(torch.tensor([[3, 4, 5, 6]]))  # a plain forward call: one new sequence
    tok = open_capture(tmp_path / "c.zarr").token_table()
    # prefill: 3 + 6 + 5 real tokens in batch order, left padding skipped
    assert tok["sequence"][:14].tolist() == [0] * 3 + [1] * 6 + [2] * 5
    assert tok["position"][:14].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    assert tok["step"][:14].tolist() == [0] * 14
    # decode steps: one row per sequence, positions continue per sequence
    assert tok["sequence"][14:20].tolist() == [0, 1, 2, 0, 1, 2]
    assert tok["position"][14:20].tolist() == [3, 6, 5, 4, 7, 6]
    assert tok["step"][14:20].tolist() == [1, 1, 1, 2, 2, 2]
    # the second call is a new sequence id, unique within the capture
    assert tok["sequence"][20:].tolist() == [3, 3, 3, 3]
    assert tok["token_id"][20:].tolist() == [3, 4, 5, 6]
    assert tok["position"][20:].tolist() == [0, 1, 2, 3]
    assert tok["step"][20:].tolist() == [3] * 4


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox", "opt"])
def test_generate_without_attention_mask_continues_its_sequences(arch: str, tmp_path) -> None:
    """Without a mask, the tokens already in the cache come from the cache object, whatever
    keyword the model receives it under (``past_key_values`` in transformers 4, ``cache``
    in 5): decode steps continue their sequences instead of starting new ones."""
    model = _tiny(arch)
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))
    fw.instrument_model(model)
    prompts = torch.tensor([[9, 8, 7, 6, 5], [3, 4, 5, 6, 7]])
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        out = model.generate(
            prompts, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None
        )
    tok = open_capture(tmp_path / "c.zarr").token_table()
    assert tok["sequence"].tolist() == [0] * 5 + [1] * 5 + [0, 1] * 2
    assert tok["position"].tolist() == [0, 1, 2, 3, 4] * 2 + [5, 5, 6, 6]
    assert tok["step"].tolist() == [0] * 10 + [1, 1, 2, 2]
    assert (
        tok["token_id"].tolist()
        == prompts.reshape(-1).tolist() + out[:, 5:7].T.reshape(-1).tolist()
    )


def test_a_mask_passed_by_position_is_used(tmp_path) -> None:
    """model(ids, mask): the mask is the forward's second parameter. Read only from the
    keywords, it was missed and left padding was stored as tokens, positions shifted."""
    model = _tiny("llama")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))
    fw.instrument_model(model)
    tables = []
    for i, call in enumerate(
        (lambda: model(PROMPTS, attention_mask=MASK), lambda: model(PROMPTS, MASK))
    ):
        with fw.capture_activations(tmp_path / f"c{i}.zarr"), torch.no_grad():
            call()
        cap = open_capture(tmp_path / f"c{i}.zarr")
        tables.append((cap.token_table(), {s: cap.read(s) for s in cap.sites}))
    (by_name, rows_by_name), (by_position, rows_by_position) = tables
    assert by_position["token_id"].tolist() == [5, 6, 7, 9, 8, 7, 6, 5, 4, 11, 12, 13, 14, 15]
    assert by_position["position"].tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4]
    for column in by_name:
        assert np.array_equal(by_name[column], by_position[column]), column
    for site in rows_by_name:
        assert np.array_equal(rows_by_name[site], rows_by_position[site]), site


def test_a_cache_passed_by_position_continues_its_sequence(tmp_path) -> None:
    """model(next_token, past_key_values): GPT-2's forward takes the cache second. Read
    only from the keywords, each decode step was stored as a new one-token sequence."""
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        out = model(torch.tensor([[9, 8, 7, 6]]), use_cache=True)
        for token in (5, 4, 3):
            out = model(torch.tensor([[token]]), out.past_key_values)
    tok = open_capture(tmp_path / "c.zarr").token_table()
    assert tok["sequence"].tolist() == [0] * 7
    assert tok["position"].tolist() == list(range(7))
    assert tok["step"].tolist() == [0, 0, 0, 0, 1, 2, 3]
    assert tok["token_id"].tolist() == [9, 8, 7, 6, 5, 4, 3]


class _Passthrough(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


def test_a_mask_passed_by_position_through_a_wrapper(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    """A wrapper whose forward takes only ``*args`` (DataParallel, torch.compile's
    module) is looked through to the module it wraps; one that cannot be looked through
    gets a warning rather than silently storing padding as tokens."""
    wrapped = torch.nn.DataParallel(_tiny("llama"))
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))
    fw.instrument_model(wrapped)
    with fw.capture_activations(tmp_path / "dp.zarr"), torch.no_grad():
        wrapped(PROMPTS, MASK)
    assert open_capture(tmp_path / "dp.zarr").num_rows == int(MASK.sum())

    opaque = _Passthrough(_tiny("llama"))
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))
    fw.instrument_model(opaque)
    with (
        caplog.at_level("WARNING", logger="llminstr"),
        fw.capture_activations(tmp_path / "p.zarr"),
        torch.no_grad(),
    ):
        opaque(PROMPTS, MASK)
    assert "pass attention_mask= and past_key_values= by keyword" in caplog.text


def test_positional_parameters_stop_at_var_positional() -> None:
    from llminstr.capture import _positional_parameters

    class M(torch.nn.Module):
        def forward(self, x, mask=None, *rest, cache=None):  # type: ignore[no-untyped-def]
            return x

    assert _positional_parameters(M()) == ("x", "mask")
    compiled = torch.compile(_tiny("gpt2"), backend="eager")
    assert _positional_parameters(compiled)[0] == "input_ids"  # its module's forward
    first, second = _positional_parameters(_tiny("gpt2"))[:2]
    assert first == "input_ids" and second in ("past_key_values", "cache")  # transformers 4, 5


def test_outputs_identical_and_hooks_removed(tmp_path) -> None:
    model = _tiny("llama")
    ids = torch.randint(3, 90, (2, 7))
    with torch.no_grad():
        before = model(ids).logits
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw.instrument_model(model)
    with torch.no_grad():
        outside = model(ids).logits
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        inside = model(ids).logits
    assert torch.equal(before, outside) and torch.equal(before, inside)
    for name, mod in model.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, name
    fw.remove_instrumentation()
    assert fw.model is None and fw.sites == []


@pytest.mark.parametrize(
    "granularity,kinds",
    [
        (HookGranularity.ATTENTION_ONLY, {"attention"}),
        (HookGranularity.FFN_ONLY, {"ffn"}),
    ],
)
def test_granularity_selects_kinds(granularity, kinds, tmp_path) -> None:
    model = _tiny("qwen2")
    fw = InstrumentationFramework(InstrumentationConfig(granularity=granularity, max_memory_gb=0.1))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(torch.randint(3, 90, (1, 5)))
    cap = open_capture(tmp_path / "c.zarr")
    assert {cap.site_info(s)["kind"] for s in cap.sites} == kinds
    assert cap.num_rows == 5
    assert cap.metadata["capture_config"]["granularity"] == granularity.name


def test_exception_marks_aborted_keeps_data_and_reraises(tmp_path) -> None:
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))
    fw.instrument_model(model)
    with pytest.raises(RuntimeError, match="boom"), fw.capture_activations(tmp_path / "c.zarr"):
        with torch.no_grad():
            model(torch.randint(3, 90, (2, 5)))
        raise RuntimeError("boom")
    cap = open_capture(tmp_path / "c.zarr")
    assert cap.status == "aborted"
    assert cap.num_rows == 10
    assert "boom" in cap.metadata["error"]
    # the framework is usable again
    with fw.capture_activations(tmp_path / "d.zarr"), torch.no_grad():
        model(torch.randint(3, 90, (1, 3)))
    assert open_capture(tmp_path / "d.zarr").status == "complete"


def test_keyboard_interrupt_marks_aborted(tmp_path) -> None:
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw.instrument_model(model)
    with pytest.raises(KeyboardInterrupt), fw.capture_activations(tmp_path / "c.h5"):
        with torch.no_grad():
            model(torch.randint(3, 90, (1, 4)))
        raise KeyboardInterrupt
    cap = open_capture(tmp_path / "c.h5")
    assert (cap.status, cap.num_rows) == ("aborted", 4)


def test_deepcopy_during_a_capture_gives_an_uninstrumented_copy(tmp_path) -> None:
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw.instrument_model(model)
    ids = torch.randint(3, 90, (1, 4))
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(ids)
        clone = copy.deepcopy(model)  # used to fail: cannot pickle '_thread.RLock'
        a = clone(ids).logits  # records nothing, raises nothing
        b = model(ids).logits  # the original keeps recording
    assert torch.equal(a, b)
    cap = open_capture(tmp_path / "c.zarr")
    assert (cap.status, cap.num_rows) == ("complete", 8)
    # the copy can be instrumented and captured on its own
    fw2 = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw2.instrument_model(clone)
    with fw2.capture_activations(tmp_path / "d.zarr"), torch.no_grad():
        clone(ids)
    d = open_capture(tmp_path / "d.zarr")
    assert d.num_rows == 4
    for site in cap.sites:
        assert np.array_equal(d.read(site), cap.read(site, 0, 4))


def test_state_errors(tmp_path) -> None:
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    with (
        pytest.raises(CaptureStateError, match="instrument_model"),
        fw.capture_activations(tmp_path / "x.zarr"),
    ):
        pass
    fw.instrument_model(_tiny("gpt2"))
    with (
        fw.capture_activations(tmp_path / "a.zarr"),
        pytest.raises(CaptureStateError, match="already active"),
        fw.capture_activations(tmp_path / "b.zarr"),
    ):
        pass
    with pytest.raises(ConfigError, match=r"torch\.nn\.Module"):
        fw.instrument_model("not a model")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="InstrumentationConfig"):
        InstrumentationFramework({"granularity": "all"})  # type: ignore[arg-type]


def test_capture_stats_and_metadata(tmp_path) -> None:
    model = _tiny("gpt2")
    cfg = InstrumentationConfig(max_memory_gb=0.1, compression_algorithm="zstd", chunk_rows=16)
    fw = InstrumentationFramework(cfg)
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(torch.randint(3, 90, (4, 10)))
    stats = fw.last_capture_stats
    assert stats is not None
    assert stats["rows"] == 40
    assert stats["status"] == "complete"
    # 6 sites x 40 rows x 32 float32 + 4 token columns x 40 rows x 8 bytes
    assert stats["activation_raw_bytes"] == 6 * 40 * 32 * 4
    assert stats["staging"] is None  # a model on the CPU stages nothing
    assert stats["raw_bytes"] == 6 * 40 * 32 * 4 + 4 * 40 * 8
    assert stats["stored_bytes"] > 0 and stats["compression_ratio"] > 0
    assert stats["peak_buffered_bytes"] <= 0.1e9
    for key in ("gbps", "stall_seconds", "target_throughput_gbps", "forward_passes"):
        assert key in stats
    meta = open_capture(tmp_path / "c.zarr").metadata
    assert meta["model"]["class"] == "GPT2LMHeadModel"
    assert meta["model"]["model_type"] == "gpt2"
    assert meta["capture_config"]["compression_algorithm"] == "zstd"
    assert meta["compression"]["cname"] == "zstd"
    json.dumps(meta)


def test_padding_keep_and_storage_dtype(tmp_path) -> None:
    model = _tiny("gpt2")
    cfg = InstrumentationConfig(max_memory_gb=0.1, padding="keep", storage_dtype="bfloat16")
    fw = InstrumentationFramework(cfg)
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(PROMPTS, attention_mask=MASK)
    cap = open_capture(tmp_path / "c.zarr")
    assert cap.num_rows == PROMPTS.numel()
    tok = cap.token_table()
    assert tok["is_padding"].tolist() == (1 - MASK).reshape(-1).tolist()
    # section 2.3: padding rows have position -1; the column says what it means
    assert (tok["position"][tok["is_padding"] == 1] == -1).all()
    doc = json.loads((tmp_path / "c.zarr" / "tokens" / "is_padding" / "zarr.json").read_text())
    assert "padding row" in doc["attributes"]["llminstr"]["description"]
    assert all(cap.site_info(s)["logical_dtype"] == "bfloat16" for s in cap.sites)


def test_layers_subset_and_module_names(tmp_path) -> None:
    model = _tiny("llama")
    fw = InstrumentationFramework(InstrumentationConfig(layers=(-1,), max_memory_gb=0.1))
    names = [s.name for s in fw.instrument_model(model)]
    assert names == ["model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.1"]
    fw = InstrumentationFramework(
        InstrumentationConfig(module_names=("model.layers.0.mlp.down_proj",), max_memory_gb=0.1)
    )
    assert [s.name for s in fw.instrument_model(model)] == ["model.layers.0.mlp.down_proj"]
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(torch.randint(3, 90, (1, 6)))
    assert open_capture(tmp_path / "c.zarr").activations("model.layers.0.mlp.down_proj").shape == (
        6,
        32,
    )


def test_site_running_twice_is_an_error(tmp_path) -> None:
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 4)
            self.layer = torch.nn.Linear(4, 4)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.layer(self.layer(self.emb(input_ids)))

    fw = InstrumentationFramework(InstrumentationConfig(module_names=("layer",), max_memory_gb=0.1))
    model = Twice()
    fw.instrument_model(model)
    with (
        pytest.raises(LlminstrError, match="ran twice"),
        fw.capture_activations(tmp_path / "c.zarr"),
    ):
        model(torch.tensor([[1, 2, 3]]))


def test_config_validation_messages() -> None:
    with pytest.raises(
        ConfigError, match=r"compression_algorithm must be one of 'lz4', 'zstd', None; got 'gzip'"
    ):
        InstrumentationConfig(compression_algorithm="gzip")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="max_memory_gb must be a positive number; got -1"):
        InstrumentationConfig(max_memory_gb=-1)
    with pytest.raises(ConfigError, match="target_throughput_gbps"):
        InstrumentationConfig(target_throughput_gbps=0)
    with pytest.raises(ConfigError, match="granularity must be a HookGranularity"):
        InstrumentationConfig(granularity="everything")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="chunk_rows"):
        InstrumentationConfig(chunk_rows=0)
    with pytest.raises(ConfigError, match="module_names must be a sequence"):
        InstrumentationConfig(module_names="model.layers.0")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="storage_dtype"):
        InstrumentationConfig(storage_dtype="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError):  # ConfigError is also a ValueError
        InstrumentationConfig(padding="drop")  # type: ignore[arg-type]
    assert InstrumentationConfig(granularity="ffn_only").granularity is HookGranularity.FFN_ONLY  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"layers must be a sequence of layer indices, not one"):
        InstrumentationConfig(layers=0)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="layers must be a non-empty sequence of integers"):
        InstrumentationConfig(layers=(0, 1.5))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"max_memory_gb must be between 1e-06 and 1e\+06"):
        InstrumentationConfig(max_memory_gb=1e300)
    with pytest.raises(ConfigError, match=r"max_memory_gb must be between 1e-06 and 1e\+06"):
        InstrumentationConfig(max_memory_gb=1e-12)
    with pytest.raises(ConfigError, match="compression_level=3 was given with compression_alg"):
        InstrumentationConfig(compression_algorithm=None, compression_level=3)
    # numpy numbers are numbers; they are stored as Python ones
    cfg = InstrumentationConfig(
        max_memory_gb=np.float32(0.5),  # type: ignore[arg-type]
        target_throughput_gbps=np.int64(3),  # type: ignore[arg-type]
        layers=np.array([0, -1]),  # type: ignore[arg-type]
    )
    assert (cfg.max_memory_gb, cfg.target_throughput_gbps, cfg.layers) == (0.5, 3.0, (0, -1))
    assert type(cfg.max_memory_gb) is float and type(cfg.layers[0]) is int
    json.dumps(cfg.to_dict())


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_generate_matches_cpu_path(dtype: torch.dtype, tmp_path) -> None:
    model = _tiny("llama", dtype).cuda()
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.2, chunk_rows=8))
    specs = fw.instrument_model(model)
    modules = dict(model.named_modules())
    global PROMPTS, MASK
    saved = PROMPTS, MASK
    PROMPTS, MASK = PROMPTS.cuda(), MASK.cuda()
    try:
        expected = _reference_rows(model, {s.name: modules[s.module_path] for s in specs})
        with fw.capture_activations(tmp_path / "c.zarr"):
            _generate(model)
    finally:
        PROMPTS, MASK = saved
    cap = open_capture(tmp_path / "c.zarr")
    for s in specs:
        assert np.array_equal(cap.activations(s.name, logical=False).compute(), expected[s.name])


@pytest.mark.cuda
@cuda
def test_cuda_tensor_modified_after_hook_is_captured_as_it_was(tmp_path) -> None:
    class InPlace(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(10, 256)
            self.site = torch.nn.Identity()

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            h = self.site(self.emb(input_ids) * 1.0)
            h.mul_(0)  # modified in place right after the hook returned
            return h

    model = InPlace().cuda()
    fw = InstrumentationFramework(InstrumentationConfig(module_names=("site",), max_memory_gb=0.1))
    fw.instrument_model(model)
    ids = torch.randint(0, 10, (4, 64), device="cuda")
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        for _ in range(20):
            model(ids)
    got = open_capture(tmp_path / "c.zarr").activations("site").compute()
    want = model.emb(ids).detach().reshape(-1, 256).cpu().numpy()
    assert np.array_equal(got[: want.shape[0]], want)


def test_first_pass_rows_are_lent_and_stay_charged_until_encoded(tmp_path, monkeypatch) -> None:
    """The first pass's rows are lent to the writer (whole chunks encoded where they lie)
    and stay charged to the budget until their lent chunks are encoded: releasing a site's
    charge before the writer copied it overshot max_memory_gb by that site's rows
    (1.04x-1.10x measured), and releasing them all first by up to 1.6x."""
    from llminstr.storage.writer import CaptureWriter

    seen: list[tuple[str, int, int, int]] = []
    released: list[int] = []
    original = CaptureWriter.write_site_lent
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))

    def spy(self: CaptureWriter, name: str, rows: Any, release: Any) -> None:
        session = fw._session
        assert session is not None
        used = session.budget.used
        seen.append((name, session._first_bytes, rows.nbytes, used))

        def tracked() -> None:
            released.append(rows.nbytes)
            release()

        original(self, name, rows, tracked)

    monkeypatch.setattr(CaptureWriter, "write_site_lent", spy)
    monkeypatch.setattr(CaptureWriter, "write_site", None)  # no copying path for site rows
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(torch.randint(3, 90, (2, 9)))  # 18 rows: four whole chunks and a tail
    cap = open_capture(tmp_path / "c.zarr")
    assert [name for name, _, _, _ in seen] == cap.sites  # one lent write per site
    site_bytes = [nbytes for _, _, nbytes, _ in seen]
    for i, (_name, charged, nbytes, used) in enumerate(seen):
        # the sites not yet written are still charged, and so is this one's part
        assert charged == sum(site_bytes[i + 1 :]), (i, charged, site_bytes)
        assert used >= charged + nbytes, (i, used, charged, nbytes)
    assert sorted(released) == sorted(site_bytes)  # each lease released exactly once
    assert fw.last_capture_stats["peak_buffered_bytes"] <= 0.1e9
    assert cap.num_rows == 18


@pytest.mark.timeout(120)
@pytest.mark.parametrize("slack", [100, 1 << 20])
def test_a_first_pass_that_nearly_fills_the_budget_completes(tmp_path, slack: int) -> None:
    """A first pass leaving less free than the writer's own buffers need: keeping its
    rows charged while the writer copied them blocked forever."""
    model = _tiny("gpt2")
    ids = torch.randint(3, 90, (2, 32))
    probe = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=16))
    probe.instrument_model(model)
    with probe.capture_activations(tmp_path / "probe.zarr"), torch.no_grad():
        model(ids)
    cap = open_capture(tmp_path / "probe.zarr")
    first_pass = sum(cap.read(s).nbytes for s in cap.sites)
    fw = InstrumentationFramework(
        InstrumentationConfig(max_memory_gb=(first_pass + slack) / 1e9, chunk_rows=16)
    )
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(ids)
    got = open_capture(tmp_path / "c.zarr")
    assert (got.status, got.num_rows) == ("complete", 64)
    for site in cap.sites:
        assert np.array_equal(got.read(site), cap.read(site))


def test_progress_line_shows_rows_bytes_rate_and_buffer(tmp_path, capsys) -> None:
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, progress=True))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        for _ in range(3):
            model(torch.randint(3, 90, (2, 8)))
            import time

            time.sleep(0.6)  # the postfix refreshes at most twice a second
    err = capsys.readouterr().err
    assert "capture" in err and "rows" in err
    for field in ("GB=", "GBps=", "buffer="):
        assert field in err, err
    with fw.capture_activations(tmp_path / "p.zarr"), torch.no_grad():
        model(PROMPTS, attention_mask=MASK)  # 18 positions, 14 real tokens
    err = capsys.readouterr().err
    assert "capture: 14 rows" in err and "18 rows" not in err  # stored rows, not padding
    fw_quiet = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, progress=False))
    fw_quiet.instrument_model(model)
    with fw_quiet.capture_activations(tmp_path / "d.zarr"), torch.no_grad():
        model(torch.randint(3, 90, (2, 8)))
    assert capsys.readouterr().err == ""


def test_bad_output_path_fails_before_the_model_runs(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from llminstr.errors import CaptureExistsError

    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw.instrument_model(model)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    (tmp_path / "exists.zarr").mkdir()
    with (
        pytest.raises(CaptureExistsError, match="overwrite=True"),
        fw.capture_activations(tmp_path / "exists.zarr"),
    ):
        model(torch.randint(3, 90, (1, 4)))
    with pytest.raises(ConfigError, match="suffix"), fw.capture_activations(tmp_path / "run.bin"):
        model(torch.randint(3, 90, (1, 4)))
    handle.remove()
    assert calls == []
    assert not any(m._forward_hooks for m in model.modules())


@pytest.mark.parametrize(("stall", "limited"), [(0.0, False), (0.05, False), (0.2, True)])
def test_pipeline_limited_needs_a_real_stall(
    stall: float, limited: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A capture counts as pipeline-limited (and warns when below target) only when the
    model waited more than STALL_FRACTION of the capture, not for a few milliseconds."""
    import types

    from llminstr import framework as framework_mod
    from llminstr.storage.writer import WriterStats

    assert framework_mod.STALL_FRACTION == 0.01
    fw = InstrumentationFramework(InstrumentationConfig(progress=False))
    stats = WriterStats(
        rows=10,
        raw_bytes=10**6,
        stored_bytes=10**6,
        activation_raw_bytes=10**6,
        seconds=10.0,
        stall_seconds=stall,
        stall_events=1 if stall else 0,
        peak_buffered_bytes=0,
        chunks_written=1,
        encoder_threads=2,
        chunk_rows=16,
    )
    session = types.SimpleNamespace(path="x.zarr", writer=None, _step=3, staging_stats=lambda: None)
    with caplog.at_level("WARNING", logger="llminstr"):
        report = fw._report(stats, session)  # type: ignore[arg-type]
    assert report["pipeline_limited"] is limited
    assert ("held the model back" in caplog.text) is limited


def test_first_pass_rows_count_against_the_budget(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The first pass's rows wait on the host until the writer opens at its end: they are
    counted, and a first pass larger than the budget is refused with what to do."""
    from test_staging import _inputs, _stack

    fw, model = _stack(4, max_memory_gb=0.05, chunk_rows=64)
    first = _inputs(1, 8, 256, 1024)[0]  # 4 sites x 8 MiB of rows
    with fw.capture_activations(tmp_path / "ok.zarr"), torch.no_grad():
        model(inputs_embeds=first)
    stats = fw.last_capture_stats
    assert stats is not None
    assert stats["peak_buffered_bytes"] >= 4 * 8 * 256 * 1024 * 4

    fw, model = _stack(4, max_memory_gb=0.02, chunk_rows=64)
    with (
        pytest.raises(
            ConfigError, match=r"first forward pass needs more than .* Raise max_memory_gb"
        ),
        fw.capture_activations(tmp_path / "big.zarr") as session,
        torch.no_grad(),
    ):
        model(inputs_embeds=first)
    assert session.budget.used == 0
    assert session.writer is None


class _EmbeddingBlocks(torch.nn.Module):
    """A plain module called as ``model(x)`` with embeddings ``(batch, seq, hidden)``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict({"attn": torch.nn.Linear(d, d), "mlp": torch.nn.Linear(d, d)})
            for _ in range(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block["attn"](x)
            x = x + block["mlp"](x)
        return x


def test_positional_embeddings_input_is_not_taken_for_token_ids(tmp_path) -> None:
    torch.manual_seed(0)
    model = _EmbeddingBlocks().eval()
    fw = InstrumentationFramework(
        InstrumentationConfig(max_memory_gb=0.1, module_names=("layers.0.mlp", "layers.1.attn"))
    )
    fw.instrument_model(model)
    x = torch.randn(2, 16, 16)  # sequence length equal to the width: no shape coincidence helps
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(x)
    cap = open_capture(tmp_path / "c.zarr")
    tok = cap.token_table()
    assert tok["token_id"].tolist() == [-1] * 32
    assert tok["sequence"].tolist() == [0] * 16 + [1] * 16
    assert tok["position"].tolist() == list(range(16)) * 2
    with torch.no_grad():
        h = x + model.layers[0]["attn"](x)
        mlp0 = model.layers[0]["mlp"](h)
    np.testing.assert_array_equal(cap.read("layers.0.mlp"), mlp0.reshape(32, 16).numpy())
    with (
        pytest.raises(CaptureStateError, match=r"floating-point tensor of shape \(2, 16\)"),
        fw.capture_activations(tmp_path / "d.zarr"),
        torch.no_grad(),
    ):
        model(torch.randn(2, 16))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_static_kv_cache_is_refused_with_a_clear_error(arch: str, tmp_path) -> None:
    """A static cache passes a 4-D mask, or a 2-D mask padded to the cache length, which
    would store padding as tokens: refused, naming the cause and the way out."""
    model = _tiny(arch)
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw.instrument_model(model)
    with (
        pytest.raises(CaptureStateError, match=r"Static and hybrid caches .* are not supported"),
        fw.capture_activations(tmp_path / "c.zarr"),
        torch.no_grad(),
    ):
        model.generate(
            PROMPTS,
            attention_mask=MASK,
            max_new_tokens=2,
            do_sample=False,
            pad_token_id=0,
            cache_implementation="static",
        )
    assert not (tmp_path / "c.zarr").exists()  # refused on the first pass, before any write


def test_activation_checkpointing_recomputation_is_not_recorded(tmp_path) -> None:
    """Checkpointing re-runs blocks during backward: no forward pass, nothing to record."""
    model = _tiny("llama").train()
    enable = (
        getattr(model, "activation_checkpointing_enable", None)
        or model.gradient_checkpointing_enable
    )
    enable()  # the name transformers 5 prefers, the older one before it
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=8))
    specs = fw.instrument_model(model)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    torch.manual_seed(1)
    with fw.capture_activations(tmp_path / "c.zarr"):
        loss = model(ids, labels=ids).loss
        loss.backward()
    cap = open_capture(tmp_path / "c.zarr")
    assert (cap.status, cap.num_rows) == ("complete", 8)
    assert cap.token_table()["step"].tolist() == [0] * 8
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert len(cap.sites) == len(specs)


def test_tuple_index_is_null_for_sites_whose_output_is_a_tensor(tmp_path) -> None:
    """Section 3.3: tuple_index says which tuple element was taken, null for a plain tensor."""
    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(torch.tensor([[3, 4, 5]]))
    cap = open_capture(tmp_path / "c.zarr")
    indices = {name: cap.site_info(name)["tuple_index"] for name in cap.sites}
    assert indices["transformer.h.0.attn"] == 0  # GPT2Attention returns (output, weights)
    assert indices["transformer.h.0.mlp"] is None  # GPT2MLP returns a tensor


def test_a_second_thread_calling_the_model_mid_pass_is_refused(tmp_path) -> None:
    """Concurrent forward passes would mix rows under one pass's token ids: the thread that
    arrives second gets a clear error, and the first thread's capture stays right."""
    import threading

    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1, chunk_rows=4))
    fw.instrument_model(model)
    block = model.transformer.h[0]
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold(module: Any, args: Any, output: Any) -> None:  # thread A waits mid-pass
        if threading.current_thread() is threading.main_thread():
            inside.set()
            release.wait(10)

    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states[1]
    handle = block.register_forward_hook(hold)

    def second() -> None:
        inside.wait(10)
        try:
            with torch.no_grad():
                model(torch.tensor([[7, 8]]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            release.set()

    t = threading.Thread(target=second)
    t.start()
    try:
        with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
            model(ids)
    finally:
        t.join()
        handle.remove()
    assert len(errors) == 1 and isinstance(errors[0], CaptureStateError)
    assert "called from a second thread" in str(errors[0])
    cap = open_capture(tmp_path / "c.zarr")
    assert (cap.status, cap.num_rows) == ("complete", 3)
    np.testing.assert_array_equal(cap.read("transformer.h.0"), expected[0].numpy())


def test_refused_capture_leaves_no_stale_stats(tmp_path) -> None:
    from llminstr.errors import CaptureExistsError

    model = _tiny("gpt2")
    fw = InstrumentationFramework(InstrumentationConfig(max_memory_gb=0.1))
    fw.instrument_model(model)
    with fw.capture_activations(tmp_path / "c.zarr"), torch.no_grad():
        model(torch.tensor([[3, 4]]))
    assert fw.last_capture_stats is not None
    with pytest.raises(CaptureExistsError), fw.capture_activations(tmp_path / "c.zarr"):
        pass
    assert fw.last_capture_stats is None
