"""The DPO loss family: closed forms, hand-computed values, TRL parity, argument checks."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dpo_core.losses import LOSS_TYPES, PAIR_LOSS_TYPES, REFERENCE_FREE, preference_loss


def log1pexp(x: float) -> float:  # -log sigmoid(-x)
    return math.log1p(math.exp(x))


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def loss_of(loss_type: str, pc, pr, rc, rr, lc=2.0, lr=4.0, **kwargs) -> float:
    t = lambda v: torch.tensor([float(v)])  # noqa: E731
    losses, _, _ = preference_loss(
        t(pc), t(pr), t(rc), t(rr), loss_type=loss_type,
        chosen_lengths=t(lc), rejected_lengths=t(lr), **kwargs,
    )  # fmt: skip
    return losses.item()


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    logps = torch.tensor([-12.5, -3.0, -40.0])
    losses, chosen_rewards, rejected_rewards = preference_loss(
        logps, logps - 1, logps, logps - 1, beta=0.3
    )
    torch.testing.assert_close(losses, torch.full((3,), math.log(2)))
    assert torch.equal(chosen_rewards, torch.zeros(3))
    assert torch.equal(rejected_rewards, torch.zeros(3))


@pytest.mark.parametrize(
    ("loss_type", "kwargs", "expected"),
    [
        ("sigmoid", {}, math.log(2)),
        ("sigmoid", {"label_smoothing": 0.2}, math.log(2)),
        ("robust", {"label_smoothing": 0.2}, math.log(2)),
        ("hinge", {}, 1.0),
        ("ipo", {}, (1 / (2 * 0.5)) ** 2),
        ("bco_pair", {}, 2 * math.log(2)),
        ("sppo_hard", {}, 2 * (0.5 / 0.5) ** 2),
        ("nca_pair", {}, 2 * math.log(2)),
        ("apo_zero", {}, 1.0),
    ],
)
def test_closed_forms_at_policy_equal_to_reference(loss_type, kwargs, expected):
    got = loss_of(loss_type, -7.0, -9.0, -7.0, -9.0, beta=0.5, **kwargs)
    assert got == pytest.approx(expected, abs=1e-6)


# Hand-computed: chosen log-ratio +1, rejected -1 (pc=-10, rc=-11, pr=-12, rr=-11), lengths 2
# and 4, so averaged log-ratios +1/2 and -1/4; avg policy log-probs -5 and -3.
def _orpo_hand(beta: float) -> float:
    log_odds = (-5 + 3) - (math.log(1 - math.exp(-5)) - math.log(1 - math.exp(-3)))
    return 5 + beta * log1pexp(-log_odds)


HAND = [
    ("sigmoid", 0.5, {}, log1pexp(-1.0)),
    ("sigmoid", 0.5, {"label_smoothing": 0.1}, 0.9 * log1pexp(-1.0) + 0.1 * log1pexp(1.0)),
    ("robust", 0.5, {"label_smoothing": 0.1}, (0.9 * log1pexp(-1.0) - 0.1 * log1pexp(1.0)) / 0.8),
    ("hinge", 0.5, {}, 0.0),
    ("hinge", 0.25, {}, 0.5),
    ("ipo", 0.5, {}, (0.75 - 1.0) ** 2),
    ("bco_pair", 0.5, {}, 2 * log1pexp(-0.5)),
    ("sppo_hard", 0.25, {}, (1 - 2) ** 2 + (-1 + 2) ** 2),
    ("nca_pair", 0.5, {}, log1pexp(-0.5) + 0.5 * log1pexp(0.5) + 0.5 * log1pexp(-0.5)),
    ("apo_zero", 0.5, {}, 1 - sig(0.5) + sig(-0.5)),
    ("simpo", 0.5, {"simpo_gamma": 0.5}, log1pexp(1.5)),
    ("simpo", 2.0, {"simpo_gamma": 1.0, "label_smoothing": 0.1},
     0.9 * log1pexp(-(2.0 * -2 - 1.0)) + 0.1 * log1pexp(2.0 * -2 - 1.0)),
    ("orpo", 0.5, {}, _orpo_hand(0.5)),
]  # fmt: skip


@pytest.mark.parametrize(("loss_type", "beta", "kwargs", "expected"), HAND)
def test_hand_computed_values(loss_type, beta, kwargs, expected):
    got = loss_of(loss_type, -10.0, -12.0, -11.0, -11.0, beta=beta, **kwargs)
    assert got == pytest.approx(expected, abs=1e-5)


def test_every_variant_is_covered_by_hand_values():
    assert {row[0] for row in HAND} == set(PAIR_LOSS_TYPES)
    assert set(LOSS_TYPES) == {*PAIR_LOSS_TYPES, "kto"}  # KTO: tests/dpo_core/test_kto.py


def test_rewards_are_detached_beta_scaled_log_ratios():
    pc = torch.tensor([-10.0, -4.0], requires_grad=True)
    pr = torch.tensor([-12.0, -3.0], requires_grad=True)
    _, cr, rr = preference_loss(pc, pr, torch.tensor([-11.0, -5.0]), torch.tensor([-11.0, -2.0]))
    torch.testing.assert_close(cr, torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(rr, torch.tensor([-0.1, -0.1]))
    assert not cr.requires_grad and not rr.requires_grad


def test_reference_free_rewards_are_beta_times_average_logps():
    lengths = torch.tensor([2.0])
    _, cr, rr = preference_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), loss_type="simpo", beta=2.0,
        chosen_lengths=lengths, rejected_lengths=lengths * 2,
    )  # fmt: skip
    assert cr.item() == pytest.approx(-10.0) and rr.item() == pytest.approx(-6.0)


@pytest.mark.parametrize("loss_type", PAIR_LOSS_TYPES)
def test_every_variant_raises_chosen_and_lowers_rejected_at_the_start(loss_type):
    pc = torch.tensor([-20.0], requires_grad=True)
    pr = torch.tensor([-20.0], requires_grad=True)
    lengths = torch.tensor([8.0])
    losses, _, _ = preference_loss(
        pc, pr, torch.tensor([-20.0]), torch.tensor([-20.0]), loss_type=loss_type,
        chosen_lengths=lengths, rejected_lengths=lengths,
    )  # fmt: skip
    losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 0.0}, "beta must be a positive number"),
        ({"beta": float("nan")}, "beta must be a positive number"),
        ({"label_smoothing": 0.5}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"label_smoothing": -0.1}, r"label_smoothing must be in \[0, 0.5\)"),
        ({"loss_type": "ipo", "label_smoothing": 0.1}, "not used by loss_type 'ipo'"),
        ({"loss_type": "dpo"}, "unknown loss_type 'dpo'; choose one of sigmoid"),
        ({"loss_type": "simpo", "simpo_gamma": -1.0}, "simpo_gamma must be"),
        ({"loss_type": "kto"}, "loss_type 'kto' scores single answers: use kto_loss"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    x = torch.zeros(2)
    lengths = {"chosen_lengths": torch.ones(2), "rejected_lengths": torch.ones(2)}
    with pytest.raises(ValueError, match=message):
        preference_loss(x, x, x, x, **(lengths | kwargs))


@pytest.mark.parametrize("reference_free", [False, True], ids=["with reference", "reference-free"])
def test_a_new_length_normalised_loss_is_not_sent_to_another_variant(monkeypatch, reference_free):
    """Naming a new variant in LOSS_TYPES and LENGTH_NORMALISED is not enough to compute it:
    until it has its own branch it raises, rather than silently computing IPO (or SimPO)."""
    from dpo_core import losses

    monkeypatch.setattr(losses, "LOSS_TYPES", (*losses.LOSS_TYPES, "new_norm"))
    monkeypatch.setattr(losses, "LENGTH_NORMALISED", (*losses.LENGTH_NORMALISED, "new_norm"))
    if reference_free:
        monkeypatch.setattr(losses, "REFERENCE_FREE", (*losses.REFERENCE_FREE, "new_norm"))
    t = torch.tensor([-3.0])
    with pytest.raises(ValueError, match="no loss function for loss_type 'new_norm'"):
        preference_loss(t, t, t, t, loss_type="new_norm", chosen_lengths=t, rejected_lengths=t)


def test_missing_inputs_raise_clear_errors():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="needs reference log-probs"):
        preference_loss(x, x, loss_type="sigmoid")
    with pytest.raises(ValueError, match="needs chosen_lengths and rejected_lengths"):
        preference_loss(x, x, x, x, loss_type="ipo")
    with pytest.raises(ValueError, match="same 1-D shape"):
        preference_loss(x, torch.zeros(3), x, x)


# ---- parity with TRL: the same four log-prob tensors give the same losses -------------------

TRL_DPO_TYPES = ("sigmoid", "ipo", "hinge", "robust", "bco_pair", "sppo_hard", "nca_pair",
                 "apo_zero")  # fmt: skip


class _Gather:
    device = torch.device("cpu")

    def gather(self, t):
        return t

    gather_for_metrics = gather


def trl_dpo_losses(loss_type, beta, label_smoothing, pc, pr, rc, rr, lc, lr) -> torch.Tensor:
    """Per-pair losses from TRL's own DPOTrainer._compute_loss, one pair per call. The model
    double returns per-token log-probs that sum to the given sequence log-probs."""
    from trl import DPOTrainer

    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=_Gather(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, args=SimpleNamespace(), _metrics={"train": _MetricLists()},
        _total_train_tokens=0, _tp_size=1,
    )  # fmt: skip
    out = []
    for i in range(len(pc)):
        width = int(max(lc[i], lr[i])) + 2
        completion = torch.zeros(2, width, dtype=torch.long)
        completion[0, 1 : 1 + int(lc[i])] = 1
        completion[1, 1 : 1 + int(lr[i])] = 1
        per_token = torch.zeros(2, width - 1)
        per_token[0, 0], per_token[1, 0] = pc[i], pr[i]

        def model(per_token=per_token, **_):
            zeros = torch.zeros_like(per_token)
            return SimpleNamespace(
                log_probs=per_token, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool()
            )

        inputs = {
            "input_ids": torch.ones(2, width, dtype=torch.long),
            "attention_mask": torch.ones(2, width, dtype=torch.long),
            "completion_mask": completion,
            "ref_chosen_logps": rc[i : i + 1],
            "ref_rejected_logps": rr[i : i + 1],
        }
        out.append(DPOTrainer._compute_loss(trainer, model, inputs, False))
    return torch.stack(out)


class _MetricLists(dict):
    def __missing__(self, key):
        self[key] = []
        return self[key]


@pytest.fixture
def four_logps():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-60 * torch.rand(6, generator=g) - 1 for _ in range(4))
    lc = torch.randint(1, 40, (6,), generator=g).float()
    lr = torch.randint(1, 40, (6,), generator=g).float()
    return pc, pr, rc, rr, lc, lr


@pytest.mark.parametrize("loss_type", TRL_DPO_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_parity_with_trl_dpo_trainer(loss_type, beta, four_logps):
    pc, pr, rc, rr, lc, lr = four_logps
    ls = 0.2 if loss_type == "robust" else 0.0
    ours, _, _ = preference_loss(
        pc, pr, rc, rr, loss_type=loss_type, beta=beta, label_smoothing=ls,
        chosen_lengths=lc, rejected_lengths=lr,
    )  # fmt: skip
    theirs = trl_dpo_losses(loss_type, beta, ls, pc, pr, rc, rr, lc, lr)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_simpo_parity_with_trl_cpo_trainer(four_logps, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    pc, pr, _, _, lc, lr = four_logps
    beta, gamma = 2.0, 0.8
    ours, cr, rr = preference_loss(
        pc, pr, loss_type="simpo", beta=beta, simpo_gamma=gamma,
        label_smoothing=label_smoothing, chosen_lengths=lc, rejected_lengths=lr,
    )  # fmt: skip
    cpo = SimpleNamespace(
        alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta,
        label_smoothing=label_smoothing, accelerator=_Gather(),
    )  # fmt: skip
    theirs, their_cr, their_rr = CPOTrainer.cpo_loss(cpo, pc / lc, pr / lr)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(cr, their_cr)
    torch.testing.assert_close(rr, their_rr)


def test_orpo_parity_with_trl_orpo_trainer(four_logps):
    """TRL's ORPO loss is NLL(chosen) - mean(beta * log sigma(log odds)); per pair, with the
    NLL as the average negative log-prob of the chosen tokens, ours is the same sum."""
    from trl.experimental.orpo import ORPOTrainer

    pc, pr, _, _, lc, lr = four_logps
    ours, _, _ = preference_loss(
        pc, pr, loss_type="orpo", beta=0.25, chosen_lengths=lc, rejected_lengths=lr
    )
    orpo = SimpleNamespace(beta=0.25, accelerator=_Gather())
    odds_ratio_terms = ORPOTrainer.odds_ratio_loss(orpo, pc / lc, pr / lr)[0]
    torch.testing.assert_close(ours, -pc / lc - odds_ratio_terms, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loss_type", REFERENCE_FREE)
def test_reference_free_variants_ignore_the_reference(loss_type, four_logps):
    pc, pr, rc, rr, lc, lr = four_logps
    kw = {"loss_type": loss_type, "chosen_lengths": lc, "rejected_lengths": lr}
    torch.testing.assert_close(
        preference_loss(pc, pr, rc, rr, **kw)[0], preference_loss(pc, pr, **kw)[0]
    )
