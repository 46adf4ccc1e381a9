"""Site discovery: which modules of a model have their output captured.

A *site* is one module whose forward output is recorded. :func:`find_sites` maps a
:class:`~llminstr.config.HookGranularity` (and optional layer subset) to an ordered list
of :class:`SiteSpec`, using

1. :data:`ARCHITECTURES`, a table keyed by ``model.config.model_type`` giving the path of
   the block list and the names of the attention and FFN children of each block; when the
   model has no (known) config, the table is also matched by the class name of the blocks;
2. otherwise, module-name heuristics: the block list is the largest ``nn.ModuleList`` of
   same-class, non-leaf children, and inside each block the attention / FFN modules are
   the shallowest children whose names look like ``attn`` / ``mlp`` and the like.

``module_names=`` bypasses both and names the modules directly.

``docs/architectures.md`` lists, per architecture, exactly which module each granularity
captures and which tuple element is taken.
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llminstr.config import HookGranularity
from llminstr.errors import ConfigError, NoSitesFoundError, SiteNotFoundError

__all__ = [
    "ARCHITECTURES",
    "SITE_KINDS",
    "ArchitectureEntry",
    "SiteSpec",
    "find_sites",
    "resolve_modules",
]

#: The allowed values of :attr:`SiteSpec.kind`, in the order sites are emitted within a block.
SITE_KINDS: tuple[str, ...] = ("attention", "ffn", "residual", "other")

_KIND_RANK = {"attention": 0, "ffn": 1, "residual": 2}


@dataclass(frozen=True)
class SiteSpec:
    """One captured module.

    name
        Canonical site name: the dotted module path (identical to ``module_path``).
    module_path
        Dotted path of the module inside the model, as ``model.get_submodule`` takes it.
    layer
        Index of the block the module belongs to (or is), ``None`` outside the blocks.
    kind
        ``"attention"``, ``"ffn"``, ``"residual"`` (a whole block: the residual stream after
        it) or ``"other"`` (an explicit module that fits none of them).
    module_class
        ``type(module).__name__``.
    tuple_index
        The element taken when the module returns a tuple or list; ignored when it
        returns a tensor.
    flat_tokens
        ``True`` when the module's output has the batch and sequence dimensions flattened
        into one, i.e. shape ``(batch * seq, hidden)`` instead of ``(batch, seq, hidden)``
        (OPT's ``fc2``); the capture must view it back using the input's batch shape.
    """

    name: str
    module_path: str
    layer: int | None
    kind: str
    module_class: str
    tuple_index: int = 0
    flat_tokens: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SITE_KINDS:
            raise ConfigError(f"site kind must be one of {SITE_KINDS}; got {self.kind!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (every field, by name)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ArchitectureEntry:
    """Where the sites of one architecture live.

    blocks
        Path of the block list in the usual head model (``LlamaForCausalLM`` ...). The
        block list is found by suffix match, so a base model (``layers`` in
        ``LlamaModel``) or an extra wrapper (``base_model.model.model.layers``) is found too.
    block_classes
        Class names of the blocks; used to recognise the architecture of a model without a
        ``config.model_type`` and to pick the right list when several paths match.
    attention, ffn
        Candidate paths of the attention and FFN modules relative to a block; the first that
        exists is used (several names cover renames across ``transformers`` versions).
    flat_ffn
        The FFN module's output is ``(batch * seq, hidden)`` (see :attr:`SiteSpec.flat_tokens`).
    note
        Free text for the documentation.
    """

    blocks: str
    block_classes: tuple[str, ...]
    attention: tuple[str, ...]
    ffn: tuple[str, ...]
    flat_ffn: bool = False
    note: str = ""


def _decoder(
    prefix: str, *classes: str, ffn: tuple[str, ...] = ("mlp",), note: str = ""
) -> ArchitectureEntry:
    """The common layout ``model.layers.N.{self_attn, mlp}`` of Llama-like decoders."""
    return ArchitectureEntry(
        blocks=f"{prefix}.layers",
        block_classes=classes,
        attention=("self_attn",),
        ffn=ffn,
        note=note,
    )


_MOE_FFN = ("mlp", "block_sparse_moe")  # "block_sparse_moe" in transformers 4.x

_BERT_NOTE = (
    "Post-LN encoder: BertAttention and BertOutput both end with residual add + LayerNorm "
    "(BertOutput's output is the block output itself), so the attention and FFN sites are "
    "the sublayers' own contributions before the residual add: the output projections "
    "attention.output.dense and output.dense."
)

#: Architecture table, keyed by ``config.model_type``.
ARCHITECTURES: dict[str, ArchitectureEntry] = {
    "gpt2": ArchitectureEntry("transformer.h", ("GPT2Block",), ("attn",), ("mlp",)),
    "gpt_neo": ArchitectureEntry("transformer.h", ("GPTNeoBlock",), ("attn",), ("mlp",)),
    "gpt_bigcode": ArchitectureEntry("transformer.h", ("GPTBigCodeBlock",), ("attn",), ("mlp",)),
    "gptj": ArchitectureEntry(
        "transformer.h",
        ("GPTJBlock",),
        ("attn",),
        ("mlp",),
        note="Parallel attention and MLP, both fed from ln_1.",
    ),
    "gpt_neox": ArchitectureEntry(
        "gpt_neox.layers",
        ("GPTNeoXLayer",),
        ("attention",),
        ("mlp",),
        note="Parallel residual by default (use_parallel_residual).",
    ),
    "opt": ArchitectureEntry(
        "model.decoder.layers",
        ("OPTDecoderLayer",),
        ("self_attn",),
        ("fc2",),
        flat_ffn=True,
        note="No MLP submodule: fc1/fc2 live in the decoder layer, so the FFN site is fc2, "
        "whose output is (batch * seq, hidden) and before the residual add.",
    ),
    "llama": _decoder("model", "LlamaDecoderLayer"),
    "mistral": _decoder("model", "MistralDecoderLayer"),
    "mixtral": _decoder(
        "model", "MixtralDecoderLayer", ffn=_MOE_FFN, note="FFN site: the sparse MoE block."
    ),
    "qwen2": _decoder("model", "Qwen2DecoderLayer"),
    "qwen2_moe": _decoder(
        "model",
        "Qwen2MoeDecoderLayer",
        ffn=_MOE_FFN,
        note="FFN site: the sparse MoE block (routed experts + shared expert).",
    ),
    "qwen3": _decoder("model", "Qwen3DecoderLayer"),
    "qwen3_moe": _decoder(
        "model", "Qwen3MoeDecoderLayer", ffn=_MOE_FFN, note="FFN site: the sparse MoE block."
    ),
    "gemma": _decoder("model", "GemmaDecoderLayer"),
    "gemma2": _decoder(
        "model",
        "Gemma2DecoderLayer",
        note="Sandwich norms: the sites are before post_attention_layernorm / "
        "post_feedforward_layernorm, i.e. not the exact residual contributions.",
    ),
    "gemma3_text": _decoder(
        "model",
        "Gemma3DecoderLayer",
        note="Sandwich norms, as gemma2.",
    ),
    "phi": _decoder("model", "PhiDecoderLayer", note="Parallel attention and MLP."),
    "phi3": _decoder("model", "Phi3DecoderLayer"),
    "phimoe": _decoder(
        "model", "PhimoeDecoderLayer", ffn=_MOE_FFN, note="FFN site: the sparse MoE block."
    ),
    "olmo2": _decoder(
        "model",
        "Olmo2DecoderLayer",
        note="Post-sublayer norms: the sites are before post_attention_layernorm / "
        "post_feedforward_layernorm.",
    ),
    "starcoder2": _decoder("model", "Starcoder2DecoderLayer"),
    "falcon": ArchitectureEntry(
        "transformer.h",
        ("FalconDecoderLayer",),
        ("self_attention",),
        ("mlp",),
        note="Parallel attention by default; the decoder layer returns a tuple. The layer "
        "adds the attention output into the MLP output in place (mlp_output += "
        "attention_output) right after the MLP returns, so a hook must copy the MLP output "
        "before returning.",
    ),
    "bloom": ArchitectureEntry(
        "transformer.h",
        ("BloomBlock",),
        ("self_attention.dense",),
        ("mlp.dense_4h_to_h",),
        note="BloomAttention and BloomMLP add the residual themselves (BloomMLP's output is "
        "the block output), so the sites are their output projections, before the residual "
        "add. With slow_but_exact=True and pretraining_tp > 1 those Linear modules are not "
        "called (the weights are sliced), so nothing is recorded; the block returns a tuple.",
    ),
    "bert": ArchitectureEntry(
        "bert.encoder.layer",
        ("BertLayer",),
        ("attention.output.dense",),
        ("output.dense",),
        note=_BERT_NOTE,
    ),
    "roberta": ArchitectureEntry(
        "roberta.encoder.layer",
        ("RobertaLayer",),
        ("attention.output.dense",),
        ("output.dense",),
        note="As bert.",
    ),
    "distilbert": ArchitectureEntry(
        "distilbert.transformer.layer",
        ("TransformerBlock",),
        ("attention",),
        ("ffn",),
        note="Post-LN, but attention and ffn are the sublayers before the residual add.",
    ),
}

#: Child names the heuristics take for attention / FFN modules, in order of preference.
ATTENTION_NAMES: tuple[str, ...] = ("self_attn", "self_attention", "attn", "attention")
FFN_NAMES: tuple[str, ...] = ("mlp", "ffn", "feed_forward", "block_sparse_moe", "moe")

_ATTENTION_TOKENS = frozenset({"attn", "attention", "selfattention"})
_FFN_TOKENS = frozenset({"mlp", "ffn", "moe", "feedforward"})
_EXCLUDED_TOKENS = frozenset(
    {"norm", "layernorm", "ln", "dropout", "drop", "cross", "crossattention", "rotary", "emb"}
)
_HEURISTIC_DEPTH = 2


# --------------------------------------------------------------------------- helpers


def _looks_like(name: str, kind: str) -> bool:
    """Whether one path component names an attention (``kind="attention"``) or FFN module."""
    low = name.lower()
    exact, tokens = (
        (ATTENTION_NAMES, _ATTENTION_TOKENS) if kind == "attention" else (FFN_NAMES, _FFN_TOKENS)
    )
    if low in exact:
        return True
    parts = set(low.split("_"))
    return bool(parts & tokens) and not parts & _EXCLUDED_TOKENS


def _children_by_depth(block: torch.nn.Module, max_depth: int) -> Iterator[list[str]]:
    """Relative paths of the descendants of ``block``, one list per depth (1, 2, ...)."""
    level: list[tuple[str, torch.nn.Module]] = [("", block)]
    for _ in range(max_depth):
        nxt: list[tuple[str, torch.nn.Module]] = []
        for prefix, mod in level:
            for child_name, child in mod.named_children():
                nxt.append((f"{prefix}.{child_name}" if prefix else child_name, child))
        if not nxt:
            return
        yield [path for path, _ in nxt]
        level = nxt


def _heuristic_child(block: torch.nn.Module, kind: str) -> str | None:
    """The shallowest descendant of ``block`` whose own name looks like ``kind``.

    At each depth, exact names (:data:`ATTENTION_NAMES` / :data:`FFN_NAMES`, in that order
    of preference) win over looser token matches such as ``attn_layer``.
    """
    exact = ATTENTION_NAMES if kind == "attention" else FFN_NAMES
    for paths in _children_by_depth(block, _HEURISTIC_DEPTH):
        by_last = {p.rsplit(".", 1)[-1].lower(): p for p in reversed(paths)}
        for name in exact:
            if name in by_last:
                return by_last[name]
        for p in paths:
            if _looks_like(p.rsplit(".", 1)[-1], kind):
                return p
    return None


def _get(module: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return module.get_submodule(path) if path else module
    except AttributeError:
        return None


def _module_lists(model: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    return [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0
    ]


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _common_suffix(a: str, b: str) -> int:
    """Number of trailing dotted components ``a`` and ``b`` share."""
    pa, pb = a.split("."), b.split(".")
    n = 0
    while n < min(len(pa), len(pb)) and pa[-1 - n] == pb[-1 - n]:
        n += 1
    return n


@dataclass(frozen=True)
class _Blocks:
    """A located block list: its path, its blocks, and the registry entry if any."""

    path: str
    blocks: tuple[tuple[str, torch.nn.Module], ...]  # (child name, block)
    entry: ArchitectureEntry | None
    arch: str | None


def _registry_entry(model: torch.nn.Module) -> tuple[str, ArchitectureEntry] | None:
    """The table entry for ``model``: by ``config.model_type``, else by block class name."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if isinstance(model_type, str) and model_type in ARCHITECTURES:
        return model_type, ARCHITECTURES[model_type]
    classes = {type(mod[0]).__name__ for _, mod in _module_lists(model)}
    for arch, entry in ARCHITECTURES.items():
        if classes & set(entry.block_classes):
            return arch, entry
    return None


def _registry_blocks(model: torch.nn.Module, arch: str, entry: ArchitectureEntry) -> _Blocks | None:
    best: tuple[tuple[bool, int, int], str, torch.nn.ModuleList] | None = None
    for path, mod in _module_lists(model):
        class_ok = type(mod[0]).__name__ in entry.block_classes
        suffix = _common_suffix(path, entry.blocks)
        if not class_ok and suffix == 0:
            continue
        score = (class_ok, suffix, _numel(mod))
        if best is None or score > best[0]:
            best = (score, path, mod)
    if best is None:
        return None
    _, path, mod = best
    return _Blocks(path, tuple(mod.named_children()), entry, arch)


def _heuristic_blocks(model: torch.nn.Module) -> _Blocks | None:
    """The largest ``ModuleList`` of same-class, non-leaf children (preferring blocks with
    attention / FFN-like children and lists that are not nested in another candidate)."""
    candidates = [
        (path, mod)
        for path, mod in _module_lists(model)
        if len({type(c) for c in mod}) == 1 and any(True for _ in mod[0].children())
    ]
    if not candidates:
        return None

    def key(item: tuple[str, torch.nn.ModuleList]) -> tuple[bool, bool, int, int]:
        path, mod = item
        recognised = any(_heuristic_child(mod[0], k) is not None for k in ("attention", "ffn"))
        nested = any(path.startswith(other + ".") for other, _ in candidates if other != path)
        return (recognised, not nested, len(mod), _numel(mod))

    path, mod = max(candidates, key=key)
    return _Blocks(path, tuple(mod.named_children()), None, None)


def _locate_blocks(model: torch.nn.Module) -> _Blocks | None:
    found = _registry_entry(model)
    if found is not None:
        blocks = _registry_blocks(model, *found)
        if blocks is not None:
            return blocks
    return _heuristic_blocks(model)


def _normalise_layers(layers: Sequence[int], n_blocks: int) -> list[int]:
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise ConfigError(f"layers must be a sequence of integers or None; got {layers!r}")
    if len(layers) == 0:
        raise ConfigError("layers must be a non-empty sequence of integers or None; got []")
    out: set[int] = set()
    for item in layers:
        try:
            if isinstance(item, bool):
                raise TypeError
            i = operator.index(item)
        except TypeError:
            raise ConfigError(
                f"layers must contain integers; got {item!r} in {list(layers)!r}"
            ) from None
        if not -n_blocks <= i < n_blocks:
            raise ConfigError(
                f"layer {i} is out of range: the model has {n_blocks} blocks, so valid "
                f"indices are 0..{n_blocks - 1} (or -{n_blocks}..-1 from the end)"
            )
        out.add(i % n_blocks)
    return sorted(out)


def _describe_model(model: torch.nn.Module, limit: int = 20) -> str:
    lists = _module_lists(model)
    if lists:
        shown = "; ".join(
            f"{path or '<root>'} ({len(mod)} x {'/'.join(sorted({type(c).__name__ for c in mod}))})"
            for path, mod in lists[:10]
        )
        text = f"ModuleLists found: {shown}."
    else:
        text = "No nn.ModuleList found."
    modules = list(model.named_modules())
    first = ", ".join(f"{n or '<root>'} ({type(m).__name__})" for n, m in modules[:limit])
    more = f", ... ({len(modules) - limit} more)" if len(modules) > limit else ""
    return f"{text} Modules: {first}{more}."


def _no_sites(model: torch.nn.Module, why: str) -> NoSitesFoundError:
    return NoSitesFoundError(
        f"{why} {_describe_model(model)} Pass module_names=[...] with the dotted paths of "
        "the modules to capture (as listed by model.named_modules())."
    )


def _missing(model: torch.nn.Module, name: str) -> SiteNotFoundError:
    names = [n for n, _ in model.named_modules(remove_duplicate=False) if n]
    close = [n for n in names if n.endswith("." + name)][:5]
    close += [n for n in difflib.get_close_matches(name, names, n=5, cutoff=0.6) if n not in close]
    hint = (
        f"; close matches: {', '.join(repr(c) for c in close[:5])}"
        if close
        else "; see model.named_modules() for the valid paths"
    )
    return SiteNotFoundError(f"module {name!r} not found in {type(model).__name__}{hint}")


def _post_order(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """Sort keys placing every module after its descendants (the order outputs complete)."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]
    last = {n: i for i, n in enumerate(names)}
    for i, n in enumerate(names):
        parts = n.split(".") if n else []
        for d in range(len(parts)):
            anc = ".".join(parts[:d])
            if anc in last:
                last[anc] = max(last[anc], i)
    return {n: (last[n], -(n.count(".") + 1 if n else 0)) for n in names}


def _block_child(
    block: torch.nn.Module, entry: ArchitectureEntry | None, kind: str
) -> tuple[str, bool] | None:
    """Path (relative to ``block``) of the ``kind`` site of one block, and its ``flat_tokens``.

    The residual site is the block itself (``""``). Attention / FFN: the first of the
    table's candidate names that exists, else the name heuristics, else ``None``.
    """
    if kind == "residual":
        return "", False
    if entry is not None:
        candidates = entry.attention if kind == "attention" else entry.ffn
        for rel in candidates:
            if _get(block, rel) is not None:
                return rel, kind == "ffn" and entry.flat_ffn
    rel_or_none = _heuristic_child(block, kind)
    return None if rel_or_none is None else (rel_or_none, False)


# --------------------------------------------------------------------------- explicit names


def _explicit_sites(
    model: torch.nn.Module, module_names: Sequence[str], layers: Sequence[int] | None
) -> list[SiteSpec]:
    if isinstance(module_names, str) or not isinstance(module_names, Sequence):
        raise ConfigError(f"module_names must be a sequence of module paths; got {module_names!r}")
    if len(module_names) == 0:
        raise ConfigError("module_names must be non-empty (or None)")
    if len(set(module_names)) != len(module_names):
        raise ConfigError(f"module_names has duplicates: {list(module_names)!r}")
    blocks = _locate_blocks(model)
    block_index = {}
    if blocks is not None:
        block_index = {name: i for i, (name, _) in enumerate(blocks.blocks)}
    sites: list[SiteSpec] = []
    for name in module_names:
        if not isinstance(name, str) or not name:
            raise ConfigError(f"module_names must hold non-empty strings; got {name!r}")
        module = _get(model, name)
        if module is None:
            raise _missing(model, name)
        layer: int | None = None
        kind = "other"
        flat = False
        rel = name
        if blocks is not None and (not blocks.path or name.startswith(blocks.path + ".")):
            rest = name[len(blocks.path) + 1 :] if blocks.path else name
            head, _, tail = rest.partition(".")
            if head in block_index:
                layer, rel = block_index[head], tail
                entry = blocks.entry
                if not rel:
                    kind = "residual"
                elif entry is not None and rel in entry.attention:
                    kind = "attention"
                elif entry is not None and rel in entry.ffn:
                    kind, flat = "ffn", entry.flat_ffn
        if kind == "other":
            # By name, the module itself only: a module inside an attention or FFN module
            # (a QKV or up projection) is a part of it, not its output, and stays "other".
            parts = rel.split(".")
            for i, part in enumerate(parts):
                named = next((k for k in ("attention", "ffn") if _looks_like(part, k)), None)
                if named is not None:
                    kind = named if i == len(parts) - 1 else "other"
                    break
        sites.append(SiteSpec(name, name, layer, kind, type(module).__name__, 0, flat))
    if layers is not None:
        if blocks is None:
            raise ConfigError(
                "layers= was given with module_names= but the model has no recognisable "
                "block list to index; drop layers= and list the modules you want"
            )
        keep = set(_normalise_layers(layers, len(blocks.blocks)))
        sites = [s for s in sites if s.layer is None or s.layer in keep]
        if not sites:
            raise ConfigError(
                f"layers={list(layers)!r} excludes every module in module_names="
                f"{list(module_names)!r}"
            )
    order = _post_order(model)
    far = (len(order), 0)
    return sorted(sites, key=lambda s: order.get(s.module_path, far))


# --------------------------------------------------------------------------- public API


def find_sites(
    model: torch.nn.Module,
    granularity: HookGranularity,
    *,
    layers: Sequence[int] | None = None,
    module_names: Sequence[str] | None = None,
) -> list[SiteSpec]:
    """The modules whose outputs are captured, in model order.

    Sites come by block, and within a block attention, then FFN, then the residual stream
    after the block (the block module itself). ``HookGranularity.ALL`` gives all three,
    ``ATTENTION_ONLY`` and ``FFN_ONLY`` one each.

    Args:
        model: The model (a head model such as ``LlamaForCausalLM``, its base model, or any
            ``nn.Module`` holding a list of blocks).
        granularity: Which components of each block to capture.
        layers: Block indices to keep (``None``: all); negative indices count from the
            end. Raises :class:`~llminstr.errors.ConfigError` when out of range.
        module_names: Explicit dotted module paths; they override the architecture table
            and ``granularity``. Layer and kind are inferred from the paths (kind
            ``"other"`` when nothing fits); with ``layers`` too, modules of other blocks
            are dropped. Sites are returned in model (post-)order.

    Raises:
        SiteNotFoundError: A name in ``module_names`` is not a module of ``model`` (the
            message lists close matches).
        ConfigError: ``layers`` or ``module_names`` is malformed or out of range.
        NoSitesFoundError: Nothing matched; the message lists candidate modules.
    """
    if module_names is not None:
        return _explicit_sites(model, module_names, layers)
    if not isinstance(granularity, HookGranularity):
        raise ConfigError(
            f"granularity must be a HookGranularity (ALL, ATTENTION_ONLY, FFN_ONLY); "
            f"got {granularity!r}"
        )
    blocks = _locate_blocks(model)
    if blocks is None:
        raise _no_sites(model, f"No block list found in {type(model).__name__}.")
    selected = (
        range(len(blocks.blocks))
        if layers is None
        else _normalise_layers(layers, len(blocks.blocks))
    )
    kinds = {
        HookGranularity.ALL: ("attention", "ffn", "residual"),
        HookGranularity.ATTENTION_ONLY: ("attention",),
        HookGranularity.FFN_ONLY: ("ffn",),
    }[granularity]
    prefix = f"{blocks.path}." if blocks.path else ""
    entry = blocks.entry
    sites: list[SiteSpec] = []
    for i in selected:
        child_name, block = blocks.blocks[i]
        block_path = f"{prefix}{child_name}"
        for kind in kinds:
            found = _block_child(block, entry, kind)
            if found is None:
                continue
            rel, flat = found
            module = _get(block, rel)
            assert module is not None
            path = f"{block_path}.{rel}" if rel else block_path
            sites.append(SiteSpec(path, path, i, kind, type(module).__name__, 0, flat))
    if not sites:
        raise _no_sites(
            model,
            f"No {granularity.name} sites found in the {len(blocks.blocks)} blocks at "
            f"{blocks.path or '<root>'!r} of {type(model).__name__} "
            f"(block class {type(blocks.blocks[0][1]).__name__}).",
        )
    sites.sort(key=lambda s: (s.layer, _KIND_RANK[s.kind]))
    return sites


def resolve_modules(
    model: torch.nn.Module, sites: Sequence[SiteSpec]
) -> list[tuple[SiteSpec, torch.nn.Module]]:
    """Pair each site with its module in ``model``.

    Raises:
        SiteNotFoundError: A site's ``module_path`` is not a module of ``model``.
    """
    out: list[tuple[SiteSpec, torch.nn.Module]] = []
    for site in sites:
        module = _get(model, site.module_path)
        if module is None or not site.module_path:
            raise _missing(model, site.module_path)
        out.append((site, module))
    return out
