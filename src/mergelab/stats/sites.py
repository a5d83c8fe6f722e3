"""Sites: the places in a model where activation statistics are taken (and corrected).

A site is a module's output (``"encoder.0"``), or a module's first input
(``"classifier:input"``).  The channel axis is 1 for convs and channel-first norms
(BatchNorm, GroupNorm, InstanceNorm) and the last axis for linears and LayerNorm, unless the
tensor's shape says otherwise (a LayerNorm applied to ``(N, C, H, W)`` over ``C``) or the user
gives ``Site(name, channel_dim=...)``.

Default sites (:func:`discover_sites`), in module order, never inside the head:

* every norm layer's output (BatchNorm / LayerNorm / GroupNorm), i.e. the output of a
  conv/linear + norm block, and in a post-LN transformer the block outputs;
* every Linear/Conv output not feeding only a norm (found by ``torch.fx`` tracing, or, for
  models that do not trace such as Hugging Face ones, by ``nn.Sequential`` order): MLP
  intermediates before the activation, attention projections, pooler dense;
* the head's input, the final features (``"<head>:input"``);
* an ``nn.MultiheadAttention``'s output (its ``out_proj``'s output: the module calls the
  projection functionally, so ``out_proj`` itself never runs and is not a site).

Sites are where data flows: given a ``probe`` (one forward pass, see :func:`probe_batch`),
default sites whose module never runs (weights used functionally, e.g. a fused qkv projection
called through ``F.linear``) are left out.

Every default site can be folded into a layer (see ``mergelab.repair.fold``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

from torch import Tensor, nn

from ..errors import MergelabError

CONV = nn.modules.conv._ConvNd
NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_CHANNEL_FIRST = (CONV, nn.modules.batchnorm._BatchNorm, nn.GroupNorm,
                  nn.modules.instancenorm._InstanceNorm)


@dataclass(frozen=True)
class Site:
    module: str                  # dotted module name
    where: str = "output"        # "output" or "input"
    channel_dim: int | None = None

    @property
    def name(self) -> str:
        return self.module if self.where == "output" else f"{self.module}:input"

    @staticmethod
    def parse(s: "str | Site") -> "Site":
        if isinstance(s, Site):
            return s
        if s.endswith(":input"):
            return Site(s[: -len(":input")], "input")
        if s.endswith(":output"):
            return Site(s[: -len(":output")])
        return Site(s)


def n_channels(module: nn.Module, where: str) -> int | None:
    """The channel count the module produces (output) or expects (input), if known."""
    if isinstance(module, nn.Linear):
        return module.out_features if where == "output" else module.in_features
    if isinstance(module, CONV):
        return module.out_channels if where == "output" else module.in_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    if isinstance(module, nn.LayerNorm):
        return module.normalized_shape[-1]
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.MultiheadAttention):
        return module.embed_dim
    return None


def channel_dim(site: Site, module: nn.Module, x: Tensor) -> int:
    """The channel axis (non-negative) of the tensor seen at ``site``.

    Explicit ``Site.channel_dim`` first; then the module's channel count when it picks one
    axis; then the module's kind (convs and channel-first norms: axis 1; linears and
    LayerNorm: the last axis; a 3-D tensor of another module: ``(N, T, C)`` token features,
    the last axis).  A tensor of 4 or more axes from a module of unknown kind is an error
    naming the site, never a guess."""
    if site.channel_dim is not None:
        if not -x.ndim <= site.channel_dim < x.ndim:
            raise MergelabError(f"site '{site.name}': channel_dim {site.channel_dim} is out of range "
                                f"for a tensor of shape {tuple(x.shape)}")
        return site.channel_dim % x.ndim
    if x.ndim <= 2:
        return x.ndim - 1
    n = n_channels(module, site.where)
    if n is not None and x.shape[1] == n and x.shape[-1] != n:
        return 1
    if n is not None and x.shape[-1] == n and x.shape[1] != n:
        return x.ndim - 1
    if isinstance(module, _CHANNEL_FIRST):
        return 1
    if n is not None or x.ndim == 3:
        return x.ndim - 1
    raise MergelabError(f"site '{site.name}': cannot tell the channel axis of a {tuple(x.shape)} "
                        f"tensor from a {type(module).__name__}; expected a conv/norm/linear module "
                        f"or an explicit Site('{site.module}', '{site.where}', channel_dim=...)")


def find_head(model: nn.Module, head: str | None = "auto") -> str | None:
    """The head's module name: given, ``None`` for no head, or ``"auto"``: the last nn.Linear."""
    if head is None:
        return None
    names = dict(model.named_modules())
    if head == "auto":
        linears = [n for n, m in names.items() if isinstance(m, nn.Linear)]
        return linears[-1] if linears else None
    if head not in names:
        raise MergelabError(f"head: model has no module named '{head}'")
    return head


def _inside(name: str, prefix: str | None) -> bool:
    return prefix is not None and (name == prefix or name.startswith(prefix + "."))


def _feeds_norm_fx(model: nn.Module) -> set[str] | None:
    """Linear/conv modules whose output goes only into a norm, by torch.fx tracing (None if
    the model does not trace, e.g. Hugging Face models with data-dependent code)."""
    import torch.fx

    class _Tracer(torch.fx.Tracer):           # norm / linear / conv subclasses stay leaves
        def is_leaf_module(self, m, qualname):
            return isinstance(m, NORMS + (nn.Linear, CONV)) or super().is_leaf_module(m, qualname)

    try:
        graph = _Tracer().trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure: fall back to nn.Sequential order
        return None
    mods = dict(model.named_modules())
    out = set()
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), (nn.Linear, CONV)):
            users = list(node.users)
            if (len(users) == 1 and users[0].op == "call_module"
                    and isinstance(mods.get(users[0].target), NORMS)):
                out.add(node.target)
    return out


