"""The four classification heads. Each takes (last_hidden_state, attention_mask), looks only at
real tokens, and never assumes a fixed length, so a text's logits do not depend on how long its
batch-mates are.

This file needs only torch: `_2_model.py` builds classifiers from it, and every checkpoint whose
head has no standard transformers class carries a copy of it (with `modeling_classifier.py`), so
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` loads it.
"""
import torch
from torch import nn

ACTIVATIONS = {"tanh": torch.tanh, "gelu": nn.functional.gelu}


class ClsHead(nn.Module):
    """The [CLS] vector through dropout, dense, tanh, dropout, linear: RoBERTa's classifier. On
    ELECTRA the activation is GELU, as in ELECTRA's own classifier."""

    def __init__(self, hidden, num_classes, dr_rate, activation="tanh"):
        super().__init__()
        self.dense, self.out = nn.Linear(hidden, hidden), nn.Linear(hidden, num_classes)
        self.dropout, self.activation = nn.Dropout(dr_rate), activation

    def forward(self, hidden_states, attention_mask):
        x = ACTIVATIONS[self.activation](self.dense(self.dropout(hidden_states[:, 0])))
        return self.out(self.dropout(x))


class PoolerHead(ClsHead):
    """The backbone's pretrained pooler (dense + tanh on [CLS]; _2_model copies its weights into
    `dense`), dropout, linear: KoBERT's classifier and BertForSequenceClassification."""

    def forward(self, hidden_states, attention_mask):
        return self.out(self.dropout(torch.tanh(self.dense(hidden_states[:, 0]))))


class WeightAvgHead(nn.Module):
    """A learned score per token, softmax over real tokens only, weighted average, linear."""

    def __init__(self, hidden, num_classes, dr_rate, activation=None):
        super().__init__()
        self.score, self.out = nn.Linear(hidden, 1), nn.Linear(hidden, num_classes)
        self.dropout = nn.Dropout(dr_rate)

    def forward(self, hidden_states, attention_mask):
        scores = self.score(hidden_states).squeeze(-1).float()
        scores = scores.masked_fill(attention_mask == 0, float("-inf"))
        weights = scores.softmax(dim=-1).to(hidden_states.dtype)
        return self.out(self.dropout(torch.einsum("bt,bth->bh", weights, hidden_states)))


class LSTMHead(nn.Module):
    """A bidirectional LSTM over real tokens only (packed, zero initial state), final states,
    linear: the same text always gets the same logits."""

    def __init__(self, hidden, num_classes, dr_rate, activation=None):
        super().__init__()
        self.lstm = nn.LSTM(hidden, hidden // 2, batch_first=True, bidirectional=True)
        self.out, self.dropout = nn.Linear(2 * (hidden // 2), num_classes), nn.Dropout(dr_rate)

    def forward(self, hidden_states, attention_mask):
        lengths = attention_mask.sum(dim=1).cpu()
        packed = nn.utils.rnn.pack_padded_sequence(hidden_states, lengths, batch_first=True,
                                                   enforce_sorted=False)
        _, (h_n, _) = self.lstm(packed)  # h_n: (2 directions, batch, hidden // 2)
        return self.out(self.dropout(torch.cat([h_n[0], h_n[1]], dim=-1)))


HEADS = {"cls": ClsHead, "pooler": PoolerHead, "weight_avg": WeightAvgHead, "lstm": LSTMHead}
