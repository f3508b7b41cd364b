"""The DPO loss family: pure functions from per-sequence log-probs to per-pair losses.

Every input is a 1-D tensor with one entry per pair, holding the *summed* log-probability of the
completion tokens. Variants that average over tokens (IPO, SimPO, ORPO) also take the completion
lengths. Notation, shared with the papers: h = beta * [(pi_c - ref_c) - (pi_r - ref_r)], where
pi/ref are policy/reference log-probs of the chosen (c) and rejected (r) completions.

KTO (`kto_loss`) is the unpaired member: one answer per example with a verdict, desirable or
not, plus a mismatched "KL completion" that sets its reference point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

PAIR_LOSS_TYPES = (
    "sigmoid",
    "ipo",
    "hinge",
    "robust",
    "bco_pair",
    "sppo_hard",
    "nca_pair",
    "apo_zero",
    "simpo",
    "orpo",
)
UNPAIRED_LOSS_TYPES = ("kto",)  # one answer and a verdict per example: `kto_loss`
LOSS_TYPES = (*PAIR_LOSS_TYPES, *UNPAIRED_LOSS_TYPES)
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_NORMALISED = ("ipo", "simpo", "orpo")
USES_LABEL_SMOOTHING = ("sigmoid", "robust", "simpo")


def preference_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor | None = None,
    reference_rejected_logps: Tensor | None = None,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) summed completion log-probs, policy.
        reference_chosen_logps, reference_rejected_logps: (B,) the same under the reference
            model; required except for the reference-free `simpo` and `orpo`.
        loss_type: one of `LOSS_TYPES`.
        beta: the inverse temperature (IPO's tau, SPPO's eta^-1, ORPO's lambda).
        label_smoothing: assumed probability that a label is flipped (`sigmoid`, `robust`,
            `simpo` only); in [0, 0.5).
        chosen_lengths, rejected_lengths: (B,) completion token counts, required by `ipo`,
            `simpo` and `orpo`, which work on per-token averages.
        simpo_gamma: SimPO's target reward margin gamma.

    Returns:
        (losses, chosen_rewards, rejected_rewards), each (B,) float32. Rewards are detached:
        beta * (policy - reference) log-probs, or beta * average policy log-probs for the
        reference-free variants.
    """
    check_loss_args(loss_type, beta, label_smoothing, simpo_gamma)
    if loss_type in UNPAIRED_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} scores single answers: use kto_loss")
    _check_inputs(
        loss_type,
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        chosen_lengths,
        rejected_lengths,
    )
    pi_c, pi_r = policy_chosen_logps.float(), policy_rejected_logps.float()
    if loss_type in REFERENCE_FREE:
        avg_c = pi_c / _lengths(chosen_lengths, pi_c)  # per-token average log-probs
        avg_r = pi_r / _lengths(rejected_lengths, pi_r)
        losses = _reference_free_loss(avg_c, avg_r, loss_type, beta, simpo_gamma, label_smoothing)
        return losses, beta * avg_c.detach(), beta * avg_r.detach()
    assert reference_chosen_logps is not None and reference_rejected_logps is not None
    chosen_logratios = pi_c - reference_chosen_logps.float()  # log pi/ref, chosen
    rejected_logratios = pi_r - reference_rejected_logps.float()
    losses = _logratio_loss(
        LogRatios(chosen_logratios, rejected_logratios, chosen_lengths, rejected_lengths),
        loss_type,
        beta,
        label_smoothing,
    )
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


@dataclass(frozen=True)
class LogRatios:
    """Policy/reference log-ratios of a batch of pairs, (B,) each, with completion lengths
    for the variants that average over tokens."""

    chosen: Tensor
    rejected: Tensor
    chosen_lengths: Tensor | None
    rejected_lengths: Tensor | None

    def per_token(self) -> tuple[Tensor, Tensor]:
        """The log-ratios averaged over each completion's tokens."""
        assert self.chosen_lengths is not None and self.rejected_lengths is not None
        return (
            self.chosen / _lengths(self.chosen_lengths, self.chosen),
            self.rejected / _lengths(self.rejected_lengths, self.rejected),
        )


