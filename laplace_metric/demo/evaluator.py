"""One row of the demo's table from an OOD score, retrieval embeddings and a confidence."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from laplace_metric.data import OpenSetSplit
from laplace_metric.evaluation import (
    SeedResult,
    calibration_metrics,
    retrieval_metrics,
    sparsification_metrics,
)
from laplace_metric.metrics import ood_aupr, ood_auroc, top1_labels

__all__ = ["DemoEvaluator"]


class DemoEvaluator:
    """Scores the test set, the held-out classes and the noise of one open-set split.

    Parameters
    ----------
    split : OpenSetSplit
    device : torch.device
    result : SeedResult
        Where :meth:`row` records the rows and their plot data.
    """

    def __init__(self, split: OpenSetSplit, device: torch.device, result: SeedResult) -> None:
        self.x_tr, self.y_tr = (t.to(device) for t in split.train.tensors)
        self.x_te, self.y_te = (t.to(device) for t in split.test.tensors)
        self.x_held = split.ood_classes.tensors[0].to(device)
        self.x_noise = split.ood_noise.tensors[0].to(device)
        self.x_val = split.val.tensors[0].to(device)
        self.x_noise_val = split.ood_noise_val.tensors[0].to(device)
        self.result = result

    def row(
        self,
        name: str,
        score: Callable[[Tensor], Tensor],
        embed: Callable[[Tensor], Tensor] | None = None,
        confidence: tuple[Tensor, Tensor] | None = None,
    ) -> None:
        """Record the row ``name``: OOD metrics, and retrieval / AUSE / ECE where available."""
        s_in, s_held, s_noise = (
            score(x).detach().cpu() for x in (self.x_te, self.x_held, self.x_noise)
        )
        row = {
            "AUROC held-out": ood_auroc(s_in, s_held),
            "AUROC noise": ood_auroc(s_in, s_noise),
            "AUPR held-out": ood_aupr(s_in, s_held),
        }
        curve = bins = None
        if embed is not None:
            emb_te, emb_tr = embed(self.x_te).cpu(), embed(self.x_tr).cpu()
            y_te, y_tr = self.y_te.cpu(), self.y_tr.cpu()
            row.update(retrieval_metrics(emb_te, y_te, emb_tr, y_tr, recall_ks=(1,)))
            wrong = top1_labels(emb_te, emb_tr, y_tr) != y_te
            ause, curve = sparsification_metrics(s_in, wrong)
            row.update(ause)
        if confidence is not None:
            conf, correct = confidence
            ece, bins = calibration_metrics(conf.cpu(), correct.cpu())
            row.update(ece)
        scores = {"test (in-distribution)": s_in, "held-out classes": s_held, "noise": s_noise}
        self.result.add_row(name, row, scores=scores, curve=curve, reliability=bins)


#: The former private name.
_Evaluator = DemoEvaluator
