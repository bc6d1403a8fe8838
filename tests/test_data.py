"""Image loading, crops, the built-in dataset and the resumable sampler. Run: python -m pytest tests/test_data.py"""

import random

import numpy as np
import pytest
import torch
from PIL import Image

import data


def write(path, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def test_odd_images_become_rgb_tensors(tmp_path, capsys):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    write(tmp_path / 'a' / 'rgb.png', Image.fromarray(rgb))
    write(tmp_path / 'a' / 'gray.png', Image.fromarray(rgb[..., 0]))
    rgba = np.concatenate([rgb, np.zeros((40, 50, 1), np.uint8)], axis=2)         # fully transparent
    write(tmp_path / 'a' / 'rgba.png', Image.fromarray(rgba, 'RGBA'))
    write(tmp_path / 'b' / 'cmyk.jpg', Image.fromarray(rgb).convert('CMYK'))
    write(tmp_path / 'b' / 'tiny.png', Image.fromarray(rgb[:16, :16]))
    write(tmp_path / 'b' / 'sixteen.png', Image.fromarray(rgb[..., 0].astype(np.uint16) * 257))
    (tmp_path / 'b' / 'corrupt.jpg').write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
    ds = data.ImageFolder(str(tmp_path), 32)
    assert ds.classes == ['a', 'b'] and ds.num_classes == 2
    assert ds.skipped == 1 and 'skipped 1 unreadable' in capsys.readouterr().out
    names = [p.split('/')[-1] for p, _ in ds.samples]
    assert names == ['gray.png', 'rgb.png', 'rgba.png', 'cmyk.jpg', 'sixteen.png', 'tiny.png']
    # each file as the RGB image it shows, centre-cropped to 32 px, uint8 v -> v / 127.5 - 1
    gray3 = np.repeat(rgb[..., :1], 3, axis=2)
    shown = [gray3, rgb, np.full_like(rgb, 255), np.asarray(Image.open(tmp_path / 'b' / 'cmyk.jpg').convert('RGB')), gray3, rgb[:16, :16]]
    for i in range(len(ds)):
        x, label = ds[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        expected = np.asarray(data.center_crop_arr(Image.fromarray(shown[i]), 32), dtype=np.float32) / 127.5 - 1
        np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), expected, atol=1e-6, err_msg=names[i])
        assert label == (0 if i < 3 else 1)
    assert torch.allclose(ds[2][0], torch.ones(3, 32, 32))          # transparent pixels are white, not black
    gray = ds[0][0]
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2])
    assert torch.equal(ds[4][0], gray)                              # 16-bit rescaled, not clipped


def test_flat_folder_is_one_class(tmp_path):
    for i in range(3):
        write(tmp_path / f'{i}.jpg', Image.new('RGB', (64, 48), (i * 50, 0, 0)))
    ds = data.ImageFolder(str(tmp_path), 16)
    assert ds.num_classes == 1 and [label for _, label in ds.samples] == [0, 0, 0]
    assert len(list(ds)) == 3  # iteration stops: an index past the end raises IndexError, not a wrapped-around image
    with pytest.raises(IndexError):
        ds[3]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist'):
        data.ImageFolder(str(tmp_path / 'nope'), 32)
    (tmp_path / 'empty' / 'sub').mkdir(parents=True)
    (tmp_path / 'empty' / 'notes.txt').write_text('hi')
    with pytest.raises(ValueError, match='no images found'):
        data.ImageFolder(str(tmp_path / 'empty'), 32)
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'x.png').write_bytes(b'junk')
    with pytest.raises(ValueError, match='could be read'):
        data.ImageFolder(str(tmp_path / 'bad'), 32)


def test_file_that_fails_to_decode_is_replaced(tmp_path, capsys):
    good = write(tmp_path / 'a.png', Image.new('RGB', (32, 32), (255, 0, 0)))
    truncated = tmp_path / 'b.png'
    truncated.write_bytes(good.read_bytes()[:60])                  # valid header, missing data
    ds = data.ImageFolder(str(tmp_path), 32)
    x, _ = ds[1]
    assert 'skipping unreadable image' in capsys.readouterr().out
    assert torch.allclose(x, ds[0][0])


