"""Print the cost model's answers to issue 8's questions as tables (docs/cost-model.md quotes them):
CS-3 decode speed per user (with and without speculative decoding), batched throughput and
8k-context capacity; trn2 TTFT chunked and unchunked."""
from __future__ import annotations

from nodes.costmodel import CostModel
from nodes.profiles import load_hardware, load_model

MODELS = ("llama-3.1-8b", "llama-3.3-70b", "llama-3.1-405b")
DRAFT = "llama-3.1-8b"  # the smallest shipped model profile; no draft for 8B itself
SPEC_K, ACCEPTANCE = 4, 0.8  # assumed: typical for a same-family draft (not a published Cerebras figure)
CONTEXT = 1024  # decode context for the speed columns
CHUNK = 2048  # chunk size for chunked prefill


def cs3_table() -> None:
    hw = load_hardware("cs3")
    print(f"CS-3 decode, context {CONTEXT}; speculative: draft {DRAFT}, k={SPEC_K}, acceptance {ACCEPTANCE}")
    print(f"{'model':16} {'systems':>7} {'tok/s/user B=1':>15} {'with spec':>10} {'tok/s B=8':>10} {'tok/s B=64':>11} {'8k requests':>12}")
    for name in MODELS:
        cm = CostModel(hw, load_model(name))
        b1 = 1.0 / cm.decode_step([CONTEXT]).time_s
        spec = "n/a"
        if name != DRAFT:
            step = cm.speculative_decode_step([CONTEXT], CostModel(hw, load_model(DRAFT)), SPEC_K, ACCEPTANCE)
            spec = f"{1.0 / step.time_per_token_s:,.0f}"
        b8, b64 = (b / cm.decode_step([CONTEXT] * b).time_s for b in (8, 64))
        print(f"{name:16} {cm.systems():>7} {b1:>15,.0f} {spec:>10} {b8:>10,.0f} {b64:>11,.0f} {cm.max_kv_tokens() // 8192:>12,}")


def trn2_table() -> None:
    hw = load_hardware("trn2")
    print(f"\ntrn2.48xlarge TTFT (prefill time, ms), unchunked / chunked by {CHUNK}")
    print(f"{'model':16} " + " ".join(f"{f'{n // 1000}k':>17}" for n in (1024, 10240, 32768)))
    for name in MODELS:
        cm = CostModel(hw, load_model(name))
        cells = []
        for n in (1024, 10240, 32768):
            whole = cm.prefill([n]).time_s
            chunked = sum(cm.prefill([min(CHUNK, n - c)], [c]).time_s for c in range(0, n, CHUNK))
            cells.append(f"{whole * 1e3:>8,.0f}/{chunked * 1e3:<8,.0f}")
        print(f"{name:16} " + " ".join(cells))


if __name__ == "__main__":
    cs3_table()
    trn2_table()
