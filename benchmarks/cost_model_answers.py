"""The cost model's answers to issue 8's questions, from the shipped profiles (docs/cost-model.md
quotes the tables and cites the JSON this writes):

- CS-3, Llama-3.1-8B / 3.3-70B / 3.1-405B: tokens/s per user at batch 1 without speculative
  decoding (``cs3``) and with it (``cs3-spec``: Llama-3.2-1B draft, 7 tokens, the acceptance
  rate fitted on trn2), throughput at batch 8 and 64, and how many requests of 8k context fit
  in the SRAM left after the weights;
- trn2.48xlarge: TTFT of 1k, 10k and 32k-token prompts, unchunked and in 2k chunks.

Run: ``python benchmarks/cost_model_answers.py [--out FILE]``; writes benchmarks/results/cost_model_answers.json.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.results_file import write_results  # noqa: E402
from nodes.costmodel import CostModel  # noqa: E402
from nodes.profiles import load_hardware, load_model  # noqa: E402

MODELS = ("llama-3.1-8b", "llama-3.3-70b", "llama-3.1-405b")
CONTEXT = 1500  # decode context of the speed columns: a 1k prompt half-way through a 1k answer
KV_CONTEXT = 8192  # "requests of 8k context"
PROMPTS = (1024, 10240, 32768)
CHUNK = 2048


def cs3_answers() -> list[dict[str, Any]]:
    plain_hw, spec_hw = load_hardware("cs3"), load_hardware("cs3-spec")
    rows = []
    for name in MODELS:
        model = load_model(name)
        cm, spec = CostModel(plain_hw, model), CostModel(spec_hw, model)
        b1 = cm.decode_step([CONTEXT])
        s1 = spec.decode_step([CONTEXT])
        rows.append({
            "model": name, "systems": cm.systems(),
            "tok_per_s_per_user_b1": 1.0 / b1.time_s,
            "tok_per_s_per_user_b1_speculative": 1.0 / s1.time_s if spec.speculative else None,
            "speculative_tokens_per_round": s1.tokens_per_step if spec.speculative else None,
            "throughput_tok_per_s_b8": 8 / cm.decode_step([CONTEXT] * 8).time_s,
            "throughput_tok_per_s_b64": 64 / cm.decode_step([CONTEXT] * 64).time_s,
            "throughput_tok_per_s_b64_speculative": (64 / spec.decode_step([CONTEXT] * 64).time_s
                                                     if spec.speculative else None),
            "kv_capacity_bytes": cm.kv_capacity_bytes(),
            "requests_of_8k_context": cm.max_kv_tokens() // KV_CONTEXT,
        })
    return rows


def trn2_answers() -> list[dict[str, Any]]:
    hw = load_hardware("trn2")
    rows = []
    for name in MODELS:
        cm = CostModel(hw, load_model(name))
        for n in PROMPTS:
            whole = cm.prefill([n]).time_s
            chunked = sum(cm.prefill([min(CHUNK, n - c)], [c]).time_s for c in range(0, n, CHUNK))
            rows.append({"model": name, "prompt_tokens": n, "ttft_ms": whole * 1e3,
                         "ttft_chunked_ms": chunked * 1e3, "chunk_tokens": CHUNK,
                         "chunking_overhead_pct": 100.0 * (chunked / whole - 1.0)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="results file (default benchmarks/results/cost_model_answers.json)")
    args = ap.parse_args(argv)
    cs3, trn2 = cs3_answers(), trn2_answers()
    print(f"CS-3 decode, context {CONTEXT}; speculative = cs3-spec (draft llama-3.2-1b, k=7)")
    print(f"{'model':16} {'systems':>7} {'tok/s/user B=1':>15} {'with spec':>10} {'tok/s B=8':>10} {'tok/s B=64':>11} "
          f"{'8k requests':>12}")
    for r in cs3:
        spec = "n/a" if r["tok_per_s_per_user_b1_speculative"] is None else f"{r['tok_per_s_per_user_b1_speculative']:,.0f}"
        print(f"{r['model']:16} {r['systems']:>7} {r['tok_per_s_per_user_b1']:>15,.0f} {spec:>10} "
              f"{r['throughput_tok_per_s_b8']:>10,.0f} {r['throughput_tok_per_s_b64']:>11,.0f} {r['requests_of_8k_context']:>12,}")
    print(f"\ntrn2.48xlarge TTFT (ms), unchunked / in {CHUNK}-token chunks")
    print(f"{'model':16} " + " ".join(f"{f'{n // 1024}k':>17}" for n in PROMPTS))
    for name in MODELS:
        cells = [f"{r['ttft_ms']:>8,.0f}/{r['ttft_chunked_ms']:<8,.0f}" for r in trn2 if r["model"] == name]
        print(f"{name:16} " + " ".join(cells))
    write_results("cost_model_answers", {"cs3_decode_context": CONTEXT, "cs3": cs3, "trn2": trn2}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
