"""Joint weight noise over a chain of matrix-variate layers (block-tridiagonal posterior).

A *chain* is a run of MVG ``BayesianLinear`` layers that are children of one ``nn.Sequential``,
in that order, separated only by parameter-free elementwise modules (``ELEMENTWISE``), with
``out_features`` of each layer equal to ``in_features`` of the next (``find_chains``). Its
posterior covariance is ``(lambda/N) F-hat^-1 = Xi^T Lambda Xi`` (docs/MATH.md, "Block-tridiagonal
Noisy K-FAC"); one joint draw is, layer by layer::

    u_i = U_i [ (E_i + P_i ((P_i^T E_i Q_i) * g_i) Q_i^T) * mid_scale ] V_i      E_i ~ N(0, I)
    w_1 = u_1,   w_{i+1} = u_{i+1} - link_out_i^T u_i link_in_i

``U_i``, ``mid_scale``, ``V_i`` are the layer's block-diagonal (factored) sampling sides
(``factor_roots()``: ``U = L_S^-T``, ``V = L_A^-1``, ``mid_scale = sqrt(lambda/N)``),
``P_i = cond_out`` and ``Q_i = cond_in`` the orthonormal singular vectors of the whitened cross
factors and ``g_i = cond_gain = 1/sqrt(1 - s2 s1^T) - 1``; the last layer of a chain has no
correction. All these *link* buffers live on the upstream layer of each link, start at zero (the
block-diagonal posterior) and are written by ``NoisyKFAC(structure="block_tridiagonal")``.

In sampling mode (``train()`` or ``models.weight_samples.sampling(model)``) a forward pre-hook on the
chain's first layer draws the joint noise and hands each layer its part (``StepNoise.joint``); the ``E_i``
are drawn in layer order with the layers' own shapes, so with zero links the draw is the
block-diagonal one, number for number.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from models.bayesian_layers import BayesianLinear, standard_normal

#: parameter-free elementwise modules that may sit between two layers of a chain
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Tanh,
               nn.Sigmoid, nn.Softplus, nn.Hardtanh, nn.Identity)

#: buffers a chain adds to the upstream layer of every link
LINK_BUFFERS = ("link_out", "link_in", "cond_out", "cond_in", "cond_gain")


def _is_mvg_linear(module: nn.Module) -> bool:
    return isinstance(module, BayesianLinear) and module.posterior == "MVG"


def find_chains(model: nn.Module) -> list[list[tuple[str, BayesianLinear]]]:
    """The model's chains of two or more MVG ``BayesianLinear`` layers (the rule in the module docstring)."""
    chains = []
    for prefix, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        run: list[tuple[str, BayesianLinear]] = []
        for name, child in parent.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if _is_mvg_linear(child):
                if run and run[-1][1].out_features == child.in_features:
                    run.append((full, child))
                    continue
                if len(run) > 1:
                    chains.append(run)
                run = [(full, child)]
            elif isinstance(child, ELEMENTWISE) and run:
                continue
            else:
                if len(run) > 1:
                    chains.append(run)
                run = []
        if len(run) > 1:
            chains.append(run)
    return chains


def _link_ranks(layer: BayesianLinear, nxt: BayesianLinear) -> tuple[int, int]:
    """Ranks of the cross factors of a link: ``(min(out_i, out_n), min(in_i', in_n'))``."""
    return min(layer.matrix_shape[0], nxt.matrix_shape[0]), min(layer.matrix_shape[1], nxt.matrix_shape[1])


