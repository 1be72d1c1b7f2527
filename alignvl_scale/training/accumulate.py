"""Contrastive gradient accumulation: the loss of K micro-batches as one contrastive batch
(GradCache, Gao et al. 2021; open_clip's --accum-freq).

Averaging the gradients of K separate micro-batch losses (what DeepSpeed's accumulation
does) optimizes K small contrastive problems, each with 1/K of the negatives. Instead:

1. forward the K micro-batches without an autograd graph, keeping their embeddings and the
   RNG states each forward starts from (dropout, Random Perturbation, mixup);
2. the Align-VL loss on all K x B x world embeddings (plain or chunked), and its gradient
   with respect to every cached embedding and to the learned scalars (scale, bias);
3. re-run each micro-batch with autograd from its saved RNG states, so the second forward
   equals the first, and backpropagate the cached gradient through it
   (`backward(sum(u * dL/du) + sum(v * dL/dv) + (scale * dL/dscale + bias * dL/dbias) / K)`);
4. one optimizer step (the caller's).

Memory stays that of one micro-batch's graph plus K x B embeddings; the cost is one more
forward per micro-batch. Under ZeRO-3 that second forward gathers the parameters again
(one more all-gather of the trained weights per micro-batch). When both towers are frozen
(the paper's setting), `forward` can run the towers once and hand the head their cached
outputs; then only the head runs twice (see `Trainer.accumulation_inputs`).

The gradient convention is the loss's (alignvl_scale.losses.infonce): each rank's gradient is that of
its local share, so after the engine averages over ranks the update equals one step on the
K x B x world batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from alignvl_scale.losses.infonce import LossOutput
from alignvl_scale.losses.registry import HeadOutput

Forward = Callable[[dict], HeadOutput]


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


def _leaf(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float().requires_grad_()


def accumulated_backward(micro_batches: list[dict], forward: Forward, loss_fn: Callable[[HeadOutput], LossOutput],
                         backward: Callable[[Tensor], None], random_modules: dict) -> tuple[LossOutput, HeadOutput]:
    """Steps 1-3 above; `backward(surrogate)` accumulates parameter gradients (K calls).
    Returns the loss on the whole contrastive batch (value and statistics) and the head
    output it was computed on (detached)."""
    states, outs = [], []
    with torch.no_grad():
        for batch in micro_batches:
            states.append(rng_snapshot(random_modules))
            outs.append(forward(batch))
    after = rng_snapshot(random_modules)
    # The loss's leaves: the embeddings of all micro-batches, and the learned scalars (the
    # same in every forward: each of the K second passes carries 1/K of their gradient).
    cached = HeadOutput(_leaf(torch.cat([o.image for o in outs])), _leaf(torch.cat([o.text for o in outs])),
                        _leaf(outs[0].logit_scale), _leaf(outs[0].logit_bias))
    out = loss_fn(cached)
    out.loss.backward()  # only to the cached leaves: no parameter sees this graph
    rows = [len(o.image) for o in outs]
    grad_u, grad_v = cached.image.grad.split(rows), cached.text.grad.split(rows)
    for k, batch in enumerate(micro_batches):
        rng_restore(states[k], random_modules)
        again = forward(batch)
        surrogate = (again.image.float() * grad_u[k]).sum() + (again.text.float() * grad_v[k]).sum()
        for value, leaf in ((again.logit_scale, cached.logit_scale), (again.logit_bias, cached.logit_bias)):
            if leaf is not None:
                surrogate = surrogate + (value.float() * leaf.grad).sum() / len(micro_batches)
        backward(surrogate)
    rng_restore(after, random_modules)  # the streams continue as after the first pass
    return (LossOutput(out.loss.detach(), out.i2t_accuracy, out.t2i_accuracy),
            HeadOutput(*(None if t is None else t.detach() for t in cached)))
