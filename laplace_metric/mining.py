"""Pairs from class labels: the default all-pairs miner and adapters for
pytorch-metric-learning miners."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Pairs:
    """Mined pairs of one batch.

    Attributes
    ----------
    first : torch.LongTensor
        Index of the first sample of each pair, shape ``(M,)``.
    second : torch.LongTensor
        Index of the second sample of each pair, shape ``(M,)``.
    positive : torch.BoolTensor
        ``True`` where both samples share a label, shape ``(M,)``.
    """

    first: torch.Tensor
    second: torch.Tensor
    positive: torch.Tensor

    def __len__(self) -> int:
        return int(self.first.numel())

    @property
    def n_positive(self) -> int:
        """Number of positive pairs."""
        return int(self.positive.sum())

    @property
    def n_negative(self) -> int:
        """Number of negative pairs."""
        return len(self) - self.n_positive


def check_labels(labels: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Validate class labels of a batch and return them as a 1-D tensor.

    Parameters
    ----------
    labels : torch.Tensor
        Integer class labels, shape ``(batch,)`` or ``(batch, 1)``.
    batch_size : int
        Number of embeddings in the batch.

    Returns
    -------
    labels : torch.Tensor
        Shape ``(batch,)``.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class ids, got {type(labels).__name__}.")
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(
            f"labels must have shape (batch,), got {tuple(labels.shape)}; "
            "pairwise likelihoods take one class id per sample."
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.is_complex():
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}.")
    if labels.shape[0] != batch_size:
        raise ValueError(
            f"Got {labels.shape[0]} labels for {batch_size} embeddings; they must match."
        )
    return labels


def all_pairs(labels: torch.Tensor) -> Pairs:
    """Every unordered pair ``i < j`` of the batch, each once.

    Parameters
    ----------
    labels : torch.Tensor
        Class labels, shape ``(batch,)``.

    Returns
    -------
    pairs : Pairs
    """
    first, second = torch.triu_indices(len(labels), len(labels), offset=1, device=labels.device)
    return Pairs(first, second, labels[first] == labels[second])


def pairs_from_miner_output(indices: tuple[torch.Tensor, ...], labels: torch.Tensor) -> Pairs:
    """Convert the output of a pytorch-metric-learning miner to :class:`Pairs`.

    Pair miners return ``(a1, p, a2, n)``; triplet miners return ``(a, p, n)``, which become
    the positive pairs ``(a, p)`` and the negative pairs ``(a, n)``. The likelihood is defined
    over a *set* of unordered pairs, so duplicates are dropped: pytorch-metric-learning's pair
    miners list each pair in both orders, and triplet miners repeat a pair across triplets.
    A mined pair therefore counts once, exactly as in :func:`all_pairs`.

    Parameters
    ----------
    indices : tuple of torch.Tensor
        The miner's output.
    labels : torch.Tensor
        Class labels of the batch, used to double-check the pairs' signs.

    Returns
    -------
    pairs : Pairs
    """
    if len(indices) == 4:
        a1, p, a2, n = indices
    elif len(indices) == 3:
        a1, p, n = indices
        a2 = a1
    else:
        raise ValueError(
            "A miner must return (anchor, positive, anchor, negative) pair indices or "
            f"(anchor, positive, negative) triplet indices; got a tuple of {len(indices)}."
        )
    first = torch.cat([a1, a2]).long()
    second = torch.cat([p, n]).long()
    positive = torch.cat(
        [torch.ones_like(a1, dtype=torch.bool), torch.zeros_like(a2, dtype=torch.bool)]
    )
    if not torch.equal(positive, labels[first] == labels[second]):
        raise ValueError("The miner returned pairs whose labels disagree with their roles.")
    keep = first != second
    low = torch.minimum(first, second)[keep]
    high = torch.maximum(first, second)[keep]
    # One key per unordered pair; ``unique`` sorts, so the result is deterministic.
    keys = torch.unique(low * labels.numel() + high)
    low, high = keys // labels.numel(), keys % labels.numel()
    return Pairs(low, high, labels[low] == labels[high])


def _miner_key(name: str) -> str:
    key = name.lower().replace("_", "").replace("-", "").replace(" ", "")
    return key[: -len("miner")] if key.endswith("miner") else key


def miner_names() -> dict[str, str]:
    """pytorch-metric-learning's miners, ``{key: class name}``, keyed by the lower-case name
    without ``Miner`` (``'multisimilarity'``, ``'pairmargin'``, ...)."""
    from pytorch_metric_learning import miners

    return {
        _miner_key(name): name
        for name in dir(miners)
        if name.endswith("Miner") and name != "BaseMiner"
    }


def resolve_miner(miner: Any | None) -> Any | None:
    """A miner from its value: ``None``, a callable, or the name of a pytorch-metric-learning
    miner (built with its default arguments).

    Parameters
    ----------
    miner : callable, str or None
        ``'multisimilarity'``, ``'MultiSimilarityMiner'``, ``'pair_margin'``, ... (case,
        ``_`` and the ``Miner`` suffix do not matter).

    Returns
    -------
    miner : callable or None

    Raises
    ------
    ValueError
        If a string names no pytorch-metric-learning miner.
    TypeError
        If ``miner`` is neither None, a string nor callable.
    """
    if miner is None or (callable(miner) and not isinstance(miner, str)):
        return miner
    if not isinstance(miner, str):
        raise TypeError(
            f"miner must be a pytorch-metric-learning miner (e.g. "
            f"pytorch_metric_learning.miners.MultiSimilarityMiner()), its name, or None; got "
            f"{type(miner).__name__}."
        )
    names = miner_names()
    name = names.get(_miner_key(miner))
    if name is None:
        import difflib

        close = difflib.get_close_matches(_miner_key(miner), list(names), n=1)
        hint = f" Did you mean miner={names[close[0]]!r}?" if close else ""
        raise ValueError(
            f"Unknown miner {miner!r}.{hint} Pass a pytorch-metric-learning miner instance, "
            "e.g. miner=pytorch_metric_learning.miners.MultiSimilarityMiner(epsilon=0.1), or "
            f"one of the names {sorted(names.values())} (built with default arguments)."
        )
    from pytorch_metric_learning import miners

    return getattr(miners, name)()


def mine_pairs(
    labels: torch.Tensor,
    embeddings: torch.Tensor | None = None,
    miner: Any | None = None,
) -> Pairs:
    """Mine the pairs of one batch.

    Parameters
    ----------
    labels : torch.Tensor
        Class labels, shape ``(batch,)``.
    embeddings : torch.Tensor, optional
        The (normalised) embeddings; required by pytorch-metric-learning miners.
    miner : callable, optional
        A pytorch-metric-learning miner (``miner(embeddings, labels)``). ``None`` uses all
        pairs ``i < j``.

    Returns
    -------
    pairs : Pairs
    """
    if miner is None:
        return all_pairs(labels)
    if embeddings is None:
        raise ValueError("A miner needs the embeddings of the batch.")
    with torch.no_grad():
        indices = miner(embeddings.detach(), labels)
    return pairs_from_miner_output(indices, labels)


class PairBudgetMiner:
    """At most ``max_pairs`` pairs per batch, drawn uniformly from the mined pairs.

    LAM-style subsampling for users who want a fixed curvature cost per batch: the curvature
    (and the loss, which is built from the same pairs) then uses a random subset of the pairs.
    Not the default: with the pair graph, curvature over *every* pair costs about what the
    per-sample GGN does, so subsampling only adds noise. Use it as any pytorch-metric-learning
    miner: ``ContrastiveLikelihood(miner=PairBudgetMiner(5000))``.

    Parameters
    ----------
    max_pairs : int
        Largest number of unordered pairs returned per batch.
    miner : callable, optional
        A pytorch-metric-learning miner whose pairs are subsampled; ``None`` uses all pairs.
    seed : int, default=0
        Seed of the miner's own generator: a run of calls is reproducible, and successive
        batches get different subsets.

    Returns
    -------
    (a1, p, a2, n)
        Pair indices in pytorch-metric-learning's format (positives ``(a1, p)``, negatives
        ``(a2, n)``).
    """

    def __init__(self, max_pairs: int, miner: Any | None = None, seed: int = 0) -> None:
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 1:
            raise ValueError(f"max_pairs must be a positive integer, got {max_pairs!r}.")
        self.max_pairs = max_pairs
        self.miner = miner
        self.generator = torch.Generator().manual_seed(int(seed))

    def __repr__(self) -> str:
        return f"PairBudgetMiner(max_pairs={self.max_pairs}, miner={self.miner!r})"

    def __call__(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pairs = mine_pairs(labels, embeddings, self.miner)
        if len(pairs) > self.max_pairs:
            keep = torch.randperm(len(pairs), generator=self.generator)[: self.max_pairs]
            keep = keep.sort().values.to(labels.device)
            pairs = Pairs(pairs.first[keep], pairs.second[keep], pairs.positive[keep])
        pos, neg = pairs.positive, ~pairs.positive
        return pairs.first[pos], pairs.second[pos], pairs.first[neg], pairs.second[neg]
