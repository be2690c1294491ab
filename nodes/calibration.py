"""Reference points the cost model is calibrated against, and the check of each.

Published serving figures (AWS Neuron tutorials for trn2, Cerebras' launch figures for CS-3)
and every prefill and decode row of the H200 measurement are predicted with the shipped
profiles; ``pdtb profiles validate`` prints them and fails when one is off by more than its
tolerance. The points check the model: they are not read by it.
"""
from __future__ import annotations

import csv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from nodes.costmodel import CostModel
from nodes.profiles import DATA_DIR, load_hardware, load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CSV = REPO_ROOT.parent / "shared" / "calibration" / "h200_llama_pytorch.csv"
PACKAGED_CSV = DATA_DIR / "calibration" / "h200_llama_pytorch.csv"
DEFAULT_TOLERANCE = 0.15

Metric = Literal["ttft_ms", "itl_ms", "prefill_ms", "decode_step_ms", "tok_per_s_per_user"]


@dataclass(frozen=True)
class ReferencePoint:
    """One published or measured figure and the step that reproduces it.

    ``phase`` ``prefill``: one batch of ``batch`` prompts of ``tokens`` tokens;
    ``decode``: one step of ``batch`` sequences over ``context`` tokens each.
    ``timed_layers``/``scale``: the figure was timed on that many layers and multiplied by
    ``scale``; ``blocks_only``: no embedding or LM head was run. ``role`` says whether the
    profile's constants were fitted to the point or it was kept out as validation;
    ``speculative`` whether the figure was measured with speculative decoding."""

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
    role: Literal["fitted", "validation"] = "fitted"
    speculative: bool = False

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

    @property
    def ok(self) -> bool:
        return abs(self.error) <= self.point.tolerance

    def to_dict(self) -> dict[str, object]:
        out = asdict(self.point)
        out.update(label=self.point.label, predicted=self.predicted, error_pct=100.0 * self.error,
                   bound=self.bound, ok=self.ok)
        return out


_NEURON = ("AWS Neuron docs, vLLM on trn2.48xlarge with NxD Inference tutorial: BF16, batch 1, "
           "10k-token prompt, 1.5k output tokens")
_CEREBRAS = "Cerebras inference launch blog, Aug 2024 (no speculative decoding)"
# ITL is the mean over 1.5k output tokens: the context then averages 10,000 + 750 tokens
_TRN2_PROMPT, _TRN2_ITL_CONTEXT = 10_000, 10_750
# Cerebras did not state the prompt; their launch demos used short chat prompts
_CS3_CONTEXT = 1_000


def published_points() -> list[ReferencePoint]:
    return [
        ReferencePoint("trn2", "llama-3.3-70b", "ttft_ms", 576.0, _NEURON, "prefill", tokens=_TRN2_PROMPT),
        ReferencePoint("trn2", "llama-3.3-70b", "itl_ms", 19.8, _NEURON, "decode", context=_TRN2_ITL_CONTEXT),
        ReferencePoint("trn2", "llama-3.1-405b", "ttft_ms", 2440.0, _NEURON, "prefill", tokens=_TRN2_PROMPT),
        ReferencePoint("trn2", "llama-3.1-405b", "itl_ms", 37.9, _NEURON, "decode", context=_TRN2_ITL_CONTEXT),
        ReferencePoint("cs3", "llama-3.1-8b", "tok_per_s_per_user", 1800.0, _CEREBRAS, "decode", context=_CS3_CONTEXT),
        ReferencePoint("cs3", "llama-3.1-70b", "tok_per_s_per_user", 450.0, _CEREBRAS, "decode", context=_CS3_CONTEXT),
    ]


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
        for row in csv.DictReader(fh):
            kind = row["kind"]
            if kind not in ("prefill", "decode_step_graph"):
                continue
            model = row["model"]
            scaled = model == "llama-3.1-70b"
            common = dict(hardware="h200", model=model, value=float(row["ms"]), source=source,
                          batch=int(row["B"]), blocks_only=True,
                          timed_layers=8 if scaled else None, scale=10.0 if scaled else 1.0)
            if kind == "prefill":
                points.append(ReferencePoint(metric="prefill_ms", phase="prefill", tokens=int(row["T"]), **common))
            else:
                points.append(ReferencePoint(metric="decode_step_ms", phase="decode", context=int(row["C"]), **common))
    return points


def reference_points() -> list[ReferencePoint]:
    return published_points() + h200_points()


def predict_point(point: ReferencePoint, hardware=None, model=None) -> tuple[float, str]:
    """The model's value for ``point`` in the point's own metric, and what bounds it."""
    hw = hardware or load_hardware(point.hardware)
    m = model or load_model(point.model)
    if point.timed_layers is not None:
        m = m.model_copy(update={"layers": point.timed_layers})
    cm = CostModel(hw, m, include_head=not point.blocks_only)
    if point.phase == "prefill":
        cost = cm.prefill([point.tokens] * point.batch)
    else:
        cost = cm.decode_step([point.context] * point.batch)
    seconds = cost.time_s * point.scale
    if point.metric == "tok_per_s_per_user":
        return 1.0 / seconds, cost.bound
    return seconds * 1e3, cost.bound


def check(points: list[ReferencePoint] | None = None) -> list[CheckedPoint]:
    out = []
    for p in points if points is not None else reference_points():
        predicted, bound = predict_point(p)
        out.append(CheckedPoint(p, predicted, predicted / p.value - 1.0, bound))
    return out
