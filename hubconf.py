"""torch.hub entry points: ``torch.hub.load("<owner>/dinov2", "dinov2_vitl14")``."""

dependencies = ["torch"]

from dinov2.hub.backbones import (  # noqa: E402
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
)
from dinov2.hub.classifiers import (  # noqa: E402
    dinov2_vitb14_lc,
    dinov2_vitb14_reg_lc,
    dinov2_vitg14_lc,
    dinov2_vitg14_reg_lc,
    dinov2_vitl14_lc,
    dinov2_vitl14_reg_lc,
    dinov2_vits14_lc,
    dinov2_vits14_reg_lc,
)
