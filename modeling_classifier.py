"""A classifier of this repository as a transformers model, for the heads that have no standard
transformers class (`weight_avg`, `lstm`, and any head on a backbone other than BERT, RoBERTa or
ELECTRA). Such checkpoint folders carry this file and heads.py and name the class below in
config.json's `auto_map`, so that

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
    pipeline("text-classification", model=folder, trust_remote_code=True)

load the fine-tuned model; without trust_remote_code, transformers' own class refuses the folder
(it holds that class's output weight empty) rather than load a random classifier. The backbone
keeps the library's key names (bert.*, roberta.*, ...) and the head is head.*, so
AutoModel.from_pretrained(folder) loads the fine-tuned encoder alone. This repository's own
loader (checkpoint.load_checkpoint) never imports this file.
"""
import torch
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .heads import HEADS


class BERTClassifierForSequenceClassification(PreTrainedModel):
    # the empty tensor that makes transformers' own class refuse this folder (folders.head_guard)
    _keys_to_ignore_on_load_unexpected = [r"^classifier\.weight$",
                                          r"^classifier\.out_proj\.weight$"]

    def __init__(self, config):
        super().__init__(config)
        backbone = AutoModel.from_config(config)
        if getattr(backbone, "pooler", None) is not None:
            backbone.pooler = None  # the heads have their own dense layer
        self.base_model_prefix = backbone.base_model_prefix
        setattr(self, self.base_model_prefix, backbone)
        self.head = HEADS[config.classifier_head](config.hidden_size, config.num_labels,
                                                  config.classifier_dropout,
                                                  config.classifier_activation)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden_states = self.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                        **extra).last_hidden_state
        logits = self.head(hidden_states, attention_mask)
        loss = None
        if labels is not None and self.config.problem_type == "multi_label_classification":
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.float())
        elif labels is not None:
            loss = torch.nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
