"""TALC's time-aligned cross-attention on the tiny LTX-Video twin: in every block's cross-attention, changing
caption j leaves the output of every other scene's video tokens unchanged, bit for bit."""

import pytest
import torch

from cosed.config import RunConfig
from cosed.runner import resolve_run
from cosed.talc import TimeAlignedAttnProcessor, install, restore, scene_of_text, scene_of_tokens


@pytest.fixture(scope="module")
def transformer(tiny_cache):
    from cosed.backend import LocalBackend

    profile, cfg = resolve_run(RunConfig(profile="tiny-flux-ltx", cache_dir=str(tiny_cache)))
    return LocalBackend(profile, cfg).video.transformer


def test_changing_caption_j_leaves_every_other_scenes_cross_attention_output_unchanged(transformer):
    scenes, latent_frames, per_frame, per_caption = 3, 5, 4, 6
    video_scene = scene_of_tokens(latent_frames, per_frame, scenes)
    text_scene = scene_of_text(per_caption, scenes)
    assert video_scene.tolist() == [0] * 8 + [1] * 8 + [2] * 4
    generator = torch.Generator().manual_seed(0)
    blocks = transformer.transformer_blocks
    dim, text_dim = blocks[0].attn2.to_q.in_features, blocks[0].attn2.to_k.in_features
    hidden = torch.randn(1, len(video_scene), dim, generator=generator)
    text = torch.randn(1, len(text_scene), text_dim, generator=generator)
    padding = torch.zeros(1, 1, len(text_scene))
    padding[..., per_caption - 1] = -10000.0  # caption 0's last token is padding, as LTX's mask says
    replaced = install(transformer, video_scene, text_scene)
    try:
        assert all(isinstance(b.attn2.processor, TimeAlignedAttnProcessor) for b in blocks)
        assert not any(isinstance(b.attn1.processor, TimeAlignedAttnProcessor) for b in blocks)
        for block in blocks:
            with torch.no_grad():
                before = block.attn2(hidden, encoder_hidden_states=text, attention_mask=padding)
                for j in range(scenes):
                    changed = text.clone()
                    changed[:, text_scene == j] = torch.randn(1, per_caption, text_dim, generator=generator)
                    after = block.attn2(hidden, encoder_hidden_states=changed, attention_mask=padding)
                    others = video_scene != j
                    assert torch.equal(after[:, others], before[:, others])
                    assert not torch.allclose(after[:, ~others], before[:, ~others])
    finally:
        restore(transformer, replaced)
    assert not any(isinstance(b.attn2.processor, TimeAlignedAttnProcessor) for b in blocks)
    # Without the mask, every scene's tokens see caption j: the test above can fail.
    with torch.no_grad():
        plain = blocks[0].attn2(hidden, encoder_hidden_states=text)
        changed = text.clone()
        changed[:, text_scene == 1] += 1.0
        assert not torch.allclose(blocks[0].attn2(hidden, encoder_hidden_states=changed)[:, video_scene == 0],
                                  plain[:, video_scene == 0])
