"""The built-in demo's teacher: shipped, loadable the way a user's checkpoint loads, and good."""
import numpy as np
import torch

from data import demo
from data.views import eval_view, render
from pipeline.config import DEMO_TEACHER
from stages.extract import encode_class_texts
from stages.prompts import TEMPLATE_SETS
from stages.teacher import OpenClipTeacher, text_classifier


def zero_shot_accuracy(teacher, per_class: int = 10, seed: int = 99) -> dict:
    """Per-style accuracy with "a photo of a {}." on freshly drawn demo images."""
    classifier = text_classifier(encode_class_texts(teacher, list(demo.CLASSES), TEMPLATE_SETS["photo"]))
    accuracy = {}
    for d, style in enumerate(demo.DOMAINS):
        pixels, labels = [], []
        for c, shape in enumerate(demo.CLASSES):
            rng = np.random.default_rng([seed, d, c])
            for _ in range(per_class):
                image = demo.draw(shape, style, rng, size=int(rng.integers(64, 89)))
                pixels.append(teacher.input_spec(render(image, eval_view(image.width, image.height))))
                labels.append(c)
        predicted = (teacher.encode_images(torch.stack(pixels)) @ classifier.T).argmax(1).numpy()
        accuracy[style] = float((predicted == np.array(labels)).mean())
    return accuracy


def test_shipped_demo_teacher_loads_and_generalises_across_styles():
    teacher = OpenClipTeacher(DEMO_TEACHER)
    assert teacher.has_weights
    accuracy = zero_shot_accuracy(teacher)
    chance = 1 / len(demo.CLASSES)
    assert np.mean(list(accuracy.values())) > 2.5 * chance, accuracy
    assert all(a > 1.75 * chance for a in accuracy.values()), accuracy


def test_pretraining_script_writes_a_loadable_checkpoint(tmp_path):
    from data.pretrain_teacher import train
    path = train(steps=2, batch_size=16, per_pair=2, lr=1e-3, folder=tmp_path / "teacher")
    assert path.exists() and path.stat().st_size < 8_000_000
    teacher = OpenClipTeacher(f"local-dir:{path.parent}")
    shipped = OpenClipTeacher(DEMO_TEACHER)
    assert teacher.has_weights
    assert teacher.identity["checkpoint_sha256"] != shipped.identity["checkpoint_sha256"]
    assert teacher.encode_images(torch.zeros(1, 3, 64, 64)).shape == (1, 64)
