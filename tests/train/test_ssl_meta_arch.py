import copy
import math
from functools import partial

import pytest
import torch

from dinov2.checkpoint import adapt_backbone_state_dict
from dinov2.models import vision_transformer
from dinov2.train.ssl_meta_arch import SSLMetaArch
from dinov2.utils.config import default_config_with

B, N_LOCAL, PATCH, GLOBAL, LOCAL, K = 4, 2, 4, 16, 8, 32
N_PATCHES = (GLOBAL // PATCH) ** 2


@pytest.fixture(autouse=True)
def _tiny_arch(monkeypatch):
    tiny = partial(vision_transformer.DinoVisionTransformer, embed_dim=32, depth=2, num_heads=2)
    monkeypatch.setitem(vision_transformer.ARCHS, "vit_test", tiny)


def _cfg(**sections):
    base = {
        "student": {"arch": "vit_test", "patch_size": PATCH, "drop_path_rate": 0.0},
        "crops": {"global_crops_size": GLOBAL, "local_crops_size": LOCAL, "local_crops_number": N_LOCAL},
        "dino": {"head_n_prototypes": K, "head_hidden_dim": 24, "head_bottleneck_dim": 16},
        "ibot": {"head_n_prototypes": K, "head_hidden_dim": 24, "head_bottleneck_dim": 16},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return default_config_with(base)


def _batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(2 * B, N_PATCHES, dtype=torch.bool)
    for i, count in enumerate([3, 5, 1, 8]):  # half of the global crops masked, different counts
        masks[i, torch.randperm(N_PATCHES, generator=gen)[:count]] = True
    indices = masks.flatten().nonzero().flatten()

    def crops(n, size):  # noise plus a colour cast per crop, so that features differ between crops
        return torch.randn(n, 3, size, size, generator=gen) + 3 * torch.randn(n, 3, 1, 1, generator=gen)

    return {
        "collated_global_crops": crops(2 * B, GLOBAL),
        "collated_local_crops": crops(N_LOCAL * B, LOCAL),
        "collated_masks": masks,
        "mask_indices_list": indices,
        "masks_weight": (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks],
        "n_masked_patches": torch.tensor([len(indices)]),
        "upperbound": len(indices),
    }


def _ce(teacher_probs, student_scores, temp=0.1):
    """-sum_k t_k log softmax(s / temp)_k for one pair of vectors, float64."""
    s = student_scores.double() / temp
    log_probs = s - torch.logsumexp(s, dim=-1)
    return -(teacher_probs.double() * log_probs).sum().item()


def _koleo(features):
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    total = 0.0
    for i in range(len(x)):
        nearest = min((x[i] - x[j]).norm().item() for j in range(len(x)) if j != i)
        total += -math.log(nearest + 1e-8)
    return total / len(x)


@torch.no_grad()
def _expected_losses(model, batch, teacher_temp, n_local=N_LOCAL):
    """Every loss term of the first step (centres still zero) from plain loops."""
    t_out = model.teacher.backbone.forward_features(batch["collated_global_crops"])
    t_cls = t_out["x_norm_clstoken"]
    t_probs = torch.softmax(model.teacher.dino_head(t_cls).double() / teacher_temp, dim=-1)  # per crop row
    g_out = model.student.backbone.forward_features(batch["collated_global_crops"], masks=batch["collated_masks"])
    s_global = model.student.dino_head(g_out["x_norm_clstoken"])
    if n_local:
        s_local = model.student.dino_head(model.student.backbone(batch["collated_local_crops"]))
    n_terms = 2 * 1 + 2 * n_local

    local = global_ = 0.0
    for img in range(B):
        for tc in range(2):  # teacher global crop tc of image img
            target = t_probs[tc * B + img]
            for lc in range(n_local):
                local += _ce(target, s_local[lc * B + img]) / B
            global_ += _ce(target, s_global[(1 - tc) * B + img]) / B  # the other view only

    masks = batch["collated_masks"]
    t_patch = model.teacher.ibot_head(t_out["x_norm_patchtokens"][masks])
    s_patch = model.student.ibot_head(g_out["x_norm_patchtokens"][masks])
    t_patch_probs = torch.softmax(t_patch.double() / teacher_temp, dim=-1)
    ibot, row = 0.0, 0
    for img in range(2 * B):
        count = int(masks[img].sum())
        for _ in range(count):
            ibot += _ce(t_patch_probs[row], s_patch[row]) / count
            row += 1
    koleo = sum(_koleo(c) for c in g_out["x_norm_clstoken"].chunk(2))
    expected = {
        "dino_local_crops_loss": local / n_terms,
        "dino_global_crops_loss": global_ / n_terms,
        "koleo_loss": koleo,
        "ibot_loss": ibot / (2 * B),
    }
    if not n_local:
        del expected["dino_local_crops_loss"]
    return expected


def test_loss_terms_match_plain_computation():
    # LayerScale 1.0: at the recipe's 1e-5 every block starts as an identity and all images give one feature.
    model = SSLMetaArch(_cfg(student={"layerscale": 1.0})).train()
    with torch.no_grad():  # distinct student and teacher weights make a mix-up of views visible
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = _batch()
    scores = model.teacher.dino_head(model.teacher.backbone(batch["collated_global_crops"]))
    assert scores.std(dim=0).mean() > 0.1 * scores.std()  # targets differ between crops, so a swap would show
    out = model(batch, teacher_temp=0.07)
    expected = _expected_losses(model, batch, 0.07)
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, rel=1e-4), name
    total = expected["dino_local_crops_loss"] + expected["dino_global_crops_loss"]
    total += 0.1 * expected["koleo_loss"] + expected["ibot_loss"]
    assert out["loss"].item() == pytest.approx(total, rel=1e-4)


def test_no_local_crops_gives_the_global_terms_only():
    """crops.local_crops_number=0: the collate's empty local-crop tensor is not fed to the student,
    and the DINO loss averages the 2 global-crop pair terms alone."""
    model = SSLMetaArch(_cfg(student={"layerscale": 1.0}, crops={"local_crops_number": 0})).train()
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    batch = {**_batch(), "collated_local_crops": torch.empty(0)}  # what the collate gives without local crops
    out = model(batch, teacher_temp=0.07)
    expected = _expected_losses(model, batch, 0.07, n_local=0)
    assert set(out) == {"loss", *expected}
    for name, value in expected.items():
        assert out[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name
    out["loss"].backward()
    assert model.student.dino_head.mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("separate_head", [True, False])
def test_no_local_crops_trains_with_either_head_layout(separate_head):
    model = SSLMetaArch(_cfg(crops={"local_crops_number": 0}, ibot={"separate_head": separate_head})).train()
    out = model({**_batch(), "collated_local_crops": torch.empty(0)}, teacher_temp=0.07)
    assert "dino_local_crops_loss" not in out and torch.isfinite(out["loss"])
    out["loss"].backward()


@pytest.mark.parametrize("centering", ["centering", "sinkhorn_knopp"])
@pytest.mark.parametrize("separate_head", [True, False])
def test_forward_modes_are_finite_and_differentiable(centering, separate_head):
    model = SSLMetaArch(_cfg(train={"centering": centering}, ibot={"separate_head": separate_head})).train()
    assert ("ibot_head" in model.student) == separate_head
    out = model(_batch(), teacher_temp=0.04)
    assert set(out) == {"loss", "dino_local_crops_loss", "dino_global_crops_loss", "koleo_loss", "ibot_loss"}
    assert all(torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    assert model.student.backbone.cls_token.grad is not None


def test_zero_weight_terms_are_not_computed():
    model = SSLMetaArch(_cfg(dino={"koleo_loss_weight": 0.0}, ibot={"loss_weight": 0.0}))
    calls = []
    model.koleo_loss.register_forward_hook(lambda *a: calls.append("koleo"))
    model.ibot_patch_loss.register_forward_hook(lambda *a: calls.append("ibot"))
    out = model(_batch(), teacher_temp=0.04)
    assert set(out) == {"loss", "dino_local_crops_loss", "dino_global_crops_loss"}
    assert calls == [] and "ibot_head" not in model.student


@pytest.mark.parametrize(
    "sections, message",
    [
        (
            {"dino": {"loss_weight": 0.0, "koleo_loss_weight": 0.0}, "ibot": {"loss_weight": 0.0}},
            "every loss term is off",
        ),
        ({"ibot": {"loss_weight": -1.0}}, "ibot.loss_weight must be a number >= 0"),
        ({"dino": {"koleo_loss_weight": float("nan")}}, "dino.koleo_loss_weight must be a number >= 0"),
        ({"dino": {"loss_weight": True}}, "dino.loss_weight must be a number >= 0"),  # a YAML true is no weight
    ],
)
def test_loss_weights_that_train_nothing_or_are_negative_are_named(sections, message):
    # Before: all-zero weights built a model whose total loss was the integer 0 (the loop then failed on
    # 'int' object has no attribute 'detach'); a negative or NaN weight silently turned its term off.
    with pytest.raises(ValueError, match=message):
        SSLMetaArch(_cfg(**sections))


def test_gradients_reach_only_their_heads_and_never_the_teacher():
    model = SSLMetaArch(_cfg()).train()
    out = model(_batch(), teacher_temp=0.04)

    def grads(loss):
        params = dict(model.student.named_parameters(), **{f"T.{k}": v for k, v in model.teacher.named_parameters()})
        trainable = {k: v for k, v in params.items() if v.requires_grad}
        got = torch.autograd.grad(loss, list(trainable.values()), retain_graph=True, allow_unused=True)
        return {k: g is not None and g.abs().sum() > 0 for k, g in zip(trainable, got)}

    assert not any(p.requires_grad for p in model.teacher.parameters())
    dino = grads(out["dino_local_crops_loss"] + out["dino_global_crops_loss"])
    ibot = grads(out["ibot_loss"])
    koleo = grads(out["koleo_loss"])
    for name in dino:
        if name.startswith("ibot_head."):
            assert not dino[name] and not koleo[name], name
        if name.startswith("dino_head."):
            assert not ibot[name] and not koleo[name], name
    assert dino["dino_head.mlp.0.weight"] and ibot["ibot_head.mlp.0.weight"] and koleo["backbone.cls_token"]


def test_update_teacher_is_an_exact_ema():
    model = SSLMetaArch(_cfg())
    with torch.no_grad():
        for p in model.student.parameters():
            p.add_(torch.randn_like(p))
    before_t = {k: v.clone() for k, v in model.teacher.state_dict().items()}
    student = {k: v.clone() for k, v in model.student.state_dict().items()}
    model.update_teacher(0.9)
    for key, value in model.teacher.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before_t[key] + 0.1 * student[key], rtol=0, atol=1e-6)


def test_repeated_steps_on_a_fixed_batch_reduce_the_loss():
    torch.manual_seed(0)
    model = SSLMetaArch(_cfg()).train()
    optimizer = torch.optim.AdamW([p for p in model.student.parameters() if p.requires_grad], lr=1e-3)
    batch = _batch()
    losses = []
    for _ in range(15):
        out = model(batch, teacher_temp=0.04)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        model.update_teacher(0.99)
        losses.append(out["loss"].item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_pretrained_weights_start_student_and_teacher(tmp_path):
    # A chunked source (blocks.{chunk}.{i}.) in a training-checkpoint layout, loaded into flat blocks.
    source = vision_transformer.ARCHS["vit_test"](patch_size=PATCH, img_size=GLOBAL, init_values=1e-5, block_chunks=2)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_()
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "t.pth")
    model = SSLMetaArch(_cfg(student={"pretrained_weights": str(tmp_path / "t.pth")}))
    flat, _ = adapt_backbone_state_dict(source.state_dict())
    assert flat.keys() == model.student.backbone.state_dict().keys()
    for key, value in flat.items():
        assert torch.equal(model.student.backbone.state_dict()[key], value)
        assert torch.equal(model.teacher.backbone.state_dict()[key], value)


def test_bad_centering_name():
    with pytest.raises(ValueError, match="train.centering='softmax'; valid: centering, sinkhorn_knopp"):
        SSLMetaArch(_cfg(train={"centering": "softmax"}))


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"ibot": {"mask_sample_probability": 0.0}}, r"ibot\.mask_sample_probability=0\.0"),
        ({"ibot": {"mask_ratio_min_max": [0.0, 0.0]}}, r"ibot\.mask_ratio_min_max=\[0\.0, 0\.0\]"),
        # 2 global crops x 4 images x 0.1 = 0.8 crops: the collate masks int(0.8) = 0 of them
        ({"ibot": {"mask_sample_probability": 0.1}, "train": {"batch_size_per_gpu": 4}}, r"0 of the 8 global crops"),
    ],
)
def test_ibot_without_any_masked_crop_is_refused(sections, message):
    # Before: the model trained with an iBOT term that was 0 at every step (its head never got a
    # gradient), reported as ibot_loss 0; the original refuses a mask probability or ratio of 0.
    with pytest.raises(ValueError, match=message) as error:
        SSLMetaArch(_cfg(**sections))
    assert "ibot.loss_weight=0" in str(error.value)  # the way to turn iBOT off
    sections["ibot"]["loss_weight"] = 0.0  # iBOT off: nothing to mask for
    assert "ibot_head" not in SSLMetaArch(_cfg(**sections)).student


