"""Serialisation: the posterior's ``state_dict`` and its checked restore."""

from __future__ import annotations

from typing import Any

import torch
from laplace.utils.enums import HessianStructure
from torch.nn.utils import parameters_to_vector


class SerializationMixin:
    """``state_dict`` / ``load_state_dict`` (a base of
    :class:`~laplace_metric.estimators.MetricLaplaceMixin`)."""

    def state_dict(self) -> dict[str, Any]:
        """Serialisable state; loadable with ``torch.load(..., weights_only=True)``.

        As in laplace-torch, the state holds the posterior (mean, curvature, prior), *not* the
        encoder: save the encoder's own ``state_dict`` beside it, and load it into the encoder
        before :meth:`load_state_dict`, which checks that the weights equal the fitted mean.
        """
        self._check_fitted()
        state = super().state_dict()
        state["likelihood"] = str(self.pair_likelihood.name)
        state["likelihood_config"] = self.pair_likelihood.config()
        state["likelihood_state"] = self.pair_likelihood.state_dict()
        signed = self.H_signed
        state["H_signed"] = signed.kfacs if self._structure == HessianStructure.KRON else signed
        state["n_pairs"] = int(self.n_pairs)
        state["n_candidate_pairs"] = int(self.n_candidate_pairs)
        scale = self.likelihood_scale
        state["likelihood_scale"] = scale.value if hasattr(scale, "value") else float(scale)
        return state

    def _check_saved_scale(self, state_dict: dict[str, Any]) -> None:
        """Raise if the state was saved under another ``likelihood_scale`` (older states,
        without the entry, were fitted under ``'batch'``)."""
        saved = state_dict.get("likelihood_scale", "batch")
        scale = self.likelihood_scale
        scale = scale.value if hasattr(scale, "value") else float(scale)
        if saved != scale:
            raise ValueError(
                f"This state_dict was saved with likelihood_scale={saved!r}, but the estimator "
                f"has likelihood_scale={scale!r}; build it with likelihood_scale={saved!r}."
            )

    def load_state_dict(self, state_dict: dict[str, Any], check_weights: bool = True) -> None:
        """Restore a fit saved by :meth:`state_dict` into an estimator of the same configuration.

        Parameters
        ----------
        state_dict : dict
        check_weights : bool, default=True
            Check that the model's current weights (those the posterior covers) equal the
            saved posterior mean, and raise a ``ValueError`` otherwise: the state does not hold
            the encoder, so a freshly built encoder would predict with wrong means. Restore::

                encoder.load_state_dict(torch.load("encoder.pt", weights_only=True))
                la = Laplace(encoder, "contrastive", ...)   # same configuration
                la.load_state_dict(torch.load("la.pt", weights_only=True))
        """
        saved = state_dict.get("likelihood_config")
        if saved is None:
            raise ValueError("This state_dict was not written by a laplace-metric estimator.")
        if state_dict.get("cls_name") != type(self).__name__:
            raise ValueError(
                f"This state_dict was saved from a {state_dict.get('cls_name')} (saved) and "
                f"cannot be loaded into a {type(self).__name__} (given): use the same "
                "subset_of_weights and hessian_structure as when saving."
            )
        check_config(saved, self.pair_likelihood.config())
        self._check_saved_scale(state_dict)
        previous = dict(self.__dict__)
        super().load_state_dict(state_dict)
        if check_weights:
            current = parameters_to_vector(self._posterior_parameters()).detach()
            saved_mean = self.mean.to(current)
            if current.shape != saved_mean.shape or not torch.allclose(
                current, saved_mean, rtol=1e-6, atol=1e-8
            ):
                self.__dict__.update(previous)
                gap = (
                    f"max abs difference {float((current - saved_mean).abs().max()):.3g}"
                    if current.shape == saved_mean.shape
                    else f"{current.numel()} vs {saved_mean.numel()} parameters"
                )
                raise ValueError(
                    "The model's current weights differ from the posterior mean saved in this "
                    f"state_dict ({gap}). A laplace-metric state_dict holds the posterior, not "
                    "the encoder (as in laplace-torch): load the encoder's weights first, "
                    "encoder.load_state_dict(torch.load('encoder.pt')), then build the "
                    "estimator on it and load this state_dict (check_weights=False skips "
                    "this check and keeps the model's weights)."
                )
        self.pair_likelihood.load_state_dict(state_dict.get("likelihood_state", {}))
        self._restore_curvature(state_dict)

    def _restore_curvature(self, state_dict: dict[str, Any]) -> None:
        """Set the signed curvature and pair counts of ``state_dict``; derive the posterior."""
        signed = state_dict["H_signed"]
        if self._structure == HessianStructure.KRON:
            from laplace.utils import Kron

            signed = Kron(signed)
        self.H_signed = signed
        self.n_pairs = int(state_dict["n_pairs"])
        self.n_candidate_pairs = int(state_dict.get("n_candidate_pairs", 0))
        self._set_posterior_curvature()


def check_config(saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise a ``ValueError`` naming every saved and given value that differ."""
    if saved == current:
        return
    keys = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    details = "; ".join(f"{k}: saved {saved.get(k)!r}, given {current.get(k)!r}" for k in keys)
    fix = ", ".join(f"{k}={saved.get(k)!r}" for k in keys if k != "name")
    raise ValueError(
        f"The likelihood configuration differs from the saved one ({details}). Build the "
        f"estimator with the saved values ({fix}) before load_state_dict."
    )


__all__ = ["SerializationMixin"]
