"""The model registry: HF model_type -> family module, HF architecture name -> head class.

Each head class is found in the module that defines it (`Family.sources`); base modules never
import their heads, so the registry is the one place that knows where every head lives.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class Family:
    """How the hub finds a family: its module, config class and HF architecture names.

    `heads` maps an HF architecture name to our head class name; `sources` maps a head class
    name to the module that defines it (default: `module`, the family's base module).
    """

    name: str
    module: str
    config_class: str
    model_types: tuple[str, ...]
    heads: dict[str, str]
    default_head: str
    task_heads: dict[str, str] = dataclasses.field(default_factory=dict)
    sources: dict[str, str] = dataclasses.field(default_factory=dict)

    def load(self) -> Any:
        return importlib.import_module(self.module)

    def config_cls(self) -> type:
        return getattr(self.load(), self.config_class)

    def head_class(self, class_name: str) -> type:
        """Our head class `class_name`, from the module that defines it."""
        module = importlib.import_module(self.sources.get(class_name, self.module))
        return getattr(module, class_name)

    def head_module(self, architecture: str) -> type:
        return self.head_class(self.heads[architecture])


def _defined_in(module: str, *class_names: str) -> dict[str, str]:
    return dict.fromkeys(class_names, module)


FAMILIES: dict[str, Family] = {
    "xlnet": Family(
        name="xlnet",
        module="xformers_jax.models.xlnet",
        config_class="XLNetConfig",
        model_types=("xlnet",),
        heads={
            name: name
            for name in (
                "XLNetModel",
                "XLNetLMHeadModel",
                "XLNetForSequenceClassification",
                "XLNetForTokenClassification",
                "XLNetForMultipleChoice",
                "XLNetForQuestionAnsweringSimple",
                "XLNetForQuestionAnswering",
            )
        },
        default_head="XLNetModel",
        sources=_defined_in(
            "xformers_jax.models.xlnet_heads",
            "XLNetLMHeadModel",
            "XLNetForSequenceClassification",
            "XLNetForTokenClassification",
            "XLNetForMultipleChoice",
            "XLNetForQuestionAnsweringSimple",
            "XLNetForQuestionAnswering",
        ),
        task_heads={
            "plm": "XLNetLMHeadModel",
            "classification": "XLNetForSequenceClassification",
            "token_classification": "XLNetForTokenClassification",
            # transformers' AutoModelForQuestionAnswering picks the Simple head for XLNet; the
            # beam head gives only a loss in training (no span logits for EM / F1).
            "qa": "XLNetForQuestionAnsweringSimple",
            "multiple_choice": "XLNetForMultipleChoice",
        },
    ),
    "beit": Family(
        name="beit",
        module="xformers_jax.models.beit",
        config_class="BeitConfig",
        model_types=("beit",),
        heads={
            name: name
            for name in (
                "BeitModel",
                "BeitForMaskedImageModeling",
                "BeitForImageClassification",
                "BeitForSemanticSegmentation",
                "BeitBackbone",
            )
        },
        default_head="BeitModel",
        sources=_defined_in(
            "xformers_jax.models.beit_segmentation", "BeitForSemanticSegmentation", "BeitBackbone"
        ),
        task_heads={
            "mim": "BeitForMaskedImageModeling",
            "image_classification": "BeitForImageClassification",
            "segmentation": "BeitForSemanticSegmentation",
        },
    ),
    "xlm_roberta": Family(
        name="xlm_roberta",
        module="xformers_jax.models.xlm_roberta",
        config_class="XLMRobertaConfig",
        model_types=("xlm-roberta-xl", "xlm-roberta"),
        heads={
            name.replace("XLMRoberta", prefix, 1): name
            for prefix in ("XLMRobertaXL", "XLMRoberta")
            for name in (
                "XLMRobertaModel",
                "XLMRobertaForMaskedLM",
                "XLMRobertaForCausalLM",
                "XLMRobertaForSequenceClassification",
                "XLMRobertaForMultipleChoice",
                "XLMRobertaForTokenClassification",
                "XLMRobertaForQuestionAnswering",
            )
        },
        default_head="XLMRobertaModel",
        sources=_defined_in(
            "xformers_jax.models.xlm_roberta_heads",
            "XLMRobertaForCausalLM",
            "XLMRobertaForSequenceClassification",
            "XLMRobertaForMultipleChoice",
            "XLMRobertaForTokenClassification",
            "XLMRobertaForQuestionAnswering",
        ),
        task_heads={
            "mlm": "XLMRobertaForMaskedLM",
            "clm": "XLMRobertaForCausalLM",
            "classification": "XLMRobertaForSequenceClassification",
            "token_classification": "XLMRobertaForTokenClassification",
            "qa": "XLMRobertaForQuestionAnswering",
            "multiple_choice": "XLMRobertaForMultipleChoice",
        },
    ),
    "yoso": Family(
        name="yoso",
        module="xformers_jax.models.yoso",
        config_class="YosoConfig",
        model_types=("yoso",),
        heads={
            name: name
            for name in (
                "YosoModel",
                "YosoForMaskedLM",
                "YosoForSequenceClassification",
                "YosoForMultipleChoice",
                "YosoForTokenClassification",
                "YosoForQuestionAnswering",
            )
        },
        default_head="YosoModel",
        task_heads={
            "mlm": "YosoForMaskedLM",
            "classification": "YosoForSequenceClassification",
            "token_classification": "YosoForTokenClassification",
            "qa": "YosoForQuestionAnswering",
            "multiple_choice": "YosoForMultipleChoice",
        },
    ),
    "mt5": Family(
        name="mt5",
        module="xformers_jax.models.mt5",
        config_class="MT5Config",
        model_types=("mt5",),
        heads={
            name: name
            for name in (
                "MT5Model",
                "MT5ForConditionalGeneration",
                "MT5EncoderModel",
                "MT5ForSequenceClassification",
                "MT5ForTokenClassification",
                "MT5ForQuestionAnswering",
            )
        },
        default_head="MT5Model",
        task_heads={
            "span_corruption": "MT5ForConditionalGeneration",
            "seq2seq": "MT5ForConditionalGeneration",
            "classification": "MT5ForSequenceClassification",
            "token_classification": "MT5ForTokenClassification",
            "qa": "MT5ForQuestionAnswering",
        },
    ),
}


def family_for_model_type(model_type: str) -> Family:
    """The family whose config.json `model_type` this is; a clear error when none is."""
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.model_types)
    raise ValueError(f"unknown model_type {model_type!r}; supported: {known}")


def family_for_architecture(architecture: str) -> Family:
    for fam in FAMILIES.values():
        if architecture in fam.heads:
            return fam
    known = sorted(a for f in FAMILIES.values() for a in f.heads)
    raise ValueError(f"unknown architecture {architecture!r}; supported: {known}")


def build_model(model_cfg: Any, task: str) -> tuple[Any, Any, str]:
    """(head module, frozen family config, HF architecture name) for `config.model` and a task.

    `model_cfg` has `family` and `preset`; any other key overrides the preset's value.
    """
    model_cfg = dict(model_cfg)
    family_name = model_cfg.pop("family")
    preset = model_cfg.pop("preset")
    if family_name not in FAMILIES:
        raise ValueError(f"unknown model.family {family_name!r}; known: {sorted(FAMILIES)}")
    fam = FAMILIES[family_name]
    module = fam.load()
    if preset not in module.PRESETS:
        raise ValueError(
            f"unknown model.preset {preset!r} for {family_name}; known: {sorted(module.PRESETS)}"
        )
    if task not in fam.task_heads:
        raise ValueError(f"family {family_name} has no head for task {task!r}")
    cfg = fam.config_cls().from_dict({**module.PRESETS[preset], **model_cfg})
    head_name = fam.task_heads[task]
    return fam.head_class(head_name)(cfg), cfg, module.architecture_name(cfg, head_name)
