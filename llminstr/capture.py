"""The capture engine: hooks -> stager -> :class:`~llminstr.storage.writer.CaptureWriter`.

One *pass* is one call of the instrumented root module (a plain forward, or one step of
``generate``). A pre-hook on the root module plans the pass: which positions are real
tokens, their ids, sequences and positions. Each site's forward hook hands its output to
the stager, which copies it out (CPU: into the writer's chunk buffers; CUDA: into pinned
arenas, see :mod:`llminstr.staging`, with no synchronisation of the compute stream) and
keeps only the planned rows. A post-hook on the root checks that every site fired
exactly once, so row ``i`` is the same token in every array.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llminstr.budget import MemoryBudget
from llminstr.config import InstrumentationConfig
from llminstr.errors import CaptureStateError, ConfigError, FormatError
from llminstr.format import SiteInfo
from llminstr.sites import SiteSpec
from llminstr.staging import CudaStager, DeviceOps
from llminstr.storage.writer import CaptureWriter, WriterStats

log = logging.getLogger("llminstr")

#: The device calls of the CUDA path (tests put a CPU stand-in here).
DEVICE_OPS = DeviceOps()

_TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PassPlan:
    """What one forward pass contributes: ``batch x seq_len`` positions, of which the
    planned ones (real tokens, unless padding is kept) become rows.

    The token ids and the attention mask may still be on their way from the GPU when the
    plan is made; :meth:`resolve` (called by whoever delivers the pass's rows) waits for
    them and computes the kept positions and the token columns once.
    """

    def __init__(
        self,
        step: int,
        batch: int,
        seq_len: int,
        past: int,
        sequences: np.ndarray,
        load_inputs: Callable[[], tuple[np.ndarray | None, np.ndarray | None]],
        keep_padding: bool,
    ) -> None:
        self.step = step
        self.batch = batch
        self.seq_len = seq_len
        self.past = past
        self.sequences = sequences
        self._load = load_inputs
        self._keep_padding = keep_padding
        self._resolved = False
        self.tokens_delivered = False
        self.keep: np.ndarray | None = None
        self.tokens: dict[str, np.ndarray] = {}
        self.n_rows = 0

    def resolve(self) -> PassPlan:
        if self._resolved:
            return self
        ids, mask = self._load()
        batch, seq_len = self.batch, self.seq_len
        ids = (
            ids.reshape(batch, seq_len).astype(np.int64, copy=False)
            if ids is not None
            else np.full((batch, seq_len), -1, dtype=np.int64)
        )
        if mask is not None:
            m = mask.astype(bool, copy=False)
            if m.ndim != 2 or m.shape[0] != batch or m.shape[1] < seq_len:
                raise FormatError(
                    f"attention_mask of shape {tuple(m.shape)} does not fit a batch of {batch} "
                    f"sequences of {seq_len} new tokens"
                )
            positions = (np.cumsum(m, axis=1) - 1)[:, -seq_len:]
            real = m[:, -seq_len:]
        else:
            positions = np.broadcast_to(np.arange(self.past, self.past + seq_len), (batch, seq_len))
            real = np.ones((batch, seq_len), dtype=bool)
        positions = np.where(real, positions, -1)
        keep = None if self._keep_padding or bool(real.all()) else real.reshape(-1)

        def pick(a: np.ndarray) -> np.ndarray:
            flat = np.ascontiguousarray(a, dtype=np.int64).reshape(-1)
            return flat if keep is None else flat[keep]

        seqs = np.broadcast_to(self.sequences[:, None], (batch, seq_len))
        tokens = {"token_id": pick(ids), "sequence": pick(seqs), "position": pick(positions)}
        tokens["step"] = np.full(len(tokens["token_id"]), self.step, dtype=np.int64)
        if self._keep_padding:
            tokens["is_padding"] = pick(~real)
        self.keep, self.tokens, self.n_rows = keep, tokens, len(tokens["token_id"])
        self._resolved = True
        return self


class _Progress:
    """A one-line progress display (tqdm) of rows, bytes, rate and buffer fill."""

    def __init__(self, enabled: bool, budget: MemoryBudget) -> None:
        self._bar: Any = None
        self._budget = budget
        self._last = 0.0
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(desc="capture", unit=" rows", dynamic_ncols=True, leave=True)

    def update(self, rows: int, raw_bytes: int, started: float) -> None:
        if self._bar is None:
            return
        now = time.perf_counter()
        self._bar.update(rows)
        if now - self._last > 0.5:
            self._last = now
            elapsed = max(now - started, 1e-9)
            self._bar.set_postfix(
                GB=f"{raw_bytes / 1e9:.3f}",
                GBps=f"{raw_bytes / elapsed / 1e9:.3f}",
                buffer=f"{100 * self._budget.used / self._budget.limit:.0f}%",
                refresh=False,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class CaptureSession:
    """State of one ``capture_activations`` block. Created by the framework."""

    def __init__(
        self,
        model: torch.nn.Module,
        sites: Sequence[tuple[SiteSpec, torch.nn.Module]],
        path: Path,
        config: InstrumentationConfig,
        *,
        overwrite: bool = False,
        model_descriptor: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        self.model = model
        self.sites = list(sites)
        self.path = path
        self.config = config
        self.overwrite = overwrite
        self.model_descriptor = dict(model_descriptor or {})
        self.budget = MemoryBudget(config.max_memory_bytes)
        self.writer: CaptureWriter | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._plan: PassPlan | None = None
        self._fired: list[bool] = [False] * len(self.sites)
        self._layouts: list[Any] = [None] * len(self.sites)
        self._pass_lock = threading.Lock()
        self._plan_thread: int | None = None  # the thread whose forward pass is recorded
        # Per site: whether its output was a tuple/list (section 3.3: tuple_index is null
        # when the rows are the output itself), seen on its first call.
        self._from_tuple: list[bool | None] = [None] * len(self.sites)
        self._first_pass: dict[int, list[np.ndarray]] | None = {}
        self._first_tokens: dict[str, np.ndarray] = {}
        self._first_bytes = 0  # budget held by first-pass rows on the host
        self._step = 0
        self._next_sequence = 0
        self._live_sequences: np.ndarray | None = None  # ids of the sequences in the batch
        self._rows = 0
        self._raw_bytes = 0
        self._started = time.perf_counter()
        self._ops = DEVICE_OPS
        self._stager: CudaStager | None = None
        self._progress = _Progress(progress, self.budget)
        self._extra_columns = ["is_padding"] if config.padding == "keep" else []
        self.failed: BaseException | None = None
        self._positional = _positional_parameters(model)
        self._warned_unnamed = False

    # ---------------------------------------------------------------- hook management
    def attach(self) -> None:
        try:
            self._handles.append(
                self.model.register_forward_pre_hook(_Hook(self._pre_hook), with_kwargs=True)
            )
            for i, (_spec, module) in enumerate(self.sites):
                self._handles.append(module.register_forward_hook(_Hook(self._make_site_hook(i))))
            self._handles.append(
                self.model.register_forward_hook(_Hook(self._post_hook), always_call=True)
            )
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---------------------------------------------------------------- hooks
    def _pre_hook(
        self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        me = threading.get_ident()
        with self._pass_lock:
            if self._plan is not None:
                if self._plan_thread == me:
                    return  # re-entrant call of the root (e.g. a wrapper calling itself)
                raise CaptureStateError(_CONCURRENT)
            self._begin_pass(args, kwargs)
            self._plan_thread = me

    def _begin_pass(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        first = args[0] if args and torch.is_tensor(args[0]) else None
        # Every argument under its parameter name: model(ids, mask) and model(ids, cache)
        # pass the mask or the KV cache by position (the tokens: ``first``, below).
        named = {**dict(zip(self._positional, args, strict=False)), **kwargs} if args else kwargs
        if len(args) > max(1, len(self._positional)) and not self._warned_unnamed:
            self._warned_unnamed = True
            log.warning(
                "capture_activations: the model was called with %d positional arguments but "
                "its forward names only %d; a mask or KV cache among the others is not seen "
                "(pass attention_mask= and past_key_values= by keyword)",
                len(args),
                len(self._positional),
            )
        embeds = kwargs.get("inputs_embeds")
        input_ids = kwargs.get("input_ids")
        if input_ids is None and embeds is None and first is not None:
            # A positional input: token ids when integral, embeddings (batch, seq, hidden)
            # when floating point (a plain nn.Module called as model(x)).
            if first.is_floating_point() or first.is_complex():
                if first.dim() != 3:
                    raise CaptureStateError(
                        "cannot tell the tokens of this forward pass: its first argument is a "
                        f"floating-point tensor of shape {tuple(first.shape)}; pass token ids, "
                        "or embeddings of shape (batch, sequence, hidden)"
                    )
                embeds = first
            else:
                input_ids = first
        mask = named.get("attention_mask")
        if input_ids is not None:
            batch, seq_len = int(input_ids.shape[0]), int(input_ids.shape[-1])
        elif embeds is not None:
            batch, seq_len = int(embeds.shape[0]), int(embeds.shape[1])
        else:
            raise CaptureStateError(
                "cannot tell the tokens of this forward pass: the instrumented model was called "
                "without input_ids or inputs_embeds"
            )
        _check_supported_cache(named, mask)
        past = _past_length(named, mask, seq_len)
        if past == 0 or self._live_sequences is None or len(self._live_sequences) != batch:
            self._live_sequences = np.arange(self._next_sequence, self._next_sequence + batch)
            self._next_sequence += batch
        on_device = any(t is not None and self._ops.handles(t) for t in (input_ids, mask))
        if on_device:
            loader = self._staging().stage_inputs(input_ids, mask)
        else:
            ids_np = input_ids.detach().numpy() if input_ids is not None else None
            mask_np = mask.detach().numpy() if mask is not None else None
            loader = lambda: (ids_np, mask_np)  # noqa: E731
        self._plan = PassPlan(
            self._step,
            batch,
            seq_len,
            past,
            self._live_sequences,
            loader,
            keep_padding=self.config.padding == "keep",
        )
        self._step += 1
        self._fired = [False] * len(self.sites)

    def _make_site_hook(self, index: int) -> Callable[..., None]:
        spec = self.sites[index][0]

        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            plan = self._plan
            if plan is not None and self._plan_thread != threading.get_ident():
                raise CaptureStateError(_CONCURRENT)
            if plan is None and _in_backward():
                return  # activation checkpointing re-running a block during backward
            if plan is None:
                raise CaptureStateError(
                    f"site {spec.name!r} ran outside a forward pass of the instrumented model; "
                    "call the model that was passed to instrument_model()"
                )
            if self._fired[index]:
                raise FormatError(
                    f"site {spec.name!r} ran twice in one forward pass; rows would no longer align. "
                    "Capture a module that runs once per pass (see module_names)."
                )
            self._fired[index] = True
            tensor = _take(output, spec)
            if self._from_tuple[index] is None:
                self._from_tuple[index] = isinstance(output, (tuple, list))
            self._on_site(index, plan, tensor)

        return hook

    def _post_hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._plan is None or self._plan_thread != threading.get_ident():
            return  # another thread's call, refused in its pre-hook
        plan, self._plan = self._plan, None
        if plan is None or output is None:
            return  # (torch calls this hook with no output when the forward raised)
        missing = [self.sites[i][0].name for i, f in enumerate(self._fired) if not f]
        if missing:
            hint = "Choose sites that run in every pass."
            if len(missing) == len(self.sites):
                hint = (
                    "None of them ran: if the model was compiled (torch.compile) and called "
                    "before it was instrumented, its cached graph skips hooks added later; "
                    "instrument it before its first compiled call, or call "
                    "torch._dynamo.reset() after instrument_model()."
                )
            raise FormatError(
                f"sites {missing} did not run in forward step {plan.step}; rows would no longer "
                f"align. {hint}"
            )
        first = self._first_pass is not None
        if first:
            self._open_writer(plan)
        if self._stager is not None:  # the first pass goes to the drain at once
            self._stager.end_pass(plan, force=first)

    # ---------------------------------------------------------------- data path
    def _storage_dtype(self, tensor: torch.Tensor, spec: SiteSpec) -> torch.dtype:
        if self.config.storage_dtype is not None:
            return _TORCH_DTYPE[self.config.storage_dtype]
        if tensor.dtype not in _TORCH_DTYPE.values():
            raise FormatError(
                f"site {spec.name!r} produced {tensor.dtype}; llminstr stores float32, float16 and "
                "bfloat16. Set storage_dtype to one of them."
            )
        return tensor.dtype

    def _layout(
        self, index: int, plan: PassPlan, tensor: torch.Tensor
    ) -> tuple[int, tuple[int, ...], torch.dtype]:
        """Rows, feature shape and storage dtype of a site output of this shape."""
        spec = self.sites[index][0]
        rows_total = plan.batch * plan.seq_len
        if tensor.dim() >= 3 and tuple(tensor.shape[:2]) == (plan.batch, plan.seq_len):
            feature = tuple(tensor.shape[2:])
        elif tensor.dim() >= 2 and tensor.shape[0] == rows_total:
            feature = tuple(tensor.shape[1:])
        else:
            raise FormatError(
                f"site {spec.name!r} returned shape {tuple(tensor.shape)}; expected "
                f"({plan.batch}, {plan.seq_len}, ...) for this pass"
            )
        return rows_total, feature, self._storage_dtype(tensor, spec)

    def _on_site(self, index: int, plan: PassPlan, tensor: torch.Tensor) -> None:
        # This runs for every site in every pass (every decode step): the layout of a
        # shape seen in the last pass is looked up, not worked out again.
        key = (tensor.shape, tensor.dtype, plan.batch, plan.seq_len)
        cached = self._layouts[index]
        if cached is None or cached[0] != key:
            layout = (key, *self._layout(index, plan, tensor))
            if cached is not None and layout[3] != cached[3]:
                raise FormatError(
                    f"site {self.sites[index][0].name!r} produced {cached[3]} rows in an "
                    f"earlier pass and {layout[3]} now (torch.autocast, or a model cast "
                    "during the capture?); a site stores one dtype. Set storage_dtype to "
                    "store every pass in one dtype."
                )
            cached = self._layouts[index] = layout
        _, rows_total, feature, dtype = cached
        if tensor.requires_grad:
            tensor = tensor.detach()
        fresh = tensor.dtype != dtype
        if fresh:
            tensor = tensor.to(dtype)
        if self._ops.handles(tensor):
            # The model may change its output in place once the hook returns (Falcon adds
            # the attention output into the MLP output): the stager copies it on the
            # producing stream, or snapshots it there first (see llminstr.staging).
            self._staging().stage(index, plan, tensor, rows_total, feature, fresh)
        else:
            plan.resolve()
            if index == 0:
                self.deliver_tokens([plan])
            flat = tensor.reshape(rows_total, *feature)
            rows = _host_rows(flat, plan.keep)
            if self._first_pass is not None:
                self._hold_first_pass_rows(rows.nbytes)
            self.deliver_rows(index, rows)

    def _hold_first_pass_rows(self, nbytes: int) -> None:
        """The first pass's rows wait on the host until the writer opens at its end: they
        count against the budget, and a first pass that cannot fit is refused."""
        if not self.budget.try_acquire(nbytes):
            held = self._first_bytes + nbytes
            raise ConfigError(
                f"the first forward pass needs more than {held / 1e9:.3g} GB of host memory "
                "for its rows until the capture's layout is known at its end; "
                f"max_memory_gb={self.config.max_memory_gb} leaves too little. Raise "
                "max_memory_gb or start with a smaller batch."
            )
        self._first_bytes += nbytes

    def staging_stats(self) -> dict[str, int] | None:
        """Device staging, when the model ran on CUDA: batches sent to the drain thread,
        bytes copied to pinned arenas, and the most arena bytes held at once."""
        stager = self._stager
        if stager is None:
            return None
        return {
            "batches": stager.batches,
            "staged_bytes": stager.staged_bytes,
            "peak_arena_bytes": stager.peak_held,
        }

    def _staging(self) -> CudaStager:
        if self._stager is None:
            names = [spec.name for spec, _module in self.sites]
            self._stager = CudaStager(self, names, self.budget, self._ops)
        return self._stager

    def deliver_rows(self, index: int, rows: np.ndarray) -> None:
        """Hand kept host rows of one site to the writer (or the first-pass buffer)."""
        self._raw_bytes += rows.nbytes
        if self._first_pass is not None:
            self._first_pass.setdefault(index, []).append(np.array(rows, copy=True))
            return
        assert self.writer is not None
        self.writer.write_site(self.sites[index][0].name, rows)

    def deliver_rows_lent(self, index: int, rows: np.ndarray, release: Callable[[], None]) -> None:
        """Like :meth:`deliver_rows`, for rows in staging memory that the writer may encode
        in place; ``release()`` is called once it no longer needs them."""
        if self._first_pass is not None or self.writer is None:
            try:
                self.deliver_rows(index, rows)
            finally:
                release()
            return
        self._raw_bytes += rows.nbytes
        self.writer.write_site_lent(self.sites[index][0].name, rows, release)

    def deliver_tokens(self, plans: list[PassPlan]) -> None:
        """Hand the token rows of finished passes to the writer (or the first-pass buffer),
        once per pass (a pass with sites on the host and on the device reaches here twice)."""
        plans = [p for p in plans if not p.tokens_delivered]
        if not plans:
            return
        for plan in plans:
            plan.resolve()
            plan.tokens_delivered = True
            self._rows += plan.n_rows
            # The bar counts stored rows (padding skipped), once per pass, when they are
            # known: in the site hooks on the CPU path, in the drain on the CUDA path.
            self._progress.update(plan.n_rows, self._raw_bytes, self._started)
        if len(plans) == 1:
            tokens = plans[0].tokens
        else:
            tokens = {c: np.concatenate([p.tokens[c] for p in plans]) for c in plans[0].tokens}
        if self._first_pass is not None:
            self._first_tokens = tokens
            return
        assert self.writer is not None
        self.writer.write_tokens(tokens)

    def _open_writer(self, plan: PassPlan) -> None:
        """The first pass told every site's feature shape and storage dtype (its hooks saw
        the tensors): create the writer, then write what the first pass left buffered on
        the host. Staged rows stay in their arenas and reach the writer like any others."""
        if self._stager is not None:
            self._stager.wait_idle()  # rows sent during the first pass went to the buffer
        assert self._first_pass is not None
        by_index = self._first_pass
        infos = []
        for i, (spec, _module) in enumerate(self.sites):
            _key, _rows, feature, dtype = self._layouts[i]
            infos.append(
                SiteInfo(
                    name=spec.name,
                    feature_shape=feature,
                    dtype=str(dtype).removeprefix("torch."),
                    kind=spec.kind,
                    layer=spec.layer,
                    module_path=spec.module_path,
                    module_class=spec.module_class,
                    tuple_index=spec.tuple_index if self._from_tuple[i] else None,
                )
            )
        cfg = self.config
        self.writer = CaptureWriter(
            self.path,
            infos,
            compression=cfg.compression_algorithm,
            compression_level=cfg.compression_level,
            checksum=cfg.checksum,
            chunk_rows=cfg.chunk_rows,
            budget=self.budget,
            encoder_threads=cfg.encoder_threads,
            target_throughput_gbps=cfg.target_throughput_gbps,
            commit_interval_s=cfg.commit_interval_s,
            backend=cfg.backend,
            overwrite=self.overwrite,
            model=self.model_descriptor,
            capture_config=cfg.to_dict(),
            extra_token_columns=self._extra_columns,
        )
        self._first_pass = None
        short = self.writer.floor_bytes - (self.budget.limit - self.budget.used)
        if short > 0:
            # Too little left for the writer's own buffers while the first pass is still
            # charged: its copies would wait forever for room the first pass holds. Give
            # up just that much of the first pass's charge (the overshoot is bounded by
            # the writer's minimum, not by the first pass).
            short = min(short, self._first_bytes)
            self.budget.release(short)
            self._first_bytes -= short
        if self._first_tokens:
            self.writer.write_tokens(self._first_tokens)
        # The rows are lent to the writer: whole chunks are encoded where they lie, and
        # each part stays charged until its last lent chunk is encoded. Only a part's
        # tail (less than a chunk) is copied, into the writer's own buffers, which the
        # room left above covers: the first pass stays within the budget. (Releasing each
        # site's charge before copying it overshot by one site's rows; releasing all of
        # them up front, by up to 1.6x.) A first pass that leaves less than the writer's
        # minimum free gave up the shortfall of its charge (above).
        for index in list(by_index):
            parts = by_index.pop(index)
            name = self.sites[index][0].name
            while parts:
                part = parts.pop(0)
                held = min(self._first_bytes, part.nbytes)
                self._first_bytes -= held
                self.writer.write_site_lent(
                    name, part, functools.partial(self.budget.release, held)
                )
                del part  # its memory goes when the writer drops its lent chunks
        self.budget.release(self._first_bytes)
        self._first_bytes = 0
        if self._stager is not None:
            # Arenas get two thirds of what the writer's minimum leaves; the writer keeps
            # the rest for chunk buffers and frames in flight (see docs/decisions.md).
            self._stager.set_cap((self.budget.limit - self.writer.floor_bytes) * 2 // 3)

    # ---------------------------------------------------------------- end
    def finish(self, exc: BaseException | None) -> WriterStats | None:
        """Flush and close. ``exc`` (from the ``with`` block) marks the capture aborted."""
        try:
            if self._stager is not None:
                try:
                    self._stager.close()
                except BaseException as stager_exc:
                    exc = exc or stager_exc
                    if self.writer is not None:
                        self.writer.abort(f"staging failed: {stager_exc!r}")
                    raise
            if self.writer is None:
                if exc is None and self._first_pass:
                    raise CaptureStateError(
                        "the first forward pass did not finish; nothing was written"
                    )
                if exc is None:
                    log.warning("capture_activations: no forward pass ran; no capture was written")
                return None
            if exc is None:
                self.writer.close("complete")
            else:
                self.writer.close("aborted", f"{type(exc).__name__}: {exc}")
            return self.writer.stats()
        finally:
            self.budget.release(self._first_bytes)  # a first pass that never finished
            self._first_bytes = 0
            self._progress.close()


def _take(output: Any, spec: SiteSpec) -> torch.Tensor:
    """The tensor a site captures: the output itself, or the element ``tuple_index`` of a
    tuple/list output (HF attention modules return ``(attn_output, attn_weights, ...)``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        index = spec.tuple_index or 0
        item: object = output[index] if index < len(output) else None
        if isinstance(item, torch.Tensor):
            return item
    hidden = getattr(output, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise FormatError(
        f"site {spec.name!r} returned {type(output).__name__}; expected a tensor or a tuple whose "
        f"element {spec.tuple_index or 0} is a tensor"
    )


def _host_rows(flat: torch.Tensor, keep: np.ndarray | None) -> np.ndarray:
    """Kept rows of a CPU tensor as numpy (bf16 as raw uint16 bits; a view when possible)."""
    arr = flat.view(torch.uint16).numpy() if flat.dtype == torch.bfloat16 else flat.numpy()
    return arr if keep is None else arr[keep]


_CONCURRENT = (
    "the instrumented model was called from a second thread while another thread's forward "
    "pass is being captured: rows would mix. Call the model from one thread at a time "
    "during a capture"
)


def _inert_hook(*args: Any, **kwargs: Any) -> None:
    """What a copy of an instrumented model gets in place of the capture's hooks."""
    return None


class _Hook:
    """A capture hook as registered on a module. ``copy.deepcopy`` of the model during a
    capture copies its hook tables: the copy gets :func:`_inert_hook` (it is not
    instrumented, and records nothing), instead of failing on the session's locks or, for
    the site hooks, recording into the original's capture."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[..., Any]) -> None:
        # Under torch.compile the hooks run eagerly (a graph break), not traced: Dynamo
        # would trace the session's numpy bookkeeping, and failed on it (cumsum of a
        # bool mask). About 0.6 µs per call when nothing is compiled.
        self.fn = torch.compiler.disable(fn)  # type: ignore[no-untyped-call]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __deepcopy__(self, memo: dict[int, Any]) -> Callable[..., None]:
        return _inert_hook


def capture_active(model: torch.nn.Module) -> bool:
    """Whether a ``capture_activations`` block is recording ``model`` (or a module in it)
    now: its hooks are registered only for the length of the block."""
    return any(
        isinstance(hook, _Hook)
        for module in model.modules()
        for hooks in (module._forward_pre_hooks, module._forward_hooks)
        for hook in hooks.values()
    )


def _in_backward() -> bool:
    """Whether autograd is running a backward pass on this thread (where activation
    checkpointing recomputes blocks: not a new forward pass, nothing to record)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and int(task()) != -1


def _positional_parameters(model: torch.nn.Module) -> tuple[str, ...]:
    """The names that ``model(...)``'s positional arguments bind to, in order (up to a
    ``*args``); empty when the forward's signature cannot be read. A wrapper whose
    forward takes only ``*args`` (``torch.compile``'s module, ``DataParallel``, a
    passthrough) is looked through to the module it wraps."""
    seen: set[int] = set()
    current: Any = model
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        try:
            params = list(inspect.signature(current.forward).parameters.values())
        except (TypeError, ValueError, AttributeError):
            return ()
        names = []
        for p in params:
            if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                break
            names.append(p.name)
        if names or not any(p.kind is p.VAR_POSITIONAL for p in params):
            return tuple(names)
        inner = getattr(current, "_orig_mod", None) or getattr(current, "module", None)
        current = inner if isinstance(inner, torch.nn.Module) else None
    return ()


def _check_supported_cache(kwargs: Mapping[str, Any], mask: Any) -> None:
    """Refuse the KV-cache forms whose masks do not say which new tokens are padding:
    static and hybrid caches pass a 4-D or per-layer-type mask, or a 2-D mask padded to
    the cache's full length (rows would then be silently wrong)."""
    cache = _cache_of(kwargs)
    static = cache is not None and (
        bool(getattr(cache, "is_compileable", False)) or "Static" in type(cache).__name__
    )
    if static or (mask is not None and not (torch.is_tensor(mask) and mask.dim() == 2)):
        form = (
            f"a {type(cache).__name__}"
            if static
            else f"an attention mask of type {type(mask).__name__}"
            + (f" and shape {tuple(mask.shape)}" if torch.is_tensor(mask) else "")
        )
        raise CaptureStateError(
            f"the model was called with {form}: llminstr needs the 2-D (batch, tokens) "
            "attention mask of a dynamic KV cache to tell padding from tokens. Static and "
            "hybrid caches (cache_implementation='static', ...) are not supported; use the "
            "default dynamic cache"
        )


#: Keyword arguments under which models receive their KV cache (see :func:`_past_length`).
_CACHE_KWARGS = ("past_key_values", "cache", "past_key_value")


def _cache_of(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache a model call received, or None. Its keyword differs between
    transformers releases: ``past_key_values`` (4.x), ``cache`` (5.x)."""
    return next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)


def _past_length(kwargs: Mapping[str, Any], mask: torch.Tensor | None, seq_len: int) -> int:
    """Tokens already in the KV cache, from host-side shapes only (never a device sync)."""
    if mask is not None and mask.dim() == 2:
        return max(0, int(mask.shape[1]) - seq_len)
    cache = _cache_of(kwargs)
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        try:
            return int(cache.get_seq_length())
        except (TypeError, ValueError, IndexError, AttributeError):
            return 0
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], (tuple, list)):
        return int(cache[0][0].shape[-2])
    return 0
