"""Textual-inversion datasets: file discovery, image preprocessing, captions and per-item randomness."""
import os
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data import personalized, personalized_style
from ldm.data.datamodule import DataModuleFromConfig, PositionSampler
from ldm.data.personalized import PersonalizedBase, caption_from_filename
from ldm.data.templates import (
    imagenet_dual_style_templates_small,
    imagenet_dual_templates_small,
    imagenet_style_templates_small,
    fill_template_line,
    imagenet_templates_small,
    per_img_token_list,
    read_template_file,
    template_holding,
)
from ldm.images import channels_first
from ldm.random_streams import BatchPositions

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def solid(path, color=RED, size=(8, 8)):
    Image.new("RGB", size, color).save(path)
    return path


def image_folder(root, count, size=(8, 8)):
    root.mkdir(exist_ok=True)
    for i in range(count):
        solid(root / f"{i:02d}.png", (10 * i, 0, 0), size)
    return root


def draw_captions(dataset, n=200):
    random.seed(0)
    return [dataset[i % len(dataset)] for i in range(n)]


def test_template_lists_match_the_original():
    assert len(imagenet_templates_small) == 81 and len(set(imagenet_templates_small)) == 57
    assert len(imagenet_dual_templates_small) == 27
    assert imagenet_dual_templates_small[-1] == "a photo of a small {} with {}"
    assert len(imagenet_style_templates_small) == 19 and len(set(imagenet_style_templates_small)) == 17
    assert len(imagenet_dual_style_templates_small) == 17
    assert len(per_img_token_list) == 22 and per_img_token_list[0] == "א" and per_img_token_list[-1] == "ת"
    assert personalized.per_img_token_list is per_img_token_list


def test_length_values_and_cached_pixels(tmp_path):
    solid(tmp_path / "a.png", RED, (12, 12))
    solid(tmp_path / "b.png", BLUE, (12, 12))
    train = PersonalizedBase(tmp_path, size=6, repeats=7, set="train")
    val = PersonalizedBase(tmp_path, size=6, repeats=7, set="val")
    assert (len(train), len(val), train.num_images) == (14, 2, 2)
    (tmp_path / "a.png").unlink()  # decoded once at construction, so items no longer need the file
    item = train[2]
    assert item["image"].shape == (6, 6, 3) and item["image"].dtype == np.uint8
    assert item["image_index"] == 0
    np.testing.assert_array_equal(item["image"][..., 0], 255)
    np.testing.assert_array_equal(item["image"][..., 1:], 0)
    assert train[3]["image"][..., 2].min() == 255
    item["image"][:] = 7  # a copy: the dataset's pixels stay as they were
    np.testing.assert_array_equal(train[2]["image"][..., 0], 255)
    with pytest.raises(IndexError):
        train[14]


@pytest.mark.parametrize("placeholder", ["@", "<my-cat>"])
def test_captions_use_the_given_placeholder(tmp_path, placeholder):
    dataset = PersonalizedBase(image_folder(tmp_path, 2), size=4, placeholder_token=placeholder)
    captions = {item["caption"] for item in draw_captions(dataset)}
    assert captions <= {template.format(placeholder) for template in imagenet_templates_small}
    assert len(captions) > 20
    assert not any("*" in caption for caption in captions)


def test_coarse_class_text_prefixes_the_placeholder(tmp_path):
    dataset = PersonalizedBase(image_folder(tmp_path, 1), size=4, placeholder_token="<my-cat>", coarse_class_text="cat")
    assert all("cat <my-cat>" in item["caption"] for item in draw_captions(dataset, 50))


def test_style_captions_come_from_the_style_list(tmp_path):
    dataset = personalized_style.PersonalizedBase(image_folder(tmp_path, 2), size=4, placeholder_token="S*")
    captions = {item["caption"] for item in draw_captions(dataset)}
    assert captions <= {template.format("S*") for template in imagenet_style_templates_small}
    assert len(captions) > 10
    with pytest.raises(ValueError, match="coarse_class_text"):
        personalized_style.PersonalizedBase(tmp_path, size=4, coarse_class_text="painting")