def test_center_crop_arr_matches_adm():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8))
    out = data.center_crop_arr(img, 128)
    # ADM: BOX-halve while the short side >= 256 (400 -> 200), BICUBIC to short side 128 (300x200 -> 192x128), crop x 32..160
    ref = img.resize((300, 200), Image.BOX).resize((192, 128), Image.BICUBIC).crop((32, 0, 160, 128))
    assert out.size == (128, 128) and np.array_equal(np.asarray(out), np.asarray(ref))


def test_random_resized_crop_is_seeded_and_in_range():
    import random
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (100, 120, 3), dtype=np.uint8))
    a = data.random_resized_crop(img, 32, random.Random(5))
    b = data.random_resized_crop(img, 32, random.Random(5))
    c = data.random_resized_crop(img, 32, random.Random(6))
    assert a.size == (32, 32) and np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    strip = Image.new('RGB', (400, 10))                            # no crop fits the ratio: the fallback centre crop
    assert data.random_resized_crop(strip, 8, random.Random(0)).size == (8, 8)


def test_to_uint8_rounds_like_the_authors():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.999, 1.0, 1.5]).view(1, 1, 1, 6).expand(1, 3, 1, 6)
    assert data.to_uint8(x)[0, 0, :, 0].tolist() == [0, 64, 128, 255, 255, 255]


def test_builtin_dataset_is_deterministic_and_labelled():
    ds = data.BuiltinShapes(32, split='train')
    assert len(ds) == 10_000 and ds.num_classes == 10
    x0, y0 = ds[13]
    assert y0 == 3 and x0.shape == (3, 32, 32)
    assert torch.equal(x0, data.BuiltinShapes(32, split='train')[13][0])
    assert not torch.equal(x0, data.BuiltinShapes(32, split='val')[13][0])
    assert not torch.equal(x0, data.BuiltinShapes(32, seed=1)[13][0])
    flipped = data.BuiltinShapes(32, flip=True)
    outs = [flipped[(13, s)][0] for s in range(20)]
    assert any(torch.equal(o, x0.flip(-1)) for o in outs) and any(torch.equal(o, x0) for o in outs)


def test_builtin_dataset_ends():
    ds = data.BuiltinShapes(8, per_class=2)
    assert len(list(ds)) == 20  # iteration stops: an index past the end raises IndexError
    with pytest.raises(IndexError):
        ds[20]


def test_builtin_classes_differ_in_colour():
    """Class means over a few images are far apart: the classes are learnable."""
    ds = data.BuiltinShapes(32)
    means = torch.stack([torch.stack([ds[c + 10 * k][0] for k in range(20)]).mean(0) for c in range(10)])
    dists = torch.cdist(means.flatten(1), means.flatten(1))
    assert dists[~torch.eye(10, dtype=bool)].min() > 3.0


