"""Union-find over axis nodes, with product / concatenation structures and frozen flags."""
from __future__ import annotations

from collections import defaultdict


class _Graph:
    """Union-find over axis nodes, with product/concatenation structures and frozen flags."""

    def __init__(self):
        self.parent: dict = {}
        self.size: dict = {}
        self.frozen: dict = {}     # root -> reason
        self.structs: dict = {}    # root -> [(kind, parts)]
        self.nvirtual = 0

    def add(self, n, size):
        if n not in self.parent:
            self.parent[n] = n
            self.size[n] = size

    def find(self, n):
        p = self.parent
        while p[n] != n:
            p[n] = p[p[n]]
            n = p[n]
        return n

    def is_frozen(self, n):
        return self.find(n) in self.frozen

    def freeze(self, n, why):
        r = self.find(n)
        if r not in self.frozen:
            self.frozen[r] = why
            return True
        return False

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        if self.size[ra] != self.size[rb]:
            self.freeze(ra, "linked to an axis of another size")
            self.freeze(rb, "linked to an axis of another size")
            return False
        self.parent[rb] = ra
        if rb in self.frozen:
            self.frozen.setdefault(ra, self.frozen.pop(rb))
        if rb in self.structs:
            self.structs.setdefault(ra, []).extend(self.structs.pop(rb))
        return True

    def struct(self, kind, whole, parts):
        self.structs.setdefault(self.find(whole), []).append((kind, tuple(parts)))

    def resolve(self):
        """Merge classes until structures are consistent; propagate frozen flags."""
        changed = True
        while changed:
            changed = False
            new = defaultdict(list)
            for r, lst in self.structs.items():
                for kind, parts in lst:
                    s = (kind, tuple(self.find(p) for p in parts))
                    if s not in new[self.find(r)]:
                        new[self.find(r)].append(s)
            self.structs = dict(new)
            for r, lst in list(self.structs.items()):
                if changed:
                    break
                k0, p0 = lst[0]
                if r in p0:
                    changed |= self.freeze(r, "axis is a part of itself")
                for k1, p1 in lst[1:]:
                    if changed:
                        break
                    if k0 == k1 and len(p0) == len(p1) and all(self.size[a] == self.size[b] for a, b in zip(p0, p1)):
                        for a, b in zip(p0, p1):
                            changed |= self.union(a, b)
                    else:
                        changed |= self.freeze(r, "axis is split in two incompatible ways")
            if changed:
                continue
            seen = {}
            for r, lst in list(self.structs.items()):
                key = lst[0]
                if key in seen and self.find(seen[key]) != self.find(r):
                    changed |= self.union(seen[key], r)
                    break
                seen.setdefault(key, r)
            if changed:
                continue
            for r, lst in self.structs.items():
                parts = lst[0][1]
                if r in self.frozen:
                    for p in parts:
                        changed |= self.freeze(p, self.frozen[r])
                elif all(self.find(p) in self.frozen for p in parts):
                    changed |= self.freeze(r, self.frozen[self.find(parts[0])])
