"""Contrastive gradient accumulation: the loss of K micro-batches as one contrastive batch
(GradCache, Gao et al. 2021; open_clip's --accum-freq).

Averaging the gradients of K separate micro-batch losses (what DeepSpeed's accumulation
does) optimizes K small contrastive problems, each with 1/K of the negatives. Instead:

1. forward the K micro-batches without an autograd graph, keeping their embeddings and the
   RNG states each forward starts from (dropout, Random Perturbation, mixup);
2. the Align-VL loss on all K x B x world embeddings (plain or chunked), and its gradient
   with respect to every cached embedding and to the logit scale;
3. re-run each micro-batch with autograd from its saved RNG states, so the second forward
   equals the first, and backpropagate the cached gradient through it
   (`backward(sum(u * dL/du) + sum(v * dL/dv) + scale * dL/dscale / K)`);
4. one optimizer step (the caller's).

Memory stays that of one micro-batch's graph plus K x B embeddings; the cost is one more
forward per micro-batch. Under ZeRO-3 that second forward gathers the parameters again
(one more all-gather of the trained weights per micro-batch). When both towers are frozen
(the paper's setting), `forward` can run the towers once and hand the head their cached
outputs; then only the head runs twice (see `Trainer.accumulation_inputs`).

The gradient convention is the loss's (alignvl_scale.loss): each rank's gradient is that of
its local share, so after the engine averages over ranks the update equals one step on the
K x B x world batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignvl_scale.loss import LossOutput

Forward = Callable[[dict], tuple[Tensor, Tensor, Tensor]]


def rng_snapshot(random_modules: dict) -> dict:
    """Every random stream a forward draws from: torch's CPU and current CUDA generator
    (dropout) and the head's own generators (mixup, noise)."""
    state = {"cpu": torch.get_rng_state(), "modules": {n: m.rng_state() for n, m in random_modules.items()}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_restore(state: dict, random_modules: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])
    for name, module in random_modules.items():
        module.load_rng_state(state["modules"][name])


def accumulated_backward(micro_batches: list[dict], forward: Forward, loss_fn: Callable[..., LossOutput],
                         backward: Callable[[Tensor], None], random_modules: dict) -> tuple[LossOutput, Tensor]:
    """Steps 1-3 above; `backward(surrogate)` accumulates parameter gradients (K calls).
    Returns the loss on the whole contrastive batch (value and statistics) and the logit
    scale it used."""
    states, us, vs, scale = [], [], [], None
    with torch.no_grad():
        for batch in micro_batches:
            states.append(rng_snapshot(random_modules))
            u, v, scale = forward(batch)
            us.append(u)
            vs.append(v)
    after = rng_snapshot(random_modules)
    all_u = torch.cat(us).float().requires_grad_()
    all_v = torch.cat(vs).float().requires_grad_()
    scale = scale.detach().float().requires_grad_()
    out = loss_fn(all_u, all_v, scale)
    out.loss.backward()  # only to the cached leaves: no parameter sees this graph
    rows = [len(u) for u in us]
    grad_u, grad_v = all_u.grad.split(rows), all_v.grad.split(rows)
    for k, batch in enumerate(micro_batches):
        rng_restore(states[k], random_modules)
        u, v, s = forward(batch)
        surrogate = ((u.float() * grad_u[k]).sum() + (v.float() * grad_v[k]).sum()
                     + (s.float() * scale.grad).sum() / len(micro_batches))
        backward(surrogate)
    rng_restore(after, random_modules)  # the streams continue as after the first pass
    return LossOutput(out.loss.detach(), out.i2t_accuracy, out.t2i_accuracy), scale.detach()
