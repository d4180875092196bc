"""MetaCLIP balancing: per-sample per-epoch probabilities from a metadata list matched in the captions.

    entries = read_metadata("metadata.txt")                 # one entry per line
    matches = match_entries(captions, entries)              # (sample ids, entry ids), one pair per match
    counts = entry_counts(matches, len(entries))             # samples matching each entry
    p, matched = balance_probabilities(matches, counts, threshold=t, num_samples=len(captions))

Matching is MetaCLIP's sub-string matching: an entry matches a caption when it occurs anywhere
in it, both lower-cased with `str.lower` (so "cat" also matches "category", as in MetaCLIP). It
runs one Aho–Corasick automaton (`pyahocorasick`) over each caption: time linear in the caption
length plus the matches, whatever the number of entries. An entry that occurs several times in
one caption counts once for that sample.

Sampling (MetaCLIP's, per epoch): entry `e` with `count_e` matching samples picks each of them
with probability `min(1, t / count_e)` (so about `t` per epoch for a head entry, all of a tail
entry), and a sample is used when any of its entries picks it:
`p = 1 - prod_e (1 - min(1, t / count_e))` over its matched entries. Samples matching no entry
get no probability (`matched` is False): the selection drops them, or keeps them at 1.0.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .select_io import SelectionError


def read_metadata(path: str | os.PathLike) -> list[str]:
    """The entries of a metadata file: one per line, surrounding whitespace stripped, lower-cased,
    empty lines and repeats dropped (first occurrence kept), in file order."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        raise SelectionError(f"metadata file {path} does not exist; pass --metadata a text file with one entry per line.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise SelectionError(f"metadata file {path} cannot be read as UTF-8 text ({error}); pass a text file with one entry per line.") from None
    entries = list(dict.fromkeys(line.strip().lower() for line in lines if line.strip()))
    if not entries:
        raise SelectionError(f"metadata file {path} holds no entry; write one entry per line.")
    return entries


def match_entries(captions: Sequence[str | None], entries: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every (sample, entry) pair whose entry occurs in the sample's lower-cased caption.

    captions: n captions (None: no caption, matches nothing); entries: E lower-cased entries.
    Returns (sample_ids [M] int64, entry_ids [M] int64), pairs unique, sorted by sample then entry.
    """
    import ahocorasick

    automaton = ahocorasick.Automaton()
    for entry_id, entry in enumerate(entries):
        automaton.add_word(entry, entry_id)
    automaton.make_automaton()
    samples: list[int] = []
    found: list[int] = []
    for sample_id, caption in enumerate(captions):
        if not caption:
            continue
        ids = sorted({entry_id for _, entry_id in automaton.iter(caption.lower())})
        samples.extend([sample_id] * len(ids))
        found.extend(ids)
    return np.asarray(samples, dtype=np.int64), np.asarray(found, dtype=np.int64)


def entry_counts(matches: tuple[np.ndarray, np.ndarray], num_entries: int) -> np.ndarray:
    """[E] int64: how many samples match each entry."""
    return np.bincount(matches[1], minlength=num_entries).astype(np.int64)


def balance_probabilities(matches: tuple[np.ndarray, np.ndarray], counts: np.ndarray, threshold: float,
                          num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(p [n] float64, matched [n] bool): each sample's per-epoch probability, and whether any entry matched it.

    p = 1 - prod over the sample's entries of (1 - min(1, threshold / count_e)); 0.0 where unmatched.
    """
    sample_ids, entry_ids = matches
    pick = np.minimum(1.0, threshold / np.maximum(counts[entry_ids], 1).astype(np.float64))  # [M]
    whole = np.bincount(sample_ids, weights=(pick >= 1.0), minlength=num_samples) > 0  # a tail entry keeps it
    # prod(1 - pick) as a sum of logs: no underflow to a wrong 0 over many head entries.
    # (pick == 1 would be log 0; those samples are set to 1.0 just below.)
    log_miss = np.bincount(sample_ids, weights=np.log1p(-np.where(pick >= 1.0, 0.0, pick)), minlength=num_samples)
    p = -np.expm1(log_miss)
    matched = np.bincount(sample_ids, minlength=num_samples) > 0
    p[whole] = 1.0
    p[~matched] = 0.0
    return p, matched
