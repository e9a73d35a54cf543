"""Class splits: which classes an episode may draw from.

Names a sampler accepts:

- any partition of the store, as prepared: ``background`` / ``evaluation`` for Omniglot (964 / 659 characters, the
  published alphabets), ``all`` (or the ``--split`` given) for an image folder;
- ``maml/train``, ``maml/test``: all 1623 Omniglot characters shuffled with ``split_seed``, 1200 / 423 (MAML, Reptile);
- ``vinyals/train``, ``vinyals/val``, ``vinyals/test``: the same shuffle cut 1028 / 172 / 423 (Vinyals et al. 2016).

The shuffled schemes are defined for Omniglot's 1623 characters only; other stores use their own partitions.
Rotation augmentation (each class x {0, 90, 180, 270} degrees as four classes) is on by default for training splits
(``background``, ``*/train``) and off for the rest.
"""

from __future__ import annotations

import difflib

import numpy as np

from tasks.errors import EpisodeError
from tasks.store import TaskStore

#: scheme -> ordered (part, count) cuts of the seeded shuffle of all classes.
SHUFFLED_SCHEMES = {
    "maml": (("train", 1200), ("test", 423)),
    "vinyals": (("train", 1028), ("val", 172), ("test", 423)),
}
TRAINING_SPLITS = ("background", "train")


def split_names(store: TaskStore) -> list[str]:
    names = list(store.splits)
    if store.num_classes == 1623:
        names += [f"{s}/{p}" for s, cuts in SHUFFLED_SCHEMES.items() for p, _ in cuts]
    return names


def resolve_split(store: TaskStore, name: str, split_seed: int = 0) -> np.ndarray:
    """The class ids (ascending) of split ``name``; EpisodeError naming the split if it does not exist."""
    if name in store.splits:
        return store.classes_of(name)
    scheme, _, part = name.partition("/")
    if scheme in SHUFFLED_SCHEMES and part in dict(SHUFFLED_SCHEMES[scheme]):
        if store.num_classes != 1623:
            raise EpisodeError(f"split {name!r} is defined for Omniglot's 1623 characters; store {store.path} has "
                               f"{store.num_classes} classes (use one of {list(store.splits)})")
        order = np.random.default_rng(split_seed).permutation(store.num_classes)
        start = 0
        for p, count in SHUFFLED_SCHEMES[scheme]:
            if p == part:
                return np.sort(order[start:start + count])
            start += count
    known = split_names(store)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise EpisodeError(f"unknown split {name!r}{hint}; known splits: {', '.join(known)}")


def is_training_split(name: str) -> bool:
    """Training splits get rotation augmentation by default."""
    return name in TRAINING_SPLITS or name.endswith("/train")
