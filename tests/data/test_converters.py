"""``mtl-ray data convert --format ...``: each published layout, on a miniature written here in that exact layout
(real JPEG/PNG files, real pickles in CIFAR-100's and tiered-ImageNet's formats), into a table whose labels,
splits, shapes and channel statistics are checked against the files and a hand computation; bad inputs are one
clear error (exit 2, nothing written); a table's split column drives data.source=parquet."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtl_ray.cli import main
from mtl_ray.components import from_dict
from mtl_ray.data import build_task_source, check_data, task_rng
from mtl_ray.data.converters import FC100_SUPERCLASSES, convert, cub_split
from mtl_ray.data.fetch import DataError
from mtl_ray.data.imagetable import read_image_table


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


# CIFAR-100's meta: the real names, in the real order (the converters check them against the split lists)
FINE = _words("""
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
    caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
    flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
    motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate
    poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
    squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
    wardrobe whale willow_tree wolf woman worm""")
COARSE = _words("""
    aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices household_furniture
    insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
    medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2""")
COARSE_OF = {"apple": 4, "aquarium_fish": 1, "baby": 14, "bear": 8, "beaver": 0, "bee": 7, "bed": 6, "beetle": 7,
             "bicycle": 18, "bottle": 3}


def _photo(k: int, h: int = 30, w: int = 40, seed: int = 0) -> np.ndarray:
    """An RGB ``[h, w, 3]`` uint8 picture of class ``k``: its own colour, a little noise."""
    rng = np.random.default_rng([k, seed])
    base = np.array([(37 * k) % 256, (91 * k + 40) % 256, (151 * k + 80) % 256], np.float64)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def _save(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, "RGB").save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(arr).save(path)


def _hand_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = images.astype(np.float64) / 255.0
    return x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))


def _check_stats(path: Path, size: int) -> None:
    """The recorded statistics are the mean and (population) std of the train split's stored pixels in [0, 1]."""
    t = read_image_table(path, size)
    labs = [lab for lab in t.images if t.splits[lab] == "train"]
    mean, std = _hand_stats(np.concatenate([t.images[lab] for lab in labs]))
    assert np.allclose(t.channel_mean, mean, atol=1e-12) and np.allclose(t.channel_std, std, atol=1e-12)


# --------------------------------------------------------------------------- mini-ImageNet

MINI = {"train": ("n01532829", "n01558993", "n01704323"), "val": ("n01855672", "n02091244"),
        "test": ("n01930112", "n01981276")}


