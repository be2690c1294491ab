"""Reference points, the fit of the profiles' calibrated constants, and the check of each point.

Published serving figures (AWS Neuron tutorials for trn2, Cerebras' figures for CS-3) live in
``data/calibration/published_points.csv`` with their source, date and configuration; each is
``fitted`` (a profile's constants were fitted to it) or ``validation`` (kept out of every fit).
The H200 rows of ``h200_llama_pytorch.csv`` are the H200 profile's fitted points.

:func:`fit` refits a family's free constants (those its profiles list under ``fitted:``) to
its fitted points, least squares on log errors by Nelder-Mead, so ``pdtb profiles validate``
can report leave-one-out errors: each fitted point predicted by a fit made without it.
The points check the model: they are not read by it.
"""
from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

from nodes.costmodel import CostModel
from nodes.profiles import DATA_DIR, HardwareProfile, ModelProfile, load_hardware, load_model
from nodes.profiles.hardware import get_constant, with_constants

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CSV = REPO_ROOT.parent / "shared" / "calibration" / "h200_llama_pytorch.csv"
PACKAGED_CSV = DATA_DIR / "calibration" / "h200_llama_pytorch.csv"
PUBLISHED_CSV = DATA_DIR / "calibration" / "published_points.csv"
DEFAULT_TOLERANCE = 0.15

Metric = Literal["ttft_ms", "itl_ms", "prefill_ms", "decode_step_ms", "tok_per_s_per_user"]
Role = Literal["fitted", "validation"]


@dataclass(frozen=True)
class ReferencePoint:
    """One published or measured figure and the step that reproduces it.

    ``phase`` ``prefill``: one batch of ``batch`` prompts of ``tokens`` tokens (TTFT);
    ``decode``: one step of ``batch`` sequences over ``context`` tokens each (a published
    ITL is the mean over the output, so its context is the prompt plus half the output).
    ``chips`` runs the point on that many chips of the profile's instance (a smaller
    tensor-parallel group); ``dtype``/``compute_dtype`` override the model's weight and matmul
    precision. ``timed_layers``/``scale``: the figure was timed on that many layers and
    multiplied by ``scale``; ``blocks_only``: no embedding or LM head was run. ``role`` says
    whether the profile's constants were fitted to the point or it was kept out as validation;
    ``speculative`` whether the figure was measured with speculative decoding (its hardware
    profile then carries ``decode.speculative``)."""

    hardware: str
    model: str
    metric: Metric
    value: float
    source: str
    phase: Literal["prefill", "decode"]
    tokens: int = 0
    batch: int = 1
    context: int = 0
    timed_layers: int | None = None
    scale: float = 1.0
    blocks_only: bool = False
    tolerance: float = DEFAULT_TOLERANCE
    role: Role = "fitted"
    speculative: bool = False
    id: str = ""
    chips: int | None = None
    dtype: str | None = None
    compute_dtype: str | None = None
    date: str = ""
    configuration: str = ""
    draft_model: str | None = None
    spec_k: int | None = None

    @property
    def label(self) -> str:
        if self.phase == "prefill":
            return f"prefill B={self.batch} T={self.tokens}"
        return f"decode B={self.batch} C={self.context}"


@dataclass(frozen=True)
class CheckedPoint:
    point: ReferencePoint
    predicted: float
    error: float  # (predicted - value) / value
    bound: str
    loo_error: float | None = None  # fitted points: the error of a fit made without this point

    @property
    def ok(self) -> bool:
        return abs(self.error) <= self.point.tolerance

    def to_dict(self) -> dict[str, object]:
        out = asdict(self.point)
        out.update(label=self.point.label, predicted=self.predicted, error_pct=100.0 * self.error,
                   bound=self.bound, ok=self.ok,
                   loo_error_pct=None if self.loo_error is None else 100.0 * self.loo_error)
        return out


# ---- the points ---------------------------------------------------------------------------------

def published_points(path: Path | None = None) -> list[ReferencePoint]:
    """The trn2 and CS-3 points of ``published_points.csv``."""
    path = path or PUBLISHED_CSV
    points = []
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            prompt, output = int(row["prompt_tokens"]), int(row["output_tokens"] or 0)
            phase = row["phase"]
            context = int(row["context"]) if row["context"] else prompt + output // 2
            spec = row["speculative"] == "yes"
            points.append(ReferencePoint(
                hardware=row["hardware"], model=row["model"], metric=row["metric"], value=float(row["value"]),
                source=row["source"], phase=phase, tokens=prompt if phase == "prefill" else 0,
                batch=int(row["batch"]), context=context if phase == "decode" else 0, role=row["role"],
                speculative=spec, id=row["id"], chips=int(row["chips"]) if row["chips"] else None,
                dtype=row["dtype"] or None, compute_dtype=row["compute_dtype"] or None, date=row["date"],
                configuration=row["instance"], draft_model=row["draft_model"] or None,
                spec_k=int(row["spec_k"]) if row["spec_k"] else None))
    return points


