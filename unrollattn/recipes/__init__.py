"""Runnable training recipes for unrollattn (one module per recipe, each with presets and ``main``).

A recipe module ``recipes.<name>`` provides ``PRESETS`` (a Registry of functions returning its
config dataclass), ``load_config(preset, overrides, resume=False)``, ``run(cfg) -> summary``,
``main(argv=None)`` and, for ablations, ``VARIANTS``, ``VARIANT_KEY`` and ``ablation_columns``.
Launch with ``unrollattn train <name> --preset NAME key=value ...`` or ``python -m unrollattn.recipes.<name>``
(see recipes/README.md).
"""