@pytest.mark.parametrize("module, duals", [(personalized, imagenet_dual_templates_small),
                                           (personalized_style, imagenet_dual_style_templates_small)])
def test_per_image_tokens_name_the_right_image(tmp_path, module, duals):
    dataset = module.PersonalizedBase(image_folder(tmp_path, 3), size=4, placeholder_token="S*",
                                      per_image_tokens=True, mixing_prob=1.0)
    for item in draw_captions(dataset, 60):
        token = per_img_token_list[item["image_index"]]
        assert item["caption"] in {template.format("S*", token) for template in duals}
    for mixing_prob, (low, high) in ((0.25, (0.15, 0.35)), (0.0, (0.0, 0.0))):  # the original's default, and none
        dataset.mixing_prob = mixing_prob
        items = draw_captions(dataset, 400)
        share = sum(per_img_token_list[item["image_index"]] in item["caption"] for item in items) / len(items)
        assert low <= share <= high, (mixing_prob, share)


def test_style_placeholder_always_follows_in_the_style_of():
    for template in imagenet_dual_style_templates_small:
        assert "in the style of S*" in template.format("S*", "א")


def test_per_image_tokens_need_fewer_than_22_images(tmp_path):
    folder = image_folder(tmp_path / "many", 22, size=(2, 2))
    with pytest.raises(ValueError, match="fewer than 22"):
        PersonalizedBase(folder, size=2, per_image_tokens=True)
    (folder / "21.png").unlink()
    assert PersonalizedBase(folder, size=2, per_image_tokens=True).num_images == 21


def test_a_caption_that_holds_name_keeps_it_literally():
    assert fill_template_line("[filewords] by [name]", "<x>", "a [name] tag") == "a [name] tag by <x>"


def test_template_file_fills_name_and_filewords(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    solid(images / "cat.png")
    (images / "cat.txt").write_text("  a tabby cat on a sofa\n", encoding="utf-8")
    solid(images / "01-red_mug-front.png")
    template = tmp_path / "subject_filewords.txt"
    template.write_text("a photo of [name], [filewords]\n\n[filewords] by [name]\n", encoding="utf-8")

    dataset = PersonalizedBase(images, size=4, placeholder_token="<x>", template_file=template)
    by_image = {0: set(), 1: set()}
    for item in draw_captions(dataset, 40):
        by_image[item["image_index"]].add(item["caption"])
    assert by_image[0] == {"a photo of <x>, red mug front", "red mug front by <x>"}
    assert by_image[1] == {"a photo of <x>, a tabby cat on a sofa", "a tabby cat on a sofa by <x>"}

    without_caption_files = PersonalizedBase(images, size=4, placeholder_token="<x>", template_file=template, captions=False)
    assert without_caption_files.image_captions == ["red mug front", "cat"]
    assert sorted(dataset.possible_captions()) == sorted(by_image[0] | by_image[1])


@pytest.mark.parametrize("dataset_class, settings", [
    (personalized.PersonalizedBase, dict(coarse_class_text="cat")),
    (personalized.PersonalizedBase, dict(per_image_tokens=True, mixing_prob=0.5)),
    (personalized.PersonalizedBase, dict(per_image_tokens=True, mixing_prob=0.0)),
    (personalized.PersonalizedBase, dict(per_image_tokens=True, mixing_prob=1.0)),
    (personalized_style.PersonalizedBase, dict(per_image_tokens=True, mixing_prob=0.5)),
])
def test_the_possible_captions_are_those_drawn(tmp_path, dataset_class, settings):
    dataset = dataset_class(image_folder(tmp_path, 2), size=4, **settings)
    drawn = {item["caption"] for item in draw_captions(dataset, 3000)}
    assert set(dataset.possible_captions()) == drawn


def test_caption_file_helpers(tmp_path):
    assert caption_from_filename("2_-3 old__chair-side.jpg") == "old chair side"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_template_file(tmp_path / "missing.txt")
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="blank.txt"):
        read_template_file(tmp_path / "blank.txt")


