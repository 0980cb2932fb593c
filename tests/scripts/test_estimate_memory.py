"""scripts/estimate_memory.py: its parameter and state arithmetic against counts written out by hand
for a small model (meta-device builds, nothing allocated), and the JSON it writes."""

from __future__ import annotations

import json

import pytest

from dinov2.utils.config import load_config

SMALL = ["student.depth=2", "student.num_register_tokens=2", "dino.head_nlayers=3", "ibot.head_nlayers=2"]


@pytest.fixture(scope="module")
def memory(script):
    return script("estimate_memory.py", "estimate_memory")


def vit_parameters(d: int, depth: int, patch: int, image: int, registers: int) -> int:
    """ViT with LayerScale and a 4x GELU MLP: patch embedding, CLS / registers / mask token, position
    embedding of CLS + the patch grid, per block two LayerNorms, qkv, proj, fc1, fc2 (all with bias) and
    two LayerScales, then the final LayerNorm."""
    h = 4 * d
    block = 2 * (2 * d) + (3 * d * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d) + 2 * d
    tokens = d + registers * d + d + (1 + (image // patch) ** 2) * d
    return (3 * patch * patch * d + d) + tokens + depth * block + 2 * d


def head_parameters(d: int, section) -> int:
    """MLP (with biases) d -> hidden (x nlayers - 1) -> bottleneck, then the weight-normalised
    prototype layer: v (K x bottleneck) and g (K)."""
    widths = [d] + [section.head_hidden_dim] * (section.head_nlayers - 1) + [section.head_bottleneck_dim]
    mlp = sum(a * b + b for a, b in zip(widths[:-1], widths[1:]))
    return mlp + section.head_n_prototypes * section.head_bottleneck_dim + section.head_n_prototypes


def test_parameter_counts_and_state_per_gpu_by_hand(memory):
    cfg = load_config("quickstart", SMALL)
    s = cfg.student
    backbone = vit_parameters(s.embed_dim, s.depth, s.patch_size, cfg.crops.global_crops_size, 2)
    dino, ibot = head_parameters(s.embed_dim, cfg.dino), head_parameters(s.embed_dim, cfg.ibot)
    counts = memory.count_parameters(cfg)
    assert counts["student_backbone"] == counts["teacher_backbone"] == backbone
    assert counts["student_dino_head"] == dino and counts["student_ibot_head"] == ibot
    assert counts["student"] == counts["teacher"] == counts["student_trainable"] == backbone + dino + ibot
    block = (backbone - vit_parameters(s.embed_dim, 0, s.patch_size, cfg.crops.global_crops_size, 2)) // s.depth
    assert counts["largest_backbone_unit"] == block

    n = backbone + dino + ibot
    # fp32 student + teacher, fp32 gradients, two fp32 AdamW moments: 4 (2 n + n + 2 n) bytes, sharded over 8
    state = memory.state_bytes(counts, 8, "FULL_SHARD")
    assert state["total"] == 4 * 5 * n / 8 and state["adamw"] == 8 * n / 8
    assert memory.state_bytes(counts, 8, "NO_SHARD")["total"] == 4 * 5 * n
    # FULL_SHARD holds two gathered units at a time (the largest of a block and a head), bf16
    assert memory.gathered_bytes(counts, 8, "FULL_SHARD", 2) == 2 * 2 * max(block, dino, ibot)
    assert memory.gathered_bytes(counts, 8, "SHARD_GRAD_OP", 2) == 2 * n
    assert memory.gathered_bytes(counts, 1, "FULL_SHARD", 2) == 0.0


def test_skip_activations_writes_the_report(memory, tmp_path):
    output = tmp_path / "memory.json"
    argv = ["--configs", "quickstart", "--world-sizes", "8", "--skip-activations", "--output", str(output)]
    report = memory.main(argv)
    saved = json.loads(output.read_text())
    assert saved["git_commit"] and saved["torch"] and saved["recipes"][0]["config"] == "quickstart"
    state = saved["recipes"][0]["sharding"]["FULL_SHARD"]["8"]["total"]
    assert state == report["recipes"][0]["sharding"]["FULL_SHARD"]["8"]["total"] > 0


@pytest.mark.parametrize("argv", [["--world-sizes", "8", "0"], ["--batch-images", "-1"]])
def test_bad_arguments_fail_with_a_message_naming_them(memory, capsys, argv):
    """--world-sizes 0 used to end in a ZeroDivisionError in the state arithmetic."""
    with pytest.raises(SystemExit) as stopped:
        memory.parse_args(argv)
    assert stopped.value.code == 2 and argv[0] in capsys.readouterr().err
