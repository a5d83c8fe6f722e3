"""Folding a per-channel correction ``y = a ⊙ x + b`` at a site into the model's weights.

Rules (methods.md §6.5), exact in float arithmetic up to rounding:

* output of a norm with a per-channel affine (BatchNorm, LayerNorm over the last axis,
  GroupNorm): ``γ' = a ⊙ γ``, ``β' = a ⊙ β + b``;
* output of a Linear / Conv: ``W' = diag(a) W``, ``c' = a ⊙ c + b`` (a bias is created if the
  layer had none);
* output of an ``nn.MultiheadAttention``: the output of its ``out_proj`` (the same rule);
* input of a Linear (e.g. an attention output feeding the output projection, or the features
  feeding a per-task head): ``W' = W diag(a)``, ``c' = c + W b``;
* input of an unpadded, ungrouped Conv: the same with ``W`` summed over the kernel for ``b``.

Anything else (a residual-stream site, a padded conv's input, a norm without affine) cannot
be folded exactly: :func:`can_fold` says False and :func:`fold_correction` raises.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import MergelabError
from ..stats.sites import CONV, Site


def _affine_norm(m: nn.Module) -> bool:
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return m.affine
    if isinstance(m, nn.GroupNorm):
        return m.affine
    if isinstance(m, nn.LayerNorm):
        return (m.elementwise_affine and len(m.normalized_shape) == 1 and m.weight is not None
                and m.bias is not None)
    return False


def why_not_foldable(model: nn.Module, site: Site) -> str | None:
    """None if the site's correction can be folded, else the reason."""
    m = model.get_submodule(site.module)
    if site.where == "output":
        if isinstance(m, nn.MultiheadAttention):
            return None
        if _affine_norm(m) or isinstance(m, (nn.Linear, CONV)):
            return None
        return f"output of a {type(m).__name__} (not a linear, conv or affine norm)"
    if isinstance(m, nn.Linear):
        return None
    if isinstance(m, CONV):
        pad = m.padding if isinstance(m.padding, tuple) else (m.padding,)
        if m.groups == 1 and (m.padding == "valid" or all(p == 0 for p in pad if isinstance(p, int))):
            return None
        return "input of a padded or grouped conv (the shift would leak into the padding)"
    return f"input of a {type(m).__name__} (not a linear or conv)"


def can_fold(model: nn.Module, site: Site) -> bool:
    return why_not_foldable(model, site) is None


def _set_bias(m: nn.Module, value: Tensor) -> None:
    if m.bias is None:
        m.bias = nn.Parameter(value.to(m.weight.dtype))
    else:
        m.bias.copy_(value)


@torch.no_grad()
def fold_correction(model: nn.Module, site: Site, a: Tensor, b: Tensor) -> None:
    """Fold ``y = a ⊙ x + b`` at ``site`` into the model's parameters, in place."""
    reason = why_not_foldable(model, site)
    if reason is not None:
        raise MergelabError(f"site '{site.name}': cannot fold the correction: {reason}")
    m = model.get_submodule(site.module)
    if isinstance(m, nn.MultiheadAttention):
        m = m.out_proj           # the attention's output is its out_proj's output
    w = m.weight
    a, b = a.to(w.dtype).to(w.device), b.to(w.dtype).to(w.device)
    if site.where == "output":
        if a.numel() != w.shape[0]:
            raise MergelabError(f"site '{site.name}': correction has {a.numel()} channels, "
                                f"layer has {w.shape[0]}")
        shape = (-1,) + (1,) * (w.ndim - 1)
        old_bias = m.bias.clone() if m.bias is not None else torch.zeros_like(a)
        w.mul_(a.view(shape))
        _set_bias(m, a * old_bias + b)
        return
    c_in = w.shape[1]
    if a.numel() != c_in:
        raise MergelabError(f"site '{site.name}': correction has {a.numel()} channels, "
                            f"layer input has {c_in}")
    old_bias = m.bias.clone() if m.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                     device=w.device)
    w_flat = w.reshape(w.shape[0], c_in, -1).sum(-1)          # (out, in): kernel summed
    new_bias = old_bias + w_flat @ b
    w.mul_(a.view((1, -1) + (1,) * (w.ndim - 2)))
    _set_bias(m, new_bias)