def _mini(root: Path, per: int = 3) -> Path:
    """Ravi & Larochelle's layout: train/val/test.csv ('filename,label') and images/n0153282900000005.jpg."""
    k = 0
    for split, classes in MINI.items():
        lines = ["filename,label"]
        for syn in classes:
            for i in range(per):
                name = f"{syn}{i + 1:08d}.jpg"
                _save(_photo(k, seed=i), root / "images" / name)
                lines.append(f"{name},{syn}")
            k += 1
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def test_mini_imagenet_keeps_the_published_splits_at_84_rgb(tmp_path):
    done = convert("mini-imagenet", _mini(tmp_path / "mini"), tmp_path / "mini.parquet", workers=2)
    t = read_image_table(done.path, 84)
    assert t.splits == {syn: s for s, classes in MINI.items() for syn in classes}
    assert {lab: x.shape for lab, x in t.images.items()} == {syn: (3, 3, 84, 84) for c in MINI.values() for syn in c}
    assert done.classes == {"train": 3, "val": 2, "test": 2} and done.images == {"train": 9, "val": 6, "test": 6}
    _check_stats(done.path, 84)
    # the stored image is the JPEG decoded and resized once (Pillow's LANCZOS), as the table hands it out
    want = np.asarray(Image.open(tmp_path / "mini/images/n0155899300000002.jpg").convert("RGB").resize(
        (84, 84), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
    assert np.abs(t.images["n01558993"][1].astype(int) - want.astype(int)).max() <= 2  # JPEG draft decoding


def test_the_split_column_drives_the_parquet_source_and_refuses_fractions(tmp_path):
    path = convert("mini-imagenet", _mini(tmp_path / "mini"), tmp_path / "m.parquet", image_size=16).path
    cfg = from_dict({"data": {"source": "parquet", "path": str(path), "image_size": 16, "ways": 2, "shots": 1,
                              "queries": 2}})
    src = build_task_source(cfg)
    assert {s: src.pools[s].names for s in ("train", "val", "test")} == {s: tuple(sorted(c)) for s, c in MINI.items()}
    assert check_data(cfg, ["train", "val", "test"]) == []
    bad = cfg.replace(**{"data.val_fraction": 0.2})
    [problem] = check_data(bad)
    assert "data.val_fraction/data.test_fraction: got 0.2/0.0, expected 0/0" in problem
    assert "3 train, 2 val, 2 test classes" in problem and "remove data.val_fraction" in problem
    with pytest.raises(DataError, match="expected 0/0"):
        build_task_source(bad)
    many = cfg.replace(**{"data.ways": 3})
    assert any("data.ways: got 3, expected <= 2" in p and "'split' column" in p for p in check_data(many))


def test_the_source_normalises_with_the_tables_train_statistics(tmp_path):
    path = convert("mini-imagenet", _mini(tmp_path / "mini"), tmp_path / "m.parquet", image_size=16).path
    t = read_image_table(path, 16)
    cfg = from_dict({"data": {"source": "parquet", "path": str(path), "image_size": 16, "ways": 2, "shots": 1,
                              "queries": 2}})
    src = build_task_source(cfg)
    batch = src.sample("val", 0, [0])
    raw = torch.from_numpy(src.pools["val"].episode(task_rng(0, "val", 0, 0), 2, 1, 2)[0][None])
    m = torch.tensor(t.channel_mean, dtype=torch.float32).reshape(3, 1, 1)
    s = torch.tensor(t.channel_std, dtype=torch.float32).reshape(3, 1, 1)
    assert torch.equal(batch.support_x, (raw.float() / 255 - m) / s)
    assert abs(float(batch.support_x.mean())) < 5  # normalised, not [0, 1] pixels


@pytest.mark.parametrize("case, fix, message", [
    ("no_csv", lambda r: (r / "val.csv").unlink(), "missing val.csv"),
    ("no_image", lambda r: (r / "images" / "n0193011200000002.jpg").unlink(),
     "n0193011200000002.jpg: image listed in the split files missing (1 of 21)"),
    ("two_splits", lambda r: (r / "test.csv").write_text("filename,label\nn0153282900000001.jpg,n01532829\n"),
     "class 'n01532829' is in two splits ('train' and 'test')"),
    ("header", lambda r: (r / "train.csv").write_text("name,class\n"), "expected the header 'filename,label'"),
    ("row", lambda r: (r / "train.csv").write_text("filename,label\nn0153282900000001.jpg\n"),
     "train.csv:2: got ['n0153282900000001.jpg'], expected 'filename,label'"),
    ("corrupt", lambda r: (r / "images" / "n0193011200000001.jpg").write_bytes(b"not a jpeg"), "not a readable image"),
])
def test_mini_imagenet_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys, case, fix, message):
    root = _mini(tmp_path / "mini")
    fix(root)
    out = tmp_path / "out.parquet"
    assert main(["data", "convert", "--format", "mini-imagenet", str(root), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".out*"))


def test_split_lists_may_live_elsewhere(tmp_path):
    root = _mini(tmp_path / "mini")
    lists = tmp_path / "lists"
    lists.mkdir()
    for s in MINI:
        (root / f"{s}.csv").rename(lists / f"{s}.csv")
    assert main(["data", "convert", "--format", "mini-imagenet", str(root), str(tmp_path / "o.parquet")]) == 2
    assert main(["data", "convert", "--format", "mini-imagenet", str(root), str(tmp_path / "o.parquet"),
                 "--split-from", str(lists), "--image-size", "8"]) == 0
    assert read_image_table(tmp_path / "o.parquet", 8).splits["n01855672"] == "val"


# --------------------------------------------------------------------------- tiered-ImageNet

TIERED = {"train": {"n01530575": "n01503061", "n01531178": "n01503061", "n02085620": "n02084071"},
          "val": {"n03000134": "n03003091", "n03014705": "n03003091"},
          "test": {"n04067472": "n04076846", "n04099969": "n04076846"}}


def _tiered_pickles(root: Path) -> Path:
    """Ren et al.'s release: {split}_images_png.pkl (a list of PNG-encoded uint8 arrays) + {split}_labels.pkl."""
    root.mkdir(parents=True)
    k = 0
    for split, classes in TIERED.items():
        cats = sorted(set(classes.values()))
        pngs, specific, general = [], [], []
        for ci, cat in enumerate(classes.values()):
            for i in range(3):
                buf = io.BytesIO()
                Image.fromarray(_photo(k, 84, 84, seed=i)).save(buf, format="PNG")
                pngs.append(np.frombuffer(buf.getvalue(), np.uint8).reshape(-1, 1))  # as cv2.imencode returns it
                specific.append(ci)
                general.append(cats.index(cat))
            k += 1
        (root / f"{split}_images_png.pkl").write_bytes(pickle.dumps(pngs, protocol=2))
        labels = {b"label_specific": np.array(specific), b"label_general": np.array(general),
                  b"label_specific_str": [s.encode() for s in classes],
                  b"label_general_str": [c.encode() for c in cats]}
        (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=2))
    return root