def _logratio_loss(ratios: LogRatios, loss_type: str, beta: float, ls: float) -> Tensor:
    """The reference-based variants, one branch per name (a new name raises ValueError here
    until it gets its own branch)."""
    c, r = ratios.chosen, ratios.rejected
    if loss_type == "sigmoid":
        return sigmoid_loss(c, r, beta, ls)
    if loss_type == "ipo":
        return ipo_loss(*ratios.per_token(), beta)
    if loss_type == "hinge":
        return hinge_loss(c, r, beta)
    if loss_type == "robust":
        return robust_loss(c, r, beta, ls)
    if loss_type == "bco_pair":
        return bco_pair_loss(c, r, beta)
    if loss_type == "sppo_hard":
        return sppo_hard_loss(c, r, beta)
    if loss_type == "nca_pair":
        return nca_pair_loss(c, r, beta)
    if loss_type == "apo_zero":
        return apo_zero_loss(c, r, beta)
    raise ValueError(f"no loss function for loss_type {loss_type!r}")


def _reference_free_loss(
    avg_c: Tensor, avg_r: Tensor, loss_type: str, beta: float, gamma: float, ls: float
) -> Tensor:
    """The reference-free variants, on per-token average log-probs."""
    if loss_type == "simpo":
        return simpo_loss(avg_c, avg_r, beta, gamma, ls)
    if loss_type == "orpo":
        return orpo_loss(avg_c, avg_r, beta)
    raise ValueError(f"no loss function for loss_type {loss_type!r}")


def sigmoid_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float = 0.0
) -> Tensor:
    """DPO, Rafailov et al. 2023, eq. 7: -log sigma(h).

    With label smoothing eps > 0 this is conservative DPO (cDPO, as in the original DPO code):
    -(1 - eps) log sigma(h) - eps log sigma(-h).
    """
    h = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def robust_loss(
    chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float, label_smoothing: float
) -> Tensor:
    """Robust DPO, Chowdhury et al. 2024, eq. 21: an unbiased loss under label-flip rate eps,
    [-(1 - eps) log sigma(h) + eps log sigma(-h)] / (1 - 2 eps)."""
    h = beta * (chosen_logratios - rejected_logratios)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(h) + eps * F.logsigmoid(-h)) / (1 - 2 * eps)


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """RSO / SLiC hinge, Liu et al. 2023 (Statistical Rejection Sampling), eq. 10: max(0, 1 - h)."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def ipo_loss(chosen_avg_logratios: Tensor, rejected_avg_logratios: Tensor, beta: float) -> Tensor:
    """IPO, Azar et al. 2023, eq. 17: (x - 1 / (2 tau))^2 with tau = beta, where x is the
    difference of per-token-averaged log-ratios (the normalisation the IPO authors use)."""
    return (chosen_avg_logratios - rejected_avg_logratios - 1 / (2 * beta)) ** 2


def bco_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Paired BCO, Jung et al. 2024 (Binary Classifier Optimization), eq. 5 applied to a pair:
    -log sigma(r_c) - log sigma(-r_r) with r = beta * log-ratio (no reward shift delta)."""
    return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)


def sppo_hard_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """SPPO with hard win probabilities, Wu et al. 2024, eq. 4.7 with P(c wins) = 1, P(r) = 0:
    (log-ratio_c - 1 / (2 beta))^2 + (log-ratio_r + 1 / (2 beta))^2, beta = eta^-1."""
    return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2