def test_ibot_with_one_masked_crop_per_batch_builds():
    # 2 x 2 images x 0.25 = 1 masked crop per batch: enough for the term
    model = SSLMetaArch(_cfg(ibot={"mask_sample_probability": 0.25}, train={"batch_size_per_gpu": 2}))
    assert model.do_ibot


@pytest.mark.parametrize("probability, warned", [(0.5, True), (0.0, False)])
def test_ibot_off_with_masking_on_says_the_student_crops_are_still_masked(caplog, probability, warned):
    # With iBOT off the collate still masks ibot.mask_sample_probability of the global crops and the
    # student sees them masked (as in the original), so a "DINO alone" ablation silently trains DINO
    # on masked crops; the build says so, naming the key that turns the masking off.
    cfg = _cfg(ibot={"loss_weight": 0.0, "mask_sample_probability": probability})
    with caplog.at_level("WARNING", logger="dinov2"):
        model = SSLMetaArch(cfg).train()
    assert ("ibot.mask_sample_probability=0 " in caplog.text) is warned, caplog.text
    # the warning is true: the masks of the batch do change what the student's DINO head sees
    batch = _batch()
    masked = model._student_outputs(batch)["global_scores"]
    unmasked = model._student_outputs({**batch, "collated_masks": torch.zeros_like(batch["collated_masks"])})
    assert not torch.allclose(masked, unmasked["global_scores"])
    caplog.clear()
    with caplog.at_level("WARNING", logger="dinov2"):
        SSLMetaArch(_cfg(ibot={"mask_sample_probability": probability or 0.5}))  # iBOT on: masks are its input
    assert "mask_sample_probability" not in caplog.text


