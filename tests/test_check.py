"""`bench.testing.check_model` passes a small correct model and fails each way a model can break the surface.

The toy model is a real `OVSegModel` (a stride-4 patch projection compared with character-embedding text features,
upsampled, cropped, resized); each broken variant changes one thing, as a user's model might get it wrong."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench.models.base import OVSegModel, Protocol
from bench.testing import ModelCheckError, check_model


class Toy(OVSegModel):
    def __init__(self):
        super().__init__(Protocol(short_side=120, max_size=480))
        self.patch = nn.Conv2d(3, 8, 4, stride=4)
        self.chars = nn.Embedding(256, 8)

    def encode_vocabulary(self, class_names):
        self.vocabulary = list(class_names)
        self.text = torch.stack([self.chars(torch.tensor(list(n.encode()))).mean(0) for n in class_names])
        return self.text

    def forward(self, x, image_sizes):
        return {"logits": torch.einsum("bchw,kc->bkhw", self.features(x), self.text)}

    def features(self, x):
        return self.patch(x)

    def postprocess(self, outputs, image_sizes, output_sizes):
        scores = []
        for logits, (h, w), out_size in zip(outputs["logits"], image_sizes, output_sizes):
            up = F.interpolate(logits[None], scale_factor=4, mode="bilinear")[..., :h, :w]
            scores.append(F.interpolate(up, size=tuple(out_size), mode="bilinear")[0])
        return scores


class Stretches(Toy):       # resizes the padded map to the output size: the padding leaks into the scores
    def postprocess(self, outputs, image_sizes, output_sizes):
        return [F.interpolate(lg[None], size=tuple(s), mode="bilinear")[0] for lg, s in zip(outputs["logits"],
                                                                                           output_sizes)]


class AtInputSize(Toy):     # forgets to resize back to the original size
    def postprocess(self, outputs, image_sizes, output_sizes):
        return super().postprocess(outputs, image_sizes, image_sizes)


class IgnoresVocabulary(Toy):
    def forward(self, x, image_sizes):
        return {"logits": self.features(x)[:, :1].expand(-1, len(self.vocabulary), -1, -1)}


class ClassBias(Toy):       # a score that depends on the class's position in the list
    def forward(self, x, image_sizes):
        out = super().forward(x, image_sizes)
        return {"logits": out["logits"] + torch.arange(len(self.vocabulary)).view(1, -1, 1, 1)}


class BatchStatistics(Toy):  # a statistic over the batch: images leak into each other
    def features(self, x):
        f = self.patch(x)
        return f + f.mean(dim=0, keepdim=True)


class GlobalPooling(Toy):    # adds a global mean over the padded map: sees the batch's padding
    def features(self, x):
        f = self.patch(x)
        return f + f.mean(dim=(2, 3), keepdim=True)


class NaNs(Toy):
    def postprocess(self, outputs, image_sizes, output_sizes):
        scores = super().postprocess(outputs, image_sizes, output_sizes)
        scores[0][0, 0, 0] = float("nan")
        return scores


class OwnPreprocess(Toy):    # a preprocess of its own (shifted values), which the evaluation does not run
    def preprocess(self, images):
        x, sizes = super().preprocess(images)
        return x + 1e-3, sizes


class ReturnsTuple(Toy):
    def forward(self, x, image_sizes):
        return (super().forward(x, image_sizes)["logits"],)


class CachesGrid(Toy):      # caches a per-size tensor during the forward (as position-embedding resizes do)
    def forward(self, x, image_sizes):
        self.grids = getattr(self, "grids", {})
        key = tuple(x.shape[-2:])
        if key not in self.grids:
            self.grids[key] = torch.zeros(1, 1, x.shape[-2] // 4, x.shape[-1] // 4)
        self.last_grid = self.grids[key]
        return {"logits": super().forward(x, image_sizes)["logits"] + self.grids[key]}


class SelectsByValue(Toy):  # a shape that depends on values: FLOPs cannot come from shapes alone
    def forward(self, x, image_sizes):
        out = super().forward(x, image_sizes)
        _ = torch.nonzero(out["logits"] > 0)
        return out


def build(cls) -> Toy:
    torch.manual_seed(0)
    return cls()


def test_a_correct_model_passes_with_its_figures():
    measured = check_model(build(Toy), own_padding=True)
    assert measured["permutation"] <= 1e-6 and measured["batch"] <= 1e-6 and measured["extra_padding"] <= 1e-6
    # the protocol is the model's own again (short_side applies only during the check)
    model = build(Toy)
    check_model(model, short_side=100)
    assert (model.protocol.short_side, model.protocol.max_size) == (120, 480)


def test_a_model_that_sees_the_batch_padding_passes_unless_own_padding_is_asked():
    measured = check_model(build(GlobalPooling))
    assert measured["extra_padding"] > 1e-3 and measured["batch"] <= 1e-6
    with pytest.raises(ModelCheckError, match="padding leaks: an image padded to a batch"):
        check_model(build(GlobalPooling), own_padding=True)


@pytest.mark.parametrize("cls, message", [
    (Stretches, "padding leaks: the scores at the resized size are not the padded map cropped"),
    (AtInputSize, r"scores have shape \(5, 120, 162\), expected \[K, H0, W0\] = \(5, 150, 203\)"),
    (IgnoresVocabulary, "every class has the same score map"),
    (ClassBias, "permuting the class names does not permute the score channels"),
    (BatchStatistics, "batch != single: image 0 of a batch of two"),
    (NaNs, "scores hold NaN or Inf"),
    (OwnPreprocess, "preprocess differs from what the evaluation feeds the model"),
    (ReturnsTuple, "forward returned a tuple, not a dict"),
])
def test_each_broken_model_fails_with_a_clear_message(cls, message):
    with pytest.raises(ModelCheckError, match=message) as err:
        check_model(build(cls), own_padding=True)
    assert str(err.value).startswith("check_model: ") and "\n" not in str(err.value)


def test_flops_from_shapes_equal_a_real_count_and_leave_no_fake_tensor_behind():
    from torch._subclasses.fake_tensor import FakeTensor

    from bench.flops import count_flops_split

    assert check_model(build(Toy))["flops_counted_from"] == "shapes"
    model = build(CachesGrid)
    assert check_model(model)["flops_counted_from"] == "shapes"
    x = torch.zeros(1, 3, 64, 96)
    model.encode_vocabulary(["a", "b"])
    with torch.inference_mode():
        fake = count_flops_split(lambda: model(x, [(64, 96)]), shapes_of=model)
    assert fake["counted_from"] == "shapes" and fake["total"] > 0
    kept = [model.last_grid, *model.grids.values()]
    assert kept and not any(isinstance(t, FakeTensor) for t in kept)
    assert (64, 96) not in model.grids             # the fake call's new cache entry is gone again
    assert check_model(build(SelectsByValue))["flops_counted_from"] == "run"


def test_not_a_model_and_unusable_image_sizes_are_refused():
    with pytest.raises(ModelCheckError, match="a Linear is not an OVSegModel"):
        check_model(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"size_divisibility 32 > 1\) no multiple of it"):
        check_model(build(Toy), image_size=(120, 160))   # resizes to itself: nothing padded in height


def test_images_are_seeded():
    from bench.testing.check import check_images

    a, b = check_images(seed=3), check_images(seed=3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and a[0].shape == (150, 203, 3)
    assert a[1].shape == (203, 150, 3)
