"""Language models through HF transformers: AoT and CRATE against GPT-2 (docs/integration.md 2).

Importing this package registers ``UnrollAttnConfig`` / ``UnrollAttnModel`` / ``UnrollAttnForCausalLM`` with
``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` (model_type ``"unrollattn"``), the parameter-free
``unrollattn_*`` kernels with HF's ``AttentionInterface`` + ``AttentionMaskInterface``, and the causal-LM
presets (``aot_mssa_lm_*``, ``aot_mhsa_lm_*``, ``crate_lm_*``, ``gpt2_*``) in the model registry.
"""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from ..utils.versions import warn_if_unsupported

warn_if_unsupported("transformers", "torch")

from .configuration import UnrollAttnConfig
from .gpt2 import GPT2UnrollAttention, build_gpt2, patch_gpt2, transformer_from_gpt2
from .hf_attention import list_hf_kernels, make_attention_function, register_hf_kernel
from .modeling import (
    LM_PRESETS, ParamRow, UnrollAttnBlock, UnrollAttnForCausalLM, UnrollAttnModel, UnrollAttnPreTrainedModel,
    build_causal_lm, count_parameters, parameter_table,
)

AutoConfig.register(UnrollAttnConfig.model_type, UnrollAttnConfig, exist_ok=True)
AutoModel.register(UnrollAttnConfig, UnrollAttnModel, exist_ok=True)
AutoModelForCausalLM.register(UnrollAttnConfig, UnrollAttnForCausalLM, exist_ok=True)

__all__ = [
    "GPT2UnrollAttention", "LM_PRESETS", "ParamRow", "UnrollAttnBlock", "UnrollAttnConfig", "UnrollAttnForCausalLM",
    "UnrollAttnModel", "UnrollAttnPreTrainedModel", "build_causal_lm", "build_gpt2",
    "count_parameters", "list_hf_kernels", "make_attention_function", "parameter_table", "patch_gpt2",
    "register_hf_kernel", "transformer_from_gpt2",
]
