"""Who spoke when, from a recording's speech regions and embeddings of short windows of them.

The method is the one 3D-Speaker and WeSpeaker use, written here for this network, on two scales
as NeMo's multi-scale diarization does: speech regions (Silero VAD, ``model/speech.py``) are cut
into short overlapping windows, each embedded, and a long window's embedding is the mean of the
short ones inside it. The long windows, whose embeddings are surer of a voice, find the speakers:
spectral clustering on a pruned cosine affinity (the number of clusters from the largest eigengap
of its Laplacian), then clusters whose centroids are as alike as one speaker's are merged, and
the caller's hints bound that merging (pauses of one speaker no longer than ``bridge_s`` stay
inside the turn). The short windows, which place a change of speaker more
closely, then each take the speaker whose centroid (of the short windows the long ones put there)
is nearest, and each stretch of speech takes the speaker of the short windows nearest it; where
two overlapping windows disagree, the turn changes where their mixes of the two voices put it.
Named from enrolled profiles, a speaker keeps its name only on the turns that match the profile
themselves (:func:`keep_names_on_matching_turns`). Times in seconds; audio and embeddings in,
turns out: no web code.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

MAX_SPEAKERS = 20  # the most speakers /diarize will look for
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class DiarizeConfig:
    window_s: float = 1.5  # each short window, which places the turns
    hop_s: float = 0.75  # between window starts: windows overlap by half
    # each long window, which finds the speakers; its hop a whole number of short hops, so that short
    # windows tile it (chosen on validation against clustering the short windows themselves, against
    # embedding each long window itself, and against a long window every 3 s)
    cluster_window_s: float = 3.0
    cluster_hop_s: float = 1.5
    min_window_s: float = 0.4  # a speech region shorter than this is too short to embed; it joins a neighbour
    prune: float = 0.022  # share of each row of the affinity kept (3D-Speaker's p-pruning); at least 6 entries
    # clusters of long windows whose centroids are nearer than this are one speaker (chosen on
    # validation among 0.55-0.7: long windows' centroids come out a little more alike than short ones')
    merge_cosine: float = 0.62
    # a cluster of fewer windows than this, or than min_cluster_share of all of them (at least 2),
    # joins its nearest unless a hint forces it (8 long windows: about 12 s of speech; 4, about
    # 6 s as with short windows, measured worse on validation: real speakers split) ...
    min_cluster_windows: int = 8
    min_cluster_share: float = 0.1
    # ... when its centroid is at least this near that one's: a voice unlike every other keeps its
    # cluster however little it spoke (chosen on validation: 0.3 and 0.4 alike)
    small_cluster_cosine: float = 0.35
    # a pause of one speaker no longer than this is part of the turn (pyannote's min_duration_off):
    # twice the scoring collar, so bridging it adds no scored false alarm even against a reference
    # that marks the pause, and on validation it took back the missed speech of pauses inside turns
    bridge_s: float = 0.5

    def small_cluster(self, windows: int) -> int:
        """Clusters of fewer windows than this join their nearest, in a recording of ``windows``."""
        return min(self.min_cluster_windows, max(2, round(self.min_cluster_share * windows)))


@dataclass(frozen=True)
class Turn:
    start: float
    end: float
    speaker: int  # 0, 1, ... in order of first appearance

    @property
    def duration(self) -> float:
        return self.end - self.start


def windows(
    regions: list[tuple[float, float]], config: DiarizeConfig | None = None, clustering: bool = False
) -> list[tuple[float, float]]:
    """Overlapping windows over each speech region: ``window_s`` long every ``hop_s`` (with
    ``clustering``, the long ones: ``cluster_window_s`` every ``cluster_hop_s``), the last one
    ending at the region's end; a region shorter than a window is one window of its own length
    (if at least ``min_window_s``). Sorted by start, so their centres are too."""
    c = config or DiarizeConfig()
    size, hop = (c.cluster_window_s, c.cluster_hop_s) if clustering else (c.window_s, c.hop_s)
    out: list[tuple[float, float]] = []
    for start, end in regions:
        length = end - start
        if length < c.min_window_s:
            continue
        if length <= size:
            out.append((start, end))
            continue
        count = math.ceil((length - size) / hop) + 1
        for i in range(count):
            a = min(start + i * hop, end - size)
            out.append((a, a + size))
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def estimate_speakers(
    embeddings: np.ndarray,
    num_speakers: int | None = None,
    min_speakers: int = 1,
    max_speakers: int = MAX_SPEAKERS,
    config: DiarizeConfig | None = None,
    seed: int = 0,
) -> np.ndarray:
    """A speaker index per row of ``embeddings`` ``(N, D)``, numbered in order of first appearance.

    Spectral clustering of the p-pruned cosine affinity, as many clusters as the largest gap
    among the Laplacian's smallest eigenvalues says (at least ``min_speakers``, or
    ``num_speakers``; at most ``MAX_SPEAKERS``); then :func:`_merge` brings them within the bounds
    (``num_speakers``, else ``min_speakers``..``max_speakers``)."""
    # imported here, not at the top: scikit-learn pulls in pandas and scipy.stats (1.3 s on a
    # 2-core EPYC), which every server start and training command would otherwise pay
    import scipy.linalg
    from sklearn.cluster import KMeans

    c = config or DiarizeConfig()
    n = len(embeddings)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    lo = max(1, min(min_speakers, n))
    hi = max(lo, min(max_speakers, n))
    if num_speakers is not None:
        lo = hi = max(1, min(num_speakers, n))
    x = _unit(np.asarray(embeddings, dtype=np.float64))
    if hi == 1 or n == 1:
        return np.zeros(n, dtype=np.int64)
    if n <= 3:  # too few for a graph: each window its own cluster, then merged below
        labels = np.arange(n)
    else:
        affinity = x @ x.T
        keep = max(6, round(c.prune * n))
        pruned = np.zeros_like(affinity)
        top = np.argsort(-affinity, axis=1)[:, :keep]
        rows = np.arange(n)[:, None]
        pruned[rows, top] = affinity[rows, top]
        pruned = 0.5 * (pruned + pruned.T)
        np.fill_diagonal(pruned, 0.0)
        laplacian = np.diag(np.abs(pruned).sum(axis=1)) - pruned
        values, vectors = scipy.linalg.eigh(laplacian)
        # the gap is looked for up to MAX_SPEAKERS whatever the hints, and _merge brings the count
        # within them: KMeans forced to a hinted count on the spectral embedding split voices and
        # joined others (on validation a right num_speakers scored worse than no hint)
        most = min(MAX_SPEAKERS, n - 1)
        gaps = np.diff(values[: most + 1])  # gap after the k-th smallest eigenvalue, k = 1..most
        k = min(lo + int(np.argmax(gaps[lo - 1 : most])) if lo <= most else lo, n)
        labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(vectors[:, :k])
    labels = _merge(x, labels, lo, hi, c)
    return _by_first_appearance(labels)


def _merge(x: np.ndarray, labels: np.ndarray, lo: int, hi: int, c: DiarizeConfig) -> np.ndarray:
    """Merge the two most alike clusters while their centroids are nearer than ``merge_cosine``;
    then a small cluster (:meth:`DiarizeConfig.small_cluster`) that is not unlike every other
    (``small_cluster_cosine``) joins its nearest; then, while there are more than ``hi``, the
    smallest joins its nearest (a hint's count is reached by folding in the least speech, not by
    joining two voices that each said much). Never below ``lo``."""
    labels = labels.copy()
    while True:
        ids = sorted(set(labels.tolist()))
        if len(ids) <= lo:
            return labels
        centroids = _unit(np.stack([x[labels == i].mean(axis=0) for i in ids]))
        sizes = np.array([(labels == i).sum() for i in ids])
        sim = centroids @ centroids.T
        np.fill_diagonal(sim, -np.inf)
        small = np.flatnonzero(sizes < c.small_cluster(len(labels)))
        if len(small):  # a small cluster unlike every other is a speaker who spoke little
            small = small[sim[small].max(axis=1) >= c.small_cluster_cosine]
        if sim.max() >= c.merge_cosine:
            a, b = (int(v) for v in np.unravel_index(np.argmax(sim), sim.shape))
        elif len(small) or len(ids) > hi:
            a = int(small[np.argmin(sizes[small])]) if len(small) else int(np.argmin(sizes))
            b = int(np.argmax(sim[a]))
        else:
            return labels
        labels[labels == ids[max(a, b)]] = ids[min(a, b)]


def speaker_labels(
    regions: list[tuple[float, float]],
    wins: list[tuple[float, float]],
    embeddings: np.ndarray,
    num_speakers: int | None = None,
    min_speakers: int = 1,
    max_speakers: int = MAX_SPEAKERS,
    config: DiarizeConfig | None = None,
) -> np.ndarray:
    """A speaker per window of ``wins`` (:func:`windows`; ``embeddings`` ``(N, E)``, as the network
    gives them), found on the long windows (``windows(regions, config, clustering=True)``) by
    :func:`estimate_speakers` with the hints. A long window's embedding is the mean of those of the
    short windows inside it: the network pools its features over time before its linear fc layer,
    so that is a long window's own embedding but for the edges of its halves (cosine 0.99 to it on
    the validation conversations) and costs nothing more to compute. Each short window is first
    given the speaker of the long window whose centre is nearest, then takes the speaker whose
    centroid of those short windows is nearest by cosine. Where that leaves fewer speakers than a
    hint asks, the short windows are clustered themselves. Numbered in order of first appearance."""
    c = config or DiarizeConfig()
    long_wins = windows(regions, c, clustering=True)
    if wins and long_wins:
        raw = np.asarray(embeddings, dtype=np.float64)
        spans, long_spans = np.array(wins), np.array(long_wins)  # both sorted by start and by end
        first_inside = np.searchsorted(spans[:, 0], long_spans[:, 0] - 1e-6, side="left")
        past_inside = np.searchsorted(spans[:, 1], long_spans[:, 1] + 1e-6, side="right")
        long_x = _range_means(raw, first_inside, np.maximum(past_inside, first_inside + 1))
        found = estimate_speakers(long_x, num_speakers, min_speakers, max_speakers, c)
        centres, long_centres = spans.mean(axis=1), long_spans.mean(axis=1)
        after = np.searchsorted(long_centres, centres)
        left, right = np.clip(after - 1, 0, len(found) - 1), np.clip(after, 0, len(found) - 1)
        nearest = np.where(np.abs(long_centres[left] - centres) <= np.abs(long_centres[right] - centres), left, right)
        first = found[nearest]
        x = _unit(raw)
        speakers = np.unique(first)
        centroids = _unit(np.stack([x[first == k].mean(axis=0) for k in speakers]))
        labels = _by_first_appearance(speakers[np.argmax(x @ centroids.T, axis=1)])
        lo = num_speakers if num_speakers is not None else min_speakers
        if int(labels.max()) + 1 >= min(lo, len(wins)):
            return labels
    # no windows, or a speaker a hint asks for lost between the scales: the short windows alone
    return estimate_speakers(embeddings, num_speakers, min_speakers, max_speakers, c)


def _range_means(x: np.ndarray, first: np.ndarray, past: np.ndarray) -> np.ndarray:
    """The mean of the rows ``first[i]:past[i]`` of ``x`` for each ``i`` (every range non-empty),
    from one running sum."""
    sums = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0, dtype=np.float64)])
    return (sums[past] - sums[first]) / (past - first)[:, None]


def _by_first_appearance(labels: np.ndarray) -> np.ndarray:
    order: dict[int, int] = {}
    for v in labels.tolist():
        order.setdefault(v, len(order))
    return np.array([order[v] for v in labels.tolist()], dtype=np.int64)


def turns(
    regions: list[tuple[float, float]],
    wins: list[tuple[float, float]],
    labels: np.ndarray,
    bridge_s: float = 0.0,
    embeddings: np.ndarray | None = None,
) -> list[Turn]:
    """Speaker turns: every speech region is split among the windows' speakers, each instant
    taking the speaker of the window whose centre is nearest (so a change falls halfway between
    the centres of two windows that disagree), or with the windows' ``embeddings`` (as the network
    gives them) where those two windows' mixes of the two voices put it (:func:`_change_at`);
    pieces of one speaker that touch, or follow each other with a pause of at most ``bridge_s``
    and no other speaker between, are joined. Regions with no window take their nearest window's
    speaker. Sorted by start."""
    if not wins:
        return []
    centres = np.array([(a + b) / 2 for a, b in wins])
    order = np.argsort(centres, kind="stable")
    centres, speakers = centres[order], np.asarray(labels)[order]
    spans = None if embeddings is None else np.asarray(wins, dtype=np.float64)[order]
    raw = None if embeddings is None else np.asarray(embeddings, dtype=np.float64)[order]
    means = {} if raw is None else {k: raw[speakers == k].mean(axis=0) for k in np.unique(speakers).tolist()}
    pieces: list[Turn] = []
    for start, end in regions:
        # the boundaries between consecutive windows' centres that fall inside this region
        inside = np.flatnonzero((centres >= start) & (centres <= end))
        if len(inside) == 0:
            nearest = int(np.argmin(np.abs(centres - (start + end) / 2)))
            pieces.append(Turn(start, end, int(speakers[nearest])))
            continue
        t = start
        for i, j in itertools.pairwise(inside):
            if speakers[i] != speakers[j]:
                cut = float((centres[i] + centres[j]) / 2)
                if raw is not None and spans is not None:
                    first, then = means[int(speakers[i])], means[int(speakers[j])]
                    cut = _change_at(spans[[i, j]], raw[[i, j]], first, then, float(centres[i]), float(centres[j]))
                pieces.append(Turn(t, cut, int(speakers[i])))
                t = cut
        pieces.append(Turn(t, end, int(speakers[inside[-1]])))
    joined: list[Turn] = []
    for p in sorted(pieces, key=lambda p: p.start):
        if joined and joined[-1].speaker == p.speaker and p.start <= joined[-1].end + bridge_s:
            joined[-1] = Turn(joined[-1].start, max(joined[-1].end, p.end), p.speaker)
        elif p.end > p.start:
            joined.append(p)
    return joined


def _change_at(
    spans: np.ndarray, x: np.ndarray, first: np.ndarray, then: np.ndarray, earliest: float, latest: float
) -> float:
    """Where one voice hands over to the next inside two overlapping windows ``spans`` (2, 2) that
    each hear both, from their embeddings ``x`` (2, E) and the two voices' mean embeddings. The
    network averages its features over time before its linear fc layer, so a window's embedding is
    near the time-weighted mix of its two voices' ones: the share of ``then`` in each window is its
    projection on the line from ``first`` to ``then``, and as ``then`` speaks to the window's end
    the change is that share of the window before its end. The two windows' estimates are averaged
    and kept between the windows' centres (each window is mostly its own voice). Against a change
    halfway between the centres, on the validation conversations (60 of each kind, seed 23) this
    cut the confusion scored with no collar from 0.33 to 0.19 % (synthetic) and 1.04 to 0.94 %
    (real), and with the 0.5 s collar from 0.11 to 0.07 % and 0.81 to 0.79 %."""
    line = then - first
    length = float(line @ line)
    if length <= 0.0:
        return (earliest + latest) / 2
    share = np.clip((x - first) @ line / length, 0.0, 1.0)
    estimates = spans[:, 1] - share * (spans[:, 1] - spans[:, 0])
    return float(np.clip(estimates.mean(), earliest, latest))


@dataclass(frozen=True)
class Diarization:
    duration_s: float
    turns: list[Turn]  # sorted by start
    speech_s: list[float]  # per speaker (0, 1, ... in order of first speech), the seconds of its turns
    embeddings: np.ndarray  # (speakers, E): each speaker's mean unit window embedding
    # (turns, E): each turn's mean unit window embedding, of the windows whose centres lie in it
    # (the nearest window for a turn with none), and (turns,) how many windows that is
    turn_embeddings: np.ndarray
    turn_windows: np.ndarray

    @property
    def speakers(self) -> int:
        return len(self.speech_s)


def diarize(
    duration_s: float,
    regions: list[tuple[float, float]],
    wins: list[tuple[float, float]],
    embeddings: np.ndarray,
    num_speakers: int | None = None,
    min_speakers: int = 1,
    max_speakers: int = MAX_SPEAKERS,
    config: DiarizeConfig | None = None,
) -> Diarization:
    """What follows the windows' embeddings ``(len(wins), E)``: speakers (:func:`speaker_labels`),
    turns, each speaker's speech seconds and mean embedding (what /diarize and its evaluation both do)."""
    c = config or DiarizeConfig()
    labels = speaker_labels(regions, wins, embeddings, num_speakers, min_speakers, max_speakers, c)
    found = turns(regions, wins, labels, c.bridge_s, embeddings)
    count = int(labels.max()) + 1 if len(labels) else 0
    unit = _unit(np.asarray(embeddings, dtype=np.float32))
    means = np.stack([unit[labels == k].mean(axis=0) for k in range(count)]) if count else unit[:0]
    speech = [sum(t.duration for t in found if t.speaker == k) for k in range(count)]
    # each turn's windows: those whose centres lie in it (sorted, as the windows are; turns do not
    # overlap, so a centre lies in one turn at most), or the nearest window for a turn with none
    centres = np.array([(a + b) / 2 for a, b in wins])
    starts, ends = np.array([t.start for t in found]), np.array([t.end for t in found])
    first = np.searchsorted(centres, starts, side="left")
    past = np.searchsorted(centres, ends, side="left")
    for i in np.flatnonzero(past <= first):
        first[i] = int(np.argmin(np.abs(centres - (starts[i] + ends[i]) / 2)))
        past[i] = first[i] + 1
    turn_x = _range_means(unit, first, past) if len(found) else unit[:0]
    return Diarization(duration_s, found, speech, means.astype(np.float32), turn_x.astype(np.float32), past - first)