class LayerChain:
    """The joint sampler of one chain (see the module docstring)."""

    def __init__(self, names: list[str], layers: list[BayesianLinear]) -> None:
        self.names, self.layers = names, layers
        for layer, nxt in zip(layers[:-1], layers[1:]):
            w = layer.weight
            (out, n_in), (out_n, in_n) = layer.matrix_shape, nxt.matrix_shape
            r_out, r_in = _link_ranks(layer, nxt)
            shapes = {"link_out": (out, out_n), "link_in": (n_in, in_n), "cond_out": (out, r_out),
                      "cond_in": (n_in, r_in), "cond_gain": (r_out, r_in)}
            for key in LINK_BUFFERS:
                layer.register_buffer(key, torch.zeros(shapes[key], dtype=w.dtype, device=w.device))
        for i, layer in enumerate(layers):
            layer.joint_variance = (lambda i=i: self.marginal_variance(i))
        layers[0].register_forward_pre_hook(self._pre_forward)

    @torch.no_grad()
    def set_link(self, i: int, link_out: Tensor, link_in: Tensor, cond_out: Tensor, cond_in: Tensor,
                 cond_gain: Tensor) -> None:
        """Write the coupling of layer ``i`` to layer ``i + 1`` (the optimizer's refresh)."""
        layer = self.layers[i]
        for key, value in zip(LINK_BUFFERS, (link_out, link_in, cond_out, cond_in, cond_gain)):
            getattr(layer, key).copy_(value)

    @torch.no_grad()
    def conditional_noise(self, i: int, eps: Tensor) -> Tensor:
        """``u_i`` (out x in') from standard normal ``eps`` (any leading batch dimensions)."""
        layer = self.layers[i]
        if i < len(self.layers) - 1:
            P, Q = layer.cond_out, layer.cond_in
            eps = eps + P @ ((P.T @ eps @ Q) * layer.cond_gain) @ Q.T
        out_root, in_root = layer.factor_roots()
        return in_root.right(out_root.left(eps * layer.mid_scale))

    @torch.no_grad()
    def noise_from(self, eps: list[Tensor]) -> list[Tensor]:
        """The joint noise matrices ``w_i`` (out x in', bias last) from standard normals ``eps[i]``."""
        u = [self.conditional_noise(i, e) for i, e in enumerate(eps)]
        w = [u[0]]
        for i in range(1, len(u)):
            prev = self.layers[i - 1]
            w.append(u[i] - prev.link_out.T @ u[i - 1] @ prev.link_in)
        return w

    @torch.no_grad()
    def draw(self, batch_shape: tuple[int, ...] = (),
             generator: torch.Generator | None = None) -> list[tuple[Tensor, Tensor | None]]:
        """One joint draw (or ``batch_shape`` of them): ``(weight_noise, bias_noise)`` per layer (the global RNG or
        ``generator``)."""
        eps = [standard_normal((*batch_shape, *layer.mid_scale.shape), layer.mid_scale, generator)
               for layer in self.layers]
        return [_split(layer, m) for layer, m in zip(self.layers, self.noise_from(eps))]

    def _pre_forward(self, module: nn.Module, inputs: tuple) -> None:
        if module.fixed_noise is not None or not (module.training or module.sample_in_eval):
            return
        for layer, noise in zip(self.layers, self.draw()):
            layer.step_noise.joint = noise

    @torch.no_grad()
    def marginal_variance(self, i: int) -> Tensor:
        """``Var[w_i]`` entrywise (out x in'): ``Var[u_i] + Var[link_out^T u_{i-1} link_in]`` (independent u)."""
        var = self._variance(i, *self._sides(i))
        if i > 0:
            prev = self.layers[i - 1]
            U, V = self._sides(i - 1)
            var = var + self._variance(i - 1, prev.link_out.T @ U, V @ prev.link_in)
        return var

    def _sides(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer i's noise sides ``U``, ``V`` (of ``U (E * R) V``) as dense matrices."""
        out_root, in_root = self.layers[i].factor_roots()
        return out_root.dense(left=True), in_root.dense(left=False)

    def _variance(self, i: int, left: Tensor, right: Tensor) -> Tensor:
        """Entrywise variance of ``left Z right`` where ``Z`` is layer i's whitened-and-scaled noise."""
        layer = self.layers[i]
        var = left.square() @ layer.mid_scale.square() @ right.square()
        if i < len(self.layers) - 1:
            g = layer.cond_gain
            extra = layer.mid_scale.square().mean() * ((1 + g).square() - 1)
            var = var + (left @ layer.cond_out).square() @ extra @ (right.T @ layer.cond_in).square().T
        return var


def _split(layer: BayesianLinear, m: Tensor) -> tuple[Tensor, Tensor | None]:
    if layer.bias is None:
        return m, None
    return m[..., :-1], m[..., -1]


def chains_of(model: nn.Module) -> list[LayerChain]:
    """The chains :func:`attach_chains` gave ``model`` (none if it was not called)."""
    return model.__dict__.get("_joint_chains", [])


def attach_chains(model: nn.Module) -> list[LayerChain]:
    """Give every chain of ``model`` its joint sampler and link buffers (idempotent)."""
    existing = model.__dict__.get("_joint_chains")
    if existing is not None:
        return existing
    chains = [LayerChain([n for n, _ in c], [m for _, m in c]) for c in find_chains(model)]
    model.__dict__["_joint_chains"] = chains
    return chains