def nca_pair_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """NCA, Chen et al. 2024 (Noise Contrastive Alignment), eq. 12 with K = 2:
    -log sigma(r_c) - 1/2 log sigma(-r_c) - 1/2 log sigma(-r_r)."""
    r_c, r_r = beta * chosen_logratios, beta * rejected_logratios
    return -F.logsigmoid(r_c) - 0.5 * F.logsigmoid(-r_c) - 0.5 * F.logsigmoid(-r_r)


def apo_zero_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """APO-zero, D'Oosterlinck et al. 2024 (Anchored Preference Optimization), eq. 7:
    1 - sigma(r_c) + sigma(r_r): push chosen up and rejected down, each anchored at zero."""
    r_c, r_r = beta * chosen_logratios, beta * rejected_logratios
    return 1 - torch.sigmoid(r_c) + torch.sigmoid(r_r)


def simpo_loss(
    chosen_avg_logps: Tensor,
    rejected_avg_logps: Tensor,
    beta: float,
    gamma: float,
    label_smoothing: float = 0.0,
) -> Tensor:
    """SimPO, Meng et al. 2024, eq. 6: -log sigma(beta (avg_c - avg_r) - gamma), reference-free
    with length-normalised log-probs and target margin gamma (label smoothing as in cDPO)."""
    h = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float) -> Tensor:
    """ORPO, Hong et al. 2024, eq. 6-7: L_SFT + lambda L_OR with lambda = beta, where
    L_SFT = -avg_c and L_OR = -log sigma(log odds(y_c) - log odds(y_r)),
    odds(y) = P(y) / (1 - P(y)) over the per-token-average probability P(y) = exp(avg)."""
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (
        _log1mexp(chosen_avg_logps) - _log1mexp(rejected_avg_logps)
    )
    return -chosen_avg_logps - beta * F.logsigmoid(log_odds)


@dataclass(frozen=True)
class KTOLosses:
    """What `kto_loss` returns for a batch of B examples."""

    losses: Tensor  # (B,) float32, each scaled by its class weight (desirable/undesirable)
    rewards: Tensor  # (B,) beta * (policy - reference) log-prob of the answer, detached
    kl: Tensor  # () the reference point z0 >= 0, detached


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    policy_kl_logps: Tensor,
    reference_kl_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLosses:
    """KTO, Ethayarajh et al. 2024, eq. 7-8, as TRL's `KTOTrainer` (loss_type "kto").

    Args:
        policy_logps, reference_logps: (B,) summed log-probs of each example's answer.
        policy_kl_logps, reference_kl_logps: (B,) the same for its KL completion: another
            example's answer after this example's prompt (a mismatched pair).
        desirable: (B,) bool, the verdict on each answer.
        beta: the inverse temperature.
        desirable_weight, undesirable_weight: lambda_D and lambda_U, the loss scale of each
            class (the paper advises lambda_D n_D / (lambda_U n_U) in [1, 4/3]).

    The reference point z0 = max(0, mean over the batch of (policy_kl - reference_kl)) is
    detached, as in TRL, so the KL completions get no gradient. With r = policy - reference
    log-prob of the answer, a desirable answer's loss is lambda_D (1 - sigma(beta (r - z0))),
    an undesirable one's lambda_U (1 - sigma(beta (z0 - r))).
    """
    check_kto_weights(desirable_weight, undesirable_weight)
    tensors = (policy_logps, reference_logps, policy_kl_logps, reference_kl_logps, desirable)
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"kto_loss inputs must all have the same 1-D shape (B,), got {shapes}")
    if desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a bool tensor, got {desirable.dtype}")
    z0 = (policy_kl_logps.float() - reference_kl_logps.float()).mean().detach().clamp(min=0)
    logratios = policy_logps.float() - reference_logps.float()
    desirable = desirable.to(logratios.device)
    losses = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (logratios - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - logratios))),
    )
    return KTOLosses(losses, beta * logratios.detach(), z0)


