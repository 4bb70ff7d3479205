"""Run configuration: frozen dataclasses, one per concern, validated on construction.

Defaults are the paper's (CPAL, CVPR 2024, Sec. 4.1). A config is loaded from YAML with
dotted overrides (``cpal.tau=0.2``) and saved as YAML beside every checkpoint and output.
Every invalid value raises ``ConfigError`` naming the field and what is allowed.

  rules.py           the allowed values of the choice fields, ConfigError, the validation rules
  sections.py        what the CAM run reads: data, model, cpal, optim, train, dist, faults
  stage_sections.py  the later stages' sections: inference, pseudo, affinity, seg
  loading.py         Config itself, StageTraining, YAML files, overrides, old field names

Import from here (``from cpal_ray.config import load_config``); the modules are its parts.
"""
from cpal_ray.config.loading import (CAM_ONLY_FIELDS, CAM_TRAINING_FIELDS, GPU_SHARE_SECTIONS, RENAMED, Config,
                                     StageTraining, check_stage_overrides, config_file, config_yaml, from_dict,
                                     load_config, parse_overrides, save_config, shipped_configs)
from cpal_ray.config.rules import (BACKGROUNDS, BUNDLED_VOC_MINI, CAM_SOURCES, CENTERS, CONTEXTS, DATASETS,
                                   EMBEDDINGS, METRICS, PSEUDO_MODES, PSEUDO_PRESETS, REGIONS, SELF_GRADS,
                                   SHIPPED_CONFIGS, TASKS, WALK_MODES, ConfigError, check_run_name)
from cpal_ray.config.sections import (CPALConfig, DataConfig, DistConfig, FaultsConfig, ModelConfig, OptimConfig,
                                      TrainConfig)
from cpal_ray.config.stage_sections import AffinityConfig, InferenceConfig, PseudoLabelConfig, SegConfig

__all__ = ["AffinityConfig", "BACKGROUNDS", "BUNDLED_VOC_MINI", "CAM_ONLY_FIELDS", "CAM_SOURCES", "CAM_TRAINING_FIELDS",
           "CENTERS", "CONTEXTS", "CPALConfig", "Config", "ConfigError", "DATASETS", "DataConfig", "DistConfig",
           "EMBEDDINGS", "FaultsConfig", "GPU_SHARE_SECTIONS", "InferenceConfig", "METRICS", "ModelConfig",
           "OptimConfig", "PSEUDO_MODES", "PSEUDO_PRESETS", "PseudoLabelConfig", "REGIONS", "RENAMED", "SELF_GRADS",
           "SHIPPED_CONFIGS", "SegConfig", "StageTraining", "TASKS", "TrainConfig", "WALK_MODES", "check_run_name",
           "check_stage_overrides", "config_file", "config_yaml", "from_dict", "load_config", "parse_overrides",
           "save_config", "shipped_configs"]