# ----------------------------------------------------------------------------- found by a mutation audit
def test_train_mode_leaves_the_teacher_in_eval_mode():
    model = SSLMetaArch(_cfg(student={"drop_path_rate": 0.3})).train()
    assert all(m.training for m in model.student.modules())
    assert not any(m.training for m in model.teacher.modules())  # no stochastic depth in the targets


def test_a_shared_head_scores_patches_against_the_dino_prototypes():
    # ibot.separate_head=false: the iBOT targets come from the DINO head, so the iBOT centre has the DINO
    # head's prototype count whatever ibot.head_n_prototypes says
    model = SSLMetaArch(_cfg(ibot={"separate_head": False, "head_n_prototypes": 2 * K}))
    out = model(_batch(), teacher_temp=0.04)
    assert model.ibot_patch_loss.center.shape[-1] == K and torch.isfinite(out["ibot_loss"])


def test_pretrained_weights_reach_the_teacher_backbone_in_the_seeded_initialisation(tmp_path):
    from safetensors.torch import save_file

    source = SSLMetaArch(_cfg())
    torch.manual_seed(11)
    weights = {k: torch.randn_like(v) for k, v in source.student.backbone.state_dict().items()}
    save_file(weights, tmp_path / "backbone.safetensors")
    model = SSLMetaArch(_cfg(student={"pretrained_weights": str(tmp_path / "backbone.safetensors")}))
    model.init_weights(seed=3)
    for name, value in model.teacher.backbone.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=name)