def calibration_csv() -> Path:
    """The H200 measurement: ``../shared/calibration`` beside the repository, else the packaged copy."""
    return SHARED_CSV if SHARED_CSV.is_file() else PACKAGED_CSV


def h200_points(path: Path | None = None) -> list[ReferencePoint]:
    """Every prefill and decode row of the H200 measurement (blocks only; 70B rows timed on
    8 layers and scaled by 10, as its README says)."""
    path = path or calibration_csv()
    source = f"measured on one H200, PyTorch eager prefill / CUDA-graph decode ({path.name})"
    points = []
    with path.open(newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            kind = row["kind"]
            if kind not in ("prefill", "decode_step_graph"):
                continue
            model = row["model"]
            scaled = model == "llama-3.1-70b"
            common = dict(hardware="h200", model=model, value=float(row["ms"]), source=source,
                          batch=int(row["B"]), blocks_only=True, date="2026-11-26",
                          timed_layers=8 if scaled else None, scale=10.0 if scaled else 1.0)
            if kind == "prefill":
                points.append(ReferencePoint(metric="prefill_ms", phase="prefill", tokens=int(row["T"]),
                                             id=f"h200-{model}-prefill-T{row['T']}", **common))
            else:
                points.append(ReferencePoint(metric="decode_step_ms", phase="decode", context=int(row["C"]),
                                             id=f"h200-{model}-decode-B{row['B']}-C{row['C']}", **common))
    return points


def reference_points() -> list[ReferencePoint]:
    return published_points() + h200_points()


# ---- predicting a point -------------------------------------------------------------------------

def point_setup(point: ReferencePoint, hardware: HardwareProfile | None = None,
                model: ModelProfile | None = None) -> tuple[HardwareProfile, ModelProfile]:
    """The hardware and model a point ran on: its profiles with its chips and precisions."""
    hw = hardware or load_hardware(point.hardware)
    m = model or load_model(point.model)
    if point.chips is not None and hw.family != "wafer" and point.chips != hw.chips:
        hw = hw.model_copy(update={"chips": point.chips})
    update = {k: v for k, v in (("dtype", point.dtype), ("compute_dtype", point.compute_dtype)) if v}
    if point.timed_layers is not None:
        update["layers"] = point.timed_layers
    if update:
        m = m.model_copy(update=update)
    return hw, m


def predict_point(point: ReferencePoint, hardware: HardwareProfile | None = None,
                  model: ModelProfile | None = None) -> tuple[float, str]:
    """The model's value for ``point`` in the point's own metric, and what bounds it."""
    hw, m = point_setup(point, hardware, model)
    cm = CostModel(hw, m, include_head=not point.blocks_only)
    if point.phase == "prefill":
        cost = cm.prefill([point.tokens] * point.batch)
    else:
        cost = cm.decode_step([point.context] * point.batch)
    seconds = cost.time_s * point.scale
    if point.metric == "tok_per_s_per_user":
        return 1.0 / seconds, cost.bound
    return seconds * 1e3, cost.bound


# ---- fitting ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FitGroup:
    """Profiles that share free constants (a base profile and its speculative deployment).
    ``ties``: constants that are not free but equal to a fitted one (key -> the fitted key)."""

    name: str
    profiles: tuple[str, ...]
    ties: tuple[tuple[str, str], ...] = field(default=())


FIT_GROUPS: tuple[FitGroup, ...] = (
    FitGroup("h200", ("h200",)),
    FitGroup("trn2", ("trn2", "trn2-spec"), ties=(("efficiency.attention", "efficiency.compute"),)),
    FitGroup("cs3", ("cs3", "cs3-spec"), ties=(("prefill.step", "decode.step"),)),
)


def group_constants(group: FitGroup) -> list[str]:
    """The free constants of a group: every key its profiles list under ``fitted:``."""
    keys: list[str] = []
    for name in group.profiles:
        for key in load_hardware(name).fitted:
            if key not in keys:
                keys.append(key)
    return keys


def group_points(group: FitGroup, role: Role = "fitted") -> list[ReferencePoint]:
    """The group's reference points of ``role``."""
    return [p for p in reference_points() if p.hardware in group.profiles and p.role == role]


def _profiles_with(group: FitGroup, values: dict[str, float]) -> dict[str, HardwareProfile]:
    """The group's profiles with ``values`` (and the constants tied to them) in place."""
    values = dict(values)
    for tied, to in group.ties:
        if to in values:
            values[tied] = values[to]
    out = {}
    for name in group.profiles:
        hw = load_hardware(name)
        own = {k: v for k, v in values.items() if k in hw.fitted or any(k == t for t, _ in group.ties)}
        out[name] = with_constants(hw, own) if own else hw
    return out


def _log_error_sum(group: FitGroup, keys: list[str], points: Sequence[ReferencePoint], x: Sequence[float]) -> float:
    profiles = _profiles_with(group, {k: math.exp(v) for k, v in zip(keys, x)})
    total = 0.0
    for p in points:
        try:
            predicted, _ = predict_point(p, profiles[p.hardware])
        except ValueError:
            return math.inf
        total += math.log(predicted / p.value) ** 2
    return total


def fit(group: FitGroup, points: Sequence[ReferencePoint] | None = None, *,
        start: dict[str, float] | None = None) -> dict[str, float]:
    """Least-squares fit (log errors) of the group's free constants to ``points`` (default: its
    fitted points), starting from the shipped values."""
    keys = group_constants(group)
    if points is None:
        points = group_points(group)
    if start is None:
        start = {}
        for k in keys:
            for name in group.profiles:
                hw = load_hardware(name)
                if k in hw.fitted:
                    start[k] = get_constant(hw, k)
                    break
    x0 = [math.log(start[k]) for k in keys]
    best = nelder_mead(lambda x: _log_error_sum(group, keys, points, x), x0)
    values = {k: math.exp(v) for k, v in zip(keys, best)}
    for k in keys:  # a rate cannot exceed 1
        if k.endswith(("acceptance_rate", "utilisation", "compute", "memory", "attention")):
            values[k] = min(values[k], 1.0)
    return values


def nelder_mead(f: Callable[[Sequence[float]], float], x0: Sequence[float], *, step: float = 0.2,
                iterations: int = 600, tolerance: float = 1e-10) -> list[float]:
    """Minimise ``f`` from ``x0`` (the standard simplex method; no SciPy in the project)."""
    n = len(x0)
    simplex = [list(x0)] + [[x + (step if i == j else 0.0) for j, x in enumerate(x0)] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(iterations):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if abs(values[-1] - values[0]) < tolerance:
            break
        centroid = [sum(x[j] for x in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        reflect = [c + (c - w) for c, w in zip(centroid, worst)]
        fr = f(reflect)
        if fr < values[0]:
            expand = [c + 2 * (c - w) for c, w in zip(centroid, worst)]
            fe = f(expand)
            simplex[-1], values[-1] = (expand, fe) if fe < fr else (reflect, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflect, fr
        else:
            contract = [c + 0.5 * (w - c) for c, w in zip(centroid, worst)]
            fc = f(contract)
            if fc < values[-1]:
                simplex[-1], values[-1] = contract, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (x - b) for b, x in zip(best, s)] for s in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    return simplex[min(range(n + 1), key=values.__getitem__)]


def _configuration(p: ReferencePoint) -> tuple:
    return (p.hardware, p.model, p.metric, p.phase, p.tokens, p.context, p.batch, p.chips, p.dtype)


def leave_one_out(group: FitGroup) -> dict[str, float | None]:
    """Point id -> error of the prediction of a fit made without that point (fitted points only).

    None where the fit without the point is underdetermined: a constant loses every point it
    was fitted to, or fewer distinct configurations than free constants remain."""
    fitted = group_points(group)
    keys = group_constants(group)
    lists: dict[str, set[str]] = {}
    for name in group.profiles:
        for key, ids in load_hardware(name).fitted.items():
            lists.setdefault(key, set()).update(ids)
    full = fit(group, fitted)
    out: dict[str, float | None] = {}
    for held in fitted:
        rest = [p for p in fitted if p is not held]
        if (any(not (ids - {held.id}) for ids in lists.values())
                or len({_configuration(p) for p in rest}) < len(keys)):
            out[held.id] = None
            continue
        values = fit(group, [p for p in fitted if p is not held], start=full)
        profiles = _profiles_with(group, values)
        predicted, _ = predict_point(held, profiles[held.hardware])
        out[held.id] = predicted / held.value - 1.0
    return out


# ---- the check ----------------------------------------------------------------------------------

def check(points: list[ReferencePoint] | None = None, *, loo: bool = False) -> list[CheckedPoint]:
    """Every point predicted with the shipped profiles; with ``loo``, fitted points of the
    fitted groups also get their leave-one-out error."""
    errors: dict[str, float | None] = {}
    if loo:
        for group in FIT_GROUPS:
            errors.update(leave_one_out(group))
    out = []
    for p in points if points is not None else reference_points():
        predicted, bound = predict_point(p)
        out.append(CheckedPoint(p, predicted, predicted / p.value - 1.0, bound, errors.get(p.id)))
    return out
