"""The demo's sentiment task: short English sentences from templates, generated, not downloaded.

Label 1: something was liked. Negations and contrasts need more than a bag of words.
Generation is seeded; the test split holds out whole subjects.
"""

from __future__ import annotations

import random
from typing import List, Tuple

POSITIVE = [
    "good", "great", "wonderful", "excellent", "delightful", "lovely", "fantastic", "charming",
    "brilliant", "enjoyable", "superb", "pleasant", "amazing", "impressive", "fun", "beautiful",
]  # fmt: skip
NEGATIVE = [
    "bad", "awful", "terrible", "boring", "dull", "horrible", "disappointing", "poor",
    "dreadful", "tedious", "mediocre", "unpleasant", "weak", "annoying", "bland", "ugly",
]  # fmt: skip
SUBJECTS = [
    "the movie", "the film", "this book", "the food", "the service", "the hotel", "the concert",
    "our trip", "the game", "this phone", "the show", "the coffee", "the museum", "the soup",
    "the album", "the lecture", "the play", "the room", "the staff", "the ending",
]  # fmt: skip
# Subjects that appear only in the test split.
TEST_SUBJECTS = ["the soup", "the album", "the lecture", "the play", "the room", "the staff", "the ending"]

# (template, negated): a negated template says the opposite of its adjective.
TEMPLATES = [
    ("{s} was {a}.", False),
    ("{s} was really {a}.", False),
    ("i thought {s} was {a}.", False),
    ("honestly, {s} was {a}.", False),
    ("everyone agreed that {s} was {a}.", False),
    ("{s} was not {a}.", True),
    ("{s} was not {a} at all.", True),
    ("i would not call {s} {a}.", True),
    ("nobody found {s} {a}.", True),
]
CONTRAST = "{s} looked {b} at first, but it turned out {a}."

Example = Tuple[str, int]


def _sentences(subjects: List[str], per_subject: int, rng: random.Random) -> List[Example]:
    examples: List[Example] = []
    for subject in subjects:
        for i in range(per_subject):
            label = i % 2  # balanced per subject
            kind = rng.randrange(len(TEMPLATES) + 2)
            if kind >= len(TEMPLATES):
                # The clause after "but" decides; the first adjective says the opposite.
                said, other = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
                text = CONTRAST.format(s=subject, a=rng.choice(said), b=rng.choice(other))
            else:
                template, negated = TEMPLATES[kind]
                positive_word = bool(label) != negated
                text = template.format(s=subject, a=rng.choice(POSITIVE if positive_word else NEGATIVE))
            examples.append((text, label))
    rng.shuffle(examples)
    return examples


def sentiment_splits(per_subject: int = 24) -> Tuple[List[Example], List[Example]]:
    """``(train, test)`` lists of ``(sentence, label)``; 13 training and 7 test subjects.

    ``per_subject=24`` gives 312 training and 168 test sentences, half of them positive.
    """
    rng = random.Random(20240808)
    train_subjects = [s for s in SUBJECTS if s not in TEST_SUBJECTS]
    return _sentences(train_subjects, per_subject, rng), _sentences(TEST_SUBJECTS, per_subject, rng)
