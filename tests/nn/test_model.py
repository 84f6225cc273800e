"""SKCDFNet: shapes, flows, the SKCM's modes, and construction errors."""

from __future__ import annotations

import pytest
import torch

from skcdf.nn import SKCDFNet

TINY = dict(filters=2, num_classes=3)


def tiny(patch=(32, 32, 32), **kwargs) -> SKCDFNet:
    torch.manual_seed(0)
    return SKCDFNet(patch_size=patch, **{**TINY, **kwargs})


@pytest.mark.parametrize("patch", [(32, 32, 32), (32, 64, 96), (64, 32, 32)])
@pytest.mark.parametrize("n_labeled,n_unlabeled", [(1, 1), (2, 2), (1, 3), (3, 1)])
def test_output_shapes_for_both_flows(patch, n_labeled, n_unlabeled):
    model = tiny(patch)
    x = torch.randn(n_labeled + n_unlabeled, 1, *patch)
    main, aux = model(x, "labeled", n_labeled=n_labeled)
    assert main.shape == aux.shape == (n_labeled + n_unlabeled, 3, *patch)
    main, aux = model(x[n_labeled:], "unlabeled")
    assert main.shape == aux.shape == (n_unlabeled, 3, *patch)
    main, _ = model.forward_labeled_decoder(x[:1])
    assert main.shape == (1, 3, *patch)


@pytest.mark.parametrize("heads", [1, 3])
def test_heads_and_input_channels_are_free(heads):
    model = tiny((32, 32, 32), num_heads=heads, in_channels=2)
    assert model(torch.randn(2, 2, 32, 32, 32), "unlabeled")[0].shape == (2, 3, 32, 32, 32)


def test_without_aux_heads_aux_is_none_and_shared_decoder_is_one_module():
    model = tiny(aux_heads=False, shared_decoder=True, skcm=False)
    main, aux = model(torch.randn(2, 1, 16, 32, 48), "labeled")  # no SKCM: any size divisible by 16
    assert aux is None and main.shape == (2, 3, 16, 32, 48)
    assert model.unlabeled_decoder is model.labeled_decoder
    assert not any(k.startswith("unlabeled_decoder") for k in model.state_dict())


def test_paper_configuration_has_the_reference_parameter_count():
    # The reference's 50,917,320 less its unused map_in convolutions.
    model = SKCDFNet(in_channels=1, num_classes=14, filters=32, patch_size=(64, 128, 128), num_heads=2)
    assert sum(p.numel() for p in model.parameters()) == 50_851_456


@pytest.mark.parametrize("patch,skcm,rule", [
    ((30, 32, 32), False, "divisible by 16"),
    ((48, 32, 32), True, "divisible by 32"),
    ((32, 32), True, "three positive sizes"),
])
def test_impossible_patch_is_rejected_at_construction(patch, skcm, rule):
    with pytest.raises(ValueError, match=rule):
        SKCDFNet(patch_size=patch, skcm=skcm, **TINY)


def test_input_of_another_size_than_the_skcm_was_built_for_is_rejected():
    with pytest.raises(ValueError, match="built for patch"):
        tiny((32, 32, 32))(torch.randn(1, 1, 32, 32, 64))


def test_cross_mode_labeled_outputs_get_no_gradient_from_unlabeled_inputs():
    model = tiny((32, 32, 32)).eval()  # eval: BatchNorm statistics do not couple the halves
    x = torch.randn(4, 1, 32, 32, 32, requires_grad=True)
    main, aux = model(x, "labeled", n_labeled=2)
    (main[:2].sum() + aux[:2].sum()).backward()
    assert x.grad[2:].abs().max() == 0
    assert x.grad[:2].abs().max() > 0


def test_cross_mode_mixes_information_between_the_halves():
    model = tiny((32, 32, 32)).eval()
    x = torch.randn(4, 1, 32, 32, 32)
    y = x.clone()
    y[3] = torch.randn(1, 32, 32, 32)
    with torch.no_grad():
        # labeled outputs depend on the unlabeled samples (keys/values) ...
        assert not torch.allclose(model(x, "labeled", 2)[0][:2], model(y, "labeled", 2)[0][:2])
        # ... but not on their order: all unlabeled channels form one pool of keys
        swapped = x[[0, 1, 3, 2]]
        torch.testing.assert_close(model(x, "labeled", 2)[0][:2], model(swapped, "labeled", 2)[0][:2])


def test_self_mode_on_a_batch_equals_each_sample_alone():
    model = tiny((32, 32, 64), num_heads=2).eval()
    x = torch.randn(3, 1, 32, 32, 64)
    with torch.no_grad():
        batch = model(x, "unlabeled")[0]
        single = torch.cat([model(x[i:i + 1], "unlabeled")[0] for i in range(3)])
    torch.testing.assert_close(batch, single, rtol=1e-5, atol=1e-5)


def test_labeled_decoder_inference_pairs_each_window_with_itself():
    model = tiny((32, 32, 32)).eval()
    x = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        paired = model.forward_labeled_decoder(x)[0]
        for i in range(2):
            cross = model(torch.cat([x[i:i + 1], x[i:i + 1]]), "labeled", n_labeled=1)[0][:1]
            torch.testing.assert_close(paired[i:i + 1], cross, rtol=1e-5, atol=1e-5)


def test_dropout_switch_controls_training_randomness():
    x = torch.randn(2, 1, 32, 32, 32)
    for dropout, same in ((False, True), (True, False)):
        model = tiny((32, 32, 32), dropout=dropout).train()
        with torch.no_grad():
            a, b = model(x, "unlabeled")[0], model(x, "unlabeled")[0]
        assert torch.equal(a, b) is same
