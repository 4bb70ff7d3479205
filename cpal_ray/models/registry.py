"""Backbone registry: factories stored by name, built with ``build_backbone(name, **kw)``.

A factory is a function returning an ``nn.Module`` with an ``out_channels`` attribute whose
``forward(x)`` maps an image batch (B, 3, H, W) to features f (B, C, h, w) at output stride 16.
Register one with the decorator; the function's name is the backbone's name, and ``channels``
(C, or a function of the factory's keyword arguments) lets callers learn C without building it::

    @register_backbone(channels=lambda width=32, **_: width)
    def tiny(pretrained: bool = False, weights: str = "", width: int = 32) -> nn.Module: ...

Registering a name twice raises (unlike timm, which only warns): two modules silently
fighting over a name would make a config mean different things depending on import order.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

BackboneFactory = Callable[..., nn.Module]

_BACKBONES: dict[str, BackboneFactory] = {}
_CHANNELS: dict[str, int | Callable[..., int] | None] = {}


def register_backbone(fn: BackboneFactory | None = None, *, name: str | None = None,
                      channels: int | Callable[..., int] | None = None):
    """Store ``fn`` under ``name`` (default: the function's name) and return it unchanged.

    Usable bare (``@register_backbone``) or with arguments (``@register_backbone(name="x",
    channels=2048)``). ``channels``: the output channels C, or a function of the factory's
    keyword arguments giving them (None = learn them by building the backbone).
    Raises ValueError when the name is already registered.
    """
    def _register(factory: BackboneFactory) -> BackboneFactory:
        key = name or factory.__name__
        if key in _BACKBONES:
            raise ValueError(f"backbone {key!r} is already registered "
                             f"(by {_BACKBONES[key].__module__}.{_BACKBONES[key].__qualname__})")
        _BACKBONES[key] = factory
        _CHANNELS[key] = channels
        return factory

    return _register(fn) if fn is not None else _register


def list_backbones() -> list[str]:
    """Names of all registered backbones, sorted."""
    return sorted(_BACKBONES)


def build_backbone(name: str, **kwargs) -> nn.Module:
    """Call the factory registered as ``name`` with ``kwargs``.

    Raises ValueError naming the known backbones when ``name`` is not registered.
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {list_backbones()}")
    return _BACKBONES[name](**kwargs)


def backbone_channels(name: str, **kwargs) -> int:
    """Output channels C of backbone ``name`` built with ``kwargs``, without building it when the
    registration declared them."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; known backbones: {list_backbones()}")
    channels = _CHANNELS[name]
    if channels is None:
        return int(build_backbone(name, **kwargs).out_channels)
    return int(channels(**kwargs) if callable(channels) else channels)
