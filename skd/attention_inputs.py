"""The score fit without a pass of its own: the attention inputs of the calibration pass, replayed on the
transformed model (skd.wpac(score_fit=True) with joint_qk=True, whose calibration pass computes every attention
explicitly).

The fit reads the transformed model's q, k and attention A over the first 1/SCORE_FIT_SHARE of the calibration
samples. WPAC's transforms preserve the function at full width, so every block's attention input x (after any
pre-norm), its additive bias and the token weights are the same before and after them, up to rounding.
`AttentionInputs` records them for those samples during the calibration pass (skd.attention_stats.
explicit_forward(inputs=)), and `replay` computes each fitted block's q, k and A from them with the transformed
q/k Linears alone (q and k: 2/3 of the qkv GEMM; v, the output projection, the MLP and every block after the last
fitted one are skipped) and feeds the accumulators, as skd.attention_stats.attention_pass would on the same samples.

Memory: the inputs of the recorded blocks, in the model's dtype, plus each block's bias and the token weights
(MiniLM, 64 sentences padded to 56 tokens: 38 MB; ViT-B/16 at 224 px with skd.wpac's default 1024 samples, 256
recorded: 1.9 GB). Above `MAX_BYTES` (on a CUDA device: at most a quarter of its free memory, `byte_bound`) the
recording stops and is dropped (`complete` False): the caller then runs the pass instead.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import torch

from ._checks import check_int
from ._dist import all_reduce_flat, rank_world
from .attention_stats import CHUNK_TOKENS, ScoreFit, attention_weights, heads, real_lengths
from .models import BlockSpec

# Recording stops above this many bytes (and the caller runs a pass instead): less than the calibration pass
# itself holds for one batch of 64 ViT-B images (its attention weights alone are 1.4 GB, its saved activations
# several GB), and enough for ViT-B's default 256 recorded images
MAX_BYTES = 2 << 30

def byte_bound(device: torch.device) -> int:
    """The recording's byte bound on `device`: MAX_BYTES, and on a CUDA device at most a quarter of the memory free
    now (the recording lives there, beside the calibration pass's own batches and saved activations)."""
    if device.type != "cuda":
        return MAX_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return min(MAX_BYTES, free // 4)


# (x (S, N, D), bias broadcastable to (S, H, N, N) or None, token weights (S, N) or None)
Entry = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


class AttentionInputs:
    """Records, for the first `num_samples` samples that pass through `explicit_forward`, the attention input and
    bias of the blocks in `which` and the token weights, and replays them (`replay`).

    blocks: the adapter's BlockSpecs; which: indices of the blocks to record; num_samples: this process's share
    of the samples (skd._dist.rank_share); max_bytes: the recording's bound (default MAX_BYTES)."""

    def __init__(self, blocks: Sequence[BlockSpec], which: Collection[int], num_samples: int,
                 max_bytes: int | None = None) -> None:
        check_int("num_samples", num_samples, 1)
        bad = [i for i in which if not 0 <= i < len(blocks)]
        if bad:
            raise ValueError(f"blocks {bad}: the model has blocks 0 to {len(blocks) - 1}")
        self.blocks = blocks
        self.which = frozenset(which)
        self.num_samples = num_samples
        self.max_bytes = MAX_BYTES if max_bytes is None else max_bytes
        self.samples = 0  # recorded so far (this process)
        self.nbytes = 0
        self.overflow = False
        self._batches: list[dict[int, Entry]] = []  # per batch: block -> (x, bias, token weights)
        self._last = len(blocks)  # the last block recorded: a block index not above it starts a new batch
        self._taken = 0  # samples of the current batch to keep

    @property
    def complete(self) -> bool:
        """Whether every sample that passed (up to num_samples) was recorded: False after an overflow."""
        return not self.overflow

    def record(self, i: int, x: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor | None) -> None:
        """Block i's attention input x (S, N, D) (detached), its bias (broadcastable to (S, H, N, N), detached) or
        None, and the token weights w (S, N) or None, of the batch passing through. Blocks come in increasing
        order within a batch; the sequences are contiguous per sample, blocks[i].sequences of them each
        (ValueError otherwise). The tensors are kept by reference (the forward does not change them in place), or
        copies of their first sequences when a batch is only partly needed."""
        spec = self.blocks[i]
        s = x.shape[0]
        if s % spec.sequences:
            raise ValueError(f"{spec.name}: {s} attention sequences are not a whole number of samples of "
                             f"{spec.sequences} sequences")
        if i <= self._last:  # a new batch
            self._taken = min(max(self.num_samples - self.samples, 0), s // spec.sequences)
            self.samples += self._taken
            if self._taken and not self.overflow:
                self._batches.append({})
        self._last = i
        if not self._taken or self.overflow or i not in self.which:
            return
        keep = self._taken * spec.sequences
        x, w = _first(x, keep), None if w is None else _first(w, keep)
        if bias is not None and bias.dim() == 4 and bias.shape[0] == s:  # per sequence; else shared by all
            bias = _first(bias, keep)
        self._batches[-1][i] = (x, bias, w)
        self._add(sum(0 if t is None else t.nbytes for t in (x, bias, w)))

    def _add(self, nbytes: int) -> None:
        self.nbytes += nbytes
        if self.nbytes > self.max_bytes:  # drop it all: the caller runs the pass
            self.overflow = True
            self._batches.clear()

    def replay(self, fit: ScoreFit, group: object = None) -> int:
        """Feed `fit` (ScoreFit.add) every recorded block's q, k and A, computed from the recorded inputs by the
        blocks' current q/k Linears (skd.attention_stats.heads(values=False)), no grad; then all-reduce its
        tensors over `group` (torch.distributed), as attention_pass does. The recording is released.
        Returns the number of samples (all processes). ValueError when the recording is incomplete (overflow)
        or holds no sample."""
        if self.overflow:
            raise ValueError(f"the attention inputs exceeded {self.max_bytes} bytes and were dropped: run the pass "
                             "(skd.attention_stats.attention_pass) instead")
        seen = torch.tensor(float(self.samples), dtype=torch.float64)
        with torch.no_grad():
            for entries in self._batches:
                for i, entry in sorted(entries.items()):
                    spec = self.blocks[i]
                    for x, bias, w in _chunks(*entry):
                        q, k = heads(spec, x, values=False)
                        a = attention_weights(spec, q, k, bias)
                        fit.add(i, q, k, a, w)
        self._batches.clear()
        if rank_world()[1] > 1:
            tensors = fit.tensors()
            seen = seen.to(tensors[0].device)
            all_reduce_flat([seen, *tensors], group=group)
        total = int(seen)
        if total == 0:
            raise ValueError("no attention inputs were recorded: the calibration data yielded no samples")
        return total


def _chunks(x: torch.Tensor, bias: torch.Tensor | None, w: torch.Tensor | None) -> Iterator[Entry]:
    """One recorded entry (x (S, N, D), bias, token weights (S, N)) as the pieces to replay: padded text, whose
    real tokens are a prefix of every sequence and whose bias masks every other key (`_padding_masked`), in
    chunks of sequences sorted by length, each cut to its longest sequence and about CHUNK_TOKENS tokens (text
    batches are mostly padding, and attention's work grows with the padded length squared); an all-padding
    sequence is left out. The padding cut off carries no weight and gets none: ScoreFit.add's sums are the
    same, in another order. Anything else: the entry, whole (ScoreFit.add chunks it)."""
    if not _padding_masked(bias, w):
        yield x, bias, w
        return
    lengths = real_lengths(w)  # real tokens come first (`_padding_masked`): their count
    order = lengths.argsort(stable=True)
    order = order[lengths[order] > 0].tolist()
    sizes = lengths.tolist()
    per_sequence = bias.dim() == 4 and bias.shape[0] == x.shape[0]
    start = 0
    while start < len(order):
        end = start + 1  # sorted: the chunk's last sequence is its longest
        while end < len(order) and (end + 1 - start) * sizes[order[end]] <= CHUNK_TOKENS:
            end += 1
        n = sizes[order[end - 1]]
        index = torch.tensor(order[start:end], device=x.device)
        part = bias.index_select(0, index) if per_sequence else bias
        yield x.index_select(0, index)[:, :n], part[..., :n, :n], w.index_select(0, index)[:, :n]
        start = end


def _padding_masked(bias: torch.Tensor | None, w: torch.Tensor | None) -> bool:
    """Whether w (S, N) has padding (weight 0), each sequence's real tokens come first, and the bias
    (broadcastable to (S, H, N, N)) gives every padding key at most half its dtype's lowest value, whatever the
    head and query: an attention weight of exactly 0 (exp underflows for any score)."""
    if w is None or bias is None:
        return False
    real = w > 0
    s, n = real.shape
    if bool(real.all()) or not torch.equal(real, torch.arange(n, device=w.device) < real.sum(1, keepdim=True)):
        return False
    full = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    highest = full.amax(dim=(1, 2)).expand(s, n)  # per sequence and key, over heads and queries
    return bool((highest[~real] <= torch.finfo(bias.dtype).min / 2).all())


def _first(t: torch.Tensor, k: int) -> torch.Tensor:
    """t's first k entries along dim 0: t itself when that is all of it, else a copy (a view would keep the whole
    batch alive)."""
    return t if k == t.shape[0] else t[:k].clone()
