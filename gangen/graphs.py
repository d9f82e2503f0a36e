"""CUDA-graph capture of the whole training step (D step, G step, EMA update): one replay per batch.

At batch 128 and 64x64 a DCGAN step is a few hundred small kernels, and eager PyTorch spends longer
launching them than the GPU spends running them (the issue's H200 figures: bf16 and torch.compile did not
help there). A CUDA graph records the kernels of one step once and then launches them all with one call.

`StepGraphs` keeps one graph per schedule key (for example: G step due or not, R1 due or not), because a
graph replays a fixed sequence of kernels. Each key runs `warmup` times eagerly on a side stream first
(cudnn autotuning, optimizer state, lazily allocated workspaces), under the autocast settings of the
capture (torch.compile'd code inside the step guards on them: a change would recompile it mid-capture),
is then captured and from then on replayed. Inputs are copied into the graph's static tensors before
each replay; the outputs (the step's scalar logs, stacked into one float32 vector) are copied out once
after it.

What the captured function may do: any CUDA kernels on tensors that live as long as the graph (parameters,
buffers, optimizer state, the static inputs). What it must not do: host syncs (.item(), printing a
tensor), CPU tensors, random numbers from a generator the graph does not own, Python decisions that
change between batches (pass those as the key), or optimizers that are not capturable. Everything the
Python code decides at capture time (learning rates as floats, which parameters require grad) is frozen
into the graph.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable
from typing import Any

import lightning.pytorch as L
import torch
from torch import Tensor

StepFn = Callable[..., dict[str, Tensor]]  # (*tensors) -> named scalar tensors, the same names every call


def _autocast_without_cache() -> contextlib.AbstractContextManager:
    """The enclosing CUDA autocast, with its weight-cast cache off (a cached cast would skip its kernel
    in the graph), or nothing when autocast is off."""
    if not torch.is_autocast_enabled("cuda"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)


def _stack(logs: dict[str, Tensor]) -> Tensor:
    """Named scalars -> one float32 vector (len(logs),), detached."""
    return torch.stack([value.detach().float().reshape(()) for value in logs.values()])


class _Captured:
    """One captured step: its graph, static inputs and stacked output."""

    def __init__(self, fn: StepFn, inputs: tuple[Tensor | None, ...]) -> None:
        self.inputs = tuple(None if x is None else x.clone() for x in inputs)  # addresses the graph reads
        self.graph = torch.cuda.CUDAGraph()
        # thread_local: a DataLoader's pin-memory thread may allocate pinned memory while this thread captures
        with _autocast_without_cache(), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            logs = fn(*self.inputs)
            self.names = list(logs)
            self.output = _stack(logs)  # (len(names),) float32, overwritten by each replay

    def replay(self, inputs: tuple[Tensor | None, ...]) -> dict[str, Tensor]:
        for static, x in zip(self.inputs, inputs, strict=True):
            if static is not None:
                static.copy_(x)
        self.graph.replay()
        return dict(zip(self.names, self.output.clone().unbind(0), strict=True))


class StepGraphs:
    """Runs `fn(*inputs)` for a schedule `key`: eagerly for the first `warmup` calls of that key, then from
    a CUDA graph captured on the next call (which also runs the step: capture itself runs nothing).

    Inputs must keep their shape, dtype and memory format from call to call (full batches only); a new
    shape is a new graph. Returns the step's named scalars as tensors that stay valid after later calls.
    """

    def __init__(self, warmup: int = 2) -> None:
        if warmup < 1:
            raise ValueError(f"warmup {warmup!r} must be >= 1: capture needs an eager run first")
        self.warmup = warmup
        self._graphs: dict[Hashable, _Captured] = {}
        self._eager_runs: dict[Hashable, int] = {}
        self._stream: torch.cuda.Stream | None = None
        self.captured = 0  # graphs captured, also counting those dropped by clear()

    def __len__(self) -> int:
        """Graphs held now."""
        return len(self._graphs)

    def clear(self) -> None:
        """Drop every graph and its memory pool (the parameters they point at may move: Lightning takes the
        model off the GPU after fit). Later calls warm up and capture again."""
        self._graphs.clear()
        self._eager_runs.clear()

    def __call__(self, key: Hashable, fn: StepFn, *inputs: Tensor | None) -> dict[str, Any]:
        shapes = tuple(None if x is None else (x.shape, x.dtype, x.stride()) for x in inputs)
        full_key = (key, shapes)
        captured = self._graphs.get(full_key)
        if captured is not None:
            return captured.replay(inputs)
        runs = self._eager_runs.get(full_key, 0)
        if runs < self.warmup:
            self._eager_runs[full_key] = runs + 1
            return self._eager(fn, inputs)
        captured = _Captured(fn, inputs)
        self._graphs[full_key] = captured
        self.captured += 1
        return captured.replay(inputs)

    def _eager(self, fn: StepFn, inputs: tuple[Tensor | None, ...]) -> dict[str, Tensor]:
        """One eager run on a side stream (as torch.cuda.graphs asks of warm-up), ordered with the main one."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)
        with _autocast_without_cache(), torch.cuda.stream(self._stream):  # as the capture will run it
            logs = fn(*inputs)
            out = _stack(logs)
        main.wait_stream(self._stream)
        out.record_stream(main)
        return dict(zip(list(logs), out.unbind(0), strict=True))


GRADIENT_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def gradient_hook_owners(module: L.LightningModule, callbacks: list[L.Callback]) -> list[str]:
    """Class names of the callbacks (and the module) that override a hook Lightning calls between a backward
    pass and its optimizer step: a replayed CUDA graph runs no Python there."""
    owners = [cb for cb in callbacks if any(getattr(type(cb), h) is not getattr(L.Callback, h) for h in GRADIENT_HOOKS)]
    if any(getattr(type(module), h) is not getattr(L.LightningModule, h) for h in GRADIENT_HOOKS):
        owners.append(module)
    return [type(owner).__name__ for owner in owners]
