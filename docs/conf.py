"""Sphinx configuration of the laplace-metric documentation."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# sphinx-gallery runs examples in-process; make the repo importable for them too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import torch  # noqa: E402

import laplace_metric  # noqa: E402

# The examples run in-process on small models: one thread avoids oversubscribing shared CPUs
# (tiny MLPs are much slower with several threads on a busy machine).
torch.set_num_threads(1)

project = "laplace-metric"
author = "laplace-metric developers"
copyright = "2026, laplace-metric developers"
release = laplace_metric.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    # MathJax bundled into _static: formulas render without network access
    "sphinx-mathjax-offline",
    "sphinx.ext.viewcode",
    "sphinx_gallery.gen_gallery",
]

# No intersphinx: the build must not touch the network.
nitpicky = False
autosummary_generate = False
autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autoclass_content = "class"
napoleon_numpy_docstring = True
napoleon_google_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

templates_path: list[str] = []
exclude_patterns = ["_build", "auto_examples/*.ipynb", "auto_examples/*.py", "**.md5"]
html_theme = "alabaster"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {
    "description": "Bayesian metric learning for laplace-torch",
    # wider than alabaster's 940px default, so code blocks of 100 columns fit
    "page_width": "1180px",
    "body_max_width": "none",
}

# Warnings raised inside the examples (e.g. deprecations in dependencies) are not docs errors.
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)
warnings.filterwarnings("ignore", category=UserWarning, module="matplotlib")

sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    # Only the plot_*.py tutorials are part of the gallery (quickstart.py and other scripts are
    # run on their own).
    "ignore_pattern": r"^(?!plot_).*\.py$",
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "image_scrapers": ("matplotlib",),
    "reset_modules": ("matplotlib", "seaborn"),
    "capture_repr": ("_repr_html_", "__repr__"),
    "min_reported_time": 1,
    "show_memory": False,
    "plot_gallery": "True",
}