def _tiered_folders(root: Path) -> Path:
    """yaoyao-liu/tiered-imagenet-tools' output: {split}/<synset>/<synset>00000001.jpg."""
    k = 0
    for split, classes in TIERED.items():
        for syn in classes:
            for i in range(3):
                _save(_photo(k, seed=i), root / split / syn / f"{syn}{i + 1:08d}.jpg")
            k += 1
    return root


def _tiered_class_lists(root: Path) -> tuple[Path, Path]:
    """Ren et al.'s tiered_imagenet_split/{split}.csv ('synset,category', no header) over ImageNet's train/<synset>/."""
    lists = root / "tiered_imagenet_split"
    lists.mkdir(parents=True)
    k = 0
    for split, classes in TIERED.items():
        (lists / f"{split}.csv").write_text("".join(f"{s},{c}\n" for s, c in classes.items()))
        for syn in classes:
            for i in range(3):
                _save(_photo(k, seed=i), root / "ILSVRC2012" / "train" / syn / f"{syn}_{i + 1}.jpg")
            k += 1
        (root / "ILSVRC2012" / "train" / "n99999999").mkdir(exist_ok=True)  # an unlisted ImageNet class: ignored
    return root / "ILSVRC2012", lists


@pytest.mark.parametrize("layout", ["pickles", "folders", "class_lists"])
def test_tiered_imagenet_each_published_form(tmp_path, layout):
    split_from = None
    if layout == "pickles":
        src = _tiered_pickles(tmp_path / "tiered")
    elif layout == "folders":
        src = _tiered_folders(tmp_path / "tiered")
    else:
        src, split_from = _tiered_class_lists(tmp_path)
    done = convert("tiered-imagenet", src, tmp_path / "t.parquet", image_size=20, split_from=split_from)
    t = read_image_table(done.path, 20)
    assert t.splits == {syn: s for s, classes in TIERED.items() for syn in classes}
    assert all(x.shape == (3, 3, 20, 20) for x in t.images.values())
    if layout != "folders":  # the category (ImageNet node) of each class is its domain
        assert t.domains == {syn: cat for classes in TIERED.values() for syn, cat in classes.items()}
    _check_stats(done.path, 20)


def test_tiered_imagenet_bad_inputs(tmp_path):
    src, lists = _tiered_class_lists(tmp_path)
    (lists / "val.csv").write_text("n01530575,n01503061\n")  # a train class again
    with pytest.raises(DataError, match="class 'n01530575' is in two splits"):
        convert("tiered-imagenet", src, tmp_path / "t.parquet", split_from=lists)
    (lists / "val.csv").write_text("n05000000,n03003091\n")
    with pytest.raises(DataError, match=r"n05000000: class folder missing \(1 of 6 listed synsets"):
        convert("tiered-imagenet", src, tmp_path / "t.parquet", split_from=lists)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="not a tiered-ImageNet layout; expected one of"):
        convert("tiered-imagenet", empty, tmp_path / "t.parquet")
    pk = _tiered_pickles(tmp_path / "pk")
    (pk / "val_labels.pkl").write_bytes(pickle.dumps({"label_specific": np.zeros(1)}))
    with pytest.raises(DataError, match="has no 'label_specific_str' entry"):
        convert("tiered-imagenet", pk, tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    pk = _tiered_pickles(tmp_path / "pk")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (pk / "test_labels.pkl").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DataError, match=r"holds a builtins.print object, not only numpy arrays"):
        convert("tiered-imagenet", pk, tmp_path / "t.parquet")


