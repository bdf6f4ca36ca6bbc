"""Configs are code: typed dataclasses (`schema`) and the paper's tables as named recipes (`recipes`)."""
from vitray.config.recipes import DETR_PRESETS, FINETUNE_PRESETS, PRESETS, finetune, preset, pretrain, smoke
from vitray.config.checks import validate
from vitray.config.schema import Config, ConfigError, apply_overrides, model_override

__all__ = ["Config", "ConfigError", "DETR_PRESETS", "FINETUNE_PRESETS", "PRESETS", "finetune", "apply_overrides", "model_override", "preset", "pretrain", "smoke", "validate"]
