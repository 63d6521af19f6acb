"""Episodes from several task sources at once, one domain per episode (Meta-Dataset's sampling).

Triantafillou et al. 2020 ("Meta-Dataset: A Dataset of Datasets for Learning to Learn from Few Examples", ICLR)
draw each training episode from one dataset at a time, chosen at random, so meta-training spans several domains
and evaluation can hold whole datasets out. Here the domains are registered image sources named by
``data.domains`` (e.g. ``[omniglot, glyphs]``), all read with the one ``data`` section (each uses the keys it
reads: ``data.val_alphabets`` for omniglot, ``data.val_scripts`` for glyphs, ...); episodes are N-way K-shot over
one domain's classes (the fixed ``data.ways``/``shots``/``queries``, not Meta-Dataset's variable ways and shots).

Choosing the domain: task ``(seed, split, step, index)`` draws one uniform from :func:`task_rng` of those
coordinates and picks the domain whose slice of ``data.domain_weights`` (normalised over the split's domains;
empty: uniform) holds it; the episode is then the chosen domain's own task ``(split', step, index)`` with a seed
derived from ``(seed, domain name)`` (:func:`domain_seed`), so the domain draw and the episode's classes are
independent streams and an episode is a pure function of its coordinates: the same whole, in chunks, in any
order and on any number of workers.

Splits: train and val sample the domains not in ``data.test_domains``, each from its own train / val split.
With ``data.test_domains`` empty, test samples every domain's test split; otherwise only the held-out domains,
each with all its classes (its ``all`` split: Meta-Dataset's Traffic Signs and MSCOCO). ``all`` samples every
domain's ``all`` split. A domain with no classes in a split is left out of that split (the others' weights
renormalised); :func:`load_source` names which domains each split samples. Every domain must give the same
image shape (same ``data.image_size`` and channels), checked when the sources load, before anything runs.

As an image source for pretraining and the data checks, the source is the union of its domains' classes per
split (classes named ``domain:class``), so ``mtl-ray pretrain`` trains one classifier over every training domain.
Omniglot's rotated classes are not in the union: a :class:`ClassPool` has one rotation count, and listing rotations
as classes of their own would let pretraining's held-out examples of a character reappear, rotated, in training
(:func:`mtl_ray.data.supervised.supervised_split` holds a character's examples out in every rotation).

:meth:`MultiDomainTaskSource.episode_domains` says which domain each episode came from: ``mtl-ray eval`` reports
accuracy per domain with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from types import ModuleType

import numpy as np

from mtl_ray.config import Config, DataConfig
from mtl_ray.data.base import ClassPool, LoadedSource, PoolTaskSource, SourceSpec, TaskBatch, TaskKind, task_rng
from mtl_ray.data.fetch import DataError

NAME = "multidomain"
DATA_SPLITS = ("train", "val", "test")


def domain_seed(seed: int, domain: str) -> int:
    """The seed of ``domain``'s episodes inside a multi-domain source: a stable hash of ``(seed, domain)`` in
    ``[0, 2**63)``, so the episodes of a domain do not share a stream with the draw that chose it."""
    return int.from_bytes(hashlib.sha256(f"{NAME}:{seed}:{domain}".encode()).digest()[:8], "big") >> 1


def domain_config(cfg: Config, domain: str) -> Config:
    """``cfg`` with ``data.source = domain`` (the rest of ``data`` as it is)."""
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, source=domain))


def weights_of(data: DataConfig) -> dict[str, float]:
    """``{domain: weight}``: ``data.domain_weights`` in the order of ``data.domains``, or 1 each."""
    ws = data.domain_weights or (1.0,) * len(data.domains)
    return dict(zip(data.domains, ws, strict=False))


def plan(data: DataConfig) -> dict[str, list[tuple[str, str]]]:
    """``{split: [(domain, the domain's own split)]}`` before empty splits are dropped (module docstring)."""
    held = set(data.test_domains)
    kept = [d for d in data.domains if d not in held]
    test = [(d, "all") for d in data.domains if d in held] if held else [(d, "test") for d in kept]
    return {"train": [(d, "train") for d in kept], "val": [(d, "val") for d in kept], "test": test,
            "all": [(d, "all") for d in data.domains]}


def _registry() -> ModuleType:
    from mtl_ray.data import registry  # the registry imports this module: import it when called, not at import

    return registry


def load_domains(cfg: Config) -> dict[str, LoadedSource]:
    """Each domain's :class:`LoadedSource` (their problems prefixed with the domain); raises :class:`DataError`
    when their image shapes differ."""
    reg = _registry()
    loaded: dict[str, LoadedSource] = {}
    errors: list[str] = []
    for name in cfg.data.domains:
        spec = reg.source_spec(domain_config(cfg, name))
        if spec.load is None:
            raise DataError(f"data.domains: got {name!r}, expected image sources ({', '.join(image_domains())})")
        try:
            loaded[name] = spec.load(domain_config(cfg, name))
        except DataError as e:
            errors += [f"domain {name}: {p}" for p in e.problems]
    if errors:
        raise DataError("; ".join(errors), errors)
    shapes = {name: _x_shape(ls) for name, ls in loaded.items()}
    if len({s for s in shapes.values() if s is not None}) > 1:
        listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
        raise DataError(f"data.domains: the domains give different image shapes ({listed}); expected one shape "
                        f"[C, S, S] for all (data.image_size={cfg.data.image_size} is shared; the channels differ): "
                        "use sources of one kind of image (e.g. convert the table with --channels 1) or drop one "
                        "from data.domains")
    return loaded


def _x_shape(ls: LoadedSource) -> tuple[int, ...] | None:
    pool = next((p for p in ls.splits.values() if p.images), None)
    return None if pool is None else tuple(int(s) for s in pool.images[0].shape[1:])


def active_plan(data: DataConfig, loaded: dict[str, LoadedSource]) -> dict[str, list[tuple[str, str, float]]]:
    """``{split: [(domain, its split, normalised weight)]}``: :func:`plan` without domains that have no classes
    there (or weight 0)."""
    w = weights_of(data)
    out: dict[str, list[tuple[str, str, float]]] = {}
    for split, pairs in plan(data).items():
        live = [(d, s) for d, s in pairs if loaded[d].splits[s].num_classes > 0 and w[d] > 0]
        total = sum(w[d] for d, _ in live)
        out[split] = [(d, s, w[d] / total) for d, s in live]
    return out


class MultiDomainTaskSource:
    """A :class:`~mtl_ray.data.base.TaskSource` whose every episode comes from one domain (module docstring)."""

    kind: TaskKind = "classification"

    def __init__(self, domains: dict[str, PoolTaskSource], splits: dict[str, list[tuple[str, str, float]]], *,
                 seed: int, ways: int):
        self.domains = domains
        self.splits = splits
        self.seed = seed
        self.ways = ways
        self.md5s = {k: v for src in domains.values() for k, v in src.md5s.items()}
        self.name = NAME
        self.x_shape = next(iter(domains.values())).x_shape
        # cumulative weights per split: a uniform u picks the first domain whose cumulative weight exceeds it
        self._cum = {s: np.cumsum([w for _, _, w in pairs]) for s, pairs in splits.items()}

    def domain_index(self, split: str, step: int, index: int) -> int:
        """Which of ``splits[split]`` task ``(split, step, index)`` samples: one uniform of its own generator."""
        pairs = self.splits[split]
        if not pairs:
            raise DataError(f"split {split!r} of multidomain: no domain has classes in it; expected at least one "
                            f"of data.domains={list(self.domains)} (data.test_domains moves whole domains to test)")
        u = task_rng(self.seed, split, step, index).random()
        return min(int(np.searchsorted(self._cum[split], u, side="right")), len(pairs) - 1)

    def episode_domains(self, split: str, step: int, indices: Sequence[int]) -> list[str]:
        """The domain of each task ``(split, step, i)`` for ``i`` in ``indices``."""
        return [self.splits[split][self.domain_index(split, step, int(i))][0] for i in indices]

    def sample(self, split: str, step: int, indices: Sequence[int], *, augment: bool = False) -> TaskBatch:
        """Tasks ``(seed, split, step, i)`` for ``i`` in ``indices``, each from the domain it draws; ``augment`` as
        :meth:`PoolTaskSource.sample` (each domain's tasks augmented from their own coordinates)."""
        idx = [int(i) for i in indices]
        picks = [self.domain_index(split, step, i) for i in idx]
        parts: dict[int, TaskBatch] = {}
        rows: list[tuple[int, int]] = []  # (pick, row in that pick's batch) for each task, in the order asked
        for k in sorted(set(picks)):
            mine = [i for i, p in zip(idx, picks, strict=True) if p == k]
            domain, sub_split, _ = self.splits[split][k]
            parts[k] = self.domains[domain].sample(sub_split, step, mine, augment=augment)
        seen = {k: 0 for k in parts}
        for p in picks:
            rows.append((p, seen[p]))
            seen[p] += 1
        return TaskBatch.stack([parts[p].slice(r, r + 1) for p, r in rows])

    def num_classes(self, split: str) -> int:
        return sum(self.domains[d].num_classes(s) for d, s, _ in self.splits[split])


def build(cfg: Config) -> MultiDomainTaskSource:
    """The multi-domain task source for ``cfg`` (:class:`DataError` when a domain is unusable)."""
    loaded = load_domains(cfg)
    problems = [p for ls in loaded.values() for p in ls.problems] + ways_problems(cfg.data, loaded)
    if problems:
        raise DataError("; ".join(problems), problems)
    d = cfg.data
    reg = _registry()
    # one normalisation and augmentation for every domain: the run's (data.channel_mean/std, data.augment)
    mean, std = reg.channel_stats(cfg)
    augment = reg.build_augment(d.augment)
    sources = {name: PoolTaskSource(ls.splits, seed=domain_seed(cfg.seed, name), ways=d.ways, shots=d.shots,
                                    queries=d.queries, md5s=ls.md5s, name=ls.name, channel_mean=mean,
                                    channel_std=std, augment=augment) for name, ls in loaded.items()}
    return MultiDomainTaskSource(sources, active_plan(d, loaded), seed=cfg.seed, ways=d.ways)


def ways_problems(data: DataConfig, loaded: dict[str, LoadedSource]) -> list[str]:
    """A domain sampled in train, val or test with fewer classes there than ``data.ways``."""
    p: list[str] = []
    for split, pairs in active_plan(data, loaded).items():
        if split not in DATA_SPLITS:
            continue
        for domain, sub, _ in pairs:
            n = loaded[domain].splits[sub].num_classes
            if n < data.ways:
                p.append(f"data.ways: got {data.ways}, expected <= {n} ({loaded[domain].describe(sub)}: domain "
                         f"{domain} of the multidomain {split!r} split); {loaded[domain].fix(sub)}, or drop "
                         f"{domain} from data.domains")
    return p


def load_source(cfg: Config) -> LoadedSource:
    """The union of the domains' classes per split (for pretraining and the data checks; module docstring)."""
    loaded = load_domains(cfg)
    active = active_plan(cfg.data, loaded)
    pools: dict[str, ClassPool] = {}
    for split, pairs in active.items():
        names: list[str] = []
        images: list[np.ndarray] = []
        for domain, sub, _ in pairs:
            pool = loaded[domain].splits[sub]
            names += [f"{domain}:{n}" for n in pool.names]
            images += pool.images
        pools[split] = ClassPool(names=tuple(names), images=tuple(images))

    def describe(split: str) -> str:
        listed = ", ".join(f"{d} {s} ({loaded[d].splits[s].num_classes} classes, weight {w:.2f})"
                           for d, s, w in active[split]) or "no domain"
        return f"classes in the {split!r} split of multidomain: {listed}"

    def fix(split: str) -> str:
        return (f"lower data.ways, or add domains with classes in the {split!r} split to data.domains "
                "(data.test_domains moves whole domains to test)")

    problems = [p for ls in loaded.values() for p in ls.problems] + ways_problems(cfg.data, loaded)
    md5s = {k: v for ls in loaded.values() for k, v in ls.md5s.items()}
    return LoadedSource(pools, md5s, NAME, describe, fix, problems)


def image_domains() -> list[str]:
    reg = _registry()
    return [n for n, spec in reg.SOURCES.items() if spec.load is not None and n != NAME]


def check_config(data: DataConfig) -> list[str]:
    """Static checks: known image sources as domains (not multidomain itself, each once), weights one per domain
    and non-negative, held-out domains among the domains with some left to train on; and each domain's own
    checks."""
    reg = _registry()
    p: list[str] = []
    allowed = image_domains()
    if not data.domains:
        return [f"data.domains: empty, expected one or more of: {', '.join(allowed)}"]
    bad = [d for d in data.domains if d not in allowed]
    if bad:
        p.append(f"data.domains: got {bad}, expected image sources: {', '.join(allowed)} (each once; "
                 f"{NAME} cannot hold itself, generated sources have no classes)")
    dup = sorted({d for d in data.domains if data.domains.count(d) > 1})
    if dup:
        p.append(f"data.domains: got {dup} more than once, expected each domain once (weigh it with "
                 "data.domain_weights instead)")
    ws = data.domain_weights
    if ws and len(ws) != len(data.domains):
        p.append(f"data.domain_weights: got {len(ws)} weights {list(ws)}, expected one per domain of "
                 f"data.domains={list(data.domains)} ({len(data.domains)}), or none for uniform")
    elif any(w < 0 for w in ws) or (ws and not any(w > 0 for w in ws)):
        p.append(f"data.domain_weights: got {list(ws)}, expected non-negative weights, at least one > 0")
    stray = [d for d in data.test_domains if d not in data.domains]
    if stray:
        p.append(f"data.test_domains: got {stray}, expected domains of data.domains={list(data.domains)}")
    elif data.test_domains and set(data.domains) <= set(data.test_domains):
        p.append(f"data.test_domains: got all of data.domains {list(data.domains)}, expected some left for "
                 "train and val; hold fewer domains out or add domains")
    elif ws and len(ws) == len(data.domains):
        w = weights_of(data)
        for split in ("train", "test"):
            doms = [d for d, _ in plan(data)[split]]
            if doms and not any(w[d] > 0 for d in doms):
                p.append(f"data.domain_weights: every domain of the {split!r} split ({doms}) has weight 0, "
                         "expected at least one > 0")
    for name in dict.fromkeys(data.domains):
        spec = reg.SOURCES.get(name)
        if spec is None or name == NAME:
            continue
        p += [q for q in spec.check(data) if q not in p]
        if spec.path and not data.path:
            p.append(f"data.path: empty, expected {spec.path} when data.domains holds {name}")
    return p


def input_shape(cfg: Config) -> tuple[int, ...]:
    """The first domain's input shape (they must all agree; :func:`load_domains` checks that)."""
    reg = _registry()
    spec = reg.SOURCES.get(cfg.data.domains[0]) if cfg.data.domains else None
    if spec is None or spec.load is None:
        return (1, cfg.data.image_size, cfg.data.image_size)
    return spec.input_shape(domain_config(cfg, cfg.data.domains[0]))


def count_images(cfg: Config) -> int:
    """Every domain's images (each process holds them all)."""
    reg = _registry()
    return sum(reg.SOURCES[d].count_images(domain_config(cfg, d)) for d in dict.fromkeys(cfg.data.domains)
               if d in reg.SOURCES and d != NAME)


def _all_data_keys() -> frozenset[str]:
    # the domains read any of the data.* keys, depending on which are named: log them all
    return frozenset(f.name for f in dataclasses.fields(DataConfig))


SOURCE = SourceSpec(kind="classification", images=True, load=load_source, build=build, check=check_config,
                    input_shape=input_shape, count_images=count_images, config_keys=_all_data_keys())
