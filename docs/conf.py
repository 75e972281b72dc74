"""Sphinx configuration for the numpyro_lds documentation."""

project = "numpyro_lds"
author = "numpyro_lds developers"
copyright = "2026, numpyro_lds developers"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "none"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Shapes:" is prose (a rubric and its paragraph), not a list of parameters
napoleon_custom_sections = ["Shapes"]
# attribute types from annotations would print JAX's private array class
napoleon_attr_annotations = False
myst_heading_anchors = 3
html_theme = "alabaster"
html_title = "numpyro_lds"
