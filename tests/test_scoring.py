"""train.scoring: ROUGE and WER/CER against values worked out by hand and the packages' own."""

import pytest

from train import scoring

rouge_score = pytest.importorskip('rouge_score')
jiwer = pytest.importorskip('jiwer')


def test_rouge_hand_computed():
  # prediction "the cat sat on the mat", reference "the cat lay on the mat": 6 tokens each.
  # rouge1: overlap the x2, cat, on, mat = 5 -> P = R = F = 5/6.
  # rouge2: bigrams shared: "the cat", "on the", "the mat" = 3 of 5 -> 3/5.
  # rougeL: LCS "the cat on the mat" = 5 -> 5/6.
  scores = scoring.rouge(['the cat sat on the mat'], ['the cat lay on the mat'])
  assert scores == pytest.approx({'rouge1': 500 / 6, 'rouge2': 60.0, 'rougeL': 500 / 6})


def test_rouge_unequal_lengths_and_mean():
  # prediction "a b" vs reference "a b c d": rouge1 P = 1, R = 1/2, F = 2/3; rouge2 P = 1,
  # R = 1/3, F = 1/2. The second pair is identical (100). Means: 250/3 and 75.
  scores = scoring.rouge(['a b', 'x y'], ['a b c d', 'x y'])
  assert scores['rouge1'] == pytest.approx((200 / 3 + 100) / 2)
  assert scores['rouge2'] == pytest.approx(75.0)


def test_rouge_stems_and_ignores_case_and_punctuation():
  # Porter: cats -> cat, running / runs -> run.
  assert scoring.rouge(['Cats, RUNNING!'], ['cat runs'])['rouge1'] == pytest.approx(100.0)


def test_rouge_matches_the_package():
  from rouge_score import rouge_scorer
  prediction = 'The quick brown foxes jumped over lazy dogs.'
  reference = 'A quick brown fox jumps over the lazy dog.'
  expected = rouge_scorer.RougeScorer(['rouge1', 'rouge2', 'rougeL'], use_stemmer=True).score(
      reference, prediction)
  scores = scoring.rouge([prediction], [reference])
  assert scores == pytest.approx({k: 100 * v.fmeasure for k, v in expected.items()})


def test_rouge_empty_prediction_scores_zero():
  assert scoring.rouge([''], ['a reference']) == {'rouge1': 0.0, 'rouge2': 0.0, 'rougeL': 0.0}


@pytest.mark.parametrize('fn', [scoring.rouge, scoring.wer_cer])
def test_bad_arguments(fn):
  with pytest.raises(ValueError, match='2 predictions but 1 references'):
    fn(['a', 'b'], ['a'])
  with pytest.raises(ValueError, match='no references'):
    fn([], [])


def test_wer_cer_hand_computed():
  # reference "the cat sit on" (4 words, 14 characters), prediction "the cat sat":
  # words: sit -> sat, "on" deleted = 2 / 4; characters: i -> a, " on" deleted = 4 / 14.
  scores = scoring.wer_cer(['the cat sat'], ['the cat sit on'])
  assert scores == pytest.approx({'wer': 50.0, 'cer': 400 / 14})
  # The other way round: reference "the cat sat" (3 words, 11 characters):
  # a substitution and an insertion = 2 / 3; a -> i and " on" inserted = 4 / 11.
  scores = scoring.wer_cer(['the cat sit on'], ['the cat sat'])
  assert scores == pytest.approx({'wer': 200 / 3, 'cer': 400 / 11})


def test_wer_is_corpus_level():
  # 1 error over 4 + 1 reference words = 20, not the mean of per-utterance rates (12.5 + 0).
  scores = scoring.wer_cer(['a b c x', 'd'], ['a b c d', 'd'])
  assert scores['wer'] == pytest.approx(20.0)
  assert scores['wer'] == pytest.approx(100 * jiwer.wer(['a b c d', 'd'], ['a b c x', 'd']))


def test_normalization_applies_to_both_sides():
  assert scoring.normalize_transcript("  Don't  STOP, well-known... ") == 'dont stop well known'
  assert scoring.wer_cer(['The CAT, sat!'], ['the cat sat.']) == {'wer': 0.0, 'cer': 0.0}


def test_empty_reference_rule():
  # The empty reference adds its prediction's word as an insertion and nothing to the
  # denominator: 1 error over 2 words; characters: 1 insertion over 3 ("a b").
  scores = scoring.wer_cer(['a b', 'x'], ['a b', '...'])
  assert scores == pytest.approx({'wer': 50.0, 'cer': 100 / 3})
  # An empty prediction against an empty reference costs nothing.
  assert scoring.wer_cer(['a b', ''], ['a b', '']) == {'wer': 0.0, 'cer': 0.0}
  with pytest.raises(ValueError, match='every reference is empty'):
    scoring.wer_cer(['x'], ['?!'])
