"""The voice catalogue: the 9 labelled voices, hundreds of training voices and the open-set split.

Voices come from Debian's synthesisers: espeak-ng's voice variants spoken with its English
accents, flite's and festival's voices (festival's other-language voices reading English count as
voices of their own), and pseudo-speakers: a synthesised voice with a fixed per-speaker speed
warp (resampling, which moves pitch, formants and tempo together, as a shorter or longer vocal
tract does), which WeSpeaker and 3D-Speaker also count as new speakers. And espeak-ng voices of
this project's own: ``SYNTHETIC_VARIANTS`` variant files drawn at random (pitch, formant
frequencies, strengths and widths, voicing, flutter, roughness, breath, tone, echo), each a new
training speaker, because the ~50 variant families espeak-ng ships are too few to teach an
embedding what makes voices it never heard differ (see ``synthetic_variant``).

Roles: ``label`` (the 9 classes of the shipped head, unchanged), ``train`` (more voices for the
embedding), ``open-val`` and ``open-test`` (voices held out of training, for calibration and
selection, and for the open-set figures). Held-out espeak-ng voices are held out as whole variant
families (``robosoft`` .. ``robosoft8`` together), in every accent, so no test voice is a near
copy of a training voice; a drawn family with a member that is the same voice as a member of
another family (``SAME_VOICE_ESPEAK_VARIANTS``) is not held out at all.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import cache

# Reserved for an independent evaluation of this project's models: never train, validate,
# calibrate or select on these, in any accent. A corpus that held them would make that
# evaluation measure voices the model has heard. espeak-ng variants are matched on the variant
# file's name, case-insensitively (espeak-ng itself is case-sensitive and silently falls back to
# the base voice on a wrong case, so 'David' must be refused as well as 'david').
RESERVED_ESPEAK_VARIANTS = frozenset(
    v.lower() for v in ("m1", "f1", "m2", "f3", "m4", "f5", "Andy", "Annie", "klatt2", "david", "linda")
)
# Festival's Italian voices (festvox-italp16k, festvox-itapc16k): reserved for the same reason.
RESERVED_FESTIVAL_VOICES = frozenset({"lp_diphone", "pc_diphone"})
# Not reserved by name, but kept out all the same: AnxiousAndy is the reserved Andy with another
# pitch and a few formants changed (same formant 0 and 1), so training on it would leak Andy.
NEAR_RESERVED_ESPEAK_VARIANTS = frozenset({"anxiousandy"})
# Variants that add no voice of their own, measured with espeak-ng 1.51 on every accent: "Mr" and
# "fast" only set a speed (which the corpus sets itself), so they speak as the accent's base voice
# (and "en+Mr" is the label voice espeak-en-gb-m7); "caleb" and "klatt6" give the same samples as
# "klatt". Two labels for one voice would teach the embedding that one voice is two.
DUPLICATE_ESPEAK_VARIANTS = frozenset({"mr", "fast", "caleb", "klatt6"})
# Variant files of different families that are one voice: the same settings but for pitch, tone (an
# equaliser), echo, intonation and stress, read from Debian 12's espeak-ng 1.51 files
# (tests/test_training.py reads them again). "Henrique" is "Hugo" with another tone, and "Diogo",
# "michel" and "miguel" are the same voice at other pitches; "RicishayMax" and "robosoft8" are "max"
# with an echo; "robosoft6" is "m8". A held-out family with such a member would be a voice that is
# also trained on (or held out twice), so such families are not held out (``catalogue``).
SAME_VOICE_ESPEAK_VARIANTS = (
    frozenset({"Diogo", "Henrique", "Hugo", "michel", "miguel"}),
    frozenset({"max", "RicishayMax", "robosoft8"}),
    frozenset({"m8", "robosoft6"}),
)


class ReservedVoiceError(ValueError):
    """A voice kept for independent evaluation was asked for."""


@dataclass(frozen=True)
class Voice:
    label: str  # unique speaker name, also the corpus folder
    engine: str  # flite | festival | espeak
    name: str  # flite -voice, festival (voice_...) command, espeak-ng -v
    warp: float = 1.0  # pseudo-speaker speed warp (1.0: the voice as synthesised)
    role: str = "label"  # label | train | open-val | open-test

    def __post_init__(self) -> None:
        check_not_reserved(self.engine, self.name)

    @property
    def variant(self) -> str:
        """The espeak-ng variant after '+' in the name ('' for other engines or none)."""
        return espeak_variant(self.name) if self.engine == "espeak" else ""


def espeak_variant(name: str) -> str:
    """``en-us+m3`` -> ``m3``; ``''`` for a name without a variant."""
    return name.partition("+")[2]


def check_not_reserved(engine: str, name: str) -> None:
    """Refuse a reserved voice (any accent, any case): raises ReservedVoiceError."""
    if engine == "espeak":
        variant = espeak_variant(name).lower()
        if variant in RESERVED_ESPEAK_VARIANTS or variant in NEAR_RESERVED_ESPEAK_VARIANTS:
            raise ReservedVoiceError(f"espeak-ng variant {variant!r} is reserved for independent evaluation")
    elif engine == "festival":
        voice = name.strip("()").removeprefix("voice_").lower()
        if voice in RESERVED_FESTIVAL_VOICES or voice.startswith(("lp_", "pc_")):
            raise ReservedVoiceError(f"festival voice {voice!r} (Italian) is reserved for independent evaluation")


LABEL_VOICES = [
    Voice("flite-awb", "flite", "awb"),
    Voice("flite-rms", "flite", "rms"),
    Voice("flite-slt", "flite", "slt"),
    Voice("flite-kal16", "flite", "kal16"),
    Voice("festival-ked", "festival", "voice_ked_diphone"),
    Voice("espeak-en-us-m3", "espeak", "en-us+m3"),
    Voice("espeak-en-us-f2", "espeak", "en-us+f2"),
    Voice("espeak-en-gb-m7", "espeak", "en-gb+m7"),
    Voice("espeak-en-gb-scotland-f4", "espeak", "en-gb-scotland+f4"),
]

# espeak-ng's voice variant files (voices/!v/ of Debian 12's espeak-ng-data, 101 files), by file
# name as espeak-ng wants it; the reserved ones are listed too and filtered out below, so this
# list can be compared with `espeak-ng --voices=variant` as it is.
ESPEAK_VARIANT_FILES = [
    "adam", "Alex", "Alicia", "Andrea", "Andy", "Annie", "antonio", "aunty", "belinda", "benjamin", "boris",
    "caleb", "david", "Demonic", "Denis", "Diogo", "ed", "edward", "edward2", "Gene", "Gene2", "gustave",
    "announcer", "Henrique", "Hugo", "iven", "iven2", "iven3", "iven4", "Jacky", "john", "kaukovalta", "Lee",
    "linda", "marcelo", "Marco", "Mario", "max", "Michael", "michel", "miguel", "Mike", "Mr", "Nguyen",
    "pablo", "paul", "pedro", "quincy", "RicishayMax", "RicishayMax2", "RicishayMax3", "rob", "robert",
    "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6", "robosoft7", "robosoft8",
    "steph", "steph2", "steph3", "Storm", "Tweaky", "UniRobot", "zac", "anika", "anikaRobot", "AnxiousAndy",
    "fast", "f2", "f3", "f4", "f5", "whisperf", "grandpa", "klatt", "klatt2", "klatt3", "klatt4", "klatt5",
    "klatt6", "m2", "m3", "m4", "m5", "m6", "m7", "norbert", "sandro", "shelby", "travis", "victor",
    "whisper", "m8", "f1", "croak", "m1", "grandma",
]  # fmt: skip
# British English is asked for as "en" (espeak-ng's gmw/en, the same voice as plain "en-gb"):
# espeak-ng 1.51 ignores the variant after "en-gb" ("en-gb+rob" and "en-gb+gustave" give the
# same samples as plain "en-gb"), which made dozens of "different" voices one voice, the same as
# the label voice espeak-en-gb-m7. tests/test_training.py checks every catalogue voice sounds
# different from every other.
ESPEAK_ACCENTS = (
    "en-us",
    "en",
    "en-gb-scotland",
    "en-gb-x-rp",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-029",
    "en-us-nyc",
)
# Festival's other-language voices in Debian main, reading English (Italian ones are reserved;
# the Hindi, Marathi and Telugu packages fail in Debian 12: their phone set files are missing).
# kal_diphone and the HTS slt voice are left out: they are the speakers of flite's kal16 and slt,
# two of the 9 labels, and a second label for the same person would teach the embedding that one
# voice is two.
FESTIVAL_VOICES = (
    "voice_msu_ru_nsh_clunits",
    "voice_suo_fi_lj_diphone",
    "voice_hy_fi_mv_diphone",
    "voice_czech_dita",
    "voice_czech_machac",
    "voice_czech_krb",
    "voice_czech_ph",
    "voice_upc_ca_ona_hts",
)
WARPS = (0.88, 0.94, 1.06, 1.12)  # pseudo-speakers: fixed speed warps of a base voice
WARPED = re.compile(r"-w\d{3}$")  # the end of a warped pseudo-speaker's label (warp_suffix)
# Families drawn for each open-set role; those that share a voice with another family are then left
# out (``catalogue``), which leaves 11 validation and 12 test voices
OPEN_VAL_FAMILIES = 12
OPEN_TEST_FAMILIES = 16
ACCENTS_PER_TRAIN_VARIANT = 6
ESPEAK_WARPED_VARIANTS = 24  # training espeak variants that also get warped pseudo-speakers (en-us)
SYNTHETIC_VARIANTS = 300  # espeak-ng variant files of our own, training voices only
SYNTHETIC_PREFIX = "vesyn"  # their file names: vesyn000 .. vesyn299 (no espeak-ng variant starts so)


def synthetic_variant(k: int) -> str:
    """The text of synthetic variant file ``k`` (espeak-ng's variant format, docs/voices.md): a
    fixed random draw, so the corpus is reproducible. A vocal tract length (one scale for formants
    0-5, with a small jitter each) and a pitch matching a male or female voice, then voice quality
    at random. Never ``klatt 2``: with default formants that is the reserved variant klatt2
    (tests/test_training.py also checks no draw lands near any reserved variant file)."""
    rng = random.Random(f"synthetic-variant:{k}")
    female = rng.random() < 0.5
    base = rng.uniform(140, 230) if female else rng.uniform(60, 135)
    tract = rng.uniform(1.0, 1.22) if female else rng.uniform(0.84, 1.04)
    lines = [
        "language variant",
        f"name {SYNTHETIC_PREFIX}{k:03d}",
        f"gender {'female' if female else 'male'}",
        f"pitch {base:.0f} {base * rng.uniform(0.6, 1.7):.0f}",
    ]
    for n in range(9):
        if n <= 5:
            freq = 100 * tract * rng.uniform(0.92, 1.08)
            lines.append(f"formant {n} {freq:.0f} {rng.uniform(50, 110):.0f} {rng.uniform(70, 170):.0f}")
        else:
            lines.append(f"formant {n} 100 {rng.uniform(30, 110):.0f} 100")
    lines += [
        f"voicing {rng.uniform(50, 150):.0f}",
        f"consonants {rng.uniform(60, 120):.0f} {rng.uniform(60, 120):.0f}",
    ]
    if rng.random() < 0.5:
        lines.append(f"flutter {rng.uniform(0, 20):.0f}")
    if rng.random() < 0.4:
        lines.append(f"roughness {rng.randint(0, 6)}")
    if rng.random() < 0.2:
        lines.append("breath " + " ".join(str(rng.randint(0, 4)) for _ in range(8)))
    if rng.random() < 0.4:
        freqs = sorted(rng.sample(range(200, 3600, 100), 4))
        lines.append("tone " + " ".join(f"{f} {rng.randint(20, 200)}" for f in freqs))
    if rng.random() < 0.15:
        lines.append(f"echo {rng.randint(10, 40)} {rng.randint(5, 20)}")
    if rng.random() < 0.15:
        lines.append(f"klatt {rng.choice((1, 3, 4))}")
    return "\n".join(lines) + "\n"


@cache
def synthetic_variants() -> dict[str, str]:
    """File name -> text of every synthetic variant (do not change the returned dict)."""
    return {f"{SYNTHETIC_PREFIX}{k:03d}": synthetic_variant(k) for k in range(SYNTHETIC_VARIANTS)}


def usable_variants() -> list[str]:
    """Variant files that are neither reserved, near copies of a reserved one, nor duplicates."""
    out = []
    for v in ESPEAK_VARIANT_FILES:
        low = v.lower()
        if low not in RESERVED_ESPEAK_VARIANTS | NEAR_RESERVED_ESPEAK_VARIANTS | DUPLICATE_ESPEAK_VARIANTS:
            out.append(v)
    return out


def family(variant: str, variants: list[str]) -> str:
    """``robosoft7`` -> ``robosoft`` when ``robosoft`` is a variant too; else the variant itself.
    (``m3`` stays ``m3``: there is no plain ``m``.) ``anikaRobot`` goes with ``anika``."""
    base = re.sub(r"\d+$", "", variant)
    if base != variant and base in variants:
        return base.lower()
    if variant == "anikaRobot":
        return "anika"
    if variant == "whisperf":
        return "whisper"
    return variant.lower()


def families_sharing_a_voice(variants: list[str]) -> set[str]:
    """The families (``family``) that have a member that is one voice with a member of another
    family (``SAME_VOICE_ESPEAK_VARIANTS``)."""
    shared: set[str] = set()
    for group in SAME_VOICE_ESPEAK_VARIANTS:
        families = {family(v, variants) for v in group if v in variants}
        if len(families) > 1:
            shared |= families
    return shared


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")


def warp_suffix(warp: float) -> str:
    """``-w088`` for a warp of 0.88 (matched by ``WARPED``); ``""`` for the voice as synthesised."""
    return f"-w{round(warp * 100):03d}" if warp != 1.0 else ""


def _espeak(accent: str, variant: str, role: str, warp: float = 1.0) -> Voice:
    label = f"espeak-{accent}-{_slug(variant)}{warp_suffix(warp)}"
    return Voice(label, "espeak", f"{accent}+{variant}", warp, role)


def catalogue() -> list[Voice]:
    """Every voice of the standard corpus, labels first (in label order), then the others.

    Deterministic: the open-set families and accents are drawn from a fixed seed."""
    variants = usable_variants()
    label_variants = {v.variant for v in LABEL_VOICES if v.engine == "espeak"}
    families: dict[str, list[str]] = {}
    for v in variants:
        families.setdefault(family(v, variants), []).append(v)
    eligible = sorted(f for f, members in families.items() if not set(members) & label_variants)
    random.Random("open-set-families").shuffle(eligible)
    held = eligible[: OPEN_VAL_FAMILIES + OPEN_TEST_FAMILIES]
    # A drawn family that shares a voice with another family is neither held out nor trained on:
    # the draw and every other voice's role stay as they were when the shipped weights were trained
    # (drawing again without those families would move voices between training and the open set).
    shared = families_sharing_a_voice(variants)
    voices = list(LABEL_VOICES)
    for k, fam in enumerate(held):
        if fam in shared:
            continue
        role = "open-val" if k < OPEN_VAL_FAMILIES else "open-test"
        voices.append(_espeak(ESPEAK_ACCENTS[k % len(ESPEAK_ACCENTS)], families[fam][0], role))
    taken = {v.name for v in LABEL_VOICES}
    train_variants = [v for v in variants if family(v, variants) not in held]
    for j, variant in enumerate(train_variants):
        for a in range(ACCENTS_PER_TRAIN_VARIANT):  # a different run of accents for each variant
            accent = ESPEAK_ACCENTS[(j + a) % len(ESPEAK_ACCENTS)]
            if f"{accent}+{variant}" not in taken:
                voices.append(_espeak(accent, variant, "train"))
    rng = random.Random("warped-variants")
    for variant in sorted(rng.sample(train_variants, ESPEAK_WARPED_VARIANTS)):
        voices += [_espeak("en-us", variant, "train", w) for w in (WARPS[0], WARPS[-1])]
    festival = [
        Voice(f"festival-{_slug(n.removeprefix('voice_'))}", "festival", n, 1.0, "train") for n in FESTIVAL_VOICES
    ]
    voices += festival
    rng = random.Random("synthetic-accents")  # each synthetic variant speaks one accent
    for variant in synthetic_variants():
        voices.append(_espeak(rng.choice(ESPEAK_ACCENTS), variant, "train"))
    for base in [*LABEL_VOICES[:5], *festival]:  # flite and festival voices are few: warp all of them
        for w in WARPS:
            voices.append(Voice(f"{base.label}{warp_suffix(w)}", base.engine, base.name, w, "train"))
    labels = [v.label for v in voices]
    assert len(set(labels)) == len(labels), "voice labels must be unique"
    return voices
