"""The procedural world: reproducible from a seed, captions that say what the pixels show, held-out concepts that
pretraining never sees, and shipped concept examples that the generator reproduces."""
import itertools
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.procedural import (
    BACKGROUNDS,
    COLORS,
    HELD_OUT_CONCEPTS,
    OBJECT_COLORS,
    OMITTABLE,
    SHAPES,
    TEXTURES,
    ProceduralCaptions,
    Scene,
    make_scene,
    sample_concept_scene,
    sample_scene,
    texture_color,
    write_concept_examples,
)

REPO = Path(__file__).resolve().parent.parent


def components(mask: np.ndarray) -> int:
    """Number of 4-connected regions of True pixels."""
    seen = np.zeros_like(mask)
    regions = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        regions += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return regions


def has_color(image: np.ndarray, rgb) -> bool:
    return bool((image == np.array(rgb, dtype=np.uint8)).all(axis=-1).any())


def test_captions_name_attributes_in_words():
    def scene(shape, color, background, count, texture):
        return Scene(shape, color, background, count, texture, ((0.5, 0.5),) * count, 0.3)

    assert scene("star", "red", "blue", 1, "plain").caption() == "a red star on a blue background"
    assert scene("square", "green", "white", 2, "plain").caption() == "two green squares on a white background"
    assert scene("cross", "yellow", "black", 3, "striped").caption() == "three striped yellow crosses on a black background"
    assert scene("circle", "pink", "gray", 1, "dotted").caption() == "a dotted pink circle on a gray background"
    assert scene("heart", "orange", "white", 1, "plain").caption() == "an orange heart on a white background"
    assert scene("heart", "orange", "white", 2, "plain").caption() == "two orange hearts on a white background"
    with pytest.raises(ValueError, match="shape 'hexagon' is unknown"):
        scene("hexagon", "red", "blue", 1, "plain")
    star = scene("star", "orange", "blue", 1, "striped")
    assert star.caption(["color"]) == "a striped star on a blue background"
    assert star.caption(["texture", "color"]) == "a star on a blue background"
    assert star.caption(["texture"]) == "an orange star on a blue background"
    assert star.caption(["background"]) == "a striped orange star"
    assert scene("cross", "red", "white", 3, "dotted").caption(OMITTABLE) == "three crosses"
    with pytest.raises(ValueError, match="cannot omit shape"):
        star.caption(["shape"])


def test_short_captions_leave_out_each_attribute_at_its_rate_and_keep_the_scene():
    full = ProceduralCaptions(size=32, length=600, seed=5)
    short = ProceduralCaptions(size=32, length=600, seed=5, omit_p=0.3)
    said = Counter()
    for i in range(600):
        scene, caption = short.scene(i), short[i]["caption"]
        assert scene == full.scene(i)
        omissions = itertools.chain.from_iterable(itertools.combinations(OMITTABLE, k) for k in range(4))
        assert caption in {scene.caption(omit) for omit in omissions}
        said.update({"color": scene.color in caption.split(), "background": "background" in caption,
                     "everything": caption == scene.caption()})
    assert 0.62 < said["color"] / 600 < 0.78 and 0.62 < said["background"] / 600 < 0.78  # 0.7 expected
    assert 0.33 < said["everything"] / 600 < 0.46  # 0.7 ** 2 * (1/3 + 2/3 * 0.7) = 0.392: "plain" is never said
    np.testing.assert_array_equal(short[3]["image"], full[3]["image"])
    assert short[3]["caption"] == short[3]["caption"]
    with pytest.raises(ValueError, match="omit_p"):
        ProceduralCaptions(omit_p=1.5)


