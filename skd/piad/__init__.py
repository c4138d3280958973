"""PIAD: progressive importance-aware dropout training of an ElasticViT super-network.

At the start of each of the first P_e epochs the importance of the current list-end subnet is
re-estimated on a proxy set (`skd.importance`) and the least important droppable units are appended
to the Dropout List until its dropped MACs reach (epoch+1)/P_e of (1 - target_macs) of the full
model. Each batch then trains the subnetwork with the list's first s units dropped, computed at its own
size (ElasticViT's prefix views), so gradients reach the shared super-network weights.

Where things live (one job per module):

- `schedule`: list growth, the refresh rule, the goal formula and the per-step strength t;
- `samplers`: one class per method (piad and the ablation baselines) behind one interface —
  adding an ablation is one class there;
- `recipe`: optimizer, learning-rate schedule, loss and batch augmentation;
- `data`: derived seeds, the global-batch sampler, the proxy set;
- `distill`: the distance of a student's output from a frozen teacher's;
- `report`: the per-epoch record, its one-line summary, the JSONL log and the callback;
- `checkpoint`: the resumable checkpoint file;
- `trainer`: `PIADTrainer`, the loop that composes them.
"""

from __future__ import annotations

from .checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_NAME
from .data import PROXY_BATCH_SIZE, GlobalBatchSampler
from .recipe import WarmupCosine
from .report import EpochReport
from .samplers import METHODS, SAMPLERS, Draw, SubnetSampler
from .schedule import ProgressiveSchedule
from .trainer import PIADTrainer

__all__ = [
           "CHECKPOINT_FORMAT",
           "CHECKPOINT_NAME",
           "METHODS",
           "PROXY_BATCH_SIZE",
           "SAMPLERS",
           "Draw",
           "EpochReport",
           "GlobalBatchSampler",
           "PIADTrainer",
           "ProgressiveSchedule",
           "SubnetSampler",
           "WarmupCosine",
]