def test_apply_center_updates_folds_the_pending_ibot_update_into_its_centre():
    model = SSLMetaArch(_cfg())
    batch = _batch()
    with torch.no_grad():
        patches = model.teacher.backbone(batch["collated_global_crops"], is_training=True)["x_norm_patchtokens"]
        scores = model.teacher.ibot_head(patches.flatten(0, 1)[batch["mask_indices_list"]])
    momentum = model.ibot_patch_loss.center_momentum
    expected = momentum * model.ibot_patch_loss.center + (1 - momentum) * scores.mean(dim=0)
    model(batch, teacher_temp=0.04)
    model.apply_center_updates()
    torch.testing.assert_close(model.ibot_patch_loss.center, expected.reshape(model.ibot_patch_loss.center.shape))


def test_the_ibot_term_weights_each_masked_token_by_the_collates_masks_weight():
    # The collate's per-token weights (1 / masked patches of the token's image) are what the term uses:
    # doubling them doubles the term.
    model = SSLMetaArch(_cfg())
    twin = copy.deepcopy(model)  # each forward moves the centres: both see the same ones
    batch = _batch()
    with torch.no_grad():
        base = model(batch, teacher_temp=0.04)["ibot_loss"]
        doubled = twin(dict(batch, masks_weight=2 * batch["masks_weight"]), teacher_temp=0.04)["ibot_loss"]
    torch.testing.assert_close(doubled, 2 * base)


def test_a_shared_head_without_the_dino_term_is_refused():
    # ibot.separate_head=false scores the patches with the DINO head, which is not built when DINO is off
    with pytest.raises(ValueError, match=r"ibot\.separate_head=false shares the DINO head.*dino\.loss_weight > 0"):
        SSLMetaArch(_cfg(dino={"loss_weight": 0.0}, ibot={"separate_head": False}))
    assert "ibot_head" in SSLMetaArch(_cfg(dino={"loss_weight": 0.0}, ibot={"separate_head": True})).student


def test_a_mask_ratio_range_starting_at_zero_still_masks_and_builds():
    # the collate draws each masked crop's ratio in [min, max]: only a maximum of 0 masks nothing
    model = SSLMetaArch(_cfg(ibot={"mask_ratio_min_max": [0.0, 0.5]}))
    assert model.do_ibot and "ibot_head" in model.student