def check_kto_weights(desirable_weight: float, undesirable_weight: float) -> None:
    """Raise ValueError unless both KTO class weights are positive numbers."""
    for name, value in (
        ("kto_desirable_weight", desirable_weight),
        ("kto_undesirable_weight", undesirable_weight),
    ):
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class KTOWeights:
    desirable: float  # lambda_D
    undesirable: float  # lambda_U


def kto_balanced_weights(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> KTOWeights:
    """The class weights with the rarer class weighed up so that lambda_D n_D = lambda_U n_U
    (the low end of the KTO paper's [1, 4/3], eq. 8); the commoner class keeps its weight, so
    balancing twice changes nothing. One class only, or none: the weights as given."""
    wd, wu = desirable_weight, undesirable_weight
    if n_desirable and n_undesirable:
        if n_desirable < n_undesirable:
            wd = n_undesirable * undesirable_weight / n_desirable
        else:
            wu = n_desirable * desirable_weight / n_undesirable
    return KTOWeights(wd, wu)


def kto_weight_advice(
    n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float
) -> str | None:
    """TRL's advice when the classes are unbalanced (KTO paper, eq. 8): lambda_D n_D /
    (lambda_U n_U) should lie in [1, 4/3]; a sentence naming the ranges that would, or None."""
    n_d, n_u = n_desirable, n_undesirable
    if n_d == n_u or not n_d or not n_u:  # balanced, or one class only: nothing to balance
        return None
    balancing_d = n_u * undesirable_weight / n_d  # the desirable weight that gives ratio 1
    balancing_u = n_d * desirable_weight / n_u
    d_low, d_high = round(balancing_d, 2), round(balancing_d * 1.33, 2)
    u_low, u_high = round(balancing_u / 1.33, 2), round(balancing_u, 2)
    if d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high:
        return None
    return (
        f"{n_desirable} desirable and {n_undesirable} undesirable answers: set EITHER "
        f"kto_desirable_weight in [{d_low}, {d_high}] or kto_undesirable_weight in "
        f"[{u_low}, {u_high}] (not both) to balance them (KTO paper, eq. 8)"
    )


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    x = x.clamp(max=-1e-7)  # a log-prob of exactly 0 would make the odds infinite
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _lengths(lengths: Tensor | None, like: Tensor) -> Tensor:
    assert lengths is not None  # _check_inputs asked for it
    if lengths.shape != like.shape:
        raise ValueError(f"lengths shape {tuple(lengths.shape)} != log-probs {tuple(like.shape)}")
    return lengths.to(like.device, torch.float32).clamp(min=1.0)


def check_loss_args(
    loss_type: str, beta: float, label_smoothing: float, simpo_gamma: float
) -> None:
    """Raise ValueError with an actionable message for an invalid loss configuration."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a positive number, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if label_smoothing > 0 and loss_type not in USES_LABEL_SMOOTHING:
        raise ValueError(
            f"label_smoothing is not used by loss_type {loss_type!r}; "
            f"it applies to {', '.join(USES_LABEL_SMOOTHING)}"
        )
    if not math.isfinite(simpo_gamma) or simpo_gamma < 0:
        raise ValueError(f"simpo_gamma must be a non-negative number, got {simpo_gamma}")


def _check_inputs(
    loss_type: str,
    pi_c: Tensor,
    pi_r: Tensor,
    ref_c: Tensor | None,
    ref_r: Tensor | None,
    chosen_lengths: Tensor | None,
    rejected_lengths: Tensor | None,
) -> None:
    """The tensors `loss_type` needs are there, and all log-probs share one 1-D shape."""
    if loss_type not in REFERENCE_FREE and (ref_c is None or ref_r is None):
        raise ValueError(f"loss_type {loss_type!r} needs reference log-probs")
    if loss_type in LENGTH_NORMALISED and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {loss_type!r} needs chosen_lengths and rejected_lengths")
    shapes = {tuple(t.shape) for t in (pi_c, pi_r, ref_c, ref_r) if t is not None}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"log-prob tensors must all have the same 1-D shape (B,), got {shapes}")