def test_a_template_file_without_the_name_slot_is_refused(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("a photo of a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"template file '.*plain.txt' has no line with \[name\]") as refused:
        read_template_file(plain)
    assert "'{}'" not in str(refused.value)
    braces = tmp_path / "braces.txt"
    braces.write_text("a photo of a {}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"braces.txt' has no line with \[name\].*write \[name\] \(not the built-in lists' '\{\}'\)"):
        read_template_file(braces)
    some = tmp_path / "some.txt"
    some.write_text("a photo\na photo of [name]\n", encoding="utf-8")
    assert read_template_file(some) == ["a photo", "a photo of [name]"]


@pytest.mark.parametrize("placeholder, templates, held", [
    ("a", ["a photo of a {}"], True),
    ("Photo", ["a photo of a {}"], True),  # the tokenizers lowercase
    ("of", ["a painting of one {1} in the style of {0}"], True),
    (",", ["a photo of [name], [filewords]"], True),  # punctuation is spaced out of its run, so found anywhere
    ("*", ["a photo of a {}", "a photo of [name], [filewords]"], False),
    ("sks", ["a photo of a {}"], False),
    ("ph", ["a photo of a {}"], False),  # part of a word is not the word
    ("name", ["a photo of [name]"], False),  # the slot is not a word of the template
])
def test_template_holding_finds_a_placeholder_used_as_a_word(placeholder, templates, held):
    assert (template_holding(placeholder, templates) is not None) == held


def test_a_placeholder_the_captions_already_use_is_refused(tmp_path):
    images = image_folder(tmp_path / "images", 1)
    for placeholder in ("a", "photo"):
        with pytest.raises(ValueError, match=f"placeholder '{placeholder}' is already a word of the training captions "
                                             r"\(\"a photo of a \{\}\"\).*such as '\*' or 'sks'"):
            PersonalizedBase(images, size=4, placeholder_token=placeholder)
    with pytest.raises(ValueError, match="placeholder 'style' is already a word"):
        personalized_style.PersonalizedBase(images, size=4, placeholder_token="style")
    template = tmp_path / "templates.txt"
    template.write_text("[name] on a table\n", encoding="utf-8")
    with pytest.raises(ValueError, match="placeholder 'table' is already a word"):
        PersonalizedBase(images, size=4, placeholder_token="table", template_file=template)
    assert PersonalizedBase(images, size=4, placeholder_token="photo", template_file=template).num_images == 1
    dataset = PersonalizedBase(images, size=4, placeholder_token="sks")
    with pytest.raises(ValueError, match="placeholder 'the' is already a word"):
        dataset.refuse_template_words(["sks", "the"])  # main.py checks the placeholders captions do not name too
    with pytest.raises(ValueError, match="placeholder is empty"):
        PersonalizedBase(images, size=4, placeholder_token="")


@pytest.mark.parametrize("settings, message", [
    (dict(size="big"), r"data.params.train.params.size 'big' is not a number of pixels"),
    (dict(size=0), r"data.params.train.params.size 0 is not"),
    (dict(size=0, set="val"), r"data.params.validation.params.size 0 is not"),
    (dict(repeats=0), r"data.params.train.params.repeats 0 is not a count of at least 1"),
    (dict(repeats=2.5), r"data.params.train.params.repeats 2.5 is not"),
    (dict(flip_p=1.5), r"data.params.train.params.flip_p 1.5 is not a probability: set it between 0 and 1"),
    (dict(flip_p="0.5"), r"data.params.train.params.flip_p '0.5' is not a probability"),
    (dict(mixing_prob=-0.1, set="val"), r"data.params.validation.params.mixing_prob -0.1 is not a probability"),
])
def test_sizes_repeats_and_probabilities_out_of_range_are_named(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        PersonalizedBase(image_folder(tmp_path, 1), **settings)


def test_an_image_too_large_to_decode_is_named(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 8x8 is over twice the limit, as a huge photo is over Pillow's
    solid(tmp_path / "huge.png")
    with pytest.raises(ValueError, match="image '.*huge.png' has more pixels than Pillow decodes safely .*resize it"):
        PersonalizedBase(tmp_path, size=4)


def test_exif_orientation_is_applied(tmp_path):
    stored = Image.new("RGB", (32, 16), GREEN)
    stored.paste(RED, (0, 0, 8, 4))  # top-left of the stored landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    stored.save(tmp_path / "phone.jpg", quality=95, exif=exif)

    image = PersonalizedBase(tmp_path, size=None, center_crop=False, flip_p=0.0)[0]["image"]
    assert image.shape == (32, 16, 3)  # upright portrait
    red = (image[..., 0] > 204) & (image[..., 1] < 51)
    assert red[1:7, 13:15].all()  # the marker is now top-right
    assert red.sum() < 40 and not red[:, :10].any()


def test_center_crop_keeps_the_middle_and_squash_keeps_everything(tmp_path):
    bands = Image.new("RGB", (30, 10))
    for left, color in zip((0, 10, 20), (RED, GREEN, BLUE)):
        bands.paste(color, (left, 0, left + 10, 10))
    bands.save(tmp_path / "wide.png")

    cropped = PersonalizedBase(tmp_path, size=10, flip_p=0.0)[0]["image"]
    np.testing.assert_array_equal(cropped, np.broadcast_to(np.array([0, 255, 0], np.uint8), (10, 10, 3)))

    squashed = PersonalizedBase(tmp_path, size=10, center_crop=False, flip_p=0.0, interpolation="bilinear")[0]["image"]
    np.testing.assert_allclose(squashed[:, 0], np.tile([255, 0, 0], (10, 1)), atol=7)
    np.testing.assert_allclose(squashed[:, 5], np.tile([0, 255, 0], (10, 1)), atol=7)
    np.testing.assert_allclose(squashed[:, 9], np.tile([0, 0, 255], (10, 1)), atol=7)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 2, 4))
    rgba.save(tmp_path / "cutout.png")
    image = PersonalizedBase(tmp_path, size=None, flip_p=0.0)[0]["image"]
    np.testing.assert_array_equal(image[:, 2:], 255)
    np.testing.assert_array_equal(image[:, :2, 0], 255)
    np.testing.assert_array_equal(image[:, :2, 1:], 0)


def test_only_image_files_are_read(tmp_path):
    solid(tmp_path / "b.JPG")
    solid(tmp_path / "a.png")
    solid(tmp_path / "c.WebP")
    (tmp_path / "a.txt").write_text("caption", encoding="utf-8")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01garbage")
    (tmp_path / "._a.png").write_bytes(b"not an image")
    (tmp_path / "nested.png").mkdir()
    solid(tmp_path / "nested.png" / "d.png")
    dataset = PersonalizedBase(tmp_path, size=4)
    assert [Path(path).name for path in dataset.image_paths] == ["a.png", "b.JPG", "c.WebP"]


def test_bad_folders_and_files_name_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        PersonalizedBase(empty)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        PersonalizedBase(tmp_path / "nowhere")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    solid(corrupt / "fine.png")
    (corrupt / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="broken.png"):
        PersonalizedBase(corrupt, size=4)
    with pytest.raises(ValueError, match="interpolation"):
        PersonalizedBase(tmp_path / "empty", interpolation="nearest")


def test_flip(tmp_path):
    stripe = Image.new("RGB", (6, 6), GREEN)
    stripe.paste(RED, (0, 0, 2, 6))
    stripe.save(tmp_path / "stripe.png")
    plain = PersonalizedBase(tmp_path, size=6, flip_p=0.0)
    mirrored = PersonalizedBase(tmp_path, size=6, flip_p=1.0)
    assert not plain[0]["flipped"] and mirrored[0]["flipped"]
    np.testing.assert_array_equal(mirrored[0]["image"], plain[0]["image"][:, ::-1])
    assert mirrored[0]["image"][0, -1, 0] == 255 and plain[0]["image"][0, 0, 0] == 255

    half = PersonalizedBase(tmp_path, size=6, repeats=200)
    flips = [item["flipped"] for item in draw_captions(half, 200)]
    assert 60 < sum(flips) < 140


def test_uint8_items_become_the_same_floats_the_networks_always_took():
    """Items are uint8; the model's conversion gives bit for bit what the dataset's float32 arithmetic gave."""
    pixels = np.arange(256, dtype=np.uint8).reshape(2, 4, 32).repeat(3, axis=0).reshape(2, 4, 32, 3)
    expected = torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1.0).permute(0, 3, 1, 2)
    converted = channels_first(torch.from_numpy(pixels))
    assert converted.dtype == torch.float32 and converted.is_contiguous()
    assert torch.equal(converted, expected)
    assert converted.min() == -1.0 and converted.max() == 1.0
    assert torch.equal(channels_first(expected.permute(0, 2, 3, 1)), expected)  # float images pass unchanged


def test_16_bit_grey_images_are_scaled_to_8_bits(tmp_path):
    """Pillow converts 16-bit grey to RGB by clipping: everything above 255 of 65535 turned white."""
    ramp = np.tile(np.array([0, 257 * 64, 32768, 65535], dtype=np.uint16), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "scan.png")
    image = PersonalizedBase(tmp_path, size=None, flip_p=0.0)[0]["image"]
    np.testing.assert_array_equal(image[0, :, 0], [0, 64, 128, 255])
    assert (image == image[..., :1]).all()


def test_caption_files_are_read_only_for_filewords_and_a_bad_one_is_named(tmp_path):
    solid(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_bytes("caf\xe9 cat".encode("cp1252"))
    assert PersonalizedBase(tmp_path, size=4).image_captions is None
    template = tmp_path.parent / f"{tmp_path.name}_template.txt"
    template.write_text("a photo of [name], [filewords]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"caption file '.*cat\.txt' is not UTF-8 .*re-save it as UTF-8"):
        PersonalizedBase(tmp_path, size=4, template_file=template)


def test_every_validation_pass_reads_the_same_captions_and_flips(tmp_path):
    for name in "abc":
        solid(tmp_path / f"{name}.png")
    config = {"target": "ldm.data.personalized.PersonalizedBase",
              "params": {"data_root": str(tmp_path), "size": 4, "set": "val"}}
    module = DataModuleFromConfig(batch_size=2, validation=config, num_workers=0)
    module.setup()
    passes = [[(tuple(batch["caption"]), tuple(batch["flipped"].tolist())) for batch in module.val_dataloader()]
              for _ in range(3)]
    assert passes[0] == passes[1] == passes[2]
    assert len({caption for batch in passes[0] for caption in batch[0]}) > 1


@pytest.mark.parametrize("batch_size", ["two", 0, 1.5, True])
def test_a_batch_size_that_is_not_a_count_is_named(batch_size):
    with pytest.raises(ValueError, match=f"data.params.batch_size {batch_size!r} is not a count of at least 1"):
        DataModuleFromConfig(batch_size=batch_size)


def test_default_workers_are_twice_the_batch_but_no_more_than_the_cores():
    assert DataModuleFromConfig(batch_size=1).num_workers == min(2, os.cpu_count())
    assert DataModuleFromConfig(batch_size=4096).num_workers == os.cpu_count()
    assert DataModuleFromConfig(batch_size=4096, num_workers=3).num_workers == 3


def stream(sampler_of, batches: int, batches_per_step: int, resume_at_step: int | None = None):
    """What a run reads, batch by batch, when Lightning restarts the sampler at every epoch (and at a resume)."""
    read, batch = [], 0
    while batch < batches:
        if resume_at_step is not None and batch >= resume_at_step * batches_per_step:
            read, batch = read[: resume_at_step * batches_per_step], resume_at_step * batches_per_step
            resume_at_step = None  # the resumed run's sampler starts at its step's first batch
        sampler = sampler_of(lambda: batch)
        items = list(sampler)
        for first in range(0, len(items), sampler.batch_size):
            read.append(items[first:first + sampler.batch_size])
            batch += 1
    return read[:batches]


@pytest.mark.parametrize("batches_per_step", [1, 2, 3])
def test_epochs_are_whole_optimizer_steps_and_a_resume_reads_on_where_it_stopped(batches_per_step):
    def sampler_of(current_batch):
        return PositionSampler(10, batch_size=2, seed=5, current_batch=current_batch, batches_per_step=batches_per_step)

    assert sampler_of(lambda: 0).batches_per_epoch % batches_per_step == 0
    uninterrupted = stream(sampler_of, 24, batches_per_step)
    seeds = [seed for batch in uninterrupted for _, seed in batch]
    assert len(set(seeds)) == len(seeds)  # every item of the run has its own position: nothing is read twice
    epoch = sampler_of(lambda: 0).batches_per_epoch
    for start in range(0, 24 - epoch + 1, epoch):  # each epoch draws distinct images
        indices = [index for batch in uninterrupted[start:start + epoch] for index, _ in batch]
        assert len(set(indices)) == len(indices)
    assert stream(sampler_of, 24, batches_per_step, resume_at_step=7) == uninterrupted


def test_ranks_read_disjoint_items_and_each_epoch_a_new_order():
    ranks = [PositionSampler(40, batch_size=2, seed=5, rank=rank, world_size=2) for rank in (0, 1)]
    first, second = (list(sampler) for sampler in ranks)
    assert not {index for index, _ in first} & {index for index, _ in second}
    assert not {seed for _, seed in first} & {seed for _, seed in second}
    epoch = ranks[0].batches_per_epoch
    later = PositionSampler(40, batch_size=2, seed=5, rank=0, world_size=2, current_batch=lambda: epoch)
    assert [index for index, _ in later] != [index for index, _ in first]


def test_the_training_loader_starts_at_the_trainers_batch_with_its_rank_and_accumulation(tmp_path):
    """A resumed run under gradient accumulation starts at its step's first batch, not at batch `global_step`."""
    for name in "abcd":
        solid(tmp_path / f"{name}.png")
    config = {"target": "ldm.data.personalized.PersonalizedBase",
              "params": {"data_root": str(tmp_path), "size": 4, "repeats": 10}}
    module = DataModuleFromConfig(batch_size=2, train=config, num_workers=0, seed=5)
    module.setup()
    module.trainer = SimpleNamespace(global_rank=1, world_size=2, accumulate_grad_batches=2, global_step=3)
    expected = PositionSampler(40, 2, 5, rank=1, world_size=2, batches_per_step=2, current_batch=lambda: 6)
    assert list(module.train_dataloader().sampler) == list(expected)


def test_each_accumulated_batch_has_its_own_position():
    positions = BatchPositions()
    assert [positions.next(step, 3) for step in (0, 0, 0, 1, 1, 1, 2)] == [0, 1, 2, 3, 4, 5, 6]
    assert BatchPositions().next(7, 3) == 21  # a resumed run starts at its step's first batch
    plain = BatchPositions()
    assert [plain.next(step, 1) for step in range(4)] == [0, 1, 2, 3]  # without accumulation: the step itself


def test_image_folder_errors_name_the_flag_and_what_belongs_there(tmp_path):
    with pytest.raises(ValueError, match="data_root '.*' holds no images .*point data_root at a folder of 3-5 images"):
        personalized.list_images(tmp_path)
    flag, content = "--images_dir", "generated images to score"
    missing = f"^{flag} '.*none' does not exist; point {flag} at a folder of {content}$"
    with pytest.raises(FileNotFoundError, match=missing):
        personalized.list_images(tmp_path / "none", flag, content)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match=f"^{flag} '.*notes.txt' is not a folder"):
        personalized.list_images(tmp_path / "notes.txt", flag, content)
