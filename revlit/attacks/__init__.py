"""Attacks: threat models (Linf / L2 / L1 with the exact L1 ∩ box projection), losses, PGD.

Framework-free (no pytorch_lightning imports): usable from a notebook with a plain ``nn.Module``.
"""

from revlit.attacks.losses import LOSSES, ce_loss, cw_loss, dlr_loss, get_loss
from revlit.attacks.norms import (
    DEFAULT_EPS,
    L1_TOPK_DEFAULT,
    Norm,
    check_eps,
    default_step_size,
    draw_noise,
    example_generators,
    l1_box_threshold,
    l1_project,
    l1_step,
    l2_project,
    l2_step,
    linf_project,
    linf_step,
    lp_norm,
    project,
    project_l1_box,
    random_init,
    step,
)
from revlit.attacks.pgd import AttackResult, frozen_eval, pgd, pgd_attack, resolve_args

__all__ = [
    "DEFAULT_EPS",
    "L1_TOPK_DEFAULT",
    "LOSSES",
    "AttackResult",
    "Norm",
    "ce_loss",
    "check_eps",
    "cw_loss",
    "default_step_size",
    "dlr_loss",
    "draw_noise",
    "example_generators",
    "frozen_eval",
    "get_loss",
    "l1_box_threshold",
    "l1_project",
    "l1_step",
    "l2_project",
    "l2_step",
    "linf_project",
    "linf_step",
    "lp_norm",
    "pgd",
    "pgd_attack",
    "project",
    "project_l1_box",
    "random_init",
    "resolve_args",
    "step",
]
