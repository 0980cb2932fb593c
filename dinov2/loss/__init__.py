"""Self-distillation objectives: DINO (class token), iBOT (masked patches) and the KoLeo regulariser."""

from dinov2.loss.centering import CenterEMA, sinkhorn_knopp, softmax_center
from dinov2.loss.dino_clstoken_loss import DINOLoss
from dinov2.loss.ibot_patch_loss import iBOTPatchLoss
from dinov2.loss.koleo_loss import KoLeoLoss

__all__ = ["CenterEMA", "DINOLoss", "KoLeoLoss", "iBOTPatchLoss", "sinkhorn_knopp", "softmax_center"]
