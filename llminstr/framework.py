"""``InstrumentationFramework``: the three verbs of the API document."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from llminstr.capture import CaptureSession
from llminstr.config import InstrumentationConfig
from llminstr.errors import CaptureStateError, ConfigError
from llminstr.sites import SiteSpec, find_sites, resolve_modules

log = logging.getLogger("llminstr")

#: Share of a capture's duration the model must have waited on the pipeline for the
#: capture to count as pipeline-limited (``pipeline_limited``, and the warning).
STALL_FRACTION = 0.01


def describe_model(model: torch.nn.Module) -> dict[str, Any]:
    """The ``model`` entry of a capture's root document (JSON only, no weights)."""
    first = next(model.parameters(), None)
    desc: dict[str, Any] = {
        "class": type(model).__name__,
        "module": type(model).__module__,
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
        "dtype": str(first.dtype).removeprefix("torch.") if first is not None else None,
        "device": str(first.device) if first is not None else None,
    }
    config = getattr(model, "config", None)
    if config is not None:
        desc["model_type"] = getattr(config, "model_type", None)
        desc["name_or_path"] = getattr(config, "_name_or_path", None) or None
        to_json = getattr(config, "to_json_string", None)
        if callable(to_json):
            try:
                desc["config"] = json.loads(to_json(use_diff=False))
            except (TypeError, ValueError) as exc:
                log.debug("model config is not JSON-serialisable: %s", exc)
    return desc


class InstrumentationFramework:
    """Capture activations of a PyTorch model to disk and analyse them.

    >>> fw = InstrumentationFramework(InstrumentationConfig())    # doctest: +SKIP
    >>> fw.instrument_model(model)                                  # doctest: +SKIP
    >>> with fw.capture_activations("run.zarr"):                    # doctest: +SKIP
    ...     model.generate(input_ids, max_length=100)
    >>> result = fw.analyze_activations("run.zarr")                 # doctest: +SKIP

    Hooks are attached only inside ``capture_activations`` and removed in ``finally``,
    so outside a capture the model runs exactly as if it were not instrumented.
    """

    def __init__(self, config: InstrumentationConfig | None = None) -> None:
        if config is None:
            config = InstrumentationConfig()
        if not isinstance(config, InstrumentationConfig):
            raise ConfigError(
                f"config must be an InstrumentationConfig; got {type(config).__name__}"
            )
        self.config = config
        self.model: torch.nn.Module | None = None
        self._sites: list[tuple[SiteSpec, torch.nn.Module]] = []
        self._session: CaptureSession | None = None
        self.last_capture_stats: dict[str, Any] | None = None

    # ------------------------------------------------------------------ instrument
    def instrument_model(self, model: torch.nn.Module) -> list[SiteSpec]:
        """Find the sites to capture in ``model`` (by architecture, name fallback, or the
        config's ``module_names``). Returns them in model order. The model is not modified."""
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"instrument_model needs a torch.nn.Module; got {type(model).__name__}"
            )
        if self._session is not None:
            raise CaptureStateError("cannot re-instrument while a capture is active")
        specs = find_sites(
            model,
            self.config.granularity,
            layers=self.config.layers,
            module_names=self.config.module_names,
        )
        self._sites = resolve_modules(model, specs)
        self.model = model
        return [spec for spec, _ in self._sites]

    @property
    def sites(self) -> list[SiteSpec]:
        return [spec for spec, _ in self._sites]

    def remove_instrumentation(self) -> None:
        """Forget the model. Hooks only live inside a capture, so nothing else is left."""
        if self._session is not None:
            raise CaptureStateError("cannot remove instrumentation while a capture is active")
        self.model = None
        self._sites = []

    # ------------------------------------------------------------------ capture
    @contextmanager
    def capture_activations(
        self, output_path: str | os.PathLike[str], *, overwrite: bool = False
    ) -> Iterator[CaptureSession]:
        """Record every forward pass of the instrumented model run inside the block.

        On normal exit the capture is flushed, committed and marked ``complete``. If the
        block raises (KeyboardInterrupt included), the capture is closed as ``aborted``
        with every committed row kept, and the exception propagates. Statistics of the
        run are left in :attr:`last_capture_stats`.
        """
        if self._session is None:
            self.last_capture_stats = None  # a capture refused below leaves no stale stats
        if self.model is None:
            raise CaptureStateError(
                "no model is instrumented: call instrument_model(model) before capture_activations()"
            )
        if self._session is not None:
            raise CaptureStateError(
                f"a capture to {str(self._session.path)!r} is already active; finish it first"
            )
        # The writer opens at the end of the first forward pass; refuse a bad path now,
        # before any model time is spent.
        from llminstr.errors import CaptureExistsError
        from llminstr.storage.writer import backend_for_path

        target = Path(output_path)
        backend_for_path(target, self.config.backend)
        if target.exists() and not overwrite:
            raise CaptureExistsError(
                f"{str(target)!r} already exists; pass overwrite=True to replace it"
            )
        progress = self.config.progress
        if progress is None:
            progress = sys.stderr.isatty()
        session = CaptureSession(
            self.model,
            self._sites,
            Path(output_path),
            self.config,
            overwrite=overwrite,
            model_descriptor=describe_model(self.model),
            progress=progress,
        )
        self._session = session
        self.last_capture_stats = None
        error: BaseException | None = None
        session.attach()
        try:
            yield session
        except BaseException as exc:
            error = exc
            raise
        finally:
            session.detach()
            self._session = None
            try:
                stats = session.finish(error)
            except BaseException:
                if error is None:
                    raise
                stats = None  # the block's exception is the one that propagates
            if stats is not None:
                self.last_capture_stats = self._report(stats, session)

    def _report(self, stats: Any, session: CaptureSession) -> dict[str, Any]:
        report: dict[str, Any] = stats.to_dict()
        report["path"] = str(session.path)
        report["status"] = session.writer.status if session.writer is not None else None
        report["target_throughput_gbps"] = self.config.target_throughput_gbps
        report["max_memory_gb"] = self.config.max_memory_gb
        report["forward_passes"] = session._step
        report["staging"] = session.staging_stats()
        # Limited: the model waited for the pipeline for more than STALL_FRACTION of the
        # capture (a few milliseconds of queue waits in a long run are not a limit).
        stalled = stats.stall_seconds > STALL_FRACTION * stats.seconds
        achieved = stats.gbps
        report["pipeline_limited"] = stalled
        if stalled and achieved < self.config.target_throughput_gbps:
            log.warning(
                "capture to %s: the pipeline held the model back for %.2f s and reached %.3f GB/s, "
                "below target_throughput_gbps=%.3g. Raise max_memory_gb or encoder_threads, use "
                "lz4, or write to a faster disk.",
                session.path,
                stats.stall_seconds,
                achieved,
                self.config.target_throughput_gbps,
            )
        return report

    # ------------------------------------------------------------------ analyse
    def analyze_activations(
        self, data_path: str | os.PathLike[str], **options: Any
    ) -> dict[str, Any]:
        """Lazy analyses of a capture (see :func:`llminstr.analysis.analyze_activations`).
        The instrumented model, when there is one, enables the interventional causal graph."""
        from llminstr.analysis import analyze_activations

        options.setdefault("model", self.model)
        return analyze_activations(data_path, **options)