def test_same_seed_same_data_and_other_seed_other_data():
    first, again, other = (ProceduralCaptions(size=32, length=20, seed=seed) for seed in (0, 0, 1))
    for i in range(20):
        assert first[i]["caption"] == again[i]["caption"]
        np.testing.assert_array_equal(first[i]["image"], again[i]["image"])
        assert first[i]["labels"] == again[i]["labels"]
    assert [first[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]
    assert sum(not np.array_equal(first[i]["image"], other[i]["image"]) for i in range(20)) >= 19

    scenes = [sample_scene(np.random.default_rng(7)) for _ in range(2)]
    assert scenes[0] == scenes[1]
    np.testing.assert_array_equal(scenes[0].render(32), scenes[1].render(32))


def test_items_are_pure_functions_of_seed_split_and_index():
    dataset = ProceduralCaptions(size=32, length=50, seed=3)
    forward = [dataset[i] for i in range(50)]
    backward = [dataset[i] for i in reversed(range(50))][::-1]
    for a, b in zip(forward, backward):
        assert a["caption"] == b["caption"]
        np.testing.assert_array_equal(a["image"], b["image"])
    fresh = ProceduralCaptions(size=32, length=50, seed=3)
    assert fresh[37]["caption"] == forward[37]["caption"]

    val = ProceduralCaptions(size=32, length=50, seed=3, split="val")
    assert [val[i]["caption"] for i in range(50)] != [f["caption"] for f in forward]

    item = forward[0]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (32, 32, 3)
    with pytest.raises(IndexError):
        dataset[50]
    with pytest.raises(ValueError, match="split 'test'"):
        ProceduralCaptions(split="test")


def agreement_scenes():
    """Every shape, count and texture, colours and backgrounds cycling through all their values."""
    rng = np.random.default_rng(11)
    pairs = [(c, b) for c, b in itertools.product(OBJECT_COLORS, BACKGROUNDS) if c != b]
    for k, (shape, count, texture) in enumerate(itertools.product(SHAPES, (1, 2, 3), TEXTURES)):
        color, background = pairs[(5 * k) % len(pairs)]
        yield make_scene(rng, shape, color, background, count, texture)


@pytest.mark.parametrize("size", [32, 64])
def test_pixels_agree_with_caption(size):
    for scene in agreement_scenes():
        image = scene.render(size)
        background = np.array(COLORS[scene.background], dtype=np.uint8)
        assert image.shape == (size, size, 3) and image.dtype == np.uint8
        for corner in (image[0, 0], image[0, -1], image[-1, 0], image[-1, -1]):
            np.testing.assert_array_equal(corner, background, err_msg=scene.caption())
        assert has_color(image, COLORS[scene.color]), scene.caption()
        if scene.texture != "plain":
            assert has_color(image, texture_color(scene.color)), scene.caption()
        objects = (image != background).any(axis=-1)
        assert components(objects) == scene.count, scene.caption()
        words = scene.caption().split()
        assert words[-2] == scene.background and scene.color in words
        assert (scene.texture in words) == (scene.texture != "plain")


def test_textures_differ_where_the_caption_says_so():
    plain, striped, dotted = (make_scene(np.random.default_rng(5), "square", "blue", "white", 1, texture).render(64)
                              for texture in TEXTURES)
    assert not np.array_equal(plain, striped) and not np.array_equal(striped, dotted)
    inside = (plain != np.array(COLORS["white"], dtype=np.uint8)).any(axis=-1)
    second = np.array(texture_color("blue"), dtype=np.uint8)
    share = {name: (image[inside] == second).all(axis=-1).mean() for name, image in
             (("plain", plain), ("striped", striped), ("dotted", dotted))}
    assert share["plain"] == 0
    assert 0.4 < share["striped"] < 0.6
    assert 0.15 < share["dotted"] < 0.35


def test_texture_colour_never_matches_a_background():
    for color, background in itertools.product(OBJECT_COLORS, BACKGROUNDS):
        second = np.array(texture_color(color), dtype=int)
        assert np.abs(second - np.array(COLORS[background])).max() >= 40, (color, background)
        assert np.abs(second - np.array(COLORS[color])).max() >= 40, (color, background)


def test_pretraining_never_shows_held_out_concepts():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(10_000)]
    heart, cross = HELD_OUT_CONCEPTS["heart"], HELD_OUT_CONCEPTS["striped_yellow_cross"]
    assert not any(s.shape == "heart" for s in scenes)
    assert not any((s.shape, s.color, s.texture) == ("cross", "yellow", "striped") for s in scenes)
    assert not any(concept.matches(s.shape, s.color, s.texture) for s in scenes for concept in (heart, cross))
    assert not any("heart" in s.caption() for s in scenes)
    assert all(s.color != s.background for s in scenes)

    seen = {(s.shape, s.color, s.texture) for s in scenes}
    assert {("cross", "yellow", "plain"), ("cross", "red", "striped"), ("star", "yellow", "striped")} <= seen

    shapes = Counter(s.shape for s in scenes)
    assert set(shapes) == set(SHAPES) - {"heart"}
    assert max(shapes.values()) / min(shapes.values()) < 1.15
    assert set(Counter(s.count for s in scenes)) == {1, 2, 3}

    dataset = ProceduralCaptions(size=32, length=2000, seed=9)
    assert not any("heart" in dataset.scene(i).caption() for i in range(2000))


def test_whole_world_contains_held_out_concepts():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, held_out=False) for _ in range(3000)]
    assert sum(s.shape == "heart" for s in scenes) > 300
    assert any((s.shape, s.color, s.texture) == ("cross", "yellow", "striped") for s in scenes)
    assert any("heart" in ProceduralCaptions(size=32, length=50, held_out=False).scene(i).caption() for i in range(50))


def test_concept_scenes_show_only_their_concept():
    rng = np.random.default_rng(4)
    for concept in HELD_OUT_CONCEPTS.values():
        scenes = [sample_concept_scene(rng, concept) for _ in range(30)]
        assert all(concept.matches(s.shape, s.color, s.texture) and s.count == 1 for s in scenes)
        assert all(s.background != s.color for s in scenes)
        assert len({s.background for s in scenes}) > 2 and len({s.positions for s in scenes}) == 30
    hearts = [sample_concept_scene(rng, HELD_OUT_CONCEPTS["heart"]) for _ in range(30)]
    assert len({s.color for s in hearts}) > 3


def test_shipped_examples_are_what_the_generator_writes(tmp_path):
    for name in HELD_OUT_CONCEPTS:
        shipped = sorted((REPO / "examples" / "held_out" / name).glob("*.png"))
        written = write_concept_examples(name, tmp_path / name, count=5, size=64, seed=0)
        assert [p.name for p in shipped] == [p.name for p in written]
        images = [np.asarray(Image.open(p).convert("RGB")) for p in written]
        for shipped_path, image in zip(shipped, images):
            np.testing.assert_array_equal(np.asarray(Image.open(shipped_path).convert("RGB")), image)
        assert all(image.shape == (64, 64, 3) for image in images)
        assert len({image.tobytes() for image in images}) == 5
    with pytest.raises(ValueError, match="concept 'dragon' is not held out"):
        write_concept_examples("dragon", tmp_path / "dragon")
