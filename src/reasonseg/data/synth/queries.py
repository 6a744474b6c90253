"""Query kinds and paraphrase families of the synthetic world.

A *query kind* is what a question asks about (a kind, a category, a colour, a position, a size, a
relation, occlusion, a property from the knowledge table, or something absent). A *paraphrase family*
is a set of wordings of one kind; the templates of one family share a style, so holding a whole family
out of training tests wording the model has never seen. Families marked ``held_out`` are used only by
the test split (see :data:`TEST_FAMILIES`).

Every generator checks that the query picks out exactly its targets in the scene (with margins for
position, size and relations), and returns None when it can't make an unambiguous one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from reasonseg.data.synth.knowledge import CATEGORIES, KINDS, PROPERTIES, Kind, kinds_in, kinds_with
from reasonseg.data.synth.scene import Instance, Scene

QUERY_KINDS: tuple[str, ...] = (
    "semantic",
    "category",
    "attribute",
    "position",
    "size",
    "relation",
    "occlusion",
    "reasoning",
)
SAMPLE_KIND_OF: dict[str, str] = {
    "semantic": "semantic",
    "category": "semantic",
    "attribute": "referring",
    "position": "referring",
    "size": "referring",
    "relation": "referring",
    "occlusion": "referring",
    "reasoning": "reasoning",
}


@dataclass(frozen=True)
class Family:
    """A paraphrase family: templates with named slots; ``sentence`` = written as a full sentence."""

    id: str
    query_kind: str
    templates: tuple[str, ...]
    sentence: bool
    held_out: bool = False


def _f(fid: str, qk: str, sentence: bool, *templates: str, held_out: bool = False) -> Family:
    return Family(fid, qk, tuple(templates), sentence, held_out)


FAMILIES: dict[str, Family] = {
    f.id: f
    for f in (
        # semantic: {name}
        _f("sem.bare", "semantic", False, "{name}"),
        _f("sem.the", "semantic", False, "the {name}", "the {name} in the picture"),
        _f(
            "sem.find",
            "semantic",
            True,
            "Find the {name}.",
            "Where is the {name}?",
            "Where is the {name} in this image?",
        ),
        _f(
            "sem.show",
            "semantic",
            True,
            "Show me the {name}.",
            "Point out the {name} in this picture.",
            held_out=True,
        ),
        # category: {cat_pl} {a_cat}
        _f("cat.all", "category", False, "all the {cat_pl}", "every {cat}"),
        _f(
            "cat.find",
            "category",
            True,
            "Find all the {cat_pl} in this image.",
            "Which objects here are {cat_pl}?",
        ),
        _f(
            "cat.mark",
            "category",
            True,
            "Mark each {cat} you can see.",
            "Highlight whatever counts as {a_cat}.",
            held_out=True,
        ),
        # attribute: {colour} {thing}
        _f("att.the", "attribute", False, "the {colour} {thing}", "the {colour}-coloured {thing}"),
        _f("att.find", "attribute", True, "Find the {colour} {thing}.", "Which {thing} is {colour}?"),
        _f(
            "att.look",
            "attribute",
            True,
            "Look for the {colour} {thing}.",
            "Segment the {thing} whose colour is {colour}.",
            held_out=True,
        ),
        # position: {thing} {where} {edge}
        _f("pos.the", "position", False, "the {thing} {where}", "the {extreme} {thing}"),
        _f(
            "pos.find",
            "position",
            True,
            "Find the {thing} {where}.",
            "Which {thing} is closest to the {edge} edge?",
        ),
        _f(
            "pos.near",
            "position",
            True,
            "Segment the {thing} nearest the {edge} edge of the image.",
            held_out=True,
        ),
        # size: {thing} {big}
        _f("size.the", "size", False, "the {big} {thing}", "the {bigger2} {thing}"),
        _f("size.find", "size", True, "Find the {big} {thing}.", "Which {thing} looks {big}?"),
        _f(
            "size.compare",
            "size",
            True,
            "Segment the {thing} that is {bigger} than all the others.",
            held_out=True,
        ),
        # relation: {thing} {rel} {anchor}
        _f("rel.the", "relation", False, "the {thing} {rel} the {anchor}"),
        _f(
            "rel.find",
            "relation",
            True,
            "Find the {thing} {rel} the {anchor}.",
            "Which {thing} is {rel} the {anchor}?",
        ),
        _f("rel.next", "relation", True, "Segment whatever is {rel} the {anchor}.", held_out=True),
        # occlusion: {thing} {occ} {anchor}
        _f("occ.the", "occlusion", False, "the {thing} {occ} the {anchor}"),
        _f(
            "occ.find",
            "occlusion",
            True,
            "Find the {thing} {occ} the {anchor}.",
            "Which {thing} is {occ} the {anchor}?",
        ),
        _f("occ.seg", "occlusion", True, "Segment the {thing} that is {occ} the {anchor}.", held_out=True),
        # reasoning (knowledge): {clause}
        _f("rsn.what", "reasoning", True, "What in this image {clause}?", "Which object here {clause}?"),
        _f(
            "rsn.need",
            "reasoning",
            True,
            "I need something that {clause}. What in this picture would work?",
            "Find the thing that {clause}.",
        ),
        _f(
            "rsn.any",
            "reasoning",
            True,
            "Is there anything here that {clause}? Show it.",
            "Show me what {clause}.",
        ),
        _f(
            "rsn.seek",
            "reasoning",
            True,
            "Segment whatever {clause}.",
            "Please point out anything in the picture that {clause}.",
            held_out=True,
        ),
    )
}
TEST_FAMILIES: frozenset[str] = frozenset(f.id for f in FAMILIES.values() if f.held_out)


def families_for(query_kind: str, split: str, rng: np.random.Generator, held_out_rate: float) -> Family:
    """A family of ``query_kind`` for ``split``: train/val never get a held-out family; the test split gets
    one with probability ``held_out_rate`` (and a seen family otherwise, so seen vs unseen wording can be
    compared on the same held-out backgrounds)."""
    fams = [f for f in FAMILIES.values() if f.query_kind == query_kind]
    seen = [f for f in fams if not f.held_out]
    unseen = [f for f in fams if f.held_out]
    pool = unseen if split == "test" and unseen and rng.random() < held_out_rate else seen
    return pool[int(rng.integers(len(pool)))]


@dataclass
class Query:
    """A generated query.

    ``texts``: every wording from the family (the first is the one written first); ``targets``: instance
    indices, left to right (empty = no target); ``explanation``: a reason sentence for reasoning queries.
    """

    query_kind: str
    family: str
    texts: list[str]
    sentence: bool
    targets: list[int]
    explanation: str | None = None
    subject: str = ""  # short name of what is asked for (used in named multi-target answers)

    @property
    def sample_kind(self) -> str:
        return SAMPLE_KIND_OF[self.query_kind]


def an(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def left_to_right(scene: Scene, idx: list[int]) -> list[int]:
    """Instance indices ordered by centroid x (then y): the order of the [SEG] slots."""
    return sorted(idx, key=lambda i: (scene.instances[i].centroid[0], scene.instances[i].centroid[1]))


def _fill(fam: Family, rng: np.random.Generator, **slots: str) -> list[str]:
    texts = [t.format(**slots) for t in fam.templates]
    first = int(rng.integers(len(texts)))
    return [texts[first]] + [t for i, t in enumerate(texts) if i != first]


def _thing(scene: Scene, i: int, pool: list[int]) -> tuple[str, list[int]]:
    """Head noun for instance ``i``: its category when that narrows the pool usefully, else 'object'."""
    cat = scene.instances[i].kind.category
    same = [j for j in pool if scene.instances[j].kind.category == cat]
    if 1 < len(same) < len(pool):
        return CATEGORIES[cat].singular, same
    return "object", pool


def _subject(kinds: list[Kind]) -> tuple[str, bool]:
    """'the orange' / 'the orange and the lemon' / 'each pig', and whether the verb is plural."""
    names = sorted({k.name for k in kinds})
    if len(names) == 1:
        k = kinds[0]
        if len(kinds) > 1 and not k.plural:
            return f"each {k.name}", False
        return f"the {k.name}", k.plural
    parts = [f"the {n}" for n in names]
    return ", ".join(parts[:-1]) + " and " + parts[-1], True


def explain(prop_id: str, kinds: list[Kind]) -> str:
    subject, plural = _subject(kinds)
    return PROPERTIES[prop_id].explain(subject, plural)


# -- generators: (scene, family, rng) -> Query | None ---------------------------------------------------


def _kinds_of(universe: frozenset[str] | None) -> Collection[str]:
    """The world's kind names (``universe``; None: every kind). Every category and property of the
    knowledge table has kinds (``test_knowledge_table_is_complete_and_consistent``), so the categories
    and properties derived from all kinds are exactly ``CATEGORIES`` and ``PROPERTIES``."""
    return KINDS if universe is None else universe


def semantic(
    scene: Scene,
    fam: Family,
    rng: np.random.Generator,
    absent: bool = False,
    universe: frozenset[str] | None = None,
) -> Query | None:
    """A query naming a kind; with ``absent``, a kind of ``universe`` (the world's kinds; None: all)
    that is not in the scene."""
    present = sorted(scene.kinds())
    if absent:
        pool = sorted(set(_kinds_of(universe)) - scene.kinds())
        if not pool:
            return None
        name = pool[int(rng.integers(len(pool)))]
        targets: list[int] = []
    else:
        name = present[int(rng.integers(len(present)))]
        targets = [i for i, inst in enumerate(scene.instances) if inst.kind.name == name]
    return Query(
        "semantic",
        fam.id,
        _fill(fam, rng, name=name),
        fam.sentence,
        left_to_right(scene, targets),
        subject=name,
    )


def category(
    scene: Scene,
    fam: Family,
    rng: np.random.Generator,
    absent: bool = False,
    universe: frozenset[str] | None = None,
) -> Query | None:
    """A query naming a category; with ``absent``, one of ``universe``'s categories (None: all) that no
    object in the scene belongs to."""
    present = sorted({inst.kind.category for inst in scene.instances})
    known = {KINDS[k].category for k in _kinds_of(universe)}
    cats = sorted(known - set(present)) if absent else present
    if not cats:
        return None
    cat = cats[int(rng.integers(len(cats)))]
    targets = [i for i, inst in enumerate(scene.instances) if inst.kind.name in kinds_in(cat)]
    c = CATEGORIES[cat]
    texts = _fill(fam, rng, cat=c.singular, cat_pl=c.plural, a_cat=an(c.singular))
    return Query("category", fam.id, texts, fam.sentence, left_to_right(scene, targets), subject=c.plural)


def attribute(scene: Scene, fam: Family, rng: np.random.Generator) -> Query | None:
    insts = scene.instances
    order = rng.permutation(len(insts))
    for i in map(int, order):
        colour = insts[i].kind.colour
        if colour is None:
            continue
        thing, pool = _thing(scene, i, list(range(len(insts))))
        # Unique: no other object in the pool has the same colour, and none is colourless-ambiguous.
        same = [j for j in pool if insts[j].kind.colour == colour]
        if same != [i]:
            continue
        texts = _fill(fam, rng, colour=colour, thing=thing)
        return Query("attribute", fam.id, texts, fam.sentence, [i], subject=f"{colour} {thing}")
    return None


_SIDES = {
    # side: (axis, sign, where, extreme, edge)
    "left": (0, -1, "on the left", "leftmost", "left"),
    "right": (0, 1, "on the right", "rightmost", "right"),
    "top": (1, -1, "at the top", "topmost", "top"),
    "bottom": (1, 1, "at the bottom", "lowest", "bottom"),
}


def position(scene: Scene, fam: Family, rng: np.random.Generator) -> Query | None:
    H, W = scene.hw
    insts = scene.instances
    sides = list(_SIDES)
    for side in [sides[int(k)] for k in rng.permutation(len(sides))]:
        axis, sign, where, extreme, edge = _SIDES[side]
        margin = 0.12 * (W if axis == 0 else H)
        # Within one kind when it repeats ("the pig on the left"), else among all objects.
        groups: list[tuple[str, list[int]]] = []
        for name in sorted(scene.kinds()):
            idx = [i for i, inst in enumerate(insts) if inst.kind.name == name]
            if len(idx) > 1:
                groups.append((name, idx))
        groups.append(("", list(range(len(insts)))))
        for name, idx in groups:
            if len(idx) < 2:
                continue
            vals = sorted(idx, key=lambda i: sign * insts[i].centroid[axis], reverse=True)
            best, second = vals[0], vals[1]
            if abs(insts[best].centroid[axis] - insts[second].centroid[axis]) < margin:
                continue
            thing = name or "object"  # "the pig on the left" among pigs, else "the leftmost object"
            texts = _fill(fam, rng, thing=thing, where=where, extreme=extreme, edge=edge)
            return Query("position", fam.id, texts, fam.sentence, [best], subject=thing)
    return None


def size(scene: Scene, fam: Family, rng: np.random.Generator) -> Query | None:
    insts = scene.instances
    if len(insts) < 2:
        return None
    first_big = bool(rng.random() < 0.5)
    for big in (first_big, not first_big):
        order = sorted(range(len(insts)), key=lambda i: insts[i].area, reverse=big)
        a, b = insts[order[0]].area, insts[order[1]].area
        if (a / max(b, 1) if big else b / max(a, 1)) < 1.8:
            continue
        words = (
            ("biggest", "largest", "bigger", "big") if big else ("smallest", "tiniest", "smaller", "small")
        )
        texts = _fill(fam, rng, thing="object", big=words[0], bigger2=words[1], bigger=words[2])
        return Query("size", fam.id, texts, fam.sentence, [order[0]], subject=f"{words[0]} object")
    return None


_RELATIONS = {
    # rel: (axis, sign): target lies on the `sign` side of the anchor along `axis`
    "to the left of": (0, -1),
    "to the right of": (0, 1),
    "above": (1, -1),
    "below": (1, 1),
}


def _rel_score(a: Instance, b: Instance, axis: int, sign: int) -> tuple[float, float]:
    """(signed offset along axis, offset across) of a relative to b."""
    ca, cb = a.centroid, b.centroid
    return sign * (ca[axis] - cb[axis]), abs(ca[1 - axis] - cb[1 - axis])


def relation(scene: Scene, fam: Family, rng: np.random.Generator) -> Query | None:
    H, W = scene.hw
    insts = scene.instances
    unique = [i for i, inst in enumerate(insts) if sum(x.kind.name == inst.kind.name for x in insts) == 1]
    rels = list(_RELATIONS)
    for b in [unique[int(k)] for k in rng.permutation(len(unique))]:
        for rel in [rels[int(k)] for k in rng.permutation(len(rels))]:
            axis, sign = _RELATIONS[rel]
            m = 0.1 * (W if axis == 0 else H)
            strict, loose = [], []
            for a in range(len(insts)):
                if a == b:
                    continue
                along, across = _rel_score(insts[a], insts[b], axis, sign)
                if along > m and along > across:
                    strict.append(a)
                if along > m / 2 and along > 0.7 * across:
                    loose.append(a)
            if len(strict) == 1 and loose == strict:
                texts = _fill(fam, rng, thing="object", rel=rel, anchor=insts[b].kind.name)
                return Query(
                    "relation",
                    fam.id,
                    texts,
                    fam.sentence,
                    strict,
                    subject=f"object {rel} the {insts[b].kind.name}",
                )
    return None


def occlusion(scene: Scene, fam: Family, rng: np.random.Generator) -> Query | None:
    insts = scene.instances
    pairs = []
    for a, inst in enumerate(insts):
        hidden = inst.full_area - inst.area
        if hidden >= 0.08 * inst.full_area and len(inst.hidden_by) == 1:
            b = next(iter(inst.hidden_by))
            pairs.append((a, b))
    if not pairs:
        return None
    a, b = pairs[int(rng.integers(len(pairs)))]
    # "behind B": a must be the only object B hides; "in front of A": b the only object hiding a.
    if rng.random() < 0.5:
        hidden_by_b = [i for i, x in enumerate(insts) if b in x.hidden_by]
        anchor_name = insts[b].kind.name
        if hidden_by_b != [a] or sum(x.kind.name == anchor_name for x in insts) != 1:
            return None
        target, occ, anchor = a, "partly hidden behind", anchor_name
    else:
        anchor_name = insts[a].kind.name
        if sum(x.kind.name == anchor_name for x in insts) != 1:
            return None
        target, occ, anchor = b, "in front of", anchor_name
    texts = _fill(fam, rng, thing="object", occ=occ, anchor=anchor)
    return Query("occlusion", fam.id, texts, fam.sentence, [target], subject=f"object {occ} the {anchor}")


def reasoning(
    scene: Scene,
    fam: Family,
    rng: np.random.Generator,
    absent: bool = False,
    universe: frozenset[str] | None = None,
) -> Query | None:
    """A knowledge query (a use or a fact); with ``absent``, a property some kind of ``universe`` (None:
    any property) has and no object in the scene has."""
    present_props = sorted({p for inst in scene.instances for p in inst.kind.properties})
    known = {p for k in _kinds_of(universe) for p in KINDS[k].properties}
    props = sorted(known - set(present_props)) if absent else present_props
    if not props:
        return None
    pid = props[int(rng.integers(len(props)))]
    prop = PROPERTIES[pid]
    targets = [i for i, inst in enumerate(scene.instances) if inst.kind.name in kinds_with(pid)]
    targets = left_to_right(scene, targets)
    texts = _fill(fam, rng, clause=prop.clause)
    why = explain(pid, [scene.instances[i].kind for i in targets]) if targets else None
    return Query(
        "reasoning",
        fam.id,
        texts,
        fam.sentence,
        targets,
        explanation=why,
        subject=f"something that {prop.clause}",
    )


GENERATORS: dict[str, Callable[..., Query | None]] = {
    "semantic": semantic,
    "category": category,
    "attribute": attribute,
    "position": position,
    "size": size,
    "relation": relation,
    "occlusion": occlusion,
    "reasoning": reasoning,
}
ABSENT_CAPABLE: tuple[str, ...] = ("semantic", "category", "reasoning")
