"""Interpretability diagnostics: per-layer SNR / coding rate, attention maps."""
