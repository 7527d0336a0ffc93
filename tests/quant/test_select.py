import pytest
from torch import nn

from tunelab.quant.select import named_by, select_layers


def stack(n: int) -> nn.Module:
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(n))
    model.embed = nn.Embedding(3, 2)
    model.head = nn.Linear(2, 1)
    return model


def test_a_skip_name_keeps_that_module_and_what_lies_inside_it_only():
    assert named_by("layers.1", ["layers.1"]) and named_by("layers.1.ff", ["layers.1"])
    assert not named_by("layers.10", ["layers.1"])  # a dotted prefix, not a string prefix
    assert not named_by("encoder.head", ["head"])  # names are full paths, not suffixes


def test_select_layers_keeps_model_order_and_skips_by_name():
    model = stack(11)
    names = [name for name, _ in select_layers(model, (nn.Linear,), skip=["head", "layers.1"])]
    assert names == [f"layers.{i}" for i in range(11) if i != 1]
    both = [name for name, _ in select_layers(model, (nn.Linear, nn.Embedding), skip="head")]
    assert both[-1] == "embed" and len(both) == 12


def test_unknown_skip_names_and_empty_selections_are_refused():
    with pytest.raises(ValueError, match=r"skip names \['haed'\] match no module of Module"):
        select_layers(stack(1), (nn.Linear,), skip=["head", "haed"])
    with pytest.raises(ValueError, match="Module has no nn.Linear layer left to quantize"):
        select_layers(stack(1), (nn.Linear,), skip=["head", "layers"], action="quantize")
