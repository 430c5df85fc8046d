"""Small random-weight backbones of each kind the package supports, for fast tests."""
import timm
from avalanche.models import SimpleMLP
from timm.models.resnet import BasicBlock, ResNet


def mlp():
    return SimpleMLP(num_classes=2, input_size=64, hidden_size=128, hidden_layers=2, drop_rate=0)


def vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=8, patch_size=2, embed_dim=32,
                             depth=2, num_heads=2, num_classes=2)


def swin():
    return timm.create_model("swin_tiny_patch4_window7_224", img_size=16, patch_size=2,
                             window_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                             num_classes=2)


def resnet():
    """A ResNet with BatchNorm (timm's, narrow)."""
    return ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 32, 64), stem_width=16,
                  num_classes=2)


BACKBONES = {"mlp": mlp, "vit": vit, "swin": swin, "resnet": resnet}
# split_digits arguments per backbone kind: 8x8 digits, 3 channels for image backbones,
# 16x16 for Swin (its windows need more tokens)
DIGITS_KW = {"mlp": {}, "vit": dict(channels=3), "swin": dict(image_size=16, channels=3),
             "resnet": dict(channels=3)}