def _called_modules(model: nn.Module, probe: Callable[[], Any]) -> set[str]:
    """Names of the modules whose forward runs during ``probe()``."""
    called: set[str] = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: called.add(n))
               for n, m in model.named_modules()]
    try:
        probe()
    finally:
        for h in handles:
            h.remove()
    return called


def discover_sites(model: nn.Module, head: str | None = "auto",
                   probe: Callable[[], Any] | None = None) -> list[Site]:
    """Default sites of a model, in module-registration order (see the module docstring).

    With ``probe`` (a function running one forward pass), only modules that actually run are
    sites."""
    head = find_head(model, head)
    feeds_norm = _feeds_norm_fx(model)
    called = _called_modules(model, probe) if probe is not None else None
    sites: list[Site] = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, nn.MultiheadAttention):
            continue                 # out_proj runs functionally inside: the MHA output is the site
        children = list(parent.named_children())
        for i, (cname, child) in enumerate(children):
            name = f"{parent_name}.{cname}" if parent_name else cname
            if _inside(name, head) or (called is not None and name not in called):
                continue
            if isinstance(child, nn.MultiheadAttention):
                sites.append(Site(name))
            elif isinstance(child, NORMS):
                sites.append(Site(name))
            elif isinstance(child, (nn.Linear, CONV)):
                nxt = children[i + 1][1] if i + 1 < len(children) else None
                if feeds_norm is not None:
                    direct = name in feeds_norm
                else:
                    direct = isinstance(parent, nn.Sequential) and isinstance(nxt, NORMS)
                if not direct:
                    sites.append(Site(name))
    if head is not None:
        sites.append(Site(head, "input"))
    return sites


def probe_batch(model: nn.Module, data: Iterable[Any]) -> tuple[Callable[[], Any] | None, Iterable[Any]]:
    """``(probe, data)``: a function running the model on the first batch of ``data`` (None
    if there is none), and ``data`` to iterate afterwards (the same object, or, for a one-shot
    iterator, one that yields the peeked batch first)."""
    import itertools

    import torch

    from .batch import call_model, model_device, split_batch, to_device
    it = iter(data)
    first = next(it, None)
    if it is data:                       # a one-shot iterator: put the batch back in front
        data = itertools.chain([] if first is None else [first], it)
    if first is None:
        return None, data
    inputs = to_device(split_batch(first)[0], model_device(model))

    def probe():
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                call_model(model, inputs)
        finally:
            model.train(was)
    return probe, data


def resolve_sites(model: nn.Module, sites: Iterable[str | Site] | None,
                  head: str | None = "auto", probe: Callable[[], Any] | None = None) -> list[Site]:
    """Sites as :class:`Site` objects, checked against the model's modules (default sites:
    :func:`discover_sites`, with ``probe`` the ones that run)."""
    if sites is None:
        out = discover_sites(model, head, probe)
    else:
        out = [Site.parse(s) for s in sites]
    names = dict(model.named_modules())
    for s in out:
        if s.module not in names:
            raise MergelabError(f"site '{s.name}': model has no module named '{s.module}'")
        if s.where not in ("output", "input"):
            raise MergelabError(f"site '{s.name}': where must be 'output' or 'input', found '{s.where}'")
    if len({s.name for s in out}) != len(out):
        raise MergelabError("sites: a site is named twice")
    if not out:
        raise MergelabError("sites: the model has no linear, conv or norm layer to take statistics at")
    return out


# A site callback receives (site, tensor, channel_dim) and returns a replacement tensor or None.
SiteFn = Callable[[Site, Tensor, int], "Tensor | None"]


class StopForward(Exception):
    """Raised by a site callback to end a forward pass early (the pass needs nothing later)."""


@contextlib.contextmanager
def hooked(model: nn.Module, sites: Sequence[Site], fn: SiteFn) -> Iterator[None]:
    """Attach ``fn`` at every site for the duration of the block."""
    modules = dict(model.named_modules())
    handles = []

    def out_hook(site):
        def hook(module, args, output):
            x = output[0] if isinstance(output, (tuple, list)) else output
            if not isinstance(x, Tensor):
                raise MergelabError(f"site '{site.name}': module output is not a tensor")
            y = fn(site, x, channel_dim(site, module, x))
            if y is None:
                return None
            if isinstance(output, tuple):
                return (y,) + tuple(output[1:])
            if isinstance(output, list):
                return [y] + list(output[1:])
            return y
        return hook

    def in_hook(site):
        def hook(module, args, kwargs):
            if args and isinstance(args[0], Tensor):
                x = args[0]
                y = fn(site, x, channel_dim(site, module, x))
                return None if y is None else ((y,) + tuple(args[1:]), kwargs)
            raise MergelabError(f"site '{site.name}': module's first positional input is not a tensor")
        return hook

    try:
        for s in sites:
            m = modules.get(s.module)
            if m is None:
                raise MergelabError(f"site '{s.name}': model has no module named '{s.module}'")
            if s.where == "output":
                handles.append(m.register_forward_hook(out_hook(s)))
            else:
                handles.append(m.register_forward_pre_hook(in_hook(s), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


def forward_order(model: nn.Module, sites: Sequence[Site], run: Callable[[], Any]) -> list[Site]:
    """The sites in the order they fire during ``run()`` (sites that never fire: an error)."""
    seen: list[Site] = []

    def fn(site, x, dim):
        if site not in seen:
            seen.append(site)
        return None

    with hooked(model, sites, fn):
        run()
    missing = [s.name for s in sites if s not in seen]
    if missing:
        raise MergelabError(f"sites never reached in a forward pass: {', '.join(missing)}")
    return seen
