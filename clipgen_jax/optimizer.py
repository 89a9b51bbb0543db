"""The optimizer and learning-rate schedule of every stage, built from one set of `config.optimizer` fields.

Adam (AdamW when weight_decay > 0), optionally after global-norm gradient clipping, on a linear warmup followed by a
cosine decay or a constant rate. Stages add their own fields beside these (the VQGAN's `disc_learning_rate`, the
prior's `accumulation_steps`). A config written before every stage had all of these fields gets the defaults for the
ones it lacks, which are what each stage did then.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections
import optax

SCHEDULES = ("cosine", "constant")


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Every field `make` reads, with `overrides` applied (a stage's config sets its own values)."""
    config = ml_collections.ConfigDict(dict(
        learning_rate=1e-3,  # the peak rate
        schedule="cosine",  # "cosine": warmup, then cosine decay to final_lr_fraction x peak; "constant": warmup, peak
        warmup_steps=0,  # linear warmup from 0
        final_lr_fraction=0.0,  # "cosine" only
        b1=0.9,
        b2=0.999,
        weight_decay=0.0,  # > 0: AdamW, decoupled decay on the leaves the stage's decay mask selects
        grad_clip_norm=0.0))  # > 0: gradients are clipped to this global norm first
    config.update(overrides)
    return config


FIELDS = tuple(default_config())


def _completed(opt: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`opt`'s values of FIELDS, defaults for those it lacks; refuses an unknown schedule."""
    opt = default_config(**{field: opt[field] for field in FIELDS if field in opt})
    if opt.schedule not in SCHEDULES:
        raise ValueError(f"optimizer.schedule={opt.schedule!r} is not one of {', '.join(SCHEDULES)}")
    return opt


def make_schedule(opt: ml_collections.ConfigDict, total_steps: int, peak: float | None = None) -> optax.Schedule:
    """The learning rate by step: linear warmup from 0 to `peak` (default opt.learning_rate), then constant or a
    cosine decay to final_lr_fraction x peak at `total_steps`."""
    opt = _completed(opt)
    peak = opt.learning_rate if peak is None else peak
    if opt.schedule == "constant":
        if opt.warmup_steps:
            return optax.linear_schedule(0.0, peak, opt.warmup_steps)  # holds `peak` after the warmup
        return optax.constant_schedule(peak)
    return optax.warmup_cosine_decay_schedule(0.0, peak, opt.warmup_steps, total_steps, peak * opt.final_lr_fraction)


def make(opt: ml_collections.ConfigDict, total_steps: int, *, peak: float | None = None,
         decay_mask: Callable[[Any], Any] | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(optimizer, schedule) from `opt` = config.optimizer; `peak` overrides opt.learning_rate (the VQGAN's
    discriminator); `decay_mask(params)` selects the leaves weight decay applies to (all when None)."""
    schedule = make_schedule(opt, total_steps, peak)
    opt = _completed(opt)
    if opt.weight_decay > 0:
        transform = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay, mask=decay_mask)
    else:
        transform = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
    if opt.grad_clip_norm > 0:
        transform = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), transform)
    return transform, schedule
