import numpy as np
import torch

from mmtrain.data.shapes import COLOURS, POSITIONS, render_sample, shapes


def test_same_seed_gives_identical_data_and_another_seed_differs():
    a = shapes(image_size=32, train_size=40, val_size=10, test_size=0, seed=3)
    b = shapes(image_size=32, train_size=40, val_size=10, test_size=0, seed=3)
    c = shapes(image_size=32, train_size=40, val_size=10, test_size=0, seed=4)
    assert set(a) == {"train", "val"}
    assert torch.equal(a["train"].images, b["train"].images)
    assert a["train"].texts == b["train"].texts and torch.equal(
        a["train"].labels, b["train"].labels
    )
    assert not torch.equal(a["train"].images, c["train"].images)
    assert a["train"].texts != a["val"].texts  # splits are distinct draws


def test_labels_say_whether_the_caption_matches_the_drawing():
    labels = []
    for index in range(300):
        sample = render_sample(0, "train", index, 64)
        differing = [k for k in sample.truth if sample.truth[k] != sample.described[k]]
        assert len(differing) == (0 if sample.label == 1 else 1), (index, sample)
        for value in sample.described.values():
            assert value in sample.caption
        labels.append(sample.label)
    assert 0.4 < np.mean(labels) < 0.6  # balanced: neither class is a shortcut


def test_the_shape_is_drawn_in_its_colour_and_quadrant():
    for index in range(100):
        sample = render_sample(1, "val", index, 64)
        colour = np.array(COLOURS[sample.truth["colour"]])
        close = np.abs(sample.image.astype(int) - colour).sum(-1) < 30
        quadrants = {
            "top left": close[:32, :32],
            "top right": close[:32, 32:],
            "bottom left": close[32:, :32],
            "bottom right": close[32:, 32:],
        }
        assert set(quadrants) == set(POSITIONS)
        counts = {name: int(mask.sum()) for name, mask in quadrants.items()}
        assert max(counts, key=counts.get) == sample.truth["position"], (index, counts)
        assert counts[sample.truth["position"]] > 20
