"""Interpretability diagnostics: attention maps from the layers' own forward (``attention_maps``), per-layer coding
rate / compression / sparsity / SNR of trained runs (``compression``, ``snr --run``), the synthetic SNR check
(``snr``). Command line: ``unrollattn diagnose maps|compression|snr``."""
from .attention import AttentionRecord, NoAttentionLayersError, attention_maps, recording

__all__ = ["AttentionRecord", "NoAttentionLayersError", "attention_maps", "recording"]