def test_sampler_shards_resumes_and_ignores_world_size():
    n, seed = 103, 7
    full = [i for i, _ in data.ResumableSampler(n, 0, 1, seed)]
    assert sorted(full) == list(range(n))
    shards = [[i for i, _ in data.ResumableSampler(n, r, 2, seed)] for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51 and not set(shards[0]) & set(shards[1])
    # a global batch of 2b taken from 2 ranks is the same set as from 1 rank
    b = 4
    for step in range(5):
        two = set(shards[0][step * b:(step + 1) * b]) | set(shards[1][step * b:(step + 1) * b])
        assert two == set(full[step * 2 * b:(step + 1) * 2 * b])
    s = data.ResumableSampler(n, 1, 2, seed)
    s.set_epoch(3)
    epoch3 = list(s)
    s.set_epoch(3, start=10)
    assert list(s) == epoch3[10:] and len(s) == len(epoch3) - 10
    s.set_epoch(4)
    assert [i for i, _ in s] != [i for i, _ in epoch3]
    # each item's augmentation seed depends on (seed, epoch, index) only
    seeds_two_ranks = dict(epoch3)
    one_rank = data.ResumableSampler(n, 0, 1, seed)
    one_rank.set_epoch(3)
    assert all(dict(one_rank)[i] == sd for i, sd in seeds_two_ranks.items())


def test_augmentation_seeds_and_flips_change_every_epoch():
    """Each epoch gives every item a new seed (a function of seed, epoch and index), so a training image is
    flipped (and cropped) anew each epoch: over 8 epochs each built-in image is seen both ways."""
    sampler = data.ResumableSampler(20, 0, 1, seed=3)
    seeds = []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        seeds.append(dict(sampler))
    assert all(len({s[i] for s in seeds}) == 8 for i in range(20))
    ds = data.BuiltinShapes(16, per_class=2, flip=True)
    plain = data.BuiltinShapes(16, per_class=2)
    for i in range(20):
        views = [ds[(i, s[i])][0] for s in seeds]
        assert any(torch.equal(v, plain[i][0]) for v in views) and any(torch.equal(v, plain[i][0].flip(-1)) for v in views), i


def test_save_grid(tmp_path):
    path = tmp_path / 'grid.png'
    data.save_grid(torch.rand(6, 3, 8, 8) * 2 - 1, str(path), ncol=3, row_labels=['first', 'second'], upscale=4)
    img = Image.open(path)
    assert img.height == 2 * (32 + 2) + 2 and img.width > 3 * 34


def random_image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_center_crop_halves_at_exactly_twice_the_target_and_floors_odd_offsets():
    """ADM's centre crop at its edges, written out step by step: a short side of exactly 2 x 128 is BOX-halved
    (`>=`), so 300x256 -> 150x128, no resize, crop x from (150 - 128) // 2 = 11; odd excesses floor the offset:
    67x64 -> x from 3 // 2 = 1, 64x71 -> y from 7 // 2 = 3 (round() would give 2 and 4)."""
    img = random_image(300, 256)
    expected = img.resize((150, 128), Image.BOX).crop((11, 0, 139, 128))
    assert np.array_equal(np.asarray(data.center_crop_arr(img, 128)), np.asarray(expected))
    wide, tall = random_image(67, 64, seed=1), random_image(64, 71, seed=2)
    assert np.array_equal(np.asarray(data.center_crop_arr(wide, 64)), np.asarray(wide)[:, 1:65])
    assert np.array_equal(np.asarray(data.center_crop_arr(tall, 64)), np.asarray(tall)[3:67, :])


class BoxRecorder:
    """Stands in for a PIL image: random_resized_crop reads .size and calls .resize(size, resample, box=...)."""

    def __init__(self, w, h):
        self.size, self.boxes = (w, h), []

    def resize(self, size, resample=None, box=None):
        self.boxes.append(box)
        return self


def test_random_resized_crop_covers_three_quarters_to_all_of_the_image():
    """The authors' augmentation: crops of 75-100% of the area (not torchvision's default 8-100%) with aspect
    ratios in [3/4, 4/3], inside the image; up to rounding of the sides to whole pixels."""
    w, h = 120, 100
    fractions, ratios = [], []
    for seed in range(300):
        img = BoxRecorder(w, h)
        data.random_resized_crop(img, 32, random.Random(seed))
        left, top, right, bottom = img.boxes[-1]
        assert 0 <= left < right <= w and 0 <= top < bottom <= h
        cw, ch = right - left, bottom - top
        fractions.append(cw * ch / (w * h))
        ratios.append(cw / ch)
    assert min(fractions) > 0.74 and max(fractions) <= 1.0
    assert min(ratios) > 0.74 and max(ratios) < 1.35


def test_image_folder_flips_by_the_items_augmentation_seed(tmp_path):
    """The flip, like the crop, follows the item's seed (random.Random(seed): its first draw < 0.5 flips), so a
    new seed each epoch flips each image anew; centre crop plus flip keeps this exact."""
    for i in range(3):
        random_image(40, 36, seed=i).save(tmp_path / f'{i}.png')
    flipping = data.ImageFolder(str(tmp_path), 32, train=False, flip=True)
    plain = data.ImageFolder(str(tmp_path), 32)
    for index in range(3):
        for seed in range(12):
            expected = plain[index][0].flip(-1) if random.Random(seed).random() < 0.5 else plain[index][0]
            assert torch.equal(flipping[(index, seed)][0], expected), (index, seed)
