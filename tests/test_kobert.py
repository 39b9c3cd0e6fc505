"""The KoBERT transform: SentencePiece over BERT basic tokens, as gluonnlp 0.10 does it."""

import json
import os
import subprocess
import unicodedata

import numpy as np
import pytest
from conftest import SAMPLE

from _1_data import BERTSentenceTransform, BERTSPTokenizer, bert_basic_tokenize, read_table

TRICKY = [
    "이 영화 정말 재밌다!!",
    "",
    "  공백\t\t탭\n줄바꿈  ",
    "최고ㅋㅋㅋ 10점 만점에 10점...",
    "漢字가 섞인 文章",
    "Café naïve RÉSUMÉ",
    "제어\x00문자\u200b와 \ufffd 대체문자",
    "emoji 😀 and ♥♥",
    "“따옴표” ‘작은’ (괄호) [대괄호] {중괄호}",
    "ｆｕｌｌｗｉｄｔｈ ＡＢＣ",
    "아" * 300,
]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    """A small SentencePiece model laid out like KoBERT's: [UNK]=0, [PAD]=1, [CLS], [SEP],
    [MASK]."""
    import sentencepiece

    texts = [t for t, _ in read_table(os.path.join(SAMPLE, "ratings_train.txt"))][:5000]
    prefix = str(tmp_path_factory.mktemp("spm") / "kobert_like")
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=prefix,
        vocab_size=2000,
        model_type="unigram",
        unk_id=0,
        unk_piece="[UNK]",
        pad_id=1,
        pad_piece="[PAD]",
        bos_id=-1,
        eos_id=-1,
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
        minloglevel=2,
    )
    return prefix + ".model"


def test_basic_tokenization_matches_bert_rules():
    # gluonnlp always applies NFD (Hangul syllables become jamo); SentencePiece recomposes them
    assert bert_basic_tokenize("Hello,world!  좋아요\t\n") == [
        "Hello",
        ",",
        "world",
        "!",
        unicodedata.normalize("NFD", "좋아요"),
    ]
    assert bert_basic_tokenize("漢字abc") == ["漢", "字", "abc"]
    assert bert_basic_tokenize("a\x00b\u200bc") == ["abc"]  # NUL and format characters dropped
    assert bert_basic_tokenize("Café", lower=True) == ["cafe"]


def test_transform_shapes_padding_and_truncation(spm_model):
    tok = BERTSPTokenizer(spm_model, lower=False)
    assert (tok.unk_token_id, tok.pad_token_id, tok.cls_token_id, tok.sep_token_id) == (0, 1, 2, 3)
    transform = BERTSentenceTransform(tok, max_seq_length=16, pad=True, pair=False)
    ids, valid_length, segments = transform(["이 영화 정말 재밌다"])
    assert ids.dtype == valid_length.dtype == segments.dtype == np.int32
    assert ids.shape == segments.shape == (16,) and valid_length.shape == ()
    n = int(valid_length)
    assert ids[0] == 2 and ids[n - 1] == 3 and (ids[n:] == 1).all() and 4 <= n < 16
    assert (segments == 0).all()
    long_ids, long_len, _ = transform(["아주 긴 리뷰 " * 50])
    assert int(long_len) == 16 and long_ids[0] == 2 and long_ids[-1] == 3
    assert (ids[:n] == BERTSentenceTransform(tok, 16, pad=False)(["이 영화 정말 재밌다"])[0]).all()
    pieces = tok("이 영화 정말 재밌다")
    assert ids[1 : n - 1].tolist() == tok.convert_tokens_to_ids(pieces)
    assert any(p.startswith("▁") for p in pieces)
    pair_ids, pair_len, pair_segments = BERTSentenceTransform(tok, 12, pair=True)(
        ["정말 재밌다 " * 5, "최고"]
    )
    assert int(pair_len) == 12 and pair_segments.tolist().count(1) == int(np.sum(pair_segments))
    assert pair_ids.tolist().count(3) == 2 and pair_segments[-1] == 1


def test_unknown_pieces_map_to_unk(spm_model):
    tok = BERTSPTokenizer(spm_model)
    ids, n, _ = BERTSentenceTransform(tok, 32)(["ᄀᄂᄃ 🦜"])
    assert 0 in ids[1 : int(n) - 1].tolist()


GLUON_SCRIPT = """
import json, sys
import gluonnlp as nlp
from gluonnlp.data.transforms import SentencepieceTokenizer
# gluonnlp calls SampleEncodeAsPieces(text, num_best=0); it documents 0 as "no sampling",
# which sentencepiece >= 0.1.9x rejects, so route it to plain EncodeAsPieces.
SentencepieceTokenizer.__call__ = lambda self, s: self._processor.EncodeAsPieces(s)
path, max_len = sys.argv[1], int(sys.argv[2])
vocab = nlp.vocab.BERTVocab.from_sentencepiece(path, padding_token="[PAD]")
tok = nlp.data.BERTSPTokenizer(path, vocab, lower=False)
transform = nlp.data.BERTSentenceTransform(tok, max_seq_length=max_len, pad=True, pair=False)
for text in json.load(sys.stdin):
    ids, n, seg = transform([text])
    basic = tok.basic_tokenizer(text)
    pieces = [tok._tokenize_wordpiece(t) for t in basic]
    print(json.dumps([ids.tolist(), int(n), seg.tolist(), basic, pieces]))
"""


class Replay(BERTSPTokenizer):
    """Our tokenizer with gluonnlp's SentencePiece segmentation of each basic token replayed."""

    pieces = {}

    def __call__(self, text):
        return self.pieces[text]


def test_matches_gluonnlp(spm_model):
    """Set GLUONNLP_PYTHON to a Python with mxnet==1.9.1 gluonnlp==0.10.0 numpy<1.24 (see
    README)."""
    python = os.environ.get("GLUONNLP_PYTHON")
    if not python or not os.path.exists(python):
        pytest.skip("GLUONNLP_PYTHON is not set to a Python with gluonnlp 0.10")
    texts = TRICKY + [t for t, _ in read_table(os.path.join(SAMPLE, "ratings_test.txt"))][:1000]
    result = subprocess.run(
        [python, "-c", GLUON_SCRIPT, spm_model, "64"],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    expected = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(expected) == len(texts)
    ours = BERTSPTokenizer(spm_model, lower=False)
    replay = Replay(spm_model, lower=False)
    ties = 0
    for text, (ids, n, segments, basic, pieces) in zip(texts, expected):
        assert bert_basic_tokenize(text) == basic, text
        tied = False
        for token, theirs in zip(basic, pieces):
            mine = ours.sp.encode(token, out_type=str)
            if mine != theirs:  # sentencepiece 0.2 and 0.1.99 break exact score ties differently
                score = lambda ps: sum(
                    ours.sp.get_score(ours.sp.piece_to_id(p)) for p in ps
                )  # noqa: E731
                assert score(mine) == pytest.approx(score(theirs), abs=1e-4), (text, mine, theirs)
                ties, tied = ties + 1, True
        replay.pieces[text] = [p for ps in pieces for p in ps]
        got = BERTSentenceTransform(replay, 64)([text])
        assert [got[0].tolist(), int(got[1]), got[2].tolist()] == [ids, n, segments], text
        if not tied:
            assert (BERTSentenceTransform(ours, 64)([text])[0] == got[0]).all()
    assert ties < len(texts) // 20
