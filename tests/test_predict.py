"""Inference as fastai users run it: ``learn.predict(item)``, ``dls.test_dl(items)`` with
``get_preds``, and ``ClassificationInterpretation``, on the project's in-memory loaders."""
import numpy as np
import pytest
import torch
from fastai.interpret import ClassificationInterpretation
from PIL import Image

from sttpfast.data import get_dls
from sttpfast.learner import spectral_learner


@pytest.fixture(scope="module")
def learn():
    torch.manual_seed(0)
    dls = get_dls("digits", bs=64, subset=200, augment=False)
    learn = spectral_learner(dls, "resnet20_cifar", param="sttp-r", rank=2, sv_every=1000)
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-2)
    return learn


def _valid_preds(learn):
    with learn.no_bar():
        probs, targets = learn.get_preds(dl=learn.dls.valid)
    return probs, targets


def test_predict_gives_the_class_name_its_index_and_the_probabilities_of_get_preds(learn):
    probs, _ = _valid_preds(learn)
    x0, _ = learn.dls.valid.dataset[3]
    with learn.no_bar():
        name, index, p = learn.predict(x0)
    assert torch.allclose(p, probs[3], atol=1e-6) and p.shape == (10,)
    assert index == probs[3].argmax() and name == learn.dls.vocab[int(index)]
    with learn.no_bar():
        image, *_ = learn.predict(x0, with_input=True)
    assert image.shape == (1, 16, 16) and 0 <= float(image.min()) and float(image.max()) <= 1 + 1e-6
    assert torch.allclose(image * 255, x0.float(), atol=1e-3)  # the input, normalization undone


def test_test_dl_takes_a_batch_tensor_a_list_pil_images_and_files(learn, tmp_path):
    probs, _ = _valid_preds(learn)
    x = learn.dls.valid.dataset.x[:5]  # uint8 (5, 1, 16, 16)
    paths = []
    for i, image in enumerate(x):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image[0].numpy()).save(paths[-1])
    items = {"batch tensor": x, "list of tensors": list(x), "numpy arrays": [im.numpy() for im in x],
             "PIL images": [Image.open(p) for p in paths], "files": paths, "file names": [str(p) for p in paths]}
    for what, given in items.items():
        dl = learn.dls.test_dl(given)
        with learn.no_bar():
            got, targets = learn.get_preds(dl=dl)
        assert targets is None, what
        assert torch.allclose(got, probs[:5], atol=1e-6), what


def test_test_dl_resizes_and_converts_pil_images_and_refuses_other_tensors(learn, tmp_path):
    rgb = Image.fromarray(np.full((40, 30, 3), 200, dtype=np.uint8))
    dl = learn.dls.test_dl([rgb])
    assert tuple(dl.dataset.x.shape) == (1, 1, 16, 16) and int(dl.dataset.x.min()) == 200
    with pytest.raises(ValueError, match=r"^test items: image 0 is a tensor of shape \(1, 8, 8\); this model's data "
                                         r"is uint8 \(1, 16, 16\) \(give PIL images or files to have them resized\)$"):
        learn.dls.test_dl([torch.zeros(1, 8, 8, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"^test items: image 0 holds float32 values; give uint8 pixels \(0-255\), "
                                         r"as the training images are$"):
        learn.dls.test_dl(torch.rand(2, 1, 16, 16))
    with pytest.raises(ValueError, match=r"^test items: image 0 \('nope.png'\) is not a readable image file"):
        learn.dls.test_dl(["nope.png"])
    with pytest.raises(ValueError, match=r"^test items: none given$"):
        learn.dls.test_dl([])


def test_classification_interpretation_sees_every_class(learn):
    _, targets = _valid_preds(learn)
    with learn.no_bar():
        interp = ClassificationInterpretation.from_learner(learn)
    assert list(interp.vocab) == [str(i) for i in range(10)]
    matrix = interp.confusion_matrix()
    assert matrix.shape == (10, 10) and matrix.sum() == len(targets)
    assert (matrix.sum(1) == np.bincount(targets.numpy(), minlength=10)).all()
