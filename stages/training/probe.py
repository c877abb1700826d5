"""A linear probe fitted to convergence: multinomial logistic regression on frozen features.

    tried, chosen = search_l2(train_x, train_y, val_x, val_y, classes)  # chosen on validation only
    weight, bias, _ = fit(train_val_x, train_val_y, 10 ** chosen["log10_l2"], classes)  # refitted on train + val

As Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?") and CLIP (Radford et
al. 2021, appendix A.3) run it: features standardised with the training rows' mean and std,
full-batch L-BFGS, and the L2 strength searched coarse-to-fine on a validation split. The
strength is scikit-learn's 1/C: the loss is the cross-entropy summed over the training rows
plus l2/2 times the squared weights (the bias is not penalised). It runs on the stage's device
with torch alone; every fit is deterministic on the CPU.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from stages.model.inference import loss_and_accuracy

COARSE_DECADES = (6, 4, 2, 0, -2, -4, -6)  # CLIP's start: 1e6 ... 1e-6, strongest first (the easiest fits)
FINEST_STEP = 1 / 8  # decades: the search halves its step around the best strength down to this
MAX_ITERATIONS = 1000  # of L-BFGS per fit; a fit that needs more is nearly unregularised
GRADIENT_TOLERANCE = 1e-5  # the largest entry of the (per-row) gradient at convergence


@dataclass(frozen=True)
class Standardiser:
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor) -> "Standardiser":
        """Per feature, from the training rows; a constant feature keeps its scale (std 1)."""
        std = x.std(0)
        return cls(x.mean(0), torch.where(std > 1e-6, std, torch.ones_like(std)))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def fold(self, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The same classifier on raw features: W (x - m) / s + b = (W / s) x + (b - (W / s) m)."""
        scaled = weight / self.std
        return scaled, bias - scaled @ self.mean


def fit(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int,
        start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weight C×D, bias C, evaluations of the objective: the fit's cost) minimising the summed cross-entropy + l2/2 |W|²,
    from `start` (a warm start) or zeros. The objective is divided by the number of rows, which
    leaves its minimum where it is and keeps the gradient's scale independent of the data's size."""
    weight = (start[0].clone() if start else torch.zeros(classes, x.shape[1], device=x.device)).requires_grad_()
    bias = (start[1].clone() if start else torch.zeros(classes, device=x.device)).requires_grad_()
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=MAX_ITERATIONS, history_size=20,
                                  tolerance_grad=GRADIENT_TOLERANCE, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")
    penalty = l2 / (2 * len(y))

    def objective():
        optimizer.zero_grad()
        loss = F.cross_entropy(torch.addmm(bias, x, weight.T), y) + penalty * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    evaluations = optimizer.state[weight]["func_evals"]
    return weight.detach(), bias.detach(), evaluations


def search_l2(train_x, train_y, val_x, val_y, classes: int) -> tuple[list[dict], dict]:
    """The L2 strength with the best validation accuracy (ties: the lower validation loss), by
    CLIP's parametric binary search: every second decade from 1e6 to 1e-6, then around the best
    so far at half the step each round, down to FINEST_STEP, never outside that range. Each fit starts from the solution of
    the nearest strength already fitted. Returns one record per strength tried (log10_l2,
    val_accuracy, val_loss, evaluations), in order of strength, and the chosen one's."""
    tried: dict[float, dict] = {}  # log10(l2) -> record, with the solution kept for warm starts

    def score(decade: float) -> None:
        if decade in tried:
            return
        nearest = min(tried, key=lambda d: abs(d - decade), default=None)
        start = (tried[nearest]["weight"], tried[nearest]["bias"]) if nearest is not None else None
        weight, bias, evaluations = fit(train_x, train_y, 10.0 ** decade, classes, start)
        loss, accuracy = loss_and_accuracy(torch.addmm(bias, val_x, weight.T), val_y)
        tried[decade] = {"log10_l2": decade, "val_accuracy": accuracy, "val_loss": loss,
                         "evaluations": evaluations, "weight": weight, "bias": bias}
        progress.update()
        progress.set_postfix(l2=f"1e{decade:+.3f}", val_accuracy=f"{accuracy:.4f}")

    def best() -> float:
        return max(tried, key=lambda d: (tried[d]["val_accuracy"], -tried[d]["val_loss"]))

    rounds = round(math.log2(2 / FINEST_STEP))
    with tqdm(total=len(COARSE_DECADES) + 2 * rounds, desc="L2 search", unit="fit") as progress:
        for decade in COARSE_DECADES:
            score(float(decade))
        step = 2.0
        for _ in range(rounds):
            step /= 2
            centre = best()
            for decade in (centre - step, centre + step):
                if min(COARSE_DECADES) <= decade <= max(COARSE_DECADES):
                    score(decade)
    records = {d: {k: v for k, v in r.items() if k not in ("weight", "bias")} for d, r in sorted(tried.items())}
    return list(records.values()), records[best()]
