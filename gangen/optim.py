"""Optimizer helpers: DCGAN's default Adam, and rebuilding a user's optimizer as fused or capturable
(same class, groups and settings) for the GPU speed paths (README Speed)."""

from __future__ import annotations

import inspect
from typing import Any

import torch


def default_adam(params: Any) -> torch.optim.Optimizer:
    """DCGAN's optimizer: Adam, lr 2e-4, beta1 0.5 (Radford et al. 2015)."""
    return torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))


def use_fused(optimizer: torch.optim.Optimizer, device_types: tuple[str, ...] = ("cuda",)) -> torch.optim.Optimizer:
    """The same Adam / AdamW with fused=True (one kernel per step) when all its parameters are on
    `device_types` and the user chose neither `fused` nor `foreach`; anything else is returned as it is.
    The default is CUDA only: on CPU the default foreach Adam was as fast (README Speed)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    defaults = optimizer.defaults
    if (
        type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW)
        or not params
        or not all(p.device.type in device_types for p in params)
        or defaults.get("fused") is not None
        or defaults.get("foreach") is not None
        or defaults.get("differentiable")
    ):
        return optimizer
    return _rebuild(optimizer, fused=True)


def make_capturable(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same optimizer with capturable=True (its step counters on the device: a CUDA graph may replay
    its step), when it has that option; anything else (SGD: nothing to count) is returned as it is."""
    if "capturable" not in optimizer.defaults or optimizer.defaults["capturable"]:
        return optimizer
    return _rebuild(optimizer, capturable=True)


def _rebuild(optimizer: torch.optim.Optimizer, **options: Any) -> torch.optim.Optimizer:
    """A new optimizer of the same class, groups and settings, with `options` changed (before any step).

    Only the settings its constructor takes are passed: `defaults` can hold more (torch 2.14's AdamW
    inherits Adam's `decoupled_weight_decay`, which AdamW() refuses; its groups keep it).
    """
    cls = type(optimizer)
    takes = inspect.signature(cls.__init__).parameters
    settings = {k: v for k, v in {**optimizer.defaults, **options}.items() if k in takes}
    return cls([{**group, **options} for group in optimizer.param_groups], **settings)


# How an optimizer runs (not what it computes): these follow the run that resumes, never the checkpoint.
_IMPLEMENTATION = ("foreach", "fused", "capturable", "differentiable")


def keep_configured_settings(optimizer: torch.optim.Optimizer, name: str, report: Any = None) -> None:
    """After `optimizer.load_state_dict` (a resumed fit), its groups keep the settings it was built with.

    torch replaces every group setting with the checkpoint's. That would train with the old learning rate
    while the run's config.yaml records the new one, and would carry the old run's implementation flags
    over: a capturable state (a CUDA-graph run) crashes the first step on the CPU, and an eager one breaks
    a CUDA-graph capture. The counters ("step") move to where the resumed flags want them. `report` gets
    one line per changed setting ("gangen: resumed g_optimizer lr 0.0001 as configured (checkpoint: 0.0002)").
    """
    built = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]

    def restore(opt: torch.optim.Optimizer) -> None:
        for i, (group, settings) in enumerate(zip(opt.param_groups, built, strict=True)):
            for key, value in settings.items():
                old = group.get(key)
                if key not in _IMPLEMENTATION and not _same(old, value) and report is not None:
                    where = f" (group {i})" if len(built) > 1 else ""
                    report(
                        f"gangen: resumed {name}{where} {key} {_show(value)} as configured (checkpoint: {_show(old)})"
                    )
                group[key] = value.clone() if isinstance(value, torch.Tensor) else value
            on_device = bool(group.get("capturable") or group.get("fused"))
            needed: dict[int, set[str]] = {}  # per parameter rank (Adafactor keeps other buffers for matrices)
            for param in group["params"]:
                state = opt.state.get(param)
                step = state.get("step") if isinstance(state, dict) else None
                if isinstance(step, torch.Tensor):
                    state["step"] = step.detach().to(param.device if on_device else "cpu", torch.float32)
                if state:  # a setting switched on (amsgrad, RMSprop momentum or centered) needs a buffer the
                    if param.dim() not in needed:
                        needed[param.dim()] = _state_keys(type(opt), settings, param.dim())
                    keys = needed[param.dim()]
                    for key in keys - state.keys():  # checkpoint lacks: torch starts those at zero too
                        state[key] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def other_class(opt: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
        """A state saved by another optimizer class (SGD -> Adam: torch fails on a missing "step") is not
        loaded: this optimizer starts fresh, with the saved groups' parameters."""
        saved = state_dict.get("param_groups") or []
        if not saved or _kind(saved) == _kind(built):
            return None
        if report is not None:
            report(
                f"gangen: {name} is {type(opt).__name__}, the checkpoint's had other settings: its state starts fresh"
            )
        groups = [{**settings_of, "params": group["params"]} for settings_of, group in zip(built, saved, strict=False)]
        return {"state": {}, "param_groups": groups}

    optimizer.register_load_state_dict_pre_hook(other_class)
    optimizer.register_load_state_dict_post_hook(restore)


# Group flags that torch versions add to every optimizer (a file of an older torch lacks them): not the kind
_FLAGS = ("params", "initial_lr", "maximize", "decoupled_weight_decay", *_IMPLEMENTATION)


def _kind(groups: list[dict[str, Any]]) -> set[str]:
    """The setting names that tell optimizers apart: SGD has momentum, Adam betas (Adam and AdamW share them)."""
    return {k for group in groups for k in group if k not in _FLAGS}


def _state_keys(cls: type[torch.optim.Optimizer], settings: dict[str, Any], dim: int = 1) -> set[str]:
    """The per-parameter buffers (shaped like the parameter) that `cls` with `settings` keeps for a parameter
    of `dim` dimensions: one step of it on a probe parameter, on the CPU and without the implementation flags."""
    probe = torch.zeros((2,) * dim, requires_grad=True)
    takes = inspect.signature(cls.__init__).parameters  # AdamW's groups hold decoupled_weight_decay, not its args
    try:
        opt = cls([probe], **{k: v for k, v in settings.items() if k in takes and k not in _IMPLEMENTATION})
        probe.grad = torch.ones_like(probe)
        opt.step()
    except Exception:  # an optimizer that cannot step like this (closure-only, LBFGS...): fill nothing
        return set()
    return {k for k, v in opt.state[probe].items() if isinstance(v, torch.Tensor) and v.shape == probe.shape}


def _same(a: Any, b: Any) -> bool:
    return _show(a) == _show(b)


def _show(value: Any) -> Any:
    """A plain value to compare and print: tensors as numbers, tuples (betas) as lists."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    return [_show(v) for v in value] if isinstance(value, (tuple, list)) else value
