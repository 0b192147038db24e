"""Least-squares compensation: the weights a pruned layer keeps are refit so that it reproduces the dense layer.

Pure torch in fp64 on the second moments of minigpt.stats (no forward pass, no Ray). Four pieces:

* `ridge_refit`: an output projection W [d, m] keeps the inputs S. With G = sum x x^T over calibration tokens,
      W'_S = (W G[:, S] + lam W_S) (G[S, S] + lam I)^-1,   lam = damp * mean(diag G)
  minimises sum |W x - W'_S x_S|^2 + lam |W'_S - W_S|^2: the ridge pulls toward the original weights, so keeping
  every input returns W exactly and an input never active on the calibration data keeps its weight. A bias is
  refit as the weight of a constant input (the Gram matrix is augmented with sum x and the token count).
* `obs_order`: structured Optimal Brain Surgeon (SlimGPT, ZipLM) on H = G + lam I. Removing the unit Q (a column,
  or a group of columns such as the query heads of a KV group) costs tr(W_Q [H^-1]_QQ^-1 W_Q^T); the rest is updated
  by W -= W_Q [H^-1]_QQ^-1 [H^-1]_Q,: and H^-1 is down-dated the same way. Greedy removal of the cheapest units gives
  the pruning order; the weights it ends with are exactly `ridge_refit` on the units left (the same objective), so
  OBS is a way to *choose* what is kept and the refit is shared by every method.
* `corrected`: the full-width projection refit toward the *dense model's stream* rather than the layer's own
  output: what sequential pruning uses with `prune.refit_target: stream` to undo the drift earlier pruned layers
  left in the residual stream (minigpt.sequential).
* `replacement`: depth with replacement (ReplaceMe). When the layers k+1..k+n are dropped, one linear map T on
  block k's MLP output a stands in for them: T = (A + lam I)^-1 (C + lam I) with A = sum a^T a and
  C = sum a^T b (minigpt.stats, depth_*), ridge toward T = I (plain dropping). T is folded into block k's output
  projection, so no module is added and the checkpoint stays stock.

`compensation(model, plan, stats)` turns a plan and a profile into new values for the kept layers' output
projections, in the dense model's shapes (removed columns zero), for minigpt.slim to cut like any other weight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from minigpt.models import (arch_of, check_replacement, decoder_layers, kv_coupling, mlp_coupling, q_coupling,
                            unit_index, widths)


class RefitError(ValueError):
    """A profile lacks the statistics a compensated plan needs."""


def _ridge(G: torch.Tensor, damp: float) -> float:
    """The ridge lam = damp * mean(diag G) of a whole Gram matrix: one value for every selection from it."""
    mean = float(G.diagonal().mean()) if G.numel() else 0.0
    return damp * mean if mean > 0 else damp


def _damped(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    lam = _ridge(H, damp)
    return H + lam * torch.eye(H.shape[0], dtype=H.dtype, device=H.device), lam


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """Cholesky factor; a Gram matrix that is only semi-definite in floating point gets a little more damping."""
    jitter = 0.0
    scale = float(H.diagonal().abs().mean()) or 1.0
    for _ in range(8):
        L, info = torch.linalg.cholesky_ex(H + jitter * torch.eye(H.shape[0], dtype=H.dtype, device=H.device))
        if int(info) == 0:
            return L
        jitter = scale * (1e-10 if jitter == 0 else jitter / scale * 100)
    raise torch.linalg.LinAlgError("Gram matrix is not positive definite even with extra damping")


def _augment(W: torch.Tensor, G: torch.Tensor, bias: torch.Tensor, x_sum: torch.Tensor, count: float):
    """A bias is the weight of a constant input 1: append it as column m, and sum x / the count to G."""
    m = W.shape[1]
    Wa = torch.cat([W, bias.reshape(-1, 1)], 1)
    Ga = torch.zeros(m + 1, m + 1, dtype=G.dtype)
    Ga[:m, :m], Ga[:m, m], Ga[m, :m], Ga[m, m] = G, x_sum, x_sum, count
    return Wa, Ga


def ridge_refit(W: torch.Tensor, G: torch.Tensor, keep: Sequence[int] | torch.Tensor, damp: float = 0.01, *,
                bias: torch.Tensor | None = None, x_sum: torch.Tensor | None = None, count: float = 0.0
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W'_S [d, |S|], refit bias or None) for a projection W [d, m] that keeps the inputs `keep`.

    See the module docstring. All maths in fp64; returns fp64 tensors.
    """
    W, G = W.detach().double(), G.double()
    keep = torch.as_tensor(list(keep) if not torch.is_tensor(keep) else keep, dtype=torch.long)
    m = W.shape[1]
    lam = _ridge(G, damp)
    if bias is not None:
        if x_sum is None or count <= 0:
            raise RefitError("refitting a bias needs the input's sum and token count")
        W, G = _augment(W, G, bias.double(), x_sum.double(), float(count))
        keep = torch.cat([keep, torch.tensor([m])])
    # Inputs never active on the calibration data: nothing to fit, they keep their weights.
    live = keep[G.diagonal()[keep] > 0]
    out = W[:, keep].clone()
    if live.numel():
        H = G[live][:, live] + lam * torch.eye(live.numel(), dtype=G.dtype)
        rhs = W @ G[:, live] + lam * W[:, live]
        fitted = torch.cholesky_solve(rhs.T, _cholesky(H)).T
        pos = {int(k): i for i, k in enumerate(keep)}
        out[:, [pos[int(k)] for k in live]] = fitted
    if bias is not None:
        return out[:, :-1], out[:, -1]
    return out, None