# --------------------------------------------------------------------------- CIFAR-100: CIFAR-FS and FC100

CIFAR_FS = {"train": ("apple", "aquarium_fish", "beaver", "bed"), "val": ("baby", "bee"), "test": ("bear", "beetle")}


def _cifar(root: Path, classes=tuple(COARSE_OF), per: tuple[int, int] = (4, 2)) -> Path:
    """cifar-100-python/{train,test,meta} as Python 2 wrote them: dicts with bytes keys, b'data' uint8 [N, 3072]."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for part, n in zip(("train", "test"), per, strict=True):
        rows, fine, coarse = [], [], []
        for name in classes:
            k = FINE.index(name)
            for i in range(n):
                rows.append(_photo(k, 32, 32, seed=i + (100 if part == "test" else 0)).transpose(2, 0, 1).reshape(-1))
                fine.append(k)
                coarse.append(COARSE_OF[name])
        data = {b"filenames": [f"{i}.png".encode() for i in range(len(rows))], b"batch_label": part.encode(),
                b"fine_labels": fine, b"coarse_labels": coarse, b"data": np.stack(rows)}
        (d / part).write_bytes(pickle.dumps(data, protocol=2))
    meta = {b"fine_label_names": [n.encode() for n in FINE], b"coarse_label_names": [n.encode() for n in COARSE]}
    (d / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def _bertinetto(root: Path, splits=CIFAR_FS) -> Path:
    d = root / "splits" / "bertinetto"
    d.mkdir(parents=True)
    for s, classes in splits.items():
        (d / f"{s}.txt").write_text("\n".join(classes) + "\n")
    return root


def test_cifar_fs_pickles_and_bertinetto_lists(tmp_path):
    root = _bertinetto(_cifar(tmp_path / "cifar"))
    done = convert("cifar-fs", root, tmp_path / "fs.parquet")
    t = read_image_table(done.path, 32)
    assert t.splits == {c: s for s, classes in CIFAR_FS.items() for c in classes}
    assert {lab: x.shape for lab, x in t.images.items()} == {c: (6, 3, 32, 32) for c in t.splits}  # train + test
    # a row of b'data' is 1024 red, 1024 green, 1024 blue values: stored unchanged at 32x32
    first = pickle.loads((root / "cifar-100-python/train").read_bytes(), encoding="bytes")[b"data"][0]
    assert np.array_equal(t.images["apple"][0].reshape(-1), first)
    _check_stats(done.path, 32)
    assert set(done.classes) == {"train", "val", "test"}
    assert read_image_table(convert("cifar-fs", root, tmp_path / "b.parquet", image_size=40).path, 40).images[
        "bee"].shape == (6, 3, 40, 40)


def test_cifar_fs_bad_inputs(tmp_path):
    root = _cifar(tmp_path / "cifar")
    with pytest.raises(DataError, match="split lists not found"):
        convert("cifar-fs", root, tmp_path / "o.parquet")
    _bertinetto(root, {**CIFAR_FS, "test": ("bear", "beetel")})
    with pytest.raises(DataError, match="'beetel' is not a CIFAR-100 class name \\(did you mean 'beetle'\\?\\)"):
        convert("cifar-fs", root, tmp_path / "o.parquet")
    (root / "splits/bertinetto/test.txt").write_text("bear\napple\n")
    with pytest.raises(DataError, match="class 'apple' is in two splits"):
        convert("cifar-fs", root, tmp_path / "o.parquet")
    (root / "splits/bertinetto/test.txt").write_text("bear\nbus\n")  # in CIFAR-100, not in this miniature's data
    with pytest.raises(DataError, match=r"class 'bus' .* has no images"):
        convert("cifar-fs", root, tmp_path / "o.parquet")
    (root / "cifar-100-python/meta").unlink()
    with pytest.raises(DataError, match="CIFAR-100 pickle\\(s\\) meta missing"):
        convert("cifar-fs", root, tmp_path / "o.parquet")
    assert not (tmp_path / "o.parquet").exists()


def test_fc100_splits_by_oreshkins_superclasses(tmp_path):
    done = convert("fc100", _cifar(tmp_path / "cifar"), tmp_path / "fc.parquet")
    t = read_image_table(done.path, 32)
    want = {c: next(s for s, sup in FC100_SUPERCLASSES.items() if COARSE_OF[c] in sup) for c in COARSE_OF}
    assert t.splits == want and t.domains == {c: COARSE[COARSE_OF[c]] for c in COARSE_OF}
    assert sorted(i for sup in FC100_SUPERCLASSES.values() for i in sup) == list(range(20))
    assert [len(v) for v in FC100_SUPERCLASSES.values()] == [12, 4, 4]
    _check_stats(done.path, 32)


# --------------------------------------------------------------------------- CUB-200-2011


def _cub(root: Path, classes: int = 8, per: int = 2) -> Path:
    d = root / "CUB_200_2011"
    names = [f"{i + 1:03d}.Bird_{i + 1}" for i in range(classes)]
    images, labels = [], []
    for c, name in enumerate(names):
        for i in range(per):
            rel = f"{name}/Bird_{c + 1}_{i:04d}.jpg"
            _save(_photo(c, seed=i), d / "images" / rel)
            images.append(f"{len(images) + 1} {rel}")
            labels.append(f"{len(labels) + 1} {c + 1}")
    (d / "images.txt").write_text("\n".join(images) + "\n")
    (d / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (d / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(names)))
    return root


def test_cub_uses_chen_et_als_class_index_split(tmp_path):
    done = convert("cub", _cub(tmp_path / "cub"), tmp_path / "cub.parquet", image_size=24)
    t = read_image_table(done.path, 24)
    assert t.splits == {f"{i + 1:03d}.Bird_{i + 1}": ["train", "val", "train", "test"][i % 4] for i in range(8)}
    assert [cub_split(i) for i in range(200)].count("train") == 100
    assert [cub_split(i) for i in range(200)].count("val") == 50 == [cub_split(i) for i in range(200)].count("test")
    assert all(x.shape == (2, 3, 24, 24) for x in t.images.values())
    _check_stats(done.path, 24)
    assert convert("cub", tmp_path / "cub" / "CUB_200_2011", tmp_path / "b.parquet", image_size=8).classes == {
        "train": 4, "val": 2, "test": 2}  # the CUB_200_2011 folder itself works too


def test_cub_bad_inputs(tmp_path):
    root = _cub(tmp_path / "cub")
    (root / "CUB_200_2011/images/003.Bird_3/Bird_3_0001.jpg").unlink()
    with pytest.raises(DataError, match=r"Bird_3_0001.jpg: image listed in images.txt missing"):
        convert("cub", root, tmp_path / "o.parquet")
    (root / "CUB_200_2011/image_class_labels.txt").write_text("1 1\n")
    with pytest.raises(DataError, match="image 2 \\(15 in all\\) has no class"):
        convert("cub", root, tmp_path / "o.parquet")
    (root / "CUB_200_2011/classes.txt").unlink()
    with pytest.raises(DataError, match=r"classes.txt missing"):
        convert("cub", root, tmp_path / "o.parquet")


# --------------------------------------------------------------------------- the command itself


def test_folder_stays_the_default_and_records_statistics(tmp_path, capsys):
    for k in range(3):
        for i in range(2):
            _save(_photo(k, seed=i), tmp_path / "imgs" / f"class{k}" / f"{i}.png")
    assert main(["data", "convert", str(tmp_path / "imgs"), str(tmp_path / "f.parquet")]) == 0
    assert "3 all classes (6 images), 28x28 1-channel" in capsys.readouterr().out
    t = read_image_table(tmp_path / "f.parquet", 28)
    assert t.splits == {} and len(t.channel_mean) == 1
    mean, std = _hand_stats(np.concatenate(list(t.images.values())))
    assert np.allclose(t.channel_mean, mean) and np.allclose(t.channel_std, std)


@pytest.mark.parametrize("argv, message", [
    (["--format", "mini-imagenet", "--invert"], "--invert: got with --format mini-imagenet, expected none"),
    (["--format", "fc100", "--split-from", "."], "--split-from: got a folder with --format fc100"),
    (["--format", "cub", "--image-size", "0"], "--image-size: got 0, expected a positive number"),
    (["--split-from", "."], "--split-from: got a folder with --format folder"),
])
def test_option_mistakes_exit_2(tmp_path, capsys, argv, message):
    assert main(["data", "convert", *argv, str(tmp_path), str(tmp_path / "o.parquet")]) == 2
    assert message in capsys.readouterr().err
