"""``pdtb profiles``: list and show hardware/model profiles, predict step times, check calibration."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from core.config import ConfigError, read_yaml
from core.units import format_byte_rate, format_bytes, format_flops

from nodes.calibration import FIT_GROUPS, PUBLISHED_CSV, calibration_csv, check, group_constants
from nodes.costmodel import CostModel
from nodes.profiles import hardware_names, load_hardware, load_model, model_names


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("profiles", help="hardware and model profiles, the cost model and its calibration")
    psub = p.add_subparsers(dest="profiles_command", metavar="SUBCOMMAND", required=True)

    ls = psub.add_parser("list", help="list the shipped hardware and model profiles")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=run_list)

    show = psub.add_parser("show", help="show one profile with its derived figures")
    show.add_argument("name", help="a hardware or model profile name, or a YAML path")
    show.add_argument("--json", action="store_true")
    show.set_defaults(func=run_show)

    pred = psub.add_parser("predict", help="predict a prefill or decode step time")
    pred.add_argument("--hardware", required=True, help="hardware profile name or YAML path")
    pred.add_argument("--model", required=True, help="model profile name or YAML path")
    phase = pred.add_mutually_exclusive_group(required=True)
    phase.add_argument("--prefill-tokens", type=_positive, metavar="N", help="prompt tokens per sequence")
    phase.add_argument("--decode-batch", type=_positive, metavar="B", help="sequences in the decode step")
    pred.add_argument("--batch", type=_positive, default=1, metavar="B", help="prompts in the prefill batch (default 1)")
    pred.add_argument("--context", type=_non_negative, metavar="C",
                      help="decode: context tokens per sequence (required); prefill: tokens already cached (chunked prefill)")
    pred.add_argument("--blocks-only", action="store_true",
                      help="transformer blocks alone, no embedding or LM head (as microbenchmarks time them)")
    pred.add_argument("--draft-model", metavar="MODEL",
                      help="decode with speculative decoding: this draft model proposes tokens on the same node")
    pred.add_argument("--speculative-k", type=_positive, default=4, metavar="K", help="draft tokens per verification step (default 4)")
    pred.add_argument("--acceptance-rate", type=float, default=0.8, metavar="A",
                      help="probability each draft token is accepted (default 0.8)")
    pred.add_argument("--json", action="store_true")
    pred.set_defaults(func=run_predict, _parser=pred)

    val = psub.add_parser("validate", help="check the cost model against every reference point (fitted and validation)")
    val.add_argument("--json", action="store_true")
    val.add_argument("--no-loo", action="store_true", help="skip the leave-one-out refits (faster)")
    val.set_defaults(func=run_validate)


def _positive(text: str) -> int:
    value = _non_negative(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected an integer > 0")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


# ---- list / show ------------------------------------------------------------------------------

def _hardware_summary(name: str) -> dict[str, Any]:
    hw = load_hardware(name)
    return {"name": hw.name, "chips": hw.chips, "peak_bf16_flops": hw.peak_flops_for("bf16") * hw.chips,
            "memory_bytes": hw.memory_bytes, "memory_bandwidth_Bps": hw.memory_bandwidth * hw.chips,
            "memory_kind": hw.memory_kind, "efa_bandwidth_bps": hw.efa_bandwidth_bps, "efa_nics": hw.efa_nics,
            "multi_system": hw.multi_system is not None, "description": hw.description}


def _model_summary(name: str) -> dict[str, Any]:
    m = load_model(name)
    return {"name": m.name, "layers": m.layers, "parameters": m.total_params, "active_parameters": m.active_params,
            "dtype": m.dtype, "weight_bytes": m.weight_bytes, "kv_bytes_per_token": m.kv_bytes_per_token,
            "moe": m.moe is not None, "mla": m.mla is not None, "description": m.description}


def run_list(args: argparse.Namespace) -> int:
    hws = [_hardware_summary(n) for n in hardware_names()]
    ms = [_model_summary(n) for n in model_names()]
    if args.json:
        print(json.dumps({"hardware": hws, "models": ms}, indent=2))
        return 0
    print("Hardware (per node; a multi-system profile: per system)")
    print(_table(["name", "chips", "peak bf16", "memory", "bandwidth", "EFA", "NICs"],
                 [[h["name"], str(h["chips"]), format_flops(h["peak_bf16_flops"]),
                   f"{h['memory_bytes'] / 1e9:,.1f} GB {h['memory_kind']}", format_byte_rate(h["memory_bandwidth_Bps"]),
                   f"{h['efa_bandwidth_bps'] / 1e9:,.0f} Gbit/s", str(h["efa_nics"])] for h in hws], right={1, 2, 3, 4, 5, 6}))
    print()
    print("Models")
    print(_table(["name", "layers", "params", "active", "dtype", "weights", "KV/token"],
                 [[m["name"], str(m["layers"]), f"{m['parameters'] / 1e9:.1f}B", f"{m['active_parameters'] / 1e9:.1f}B",
                   m["dtype"], f"{m['weight_bytes'] / 1e9:,.1f} GB", format_bytes(m["kv_bytes_per_token"])] for m in ms],
                 right={1, 2, 3, 5, 6}))
    return 0


def run_show(args: argparse.Namespace) -> int:
    name = args.name
    is_hw = name in hardware_names() or (name not in model_names() and _kind_of(name) == "hardware")
    if is_hw:
        hw = load_hardware(name)
        data = hw.model_dump(mode="json")
        data["derived"] = {"memory_bytes": hw.memory_bytes, "efa_bandwidth_bps": hw.efa_bandwidth_bps,
                           "peak_bf16_flops_per_node": hw.peak_flops_for("bf16") * hw.chips,
                           "memory_bandwidth_Bps_per_node": hw.memory_bandwidth * hw.chips}
        kind = "hardware"
    else:
        m = load_model(name)
        data = m.model_dump(mode="json")
        data["derived"] = {"total_params": m.total_params, "active_params": m.active_params,
                           "weight_bytes": m.weight_bytes, "kv_bytes_per_token": m.kv_bytes_per_token,
                           "flops_per_token_at_context_0": m.flops_per_token(0),
                           "flops_per_token_at_context_8192": m.flops_per_token(8192)}
        kind = "model"
    if args.json:
        print(json.dumps({"kind": kind, **data}, indent=2))
        return 0
    print(f"{kind}: {data['name']}")
    _print_tree({k: v for k, v in data.items() if k != "name"}, 1)
    return 0


def _kind_of(path: str) -> str:
    if not Path(path).is_file():
        raise ConfigError(path, [("name", "no such profile or file; known profiles: "
                                          f"{', '.join(hardware_names() + model_names())}")])
    data = read_yaml(path)
    if not isinstance(data, dict) or data.get("kind") not in ("hardware", "model"):
        raise ConfigError(path, [("kind", "expected 'hardware' or 'model' (or give a shipped profile name: "
                                          f"{', '.join(hardware_names() + model_names())})")])
    return data["kind"]


def _print_tree(data: dict[str, Any], depth: int) -> None:
    pad = "  " * depth
    for key, value in data.items():
        if value is None:
            continue
        if isinstance(value, dict):
            print(f"{pad}{key}:")
            _print_tree(value, depth + 1)
        else:
            print(f"{pad}{key}: {value}")


# ---- predict ------------------------------------------------------------------------------------

def run_predict(args: argparse.Namespace) -> int:
    hw, m = load_hardware(args.hardware), load_model(args.model)
    cm = CostModel(hw, m, include_head=not args.blocks_only)
    if args.prefill_tokens is not None:
        context = args.context or 0
        cost = cm.prefill([args.prefill_tokens] * args.batch, [context] * args.batch)
        step = {"phase": "prefill", "batch": args.batch, "prompt_tokens": args.prefill_tokens, "cached_tokens": context}
    else:
        if args.context is None:
            args._parser.error("--decode-batch needs --context")
        if args.draft_model is not None or cm.speculative is not None:
            if args.draft_model is not None:
                if not 0.0 <= args.acceptance_rate <= 1.0:
                    args._parser.error("--acceptance-rate must be within [0, 1]")
                plain_hw = hw.model_copy(update={"decode": hw.decode.model_copy(update={"speculative": None})})
                draft = CostModel(plain_hw, load_model(args.draft_model), include_head=not args.blocks_only)
                k, a = args.speculative_k, args.acceptance_rate
            else:  # the profile's decode.speculative
                assert cm.draft is not None and cm.speculative is not None
                draft, k, a = cm.draft, cm.speculative.tokens_per_step, cm.speculative.acceptance_rate
            spec = cm.speculative_decode_step([args.context] * args.decode_batch, draft, k, a)
            cost = spec.verify
            step = {"phase": "speculative_decode", "batch": args.decode_batch, "context": args.context,
                    "draft_model": draft.model.name, "speculative_k": k, "acceptance_rate": a,
                    "from_profile": args.draft_model is None, "tokens_per_step": spec.tokens_per_step,
                    "draft_ms": spec.draft_s * 1e3, "verify_ms": spec.verify.time_s * 1e3,
                    "round_overhead_ms": spec.overhead_s * 1e3, "round_ms": spec.time_s * 1e3,
                    "time_per_token_ms": spec.time_per_token_s * 1e3,
                    "tokens_per_s_per_user": 1.0 / spec.time_per_token_s}
        else:
            cost = cm.decode_step([args.context] * args.decode_batch)
            step = {"phase": "decode", "batch": args.decode_batch, "context": args.context,
                    "tokens_per_s_per_user": 1.0 / cost.time_s}
    out = {"hardware": hw.name, "model": m.name, **step, "blocks_only": args.blocks_only,
           "time_ms": cost.time_s * 1e3, "compute_ms": cost.compute_s * 1e3, "memory_ms": cost.memory_s * 1e3,
           "overhead_ms": cost.overhead_s * 1e3, "comm_ms": cost.comm_s * 1e3, "bound": cost.bound,
           "flops": cost.flops, "bytes": cost.bytes,
           "fits": cm.fits(), "systems": cm.systems(), "weight_bytes": m.weight_bytes,
           "memory_capacity_bytes": cm.memory_capacity_bytes(), "kv_capacity_bytes": cm.kv_capacity_bytes(),
           "kv_bytes_per_token": m.kv_bytes_per_token, "max_kv_tokens": cm.max_kv_tokens()}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    what = (f"prefill {args.batch} x {args.prefill_tokens} tokens" + (f" after {step['cached_tokens']} cached" if step.get("cached_tokens") else "")
            if step["phase"] == "prefill" else f"decode step, batch {args.decode_batch}, context {args.context}")
    print(f"{m.name} on {hw.name}: {what}")
    if step["phase"] == "speculative_decode":
        print(f"  speculative: draft {step['draft_model']} k={step['speculative_k']} acceptance {step['acceptance_rate']:g}"
              f"{' (from the profile)' if step['from_profile'] else ''}: {step['tokens_per_step']:.2f} tokens per round of "
              f"{step['round_ms']:.3f} ms (draft {step['draft_ms']:.3f} ms, fixed {step['round_overhead_ms']:.3f} ms); "
              f"{step['tokens_per_s_per_user']:,.1f} tokens/s per user; verification step below")
    elif step["phase"] == "decode":
        print(f"  speed     {step['tokens_per_s_per_user']:,.1f} tokens/s per user")
    print(f"  time      {out['time_ms']:.3f} ms  (bound: {cost.bound})")
    print(f"  compute   {out['compute_ms']:.3f} ms   ({cost.flops / 1e12:.3f} TFLOP)")
    print(f"  memory    {out['memory_ms']:.3f} ms   ({format_bytes(cost.bytes)} moved)")
    print(f"  overhead  {out['overhead_ms']:.3f} ms")
    print(f"  comm      {out['comm_ms']:.3f} ms   ({'pipeline over ' + str(cm.systems()) + ' systems' if hw.multi_system else 'tensor parallel over ' + str(hw.chips) + ' chips' if hw.chips > 1 else 'single chip'})")
    print(f"  fits      {'yes' if out['fits'] else 'NO'}: weights {format_bytes(m.weight_bytes)} in "
          f"{format_bytes(out['memory_capacity_bytes'])} usable; KV room {format_bytes(out['kv_capacity_bytes'])} "
          f"= {out['max_kv_tokens']} tokens at {format_bytes(m.kv_bytes_per_token)}/token")
    return 0


# ---- validate ------------------------------------------------------------------------------------

def _unit(metric: str) -> str:
    return "tok/s" if metric.startswith("tok_per_s") else "ms"


def _fit_summary() -> list[dict[str, Any]]:
    """Per fit group: its free constants and how many fitted and validation points it has."""
    from nodes.calibration import reference_points
    points = reference_points()
    out = []
    for g in FIT_GROUPS:
        mine = [p for p in points if p.hardware in g.profiles]
        out.append({"group": g.name, "profiles": list(g.profiles), "constants": group_constants(g),
                    "fitted_points": sum(p.role == "fitted" for p in mine),
                    "validation_points": sum(p.role == "validation" for p in mine)})
    return out


def run_validate(args: argparse.Namespace) -> int:
    """Fitted and validation points apart, leave-one-out errors for the fitted ones; exit 1
    when any point (a validation point above all) is outside its tolerance."""
    results = check(loo=not args.no_loo)
    failed = [r for r in results if not r.ok]
    groups = _fit_summary()
    if args.json:
        print(json.dumps({"ok": not failed, "calibration_csv": str(calibration_csv()),
                          "published_points_csv": str(PUBLISHED_CSV), "fit_groups": groups,
                          "points": [r.to_dict() for r in results]}, indent=2))
        return 1 if failed else 0
    sources: list[str] = []
    for role in ("fitted", "validation"):
        rows = []
        for r in results:
            p = r.point
            if p.role != role:
                continue
            if p.source not in sources:
                sources.append(p.source)
            unit = _unit(p.metric)
            loo = "" if role == "validation" else ("n/a" if r.loo_error is None else f"{100 * r.loo_error:+.1f}%")
            rows.append([p.hardware, p.model, p.id or p.label, p.metric, p.label + (" spec" if p.speculative else ""),
                         f"{p.value:,.4g} {unit}", f"{r.predicted:,.4g} {unit}", f"{100 * r.error:+.1f}%", loo,
                         f"±{100 * p.tolerance:.0f}%", "ok" if r.ok else "FAIL", r.bound,
                         f"[{sources.index(p.source) + 1}]"])
        title = ("FITTED points (the profiles' free constants were fitted to these; loo: the error of a fit made "
                 "without the point, n/a where that fit is underdetermined)" if role == "fitted"
                 else "VALIDATION points (kept out of every fit)")
        print(title)
        print(_table(["hardware", "model", "point", "metric", "step", "reference", "predicted", "error", "loo", "tol", "",
                      "bound", "src"], rows, right={5, 6, 7, 8, 9}))
        print()
    for g in groups:
        print(f"{g['group']}: {len(g['constants'])} free constants ({', '.join(g['constants'])}) fitted to "
              f"{g['fitted_points']} points; {g['validation_points']} validation points")
    print()
    for i, src in enumerate(sources, 1):
        print(f"[{i}] {src}")
    print(f"published points from {PUBLISHED_CSV}; H200 rows from {calibration_csv()}")
    worst = max(results, key=lambda r: abs(r.error))
    print(f"{len(results) - len(failed)} of {len(results)} points within tolerance; "
          f"largest error {100 * worst.error:+.1f}% ({worst.point.hardware} {worst.point.model} {worst.point.label})")
    return 1 if failed else 0