def set_apart(found: Diarization, keep: Sequence[bool]) -> tuple[Diarization, list[int | None]]:
    """``found`` with each speaker's turns that ``keep`` marks False given to a speaker of their
    own (one for each speaker that loses turns; a speaker left with none is gone), all numbered
    again in order of first speech, and for each speaker of the result the one of ``found`` it
    stands for (None: turns set apart). What /diarize's ``identify`` does with the turns of a
    named speaker that do not themselves match the profile: a voice the clustering joined to an
    enrolled one keeps its turns but not the name (the speakers' mean embeddings are made again
    from their turns' windows)."""
    if len(keep) != len(found.turns):
        raise ValueError(f"keep has {len(keep)} entries for {len(found.turns)} turns")
    # (speaker of found, kept) -> speaker of the result, in order of first speech
    new: dict[tuple[int, bool], int] = {}
    for t, k in zip(found.turns, keep, strict=True):
        new.setdefault((t.speaker, bool(k)), len(new))
    turns_ = [Turn(t.start, t.end, new[(t.speaker, bool(k))]) for t, k in zip(found.turns, keep, strict=True)]
    weights = found.turn_windows.astype(np.float64)[:, None]
    sums = np.zeros((len(new), found.turn_embeddings.shape[1]))
    counts = np.zeros(len(new))
    for i, t in enumerate(turns_):
        sums[t.speaker] += weights[i] * found.turn_embeddings[i]
        counts[t.speaker] += weights[i, 0]
    means = (sums / np.maximum(counts, 1)[:, None]).astype(np.float32)
    speech = [sum(t.duration for t in turns_ if t.speaker == k) for k in range(len(new))]
    origin: list[int | None] = [None] * len(new)
    for (speaker, kept), index in new.items():
        origin[index] = speaker if kept else None
    result = Diarization(found.duration_s, turns_, speech, means, found.turn_embeddings, found.turn_windows)
    return result, origin


