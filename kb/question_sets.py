"""The question sets the project ships, in one list: the benchmark, the CLI and the Evaluation page read them here.

Each set says what it was for, because a figure means something different on a
set that settings were tuned on than on one nobody read: the README's tables
quote these purposes. The shared dev set's copy here adds ``facts`` and
categories to ``../shared/corpus/dev_questions.jsonl`` (same questions, same gold).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kb.errors import KBError

QUESTIONS = Path(__file__).resolve().parent / "questions"


@dataclass(frozen=True)
class QuestionSet:
    key: str  # the benchmark's name for it (bench/results/*.json)
    label: str  # the Evaluation page's name for it
    file: Path
    purpose: str
    retrieval: bool = True  # has gold locations (the unanswerable set has none)


SETS: tuple[QuestionSet, ...] = (
    QuestionSet("dev", "Shared dev set, with facts", QUESTIONS / "dev_questions.jsonl",
                "tuning (the shared dev set, with facts and categories)"),
    QuestionSet("overview-dev", "Overview (dev)", QUESTIONS / "overview_dev.jsonl", "tuning (overview questions)"),
    QuestionSet("holdout", "Held-out set", QUESTIONS / "holdout_questions.jsonl", "checking only"),
    QuestionSet("overview-holdout", "Overview (held-out)", QUESTIONS / "overview_holdout.jsonl",
                "checking only; its misses were read for the third round of signals"),
    QuestionSet("overview-dev2", "Overview (dev 2)", QUESTIONS / "overview_dev2.jsonl",
                "tuning (a second overview set, written blind, then its misses read)"),
    QuestionSet("overview-fresh", "Overview (fresh)", QUESTIONS / "overview_fresh.jsonl",
                "checking only, written blind before that round"),
    QuestionSet("overview-features", "Overview (main features)", QUESTIONS / "overview_features.jsonl",
                "tuning (what a project's main features are, every README with a feature list, both languages)"),
    QuestionSet("overview-features-holdout", "Overview (main features, held-out)",
                QUESTIONS / "overview_features_holdout.jsonl",
                "checking only, other phrasings of the features questions, written before measuring"),
    QuestionSet("overview-blind3", "Overview (blind 3)", QUESTIONS / "overview_blind3.jsonl",
                "checking only, written blind from the documents alone (first questions and deep facts)"),
    QuestionSet("overview-blind4", "Overview (blind 4)", QUESTIONS / "overview_blind4.jsonl",
                "checking only, a second blind set (6 per repo: 3 first questions, 2 deep facts, 1 cross-lingual)"),
    QuestionSet("overview-blind5", "Overview (blind 5)", QUESTIONS / "overview_blind5.jsonl",
                "checking only, a third blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual)"),
    QuestionSet("overview-blind6", "Overview (blind 6)", QUESTIONS / "overview_blind6.jsonl",
                "checking only, a fourth blind set (40: 28 first questions, 8 deep facts, 4 cross-lingual)"),
    QuestionSet("overview-blind7", "Overview (blind 7)", QUESTIONS / "overview_blind7.jsonl",
                "checking only, a fifth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written from the documents alone while the retriever was left as it was"),
    QuestionSet("overview-blind8", "Overview (blind 8)", QUESTIONS / "overview_blind8.jsonl",
                "checking only, a sixth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone, measured once before blind7's misses were read"),
    QuestionSet("overview-blind9", "Overview (blind 9)", QUESTIONS / "overview_blind9.jsonl",
                "checking only, a seventh blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the thirty-fifth stop, measured once as it came"),
    QuestionSet("overview-blind10", "Overview (blind 10)", QUESTIONS / "overview_blind10.jsonl",
                "checking only, an eighth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the thirty-seventh stop, measured once as it came"),
    QuestionSet("overview-blind11", "Overview (blind 11)", QUESTIONS / "overview_blind11.jsonl",
                "checking only, a ninth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the thirty-eighth stop, measured once as it came"),
    QuestionSet("overview-blind12", "Overview (blind 12)", QUESTIONS / "overview_blind12.jsonl",
                "checking only, a tenth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the thirty-eighth stop, measured once at the next"),
    QuestionSet("overview-blind13", "Overview (blind 13)", QUESTIONS / "overview_blind13.jsonl",
                "checking only, an eleventh blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the thirty-ninth stop, measured once as it came"),
    QuestionSet("overview-blind14", "Overview (blind 14)", QUESTIONS / "overview_blind14.jsonl",
                "checking only, a twelfth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the thirty-ninth stop, measured once at the fortieth "
                "on its final code"),
    QuestionSet("overview-blind15", "Overview (blind 15)", QUESTIONS / "overview_blind15.jsonl",
                "checking only, a thirteenth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the thirty-ninth stop, measured once at the fortieth"),
    QuestionSet("overview-blind16", "Overview (blind 16)", QUESTIONS / "overview_blind16.jsonl",
                "checking only, a fourteenth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fortieth stop, measured once at the forty-first"),
    QuestionSet("overview-blind17", "Overview (blind 17)", QUESTIONS / "overview_blind17.jsonl",
                "checking only, a fifteenth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fortieth stop, measured once at the forty-first"),
    QuestionSet("overview-blind18", "Overview (blind 18)", QUESTIONS / "overview_blind18.jsonl",
                "checking only, a sixteenth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-first stop, measured once at the forty-second"),
    QuestionSet("overview-blind19", "Overview (blind 19)", QUESTIONS / "overview_blind19.jsonl",
                "checking only, a seventeenth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-second stop, measured once at the forty-third"),
    QuestionSet("overview-blind20", "Overview (blind 20)", QUESTIONS / "overview_blind20.jsonl",
                "checking only, an eighteenth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-third stop, measured once at the forty-fourth"),
    QuestionSet("overview-blind21", "Overview (blind 21)", QUESTIONS / "overview_blind21.jsonl",
                "checking only, a nineteenth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-fourth stop, measured once at the forty-fifth"),
    QuestionSet("overview-blind22", "Overview (blind 22)", QUESTIONS / "overview_blind22.jsonl",
                "checking only, a twentieth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-fifth stop, measured once at the forty-sixth"),
    QuestionSet("overview-blind23", "Overview (blind 23)", QUESTIONS / "overview_blind23.jsonl",
                "checking only, a twenty-first blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-sixth stop, measured once at the forty-seventh"),
    QuestionSet("overview-blind24", "Overview (blind 24)", QUESTIONS / "overview_blind24.jsonl",
                "checking only, a twenty-second blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-seventh stop, measured once at the forty-eighth"),
    QuestionSet("overview-blind25", "Overview (blind 25)", QUESTIONS / "overview_blind25.jsonl",
                "checking only, a twenty-third blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-eighth stop, measured once at the forty-ninth"),
    QuestionSet("overview-blind26", "Overview (blind 26)", QUESTIONS / "overview_blind26.jsonl",
                "checking only, a twenty-fourth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the forty-ninth stop, measured once at the fiftieth"),
    QuestionSet("overview-blind27", "Overview (blind 27)", QUESTIONS / "overview_blind27.jsonl",
                "checking only, a twenty-fifth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fiftieth stop, measured once at the fifty-first"),
    QuestionSet("overview-blind28", "Overview (blind 28)", QUESTIONS / "overview_blind28.jsonl",
                "checking only, a twenty-sixth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-first stop, measured once at the fifty-second"),
    QuestionSet("overview-blind29", "Overview (blind 29)", QUESTIONS / "overview_blind29.jsonl",
                "checking only, a twenty-seventh blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-second stop, measured once at the fifty-third"),
    QuestionSet("overview-blind30", "Overview (blind 30)", QUESTIONS / "overview_blind30.jsonl",
                "checking only, a twenty-eighth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-third stop, measured once at the fifty-fourth"),
    QuestionSet("overview-blind31", "Overview (blind 31)", QUESTIONS / "overview_blind31.jsonl",
                "checking only, a twenty-ninth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-fourth stop, measured once at the fifty-fifth"),
    QuestionSet("overview-blind32", "Overview (blind 32)", QUESTIONS / "overview_blind32.jsonl",
                "checking only, a thirtieth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-fifth stop, measured once at the fifty-sixth"),
    QuestionSet("overview-blind33", "Overview (blind 33)", QUESTIONS / "overview_blind33.jsonl",
                "checking only, a thirty-first blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-sixth stop (its text shown once in a "
                "review diff), measured once at the fifty-seventh"),
    QuestionSet("overview-blind34", "Overview (blind 34)", QUESTIONS / "overview_blind34.jsonl",
                "checking only, a thirty-second blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-seventh stop, measured once at the "
                "fifty-eighth"),
    QuestionSet("overview-blind35", "Overview (blind 35)", QUESTIONS / "overview_blind35.jsonl",
                "checking only, a thirty-third blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-eighth stop, measured once at the "
                "fifty-ninth"),
    QuestionSet("overview-blind36", "Overview (blind 36)", QUESTIONS / "overview_blind36.jsonl",
                "checking only, a thirty-fourth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the fifty-ninth stop, measured once at the "
                "sixtieth"),
    QuestionSet("overview-blind37", "Overview (blind 37)", QUESTIONS / "overview_blind37.jsonl",
                "checking only, a thirty-fifth blind set (40: 26 first questions, 10 deep facts, 4 cross-lingual), "
                "written by a helper from the documents alone at the sixtieth stop, measured once at the "
                "sixty-first"),
    QuestionSet("unanswerable", "Unanswerable", QUESTIONS / "unanswerable.jsonl",
                "answers only: plausible questions the documents do not answer", retrieval=False),
)
BY_KEY = {s.key: s for s in SETS}


def retrieval_sets() -> tuple[QuestionSet, ...]:
    """The sets with gold locations, which retrieval is scored on."""
    return tuple(s for s in SETS if s.retrieval)


def resolve(name: str) -> Path:
    """A question file given by path, or a shipped set by its key (``kb eval holdout``); a path wins."""
    path = Path(name)
    if path.is_file():
        return path
    if name in BY_KEY:
        return BY_KEY[name].file
    if path.is_dir():
        raise KBError(f"{name} is a folder: give a question file (.jsonl) in it, or a shipped set: {', '.join(BY_KEY)}")
    raise KBError(f"no such question file: {name} (or name a shipped set: {', '.join(BY_KEY)})")
