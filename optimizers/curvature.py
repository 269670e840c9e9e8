"""Curvature capture with hooks: per-example squared gradients and Kronecker factors, written once for every
optimizer (docs/MATH.md, "Curvature capture").

A forward hook on each layer with a curvature rule (``optimizers.curvature_rules``) keeps what its rule needs
(for ``nn.Linear`` / ``nn.Conv2d`` the input ``a``); a tensor hook on its output receives ``G = dL/ds``, the
gradient of the (mean-reduced) mini-batch loss w.r.t. the pre-activations, and adds the rule's statistic.

The hooks sit on the modules themselves, so any graph works (residual blocks, skips, modules outside
``nn.Sequential``); a module called twice in one forward pass (weight sharing) would get one
statistic per call instead of the statistic of the summed gradient, so it stops with a
``ValueError`` naming it. Parameter-free layers in between (ReLU, pooling, flatten, dropout)
need nothing: the hooks see whatever gradient flows through them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optimizers.curvature_rules import is_norm_layer, kfac_cross_factors, rule_for, supported_layers

LossFn = Callable[[Tensor, Tensor], Tensor]


class CurvatureCapture:
    """Hooks that accumulate a curvature statistic on backward passes through a model.

    ``kind`` is ``"diag"`` (squared per-example gradients per parameter), ``"kfac"`` (``(A, S)``
    per layer) or ``"none"`` (only count). Every ordinary backward pass is counted in
    ``passes[module]``: several Monte-Carlo samples (forward/backward pairs) before one
    optimizer step are averaged by the consumer. Statistics are added to ``stats[module]``
    while ``active`` (K-FAC switches it off on steps that take no statistics); with
    ``fisher="true"`` they come only from the sampled-label pass (``sampled_label_backward``),
    with ``"example"`` (the empirical Fisher: the data's labels) from the ordinary passes. The loss
    is assumed to be the *mean* over the batch of per-example losses.

    A layer's input is held from its forward pass until the first ordinary backward pass through it
    (the sampled-label pass, which comes first, uses it too), not as long as the graph lives: held
    longer, every layer's input would stay allocated until the next step, and the allocator would return
    and page-fault that memory at each step. A second ordinary backward through a retained graph is
    counted but adds no statistic.
    """

    def __init__(self, model: nn.Module, kind: str, fisher: str = "example") -> None:
        if kind not in ("diag", "kfac", "none"):
            raise ValueError(f"kind must be 'diag', 'kfac' or 'none', got {kind!r}")
        if fisher not in ("example", "true"):
            raise ValueError(f"fisher must be 'example' (the data's labels) or 'true' (sampled labels), got {fisher!r}")
        self.kind = kind
        self.fisher = fisher
        self.layers = supported_layers(model)
        self.active = kind != "none"
        #: ``(s, j)``: convolutions take their K-FAC ``A`` from output-location grid j of stride s (None: all)
        self.locations: tuple[int, int] | None = None
        self.in_sampled_pass = False
        self.stats: dict[nn.Module, list[Tensor | None]] = {}
        self.counts: dict[nn.Module, int] = {}
        self.passes: dict[nn.Module, int] = {}
        self.names = {m: n for n, m in self.layers}
        self.rules = {m: rule_for(m) for _, m in self.layers}
        self._called: set[nn.Module] | None = None  # modules run so far in the current forward of ``model``
        # cross factors of adjacent layers (K-FAC only): upstream -> downstream, and the
        # downstream layer's (a, g) kept until the upstream one's gradient arrives in the same pass
        self.cross_next: dict[nn.Module, nn.Module] = {}
        self.cross_stats: dict[nn.Module, list[Tensor]] = {}
        self.cross_counts: dict[nn.Module, int] = {}
        self._held: dict[nn.Module, tuple[Tensor, Tensor]] = {}
        self._holds: set[nn.Module] = set()
        self._handles = [m.register_forward_hook(self._forward_hook) for _, m in self.layers]
        self._handles += [model.register_forward_pre_hook(self._start_pass),
                          model.register_forward_hook(self._end_pass, always_call=True)]

    def _start_pass(self, model: nn.Module, inputs: tuple) -> None:
        self._called = set()

    def _end_pass(self, model: nn.Module, inputs: tuple, output: object) -> None:
        self._called = None

    def _forward_hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return
        if self._called is not None:
            if module in self._called:
                self._called = None
                raise ValueError(f"layer {self.names[module]!r} ({type(module).__name__}) is called more than "
                                 "once in one forward pass (shared weights); per-example curvature of a shared "
                                 "layer is not supported: give each use its own layer")
            self._called.add(module)
        saved = [None]  # emptied by the ordinary backward pass, so the graph does not keep the input alive
        if self.kind != "none" and self.active:
            saved[0] = self.rules[module].saved_input(module, inputs[0].detach(), output)
        output.register_hook(lambda g: self._on_grad(module, saved, g))

    @torch.no_grad()
    def _on_grad(self, module: nn.Module, saved: list, g: Tensor) -> None:
        a = saved[0]
        if not self.in_sampled_pass:
            self.passes[module] = self.passes.get(module, 0) + 1
            saved[0] = None
        if a is None or not self.active or self.in_sampled_pass != (self.fisher == "true"):
            return
        rule = self.rules[module]
        fn = rule.diag if self.kind == "diag" else rule.kfac
        if self.locations is not None and self.kind == "kfac" and isinstance(module, nn.Conv2d):
            new = fn(module, a, g.detach(), float(g.shape[0]), self.locations)
        else:
            new = fn(module, a, g.detach(), float(g.shape[0]))
        if self.cross_next:
            self._on_cross(module, a, g.detach())
        old = self.stats.get(module)
        if old is None:
            self.stats[module] = list(new)
            self.counts[module] = 1
        else:
            for acc, x in zip(old, new):
                if acc is not None:
                    acc += x
            self.counts[module] += 1

    def track_pairs(self, pairs: list[tuple[nn.Module, nn.Module]]) -> None:
        """Also accumulate the cross factors (``kfac_cross_factors``) of these adjacent layer pairs."""
        if self.kind != "kfac":
            raise ValueError("cross factors need kind='kfac'")
        self.cross_next.update(dict(pairs))
        self._holds.update(n for _, n in pairs)

    def _on_cross(self, module: nn.Module, a: Tensor, g: Tensor) -> None:
        # the downstream layer's gradient arrives first (the upstream one's is computed from it)
        nxt = self.cross_next.get(module)
        held = self._held.pop(nxt, None) if nxt is not None else None
        if module in self._holds:
            self._held[module] = (a, g)
        if held is None:
            return
        new = kfac_cross_factors(module, a, g, nxt, *held, float(a.shape[0]))
        old = self.cross_stats.get(module)
        if old is None:
            self.cross_stats[module], self.cross_counts[module] = list(new), 1
        else:
            for acc, x in zip(old, new):
                acc += x
            self.cross_counts[module] += 1

    def pop_cross(self, module: nn.Module) -> list[Tensor] | None:
        """The mean cross factors ``(A_cross, G_cross)`` of ``module`` and its downstream layer since the last pop."""
        stat = self.cross_stats.pop(module, None)
        if stat is None:
            return None
        n = self.cross_counts.pop(module)
        return stat if n == 1 else [s / n for s in stat]

    def pop(self, module: nn.Module) -> list[Tensor | None] | None:
        """The mean statistic of ``module`` over the backward passes since the last pop."""
        stat = self.stats.pop(module, None)
        if stat is None:
            return None
        n = self.counts.pop(module)
        return stat if n == 1 else [s / n if s is not None else None for s in stat]

    def pop_passes(self, module: nn.Module) -> int:
        """How many ordinary backward passes reached ``module`` since the last call (at least 1)."""
        return max(1, self.passes.pop(module, 0))

    def sampled_label_backward(self, logits: Tensor, params: list[Tensor]) -> None:
        """Record the statistic from a backward at labels drawn from the model's predictive.

        The "true" Fisher (docs/MATH.md, "Curvature capture"): the parameter gradients of this pass are returned by
        ``autograd.grad`` and dropped, so ``.grad`` is untouched, and the graph is retained
        for the ordinary backward that follows.
        """
        with torch.no_grad():
            y = torch.multinomial(F.softmax(logits.detach().float(), dim=-1), 1).squeeze(-1)
        self.in_sampled_pass = True
        try:
            torch.autograd.grad(F.cross_entropy(logits, y), [p for p in params if p.requires_grad],
                                retain_graph=True, allow_unused=True)
        finally:
            self.in_sampled_pass = False

    def clear(self) -> None:
        self.stats.clear()
        self.counts.clear()
        self.passes.clear()
        self.cross_stats.clear()
        self.cross_counts.clear()
        self._held.clear()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _capture_once(model: nn.Module, kind: str, inputs: Tensor, targets: Tensor,
                  loss_fn: LossFn) -> tuple[CurvatureCapture, dict]:
    capture = CurvatureCapture(model, kind)
    try:
        loss = loss_fn(model(inputs), targets)
        torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
        return capture, {m: capture.pop(m) for _, m in capture.layers}
    finally:
        capture.remove()


def sum_grad_squared(model: nn.Module, inputs: Tensor, targets: Tensor,
                     loss_fn: LossFn = F.cross_entropy) -> dict[str, Tensor]:
    """For every parameter name, ``mean_i (dL_i/dtheta)**2`` over the batch (one forward + backward).

    ``loss_fn(outputs, targets)`` must be the mean of the per-example losses. ``.grad`` is not touched.
    """
    capture, stats = _capture_once(model, "diag", inputs, targets, loss_fn)
    out = {}
    for name, module in capture.layers:
        stat = stats[module]
        if stat is None:
            continue
        prefix = f"{name}." if name else ""
        out[prefix + "weight"] = stat[0]
        if stat[1] is not None:
            out[prefix + "bias"] = stat[1]
    return out


def kronecker_factors(model: nn.Module, inputs: Tensor, targets: Tensor,
                      loss_fn: LossFn = F.cross_entropy) -> dict[str, tuple[Tensor, Tensor]]:
    """For every Linear/Conv2d module name, the K-FAC factors ``(A, S)`` of one batch (empirical Fisher).

    Normalisation layers have no Kronecker factors (their diagonal statistic: ``sum_grad_squared``).
    """
    capture, stats = _capture_once(model, "kfac", inputs, targets, loss_fn)
    return {name: (stats[m][0], stats[m][1]) for name, m in capture.layers
            if stats[m] is not None and not is_norm_layer(m)}