def keep_names_on_matching_turns(
    found: Diarization,
    chosen: Sequence[K | None],
    scores_of: Callable[[K, np.ndarray], np.ndarray],
    threshold: float,
    most: int | None = None,
) -> tuple[Diarization, list[K | None]]:
    """A named speaker keeps its name (``chosen``: a profile per speaker, or None) only on the
    turns that match the profile themselves: ``scores_of(profile, rows)`` scores turn embeddings
    (:attr:`Diarization.turn_embeddings`) against it, on the scale of ``threshold`` (the
    verification threshold: would the turn alone pass a verification against the profile?). The
    other turns become a speaker of their own with no name (:func:`set_apart`), unless that makes
    more speakers than ``most`` (a caller's ``num_speakers`` or ``max_speakers``). So a voice the
    clustering joined to an enrolled one keeps its turns but not the enrolled name. Returns the
    diarization and a profile (or None) for each of its speakers."""
    keep = [True] * len(found.turns)
    for k, profile in enumerate(chosen):
        mine = [i for i, t in enumerate(found.turns) if t.speaker == k]
        if profile is None or not mine:
            continue
        scores = np.asarray(scores_of(profile, found.turn_embeddings[mine]), dtype=np.float64).reshape(-1)
        for i, score in zip(mine, scores.tolist(), strict=True):
            keep[i] = score >= threshold
    if all(keep):
        return found, list(chosen)
    result, origin = set_apart(found, keep)
    if most is not None and result.speakers > most:
        return found, list(chosen)
    return result, [None if o is None else chosen[o] for o in origin]


def name_speakers(candidates: Sequence[Sequence[tuple[K, float]]], threshold: float) -> list[K | None]:
    """Each speaker's name among ``candidates[speaker]`` (profile, score) pairs: the best-scoring
    pairs first, at ``threshold`` or above, each profile naming one speaker at most."""
    pairs = sorted(
        ((score, k, key) for k, options in enumerate(candidates) for key, score in options if score >= threshold),
        key=lambda p: -p[0],
    )
    names: list[K | None] = [None] * len(candidates)
    taken: set[K] = set()
    for _, k, key in pairs:
        if names[k] is None and key not in taken:
            names[k] = key
            taken.add(key)
    return names


def rttm(turns_: list[Turn], names: list[str], file_id: str = "audio") -> str:
    """NIST RTTM: one ``SPEAKER`` line per turn, onset and duration in seconds. RTTM's fields are
    separated by spaces, so a space in a speaker's name (an enrolled name) becomes ``_``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in file_id) or "audio"
    who = ["_".join(n.split()) or "_" for n in names]
    return "".join(
        f"SPEAKER {safe} 1 {t.start:.3f} {t.duration:.3f} <NA> <NA> {who[t.speaker]} <NA> <NA>\n" for t in turns_
    )
