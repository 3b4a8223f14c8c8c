"""Facts about a list of class names that the recipe's schema, the metrics and the pictures all
use: the hierarchy's levels, the background class, the default palette. Plain Python (no numpy,
no matplotlib), so the recipe can check a tree and fill a palette without importing either.
"""

from __future__ import annotations

BACKGROUND_NAMES = ("background", "_background_", "bg")
# matplotlib's "tab20" colormap as 8-bit RGB (matplotlib/_cm.py `_tab20_data`, each value × 255
# truncated, as `int(255 * v)` of colormaps["tab20"](i) gives): the palette of classes without one
TAB20 = ((31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44), (152, 223, 138),
         (214, 39, 40), (255, 152, 150), (148, 103, 189), (197, 176, 213), (140, 86, 75), (196, 156, 148),
         (227, 119, 194), (247, 182, 210), (127, 127, 127), (199, 199, 199), (188, 189, 34), (219, 219, 141),
         (23, 190, 207), (158, 218, 229))


def default_palette(count: int) -> list[tuple[int, int, int]]:
    """`count` RGB colours (0..255 each) for classes that have no palette: TAB20, repeated after 20."""
    return [TAB20[i % len(TAB20)] for i in range(count)]


def background_index(names: list[str], explicit: str | int | None = None) -> int | None:
    """The class pictures leave unpainted: `explicit` (a name or index: recipe classes.background),
    else a class named "background" (or "bg", "_background_"; any case), else None (all painted)."""
    if isinstance(explicit, int):
        return explicit
    if isinstance(explicit, str):
        return names.index(explicit)
    for i, name in enumerate(names):
        if name.lower() in BACKGROUND_NAMES:
            return i
    return None


def hierarchy_levels(names: list[str], tree: dict[str, list[str]]) -> list[list[str]]:
    """For each depth d≥1 (root's children first), the group name of every leaf class.

    A leaf shallower than d keeps its own name. ``background → body → upper/lower → parts``
    gives levels [[background, body, …], [background, upper_body, lower_body, …], [leaves]].
    """
    parent: dict[str, str] = {}
    for p, children in tree.items():
        for c in children:
            if c in parent:
                raise ValueError(f"classes.hierarchy: {c!r} has two parents")
            parent[c] = p
    for leaf in names:
        if leaf in tree:
            raise ValueError(f"classes.hierarchy: class {leaf!r} is a leaf and cannot have children")
    known = set(names) | set(tree)
    for c in parent:
        if c not in known:
            raise ValueError(f"classes.hierarchy: {c!r} is neither a class name nor a group")

    def ancestry(leaf: str) -> list[str]:
        chain = [leaf]
        while chain[-1] in parent:
            chain.append(parent[chain[-1]])
            if len(chain) > len(known) + 1:
                raise ValueError("classes.hierarchy has a cycle")
        return chain[::-1]  # root-most first

    chains = [ancestry(n) for n in names]
    depth = max(len(c) for c in chains)
    return [[c[min(d, len(c) - 1)] for c in chains] for d in range(depth)]