def corrected(W: torch.Tensor, G: torch.Tensor, E: torch.Tensor, damp: float = 0.01, *,
              bias: torch.Tensor | None = None, x_sum: torch.Tensor | None = None, count: float = 0.0,
              e_sum: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W* [d, m], b* or None): the full-width projection that makes the stream downstream of it match a target.

    The projection's output y = W x + b joins a stream that is off its target by e on each token (e = the dense
    model's stream minus the partly pruned model's, after this layer). With E = sum e x^T (and e_sum = sum e),
        W* = argmin sum |W x + b + e - W' x - b'|^2 + lam |W' - W|^2 = (W G + E + lam W) (G + lam I)^-1,
    the ridge as in `ridge_refit`. The pruned fit toward that target is then `obs_order` / `ridge_refit` on
    (W*, G): the objective differs from the target's by a constant, so the same channel choice and refit apply.
    e = 0 gives W back exactly."""
    W, G, E = W.detach().double(), G.double(), E.double()
    lam = _ridge(G, damp)
    m = W.shape[1]
    if bias is not None:
        if x_sum is None or e_sum is None or count <= 0:
            raise RefitError("correcting a biased projection needs the input's sum, the error's sum and a count")
        W, G = _augment(W, G, bias.double(), x_sum.double(), float(count))
        E = torch.cat([E, e_sum.double().reshape(-1, 1)], 1)
    H = G + lam * torch.eye(G.shape[0], dtype=G.dtype)
    out = torch.cholesky_solve((W @ G + E + lam * W).T, _cholesky(H)).T
    return (out[:, :m], out[:, m]) if bias is not None else (out, None)


def obs_order(W: torch.Tensor, G: torch.Tensor, group: int = 1, damp: float = 0.01, *, remove: int | None = None,
              batch: int = 1, candidates: Sequence[int] | None = None) -> tuple[list[int], list[float]]:
    """Structured OBS: (units in the order greedy OBS removes them, cumulative error after each removal).

    Units are `group` consecutive columns of W [d, m]. `remove` stops after that many units (default: all but one);
    `batch` > 1 removes that many of the cheapest units per step with one joint (exact) update, which is faster and
    slightly less greedy. The error is sum over tokens of |W x - W' x|^2 + lam |W - W'|^2 (the objective).
    `candidates` limits which units may be removed (the others stay and absorb the compensation).
    """
    W, G = W.detach().double().clone(), G.double()
    m = W.shape[1]
    if m % group:
        raise ValueError(f"{m} columns do not split into units of {group}")
    units = m // group
    allowed = set(range(units) if candidates is None else candidates)
    remove = min(len(allowed) - (candidates is None), units - 1 if remove is None else remove)
    H, _ = _damped(G, damp)
    Hinv = torch.cholesky_inverse(_cholesky(H))
    # W and Hinv keep their full size and are updated in place: a removed unit's columns (and Hinv's rows and
    # columns) become exactly zero and are masked out of the choice, which costs one rank-|Q| update per step
    # instead of copying both matrices down to the units left.
    cols = torch.arange(m).reshape(units, group)
    pickable = torch.zeros(units, dtype=torch.bool)
    pickable[list(allowed)] = True
    order: list[int] = []
    errors: list[float] = []
    total = 0.0
    while len(order) < remove:
        if group == 1:
            cost = W.square().sum(0) / Hinv.diagonal()
        else:
            blocks = Hinv[cols[:, :, None], cols[:, None, :]]  # [units, g, g]
            blocks[~pickable] = torch.eye(group, dtype=blocks.dtype)  # removed units: zero blocks, never picked
            Wq = W[:, cols].permute(1, 0, 2)  # [units, d, g]
            cost = (Wq @ torch.linalg.inv(blocks) * Wq).sum((1, 2))
        cost = torch.where(pickable, cost, torch.full_like(cost, float("inf")))
        k = min(batch, remove - len(order))
        pick = torch.topk(cost, k, largest=False).indices.sort().values
        Q = cols[pick].reshape(-1)
        Binv = torch.linalg.inv(Hinv[Q][:, Q])
        # Joint cost of removing the batch (equals cost[pick] when k == 1).
        total += float((W[:, Q] @ Binv * W[:, Q]).sum())
        left = Binv @ Hinv[Q, :]
        W.addmm_(W[:, Q], left, alpha=-1)
        Hinv.addmm_(Hinv[:, Q], left, alpha=-1)
        W[:, Q] = 0  # exactly (the update leaves rounding residue there)
        Hinv[Q, :] = 0
        Hinv[:, Q] = 0
        pickable[pick] = False
        for p in pick.tolist():
            order.append(p)
            errors.append(total)
    return order, errors


def replacement(A: torch.Tensor, C: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """T [D, D] minimising sum |a T - b|^2 + lam |T - I|^2 given A = sum a^T a and C = sum a^T b."""
    A, C = A.double(), C.double()
    H, lam = _damped(A, damp)
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    return torch.cholesky_solve(C + lam * eye, _cholesky(H))


def replacement_error(A: torch.Tensor, C: torch.Tensor, bsq: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """sum over tokens of (a T - b)_d^2 for every output channel d, from the sums alone (bsq = sum b^2 per channel):
    bsq_d - 2 (T^T C)_dd + (T^T A T)_dd."""
    T = T.double()
    return bsq.double() - 2 * (T * C.double()).sum(0) + (T * (A.double() @ T)).sum(0)


# ------------------------------------------------------------------------------------ model glue


def _require(stats: Mapping[str, torch.Tensor], *names: str) -> None:
    missing = [n for n in names if n not in stats]
    if missing:
        raise RefitError(f"the profile has no {', '.join(missing)}: calibrate with the statistics compensation "
                         "needs (prune.reconstruct true, or a method that needs them), or set prune.reconstruct false")


def _as_out_in(weight: torch.Tensor, conv1d: bool) -> torch.Tensor:
    """Weights as [out, in] (GPT-2's Conv1D stores [in, out])."""
    return weight.T if conv1d else weight


def runs(dropped: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive dropped layers as (first, length)."""
    out: list[tuple[int, int]] = []
    for i in sorted(dropped):
        if out and out[-1][0] + out[-1][1] == i:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((i, 1))
    return out


@torch.no_grad()
def layer_compensation(model: nn.Module, index: int, mlp_keep: Sequence[int] | None,
                       kv_keep: Sequence[int] | None, stats: Mapping[str, torch.Tensor], damp: float,
                       reconstruct: bool = True, q_keep: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """New values (dense shapes, fp64) of layer `index`'s output projections for the kept MLP channels / KV groups /
    query heads (None: all kept; q_keep, when given, names the attention columns kept): refit on the layer's rows of
    `stats` (`mlp_gram`, `attn_gram` and their sums), or, with reconstruct=False, the original weights with the
    removed columns zeroed (the mask)."""
    arch = arch_of(model)
    w = widths(model)
    layer = decoder_layers(model)[index]
    count = float(stats["tokens"].item())
    out: dict[str, torch.Tensor] = {}
    parts = [(arch.mlp_out, next(c for c in mlp_coupling(model) if c.output), w["intermediate"], mlp_keep,
              "mlp_gram", "mlp_sum")]
    if arch.qkv is not None and q_keep is not None:
        parts.append((arch.attn_out, next(c for c in q_coupling(model) if c.output), w["heads"], q_keep,
                      "attn_gram", "attn_sum"))
    elif arch.qkv is not None:
        parts.append((arch.attn_out, next(c for c in kv_coupling(model) if c.output), w["kv_heads"], kv_keep,
                      "attn_gram", "attn_sum"))
    for module, coupled, units, keep, gram, xsum in parts:
        if keep is None or len(keep) == units:
            continue
        mod = layer.get_submodule(module)
        W = _as_out_in(mod.weight, arch.conv1d).double()
        cols = unit_index(coupled, keep)
        bias = getattr(mod, "bias", None)
        if reconstruct:
            _require(stats, gram, xsum)
            Wk, b = ridge_refit(W, stats[gram][index], cols, damp, bias=bias, x_sum=stats[xsum][index], count=count)
        else:
            Wk, b = W[:, cols], None
        full = torch.zeros_like(W)
        full[:, cols] = Wk
        name = f"{arch.layers}.{index}.{module}"
        out[f"{name}.weight"] = _as_out_in(full, arch.conv1d)
        if b is not None:
            out[f"{name}.bias"] = b
    return out


@torch.no_grad()
def compensation(model: nn.Module, plan, stats: Mapping[str, torch.Tensor], damp: float | None = None
                 ) -> dict[str, torch.Tensor]:
    """New values (dense shapes, dtype of the model) for the output projections a plan changes.

    MLP channels: the kept columns of the MLP output projection are refit on `mlp_gram` (and its bias on
    `mlp_sum`); KV groups and query heads: the kept columns of the attention output projection on `attn_gram`; a run of dropped
    layers k+1..k+n: block k's MLP output projection is multiplied by its replacement map (depth_cross_<n>). Removed
    columns are zero. Keys are full parameter names of `model`.
    """
    damp = plan.damp if damp is None else damp
    arch = arch_of(model)
    layers = decoder_layers(model)
    out: dict[str, torch.Tensor] = {}
    if plan.reconstruct:
        for lp in plan.layers:
            out.update(layer_compensation(model, lp.index, lp.mlp_keep, lp.kv_keep, stats, damp,
                                          q_keep=lp.q_keep))
    if getattr(plan, "replace", False):
        check_replacement(model)
        for first, n in runs(plan.dropped_layers):
            k = first - 1
            if k < 0:
                continue  # nothing before the first layer to carry a replacement: plain dropping
            _require(stats, "mlp_out_gram", f"depth_cross_{n}")
            T = replacement(stats["mlp_out_gram"][k], stats[f"depth_cross_{n}"][k], damp)
            name = f"{arch.layers}.{k}.{arch.mlp_out}"
            mod = layers[k].get_submodule(arch.mlp_out)
            W = out.get(f"{name}.weight")
            W = _as_out_in(W if W is not None else mod.weight.double(), arch.conv1d)
            # a' = a T with a = W x + b: the new projection is T^T W and the new bias b T.
            out[f"{name}.weight"] = _as_out_in(T.T @ W.double(), arch.conv1d)
            bias = out.get(f"{name}.bias", getattr(mod, "bias", None))
            if bias is not None:
                out[f"{name}.bias"] = bias.double() @ T
    dtype = next(model.parameters()).dtype
    return {k: v.to(dtype) for k, v in out.items()}


__all__ = ["RefitError", "compensation", "corrected", "layer_compensation", "obs_order", "replacement",
           "replacement_error", "ridge_refit", "runs"]
