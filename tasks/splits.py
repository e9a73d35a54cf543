"""Class splits: which classes an episode may draw from.

Names a sampler accepts:

- any partition of the store, as prepared: ``background`` / ``evaluation`` for Omniglot (964 / 659 characters, the
  published alphabets), ``all`` (or the ``--split`` given) for an image folder;
- ``maml/train``, ``maml/test``: all 1623 Omniglot characters shuffled with ``split_seed``, 1200 / 423 (MAML, Reptile);
- ``vinyals/train``, ``vinyals/val``, ``vinyals/test``: the same shuffle cut 1028 / 172 / 423 (Vinyals et al. 2016);
- ``background/train``, ``background/val``: the 964 background characters shuffled with ``split_seed``, 864 / 100,
  so that validation (model selection) uses held-out characters while ``evaluation`` stays untouched for the test.

The shuffled schemes are defined for Omniglot only; other stores use their own partitions.

Any of these may be narrowed to some alphabets with ``:A,B``: ``evaluation:Kannada,Sylheti`` is the evaluation
characters of those two alphabets (task-distribution studies compare alphabets this way).
Rotation augmentation (each class x {0, 90, 180, 270} degrees as four classes) is on by default for training splits
(``background``, ``*/train``) and off for the rest.
"""

from __future__ import annotations

import numpy as np
from metatrain.tasks.errors import EpisodeError, did_you_mean
from metatrain.tasks.store import TaskStore

#: scheme -> (partition shuffled, or None for all classes; its class count; ordered (part, count) cuts).
SHUFFLED_SCHEMES = {
    "maml": (None, 1623, (("train", 1200), ("test", 423))),
    "vinyals": (None, 1623, (("train", 1028), ("val", 172), ("test", 423))),
    "background": ("background", 964, (("train", 864), ("val", 100))),
}
TRAINING_SPLITS = ("background", "train")


def split_names(store: TaskStore) -> list[str]:
    names = list(store.splits)
    for scheme, (_, _, cuts) in SHUFFLED_SCHEMES.items():
        if _scheme_pool(store, scheme) is not None:
            names += [f"{scheme}/{p}" for p, _ in cuts]
    return names


def _scheme_pool(store: TaskStore, scheme: str) -> np.ndarray | None:
    """The classes a shuffled scheme cuts, or None if this store is not the Omniglot the scheme is defined on."""
    partition, count, _ = SHUFFLED_SCHEMES[scheme]
    pool = np.arange(store.num_classes) if partition is None else store.classes_of(partition)
    return pool if len(pool) == count else None


def resolve_split(store: TaskStore, name: str, split_seed: int = 0) -> np.ndarray:
    """The class ids (ascending) of split ``name``; EpisodeError naming the split if it does not exist."""
    base, colon, wanted = name.partition(":")
    if colon:
        classes = resolve_split(store, base, split_seed)
        alphabets = {a.strip() for a in wanted.split(",") if a.strip()}
        of_class = np.array([store.class_names[c].split("/")[0] for c in classes])
        unknown = sorted(alphabets - set(of_class))
        if not alphabets or unknown:
            raise EpisodeError(f"split {name!r}: unknown alphabet(s) {unknown or [wanted]} in {base!r}; it has "
                               f"{', '.join(sorted(set(of_class)))}")
        return classes[np.isin(of_class, sorted(alphabets))]
    if name in store.splits:
        return store.classes_of(name)
    scheme, _, part = name.partition("/")
    if scheme in SHUFFLED_SCHEMES and part in dict(SHUFFLED_SCHEMES[scheme][2]):
        partition, count, cuts = SHUFFLED_SCHEMES[scheme]
        pool = _scheme_pool(store, scheme)
        if pool is None:
            what = f"the {partition!r} partition" if partition else "the store"
            raise EpisodeError(f"split {name!r} is defined for Omniglot ({count} classes in {what}); store "
                               f"{store.path} does not have them (use one of {list(store.splits)})")
        order = pool[np.random.default_rng(split_seed).permutation(len(pool))]
        start = 0
        for p, n in cuts:
            if p == part:
                return np.sort(order[start:start + n])
            start += n
    known = split_names(store)
    raise EpisodeError(f"unknown split {name!r}{did_you_mean(name, known)}; known splits: {', '.join(known)}")


def is_training_split(name: str) -> bool:
    """Training splits get rotation augmentation by default."""
    name = name.partition(":")[0]
    return name in TRAINING_SPLITS or name.endswith("/train")
