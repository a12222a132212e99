"""All-layer LAM fit time against the stock per-sample floor, at reduced size, in one process.

The encoders table (``benchmarks/encoders.py``) times whole ResNet-50 and ViT-Tiny-size fits
(minutes each on a CPU). This script keeps what sets their per-layer cost ratios (the input
size, so the locations ``T`` per layer; the width; the batch of ``--batch`` images of 10
classes, so the pair graph) and cuts the rest: ``--images`` images, and for the ViT
``--layers`` encoder layers instead of 12. In one process, one after the other, with
``--threads`` intra-op threads (default 1: stable ratios on a shared machine), it times

* ``floor``: stock laplace-torch all-layer kron (``Laplace(model, 'regression', 'all',
  'kron')``) on ``--dim`` regression outputs, only the Linear/Conv2d parameters trainable (as
  ``floor-all-kron`` in ``benchmarks/encoders.py``);
* ``lam-diag``: all-layer LAM diag (``likelihood='contrastive'``, default backend);
* ``lam-diag-func`` (``--compare-func``): the same with ``HookPairGGN.row_params = False``
  (class token and positional embedding through ``torch.func``, the behaviour before);
* ``lam-diag-repeated`` (``--compare-repeated``): the same with ``HookPairGGN.retain_forward
  = False`` (a forward pass of the batch repeated per chunk of columns, the behaviour before);
* ``lam-kron-frozen-pos`` (ViT only): all-layer LAM kron with the positional embedding frozen;

and prints each as a multiple of the floor. Run ``python benchmarks/encoder_ratios.py --model
vit_tiny --layers 1``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
import encoder_models  # noqa: E402
from encoders import freeze_outside_kfac_layers  # noqa: E402

N_CLASSES = 10


def _fit(la, data, batch: int) -> float:
    loader = torch.utils.data.DataLoader(data, batch_size=batch)
    start = time.perf_counter()
    la.fit(loader)
    return time.perf_counter() - start


def _lam(model, structure: str, row_params: bool = True, retain_forward: bool = True):
    from laplace import Laplace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default-backend notice
        la = Laplace(model, "contrastive", "all", structure)
    if hasattr(la.backend, "row_params"):
        la.backend.row_params = row_params
        la.backend.retain_forward = retain_forward
    return la


def run(args: argparse.Namespace) -> None:
    from laplace import Laplace

    import laplace_metric  # noqa: F401  (registers the likelihoods)

    torch.set_num_threads(args.threads)
    if args.layers is not None and args.model in encoder_models.VIT_SIZES:
        _, heads, width, mlp = encoder_models.VIT_SIZES[args.model]
        encoder_models.VIT_SIZES[args.model] = (args.layers, heads, width, mlp)
    model, shape = encoder_models.build_encoder(args.model, args.dim)
    model.eval()
    x, lam_data, gen = encoder_models.random_labelled_images(shape, args.images, N_CLASSES)
    print(
        f"{args.model} (layers={args.layers}), {args.images} images in batches of {args.batch}, "
        f"{args.dim}-d, threads={args.threads}",
        flush=True,
    )
    stock, _ = encoder_models.build_encoder(args.model, args.dim)
    stock.eval()
    freeze_outside_kfac_layers(stock)
    targets = torch.randn(args.images, args.dim, generator=gen)
    stock_data = torch.utils.data.TensorDataset(x, targets)
    floor = _fit(Laplace(stock, "regression", "all", "kron"), stock_data, args.batch)
    print(f"floor (stock all-layer kron): {floor:.2f} s", flush=True)
    cells = [("lam-diag", lambda: _lam(model, "diag"))]
    if args.compare_func:
        cells.append(("lam-diag-func", lambda: _lam(model, "diag", row_params=False)))
    if args.compare_repeated:
        repeated = ("lam-diag-repeated", lambda: _lam(model, "diag", retain_forward=False))
        cells.append(repeated)
    if args.model in encoder_models.VIT_SIZES and not args.no_kron:

        def frozen_pos():
            frozen, _ = encoder_models.build_encoder(args.model, args.dim)
            frozen.eval()
            frozen.encoder.pos_embedding.requires_grad_(False)
            return _lam(frozen, "kron")

        cells.append(("lam-kron-frozen-pos", frozen_pos))
    for name, make in cells:
        seconds = _fit(make(), lam_data, args.batch)
        print(f"{name}: {seconds:.2f} s, {seconds / floor:.2f}x the floor", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny", choices=encoder_models.ENCODERS)
    parser.add_argument("--layers", type=int, default=None, help="ViT encoder layers")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-func", action="store_true")
    parser.add_argument("--compare-repeated", action="store_true")
    parser.add_argument("--no-kron", action="store_true")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
