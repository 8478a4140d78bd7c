"""Free predictors of quantization damage, rated against the same measurements as AutoQuant.

AutoQuant's scores cost a calibration and a scoring pass with gradients. A reader deciding
whether that is worth it needs to see what cheaper signals achieve on the same groups and the
same measured damage: the weights' own quantization error, and how wide or outlier-heavy a
group's input activations are. Each proxy is a number per validated group; its Spearman
correlation with measured KL and ΔNLL gets a bootstrap interval from the resamples that rate
AutoQuant too, and so does AutoQuant's lead over it.

Pure: the backend hands in sums collected from the model (:class:`WeightStats`,
:class:`ActivationStats`); nothing here touches torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import attrs

from auto_quantize_model.core import stats
from auto_quantize_model.core.noise import NAN_INTERVAL, Resamples, spearman_draws
from auto_quantize_model.validation_records import Interval, ProxyRating

if TYPE_CHECKING:
    from auto_quantize_model.core.noise import Floats


@attrs.frozen
class WeightStats:
    """A group's weights on one format, summed over its modules."""

    error_sq: float
    """Σ ‖W - Q(W)‖²_F, with Q the format's weight quantizer (fake quantization)."""
    weight_sq: float
    """Σ ‖W‖²_F."""
    max_abs: float
    """max |W| over the group's weights."""

    @property
    def relative_error(self) -> float:
        return math.sqrt(self.error_sq / self.weight_sq) if self.weight_sq > 0 else math.nan


@attrs.frozen
class ActivationStats:
    """A group's input activations over the held-out captions' real tokens, summed over modules."""

    max_abs: float
    abs_sum: float
    square_sum: float
    count: int

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / self.count if self.count else math.nan

    @property
    def rms(self) -> float:
        return math.sqrt(self.square_sum / self.count) if self.count else math.nan

    def merged(self, other: ActivationStats) -> ActivationStats:
        return ActivationStats(
            max(self.max_abs, other.max_abs),
            self.abs_sum + other.abs_sum,
            self.square_sum + other.square_sum,
            self.count + other.count,
        )


@attrs.frozen
class GroupInputs:
    """What the proxies of one validated group are computed from."""

    format: str
    """The format the group was measured on."""
    weights: Mapping[str, WeightStats]
    """Per quantized format the group was offered."""
    activations: ActivationStats | None


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) else math.nan


def proxy_columns(groups: Sequence[GroupInputs], formats: Sequence[str]) -> list[tuple[str, list[float]]]:
    """``(name, one value per group)`` of every proxy, NaN where a group has no value.

    The weight error is given per format (each format's own weight quantizer) and, with several
    formats, for the format each group was measured on; the activation proxies do not depend on
    the format.
    """
    nan = math.nan

    def on(group: GroupInputs, fmt: str) -> WeightStats | None:
        return group.weights.get(fmt)

    def relative(stat: WeightStats | None) -> float:
        return nan if stat is None else stat.relative_error

    columns: list[tuple[str, list[float]]] = [
        (f"‖W - Q(W)‖ / ‖W‖ ({fmt})", [relative(on(g, fmt)) for g in groups]) for fmt in formats
    ]
    measured = [on(g, g.format) for g in groups]
    if len(formats) > 1:
        columns.append(("‖W - Q(W)‖ / ‖W‖ (measured format)", [relative(s) for s in measured]))
    where = "measured format" if len(formats) > 1 else formats[0] if formats else "measured format"
    columns.append((f"‖W - Q(W)‖ ({where})", [nan if s is None else math.sqrt(s.error_sq) for s in measured]))
    columns.append(("max |W|", [nan if s is None else s.max_abs for s in measured]))
    acts = [g.activations for g in groups]
    columns.append(("max |x| (input)", [nan if a is None else a.max_abs for a in acts]))
    columns.append(
        ("max |x| / mean |x| (input)", [nan if a is None else _ratio(a.max_abs, a.mean_abs) for a in acts])
    )
    columns.append(
        (
            f"‖W - Q(W)‖ · rms(x) ({where})",
            [
                nan if s is None or a is None else math.sqrt(s.error_sq) * a.rms
                for s, a in zip(measured, acts, strict=True)
            ],
        )
    )
    return columns


def rate(
    name: str,
    values: Sequence[float],
    autoquant: Sequence[float],
    kl: Sequence[float],
    delta_nll: Sequence[float],
    draws: tuple[Floats, Floats] | None,
    resamples: Resamples | None,
) -> ProxyRating:
    """One proxy against measured KL and ΔNLL over the groups where it is finite.

    ``draws`` are the bootstrap ``(kl, delta_nll)`` draws ``[resamples, groups]`` from
    :meth:`Resamples.means`; without them (bootstrap off) every interval is NaN.
    """
    keep = [i for i, v in enumerate(values) if not math.isnan(v)]

    def pick(seq: Sequence[float]) -> list[float]:
        return [seq[i] for i in keep]

    proxy = pick(values)
    intervals = (NAN_INTERVAL, NAN_INTERVAL, NAN_INTERVAL)
    if draws is not None and resamples is not None and keep:
        kl_draws, nll_draws = draws[0][:, keep], draws[1][:, keep]
        proxy_kl = spearman_draws(proxy, kl_draws)
        intervals = (
            resamples.interval(proxy_kl),
            resamples.interval(spearman_draws(proxy, nll_draws)),
            resamples.interval(spearman_draws(pick(autoquant), kl_draws) - proxy_kl),
        )
    return ProxyRating(
        name=name,
        values=tuple(values),
        groups=len(keep),
        spearman_kl=stats.spearman(proxy, pick(kl)),
        spearman_kl_ci=intervals[0],
        spearman_nll=stats.spearman(proxy, pick(delta_nll)),
        spearman_nll_ci=intervals[1],
        autoquant_lead_kl=intervals[2],
    )


def rate_proxies(
    groups: Sequence[GroupInputs],
    formats: Sequence[str],
    autoquant: Sequence[float],
    kl: Sequence[float],
    delta_nll: Sequence[float],
    draws: tuple[Floats, Floats] | None,
    resamples: Resamples | None,
) -> tuple[ProxyRating, ...]:
    """Every proxy of :func:`proxy_columns` rated (columns with no finite value left out)."""
    return tuple(
        rate(name, values, autoquant, kl, delta_nll, draws, resamples)
        for name, values in proxy_columns(groups, formats)
        if any(not math.isnan(v) for v in values)
    )


def beats(rating: ProxyRating) -> str:
    """How AutoQuant compares with ``rating``'s proxy on KL, in a few words for a table cell."""
    lead: Interval = rating.autoquant_lead_kl
    if math.isnan(lead.low):
        return "n/a"
    if lead.low > 0:
        return "AutoQuant better"
    if lead.high < 0:
        return "proxy better"
    return "tie within noise"
