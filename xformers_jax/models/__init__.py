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

    `heads` maps an HF architecture name to our head class name; `sources` maps each head class
    name to the module that defines it.
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
        module = importlib.import_module(self.sources[class_name])
        return getattr(module, class_name)

    def head_module(self, architecture: str) -> type:
        return self.head_class(self.heads[architecture])


def _family(
    name: str,
    config_class: str,
    model_types: tuple[str, ...],
    classes: dict[str, tuple[str, ...]],
    task_heads: dict[str, str],
    prefixes: tuple[str, ...] = (),
) -> Family:
    """A family whose head classes are listed per defining module (`classes`, the base module
    `xformers_jax.models.<name>` first; its first class is the default head). Every class is
    its own HF architecture name, and with `prefixes` also the names transformers gives the
    variants (its first word replaced by each prefix)."""
    sources = {cls: f"xformers_jax.models.{module}" for module, names in classes.items()
               for cls in names}  # fmt: skip
    first = next(iter(classes.values()))[0]
    word = first[: first.index("Model")] if prefixes else ""
    heads = {cls.replace(word, prefix, 1): cls for prefix in prefixes for cls in sources}
    heads.update({cls: cls for cls in sources})
    return Family(
        name=name, module=f"xformers_jax.models.{name}", config_class=config_class,
        model_types=model_types, heads=heads, default_head=first, task_heads=task_heads,
        sources=sources,
    )  # fmt: skip


FAMILIES: dict[str, Family] = {
    "xlnet": _family(
        "xlnet",
        "XLNetConfig",
        ("xlnet",),
        {
            "xlnet": ("XLNetModel",),
            "xlnet_heads": (
                "XLNetLMHeadModel",
                "XLNetForSequenceClassification",
                "XLNetForTokenClassification",
                "XLNetForMultipleChoice",
                "XLNetForQuestionAnsweringSimple",
                "XLNetForQuestionAnswering",
            ),
        },
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
    "beit": _family(
        "beit",
        "BeitConfig",
        ("beit",),
        {
            "beit": ("BeitModel", "BeitForMaskedImageModeling", "BeitForImageClassification"),
            "beit_segmentation": ("BeitForSemanticSegmentation", "BeitBackbone"),
        },
        task_heads={
            "mim": "BeitForMaskedImageModeling",
            "image_classification": "BeitForImageClassification",
            "segmentation": "BeitForSemanticSegmentation",
        },
    ),
    "xlm_roberta": _family(
        "xlm_roberta",
        "XLMRobertaConfig",
        ("xlm-roberta-xl", "xlm-roberta"),
        {
            "xlm_roberta": ("XLMRobertaModel", "XLMRobertaForMaskedLM"),
            "xlm_roberta_heads": (
                "XLMRobertaForCausalLM",
                "XLMRobertaForSequenceClassification",
                "XLMRobertaForMultipleChoice",
                "XLMRobertaForTokenClassification",
                "XLMRobertaForQuestionAnswering",
            ),
        },
        task_heads={
            "mlm": "XLMRobertaForMaskedLM",
            "clm": "XLMRobertaForCausalLM",
            "classification": "XLMRobertaForSequenceClassification",
            "token_classification": "XLMRobertaForTokenClassification",
            "qa": "XLMRobertaForQuestionAnswering",
            "multiple_choice": "XLMRobertaForMultipleChoice",
        },
        prefixes=("XLMRobertaXL",),
    ),
    "yoso": _family(
        "yoso",
        "YosoConfig",
        ("yoso",),
        {
            "yoso": (
                "YosoModel",
                "YosoForMaskedLM",
                "YosoForSequenceClassification",
                "YosoForMultipleChoice",
                "YosoForTokenClassification",
                "YosoForQuestionAnswering",
            ),
        },
        task_heads={
            "mlm": "YosoForMaskedLM",
            "classification": "YosoForSequenceClassification",
            "token_classification": "YosoForTokenClassification",
            "qa": "YosoForQuestionAnswering",
            "multiple_choice": "YosoForMultipleChoice",
        },
    ),
    "mt5": _family(
        "mt5",
        "MT5Config",
        ("mt5",),
        {
            "mt5": (
                "MT5Model",
                "MT5ForConditionalGeneration",
                "MT5EncoderModel",
                "MT5ForSequenceClassification",
                "MT5ForTokenClassification",
                "MT5ForQuestionAnswering",
            ),
        },
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
