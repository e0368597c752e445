"""Conformer-CTC with layer-wise attention map reuse."""

from models.config import ModelConfig
from models.ctc import ConformerCTC, EncoderOutput
from models.reuse import LayerPlan, format_reuse_config, parse_reuse_config

__all__ = ["ConformerCTC", "EncoderOutput", "LayerPlan", "ModelConfig", "format_reuse_config", "parse_reuse_config"]
