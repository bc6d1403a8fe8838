"""VMAE model: shapes, masking, posterior/KL, losses, checkpoints. Run: python -m pytest tests/test_vmae.py"""

import argparse
import math

import numpy as np
import pytest
import torch

import fileio
import vmae


def tiny(img_size=32, **kw):
    torch.manual_seed(0)
    return vmae.VMAE_models['VMAE-tiny'](img_size=img_size, **kw)


def test_paper_preset_parameter_count():
    with torch.device('meta'):
        final = vmae.VMAE_models['VMAE-f8d16'](img_size=256, mask_token=False)
        stage1 = vmae.VMAE_models['VMAE-f8d16'](img_size=128, mask_token=True)
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert count(final) == 10_798_196                    # the authors' 10.80M
    assert count(stage1) == 10_798_196 + 192             # plus the mask token
    assert sum(p.numel() for p in final.state_dict().values()) == 11_191_412  # with the 256-px position tables


def test_encode_decode_shapes_and_ranges():
    model = tiny(32).eval()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = model.encode(x)
    assert posterior.mean.shape == posterior.logvar.shape == posterior.std.shape == (2, 16, 4, 4)
    assert posterior.sample().shape == (2, 16, 4, 4)
    assert torch.equal(posterior.mode(), posterior.mean)
    assert model.decode(posterior.mean).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match='built for 32x32'):
        model.encode(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match='decodes latents'):
        model.decode(torch.zeros(1, 16, 8, 8))


def test_latent_channel_layout_matches_linear_outputs():
    """encode's (B, 32, h, w) map is the to_latent output per token, row-major, channel = output index."""
    model = tiny(32).eval()
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    tokens, _, _ = model.encode_tokens(x)                        # (1, 16 tokens, 32)
    posterior = model.encode(x)
    row, col = 1, 3
    assert torch.allclose(posterior.mean[0, :, row, col], tokens[0, row * 4 + col, :16])
    assert torch.allclose(posterior.logvar[0, :, row, col], tokens[0, row * 4 + col, 16:].clamp(-30, 20))


def test_patchify_order_and_roundtrip():
    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).reshape(2, 3, 16, 16)
    patches = vmae.patchify(x, 8)
    assert patches.shape == (2, 4, 192)
    # token 1 is the top-right patch; values ordered (row p, column q, channel c), channel fastest
    p, q, c = 2, 5, 1
    assert patches[0, 1, (p * 8 + q) * 3 + c] == x[0, c, p, 8 + q]
    assert torch.equal(vmae.unpatchify(patches, 8), x)


def test_masking_keeps_and_restores_the_right_patches():
    model = tiny(32)
    x = torch.randn(3, 16, 5)
    kept, mask, ids_restore = model.random_masking(x, 0.25)
    assert kept.shape == (3, 12, 5) and mask.shape == (3, 16)
    assert torch.all(mask.sum(1) == 4)
    for b in range(3):
        visible = torch.nonzero(mask[b] == 0).flatten()
        # the kept tokens are exactly the unmasked positions (in shuffled order)
        kept_rows = {tuple(r.tolist()) for r in kept[b]}
        assert kept_rows == {tuple(x[b, i].tolist()) for i in visible.tolist()}
        # appending placeholders and gathering with ids_restore puts each kept token back in place
        filler = torch.full((16 - 12, 5), float('nan'))
        restored = torch.gather(torch.cat([kept[b], filler]), 0, ids_restore[b, :, None].expand(-1, 5))
        assert torch.equal(restored[visible], x[b, visible])
        assert torch.isnan(restored[mask[b] == 1]).all()


def test_masked_forward_decodes_every_position():
    model = tiny(32)
    recon, mask, posterior = model(torch.rand(2, 3, 32, 32) * 2 - 1, mask_ratio=0.25)
    assert recon.shape == (2, 3, 32, 32)
    assert posterior.mean.shape == (2, 12, 16)                   # latents exist for the visible tokens only
    recon.sum().backward()
    assert model.mask_token.grad.abs().sum() > 0


def test_posterior_clamp_sample_and_kl_by_hand():
    moments = torch.tensor([[0.5, -2.0, 40.0, -50.0]])           # means 0.5, -2; logvars 40 -> 20, -50 -> -30
    post = vmae.DiagonalGaussian(moments, dim=1)
    assert torch.allclose(post.logvar, torch.tensor([[20.0, -30.0]]))
    assert torch.allclose(post.std, torch.exp(torch.tensor([[10.0, -15.0]])))
    m, lv, s0 = 0.3, math.log(2e-6), 1e-3
    post = vmae.DiagonalGaussian(torch.tensor([[m, lv]]), dim=1)
    var = 2e-6
    expected_variance_only = 0.5 * (var / s0 ** 2 - 1 - math.log(var) + math.log(s0 ** 2))
    assert post.kl(1e-3).item() == pytest.approx(expected_variance_only, rel=1e-5)
    assert post.kl(1.0).item() == pytest.approx(0.5 * (var - 1 - math.log(var)), rel=1e-5)
    assert post.kl(standard=True).item() == pytest.approx(0.5 * (m ** 2 + var - 1 - math.log(var)), rel=1e-5)
    # the variance-only KL ignores the mean and is zero at std = target std
    at_target = vmae.DiagonalGaussian(torch.tensor([[5.0, math.log(1e-6)]]), dim=1)
    assert abs(at_target.kl(1e-3).item()) < 1e-5
    torch.manual_seed(0)
    samples = vmae.DiagonalGaussian(torch.tensor([[1.0, math.log(4.0)]]).expand(20000, 2), dim=1).sample()
    assert samples.mean().item() == pytest.approx(1.0, abs=0.05) and samples.std().item() == pytest.approx(2.0, abs=0.05)


def test_kl_normalisation_per_visible_token():
    torch.manual_seed(0)
    moments = torch.randn(2, 12, 32)                            # (B, N_vis, 2C)
    post = vmae.DiagonalGaussian(moments, dim=-1)
    imgs = torch.zeros(2, 3, 32, 32)
    w = vmae.LossWeights(mask=0, visible=0, perceptual=0, kl=1.0)
    loss, terms = vmae.vmae_loss(imgs, imgs, None, post, 8, w)
    logvar = moments[..., 16:].clamp(-30, 20)                   # the mean does not enter the variance-only KL
    by_hand = 0.5 * (logvar.exp() / 1e-6 - 1 - logvar + math.log(1e-6))
    assert terms['kl'].item() == pytest.approx((by_hand.sum() / (2 * 12)).item(), rel=1e-5)
    assert loss.item() == pytest.approx(terms['kl'].item(), rel=1e-6)


class FakeLPIPS(torch.nn.Module):
    def forward(self, a, b):
        return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True) + 0.125


@pytest.mark.parametrize('off', ['mask', 'visible', 'perceptual', 'kl'])
def test_each_loss_term_switches_off(off):
    torch.manual_seed(0)
    model = tiny(32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, mask, post = model(x, mask_ratio=0.25)
    full = vmae.LossWeights(mask=0.5, visible=0.5, perceptual=0.5, kl=1e-6)
    loss_full, terms = vmae.vmae_loss(x, recon, mask, post, 8, full, FakeLPIPS())
    expected = {'mask': 0.5 * terms['mse_masked'], 'visible': 0.5 * terms['mse_visible'],
                'perceptual': 0.5 * terms['lpips'], 'kl': 1e-6 * terms['kl']}
    assert loss_full.item() == pytest.approx(sum(v.item() for v in expected.values()), rel=1e-5)
    weights = vmae.LossWeights(**{**vars(full), off: 0.0})
    loss, _ = vmae.vmae_loss(x, recon, mask, post, 8, weights, FakeLPIPS())
    assert loss.item() == pytest.approx(loss_full.item() - expected[off].item(), rel=1e-5)


def test_vmae_loss_by_hand_with_unequal_weights():
    """Eq. 2 on two 16x16 images (four 8x8 patches each, row-major): the reconstruction is off by a constant
    d on each patch, so a patch's MSE is d^2 and its mean |error| is |d|. The masked patches carry the large
    errors and the weights differ (0.7 masked, 0.2 visible), so taking one set for the other changes every
    number. Expected values from the d's with plain arithmetic, not from what vmae_loss returns."""
    d = [[0.1, 0.9, 0.8, 0.2], [1.0, 0.3, -0.1, -0.7]]
    masked = [[1, 2], [0, 3]]                                       # patch indices removed in each image
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    offsets = torch.tensor(d).view(2, 1, 2, 2).repeat_interleave(8, 2).repeat_interleave(8, 3)  # patch (r, c) -> d[b][2r + c]
    recon = imgs + offsets
    mask = torch.tensor([[float(n in masked[b]) for n in range(4)] for b in range(2)])
    C, target_std = 2, 0.5
    moments = torch.tensor([[[0.3, -1.0, -1.2, 0.4], [2.0, 0.5, -2.0, -0.3]],
                            [[-0.7, 1.5, 0.1, -0.9], [0.0, 0.0, -1.5, 0.8]]])          # (B, N_visible, 2C): means || logvars
    posterior = vmae.DiagonalGaussian(moments, dim=-1)
    weights = vmae.LossWeights(mask=0.7, visible=0.2, perceptual=0.3, kl=0.01, kl_target_std=target_std)
    loss, terms = vmae.vmae_loss(imgs, recon, mask, posterior, 8, weights, FakeLPIPS())

    mse_masked = sum(d[b][n] ** 2 for b in range(2) for n in masked[b]) / 4                    # (0.81 + 0.64 + 1 + 0.49) / 4
    mse_visible = sum(d[b][n] ** 2 for b in range(2) for n in range(4) if n not in masked[b]) / 4  # (0.01 + 0.04 + 0.09 + 0.01) / 4
    lpips = sum(sum(abs(v) for v in d[b]) / 4 + 0.125 for b in range(2)) / 2                   # FakeLPIPS: mean |error| + 0.125
    kl_per_token = [sum(0.5 * (math.exp(lv) / target_std ** 2 - 1 - lv + math.log(target_std ** 2)) for lv in token[C:])
                    for image in moments.tolist() for token in image]
    kl = sum(kl_per_token) / len(kl_per_token)                                                 # summed over channels, mean over tokens
    assert (mse_masked, mse_visible) == (pytest.approx(0.735), pytest.approx(0.0375))
    assert terms['mse_masked'].item() == pytest.approx(mse_masked, rel=1e-5)
    assert terms['mse_visible'].item() == pytest.approx(mse_visible, rel=1e-5)
    assert terms['lpips'].item() == pytest.approx(lpips, rel=1e-6)
    assert terms['kl'].item() == pytest.approx(kl, rel=1e-5)
    assert loss.item() == pytest.approx(0.7 * mse_masked + 0.2 * mse_visible + 0.3 * lpips + 0.01 * kl, rel=1e-5)


def test_unmasked_loss_is_mse_over_all_pixels():
    model = tiny(32)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, mask, post = model(x, mask_ratio=0.0, sample_posterior=False)
    assert mask is None
    loss, terms = vmae.vmae_loss(x, recon, mask, post, 8, vmae.LossWeights(mask=0, visible=1, perceptual=0, kl=0))
    assert 'mse_masked' not in terms
    assert loss.item() == pytest.approx(((recon - x) ** 2).mean().item(), rel=1e-5)


def test_sincos_table_convention():
    table = vmae.get_2d_sincos_pos_embed(16, 3)[0]              # (9, 16); token = row * 3 + col
    row, col = 2, 1
    omega = 1 / 10000 ** (np.arange(4) / 4)
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    assert np.allclose(table[row * 3 + col].numpy(), expected, atol=1e-6)


def test_position_table_resize_is_bilinear_align_corners_false():
    table = torch.randn(1, 4, 2)                                 # a 2x2 grid -> 4x4
    resized = vmae.resize_pos_embed(table, 4)[0].reshape(4, 4, 2)
    grid = table[0].reshape(2, 2, 2)
    # align_corners=False: output pixel i samples input coordinate (i + 0.5) / 2 - 0.5, clamped to [0, 1]
    coord = np.clip((np.arange(4) + 0.5) / 2 - 0.5, 0, 1)
    for i in range(4):
        for j in range(4):
            y, x = coord[i], coord[j]
            top = (1 - x) * grid[0, 0] + x * grid[0, 1]
            bottom = (1 - x) * grid[1, 0] + x * grid[1, 1]
            assert torch.allclose(resized[i, j], (1 - y) * top + y * bottom, atol=1e-6)


def official_vmae_state_dict(depth=12, dim=192, grid=32, latent=16, seed=0):
    """Random weights with exactly the key names and shapes of the authors' vmaef8d16.pth
    (../shared/reference/official-checkpoint-keys.md), written out here independently of vmae.py."""
    g = torch.Generator().manual_seed(seed)
    shapes = {'pos_embed': (1, grid * grid, dim), 'decoder_pos_embed': (1, grid * grid, dim),
              'to_latent.weight': (2 * latent, dim), 'to_latent.bias': (2 * latent,),
              'from_latent.weight': (dim, latent), 'from_latent.bias': (dim,),
              'patch_embed.proj.weight': (dim, 3, 8, 8), 'patch_embed.proj.bias': (dim,),
              'norm.weight': (dim,), 'norm.bias': (dim,), 'decoder_embed.weight': (dim, dim), 'decoder_embed.bias': (dim,),
              'decoder_norm.weight': (dim,), 'decoder_norm.bias': (dim,),
              'decoder_pred.linear_pred.weight': (192, dim), 'decoder_pred.linear_pred.bias': (192,),
              'decoder_pred.conv_smoother.weight': (3, 3, 3, 3), 'decoder_pred.conv_smoother.bias': (3,)}
    for prefix in ('blocks', 'decoder_blocks'):
        for i in range(depth):
            b = f'{prefix}.{i}.'
            shapes.update({b + 'norm1.weight': (dim,), b + 'norm1.bias': (dim,), b + 'attn.qkv.weight': (3 * dim, dim),
                           b + 'attn.qkv.bias': (3 * dim,), b + 'attn.proj.weight': (dim, dim), b + 'attn.proj.bias': (dim,),
                           b + 'norm2.weight': (dim,), b + 'norm2.bias': (dim,), b + 'mlp.fc1.weight': (4 * dim, dim),
                           b + 'mlp.fc1.bias': (4 * dim,), b + 'mlp.fc2.weight': (dim, 4 * dim), b + 'mlp.fc2.bias': (dim,)})
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def test_authors_checkpoint_loads_strictly(tmp_path):
    sd = official_vmae_state_dict()
    assert len(sd) == 306 and sum(v.numel() for v in sd.values()) == 11_191_412
    path = tmp_path / 'vmaef8d16.pth'
    # their files carry training args as an argparse.Namespace and the LPIPS weights; both are tolerated
    torch.save({'model': {**sd, 'perceptual_loss.lin0.model.1.weight': torch.zeros(1, 64, 1, 1)},
                'args': argparse.Namespace(input_size=256), 'epoch': 9}, path)
    model = vmae.load_vmae(str(path))
    assert not model.training and model.img_size == 256 and model.mask_token is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.rand(1, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        assert model.decode(model.encode(x).mean).shape == (1, 3, 256, 256)


def test_stage1_checkpoint_moves_to_256_px(tmp_path):
    """A 128-px checkpoint (16x16 tables, with mask token) loads at 256 px with bilinearly resized tables."""
    sd = official_vmae_state_dict(grid=16)
    sd['mask_token'] = torch.randn(1, 1, 192)
    path = tmp_path / 'checkpoint-90.pth'
    torch.save({'model': sd}, path)
    assert vmae.load_vmae(str(path)).img_size == 128
    model = vmae.load_vmae(str(path), img_size=256)
    assert model.pos_embed.shape == (1, 1024, 192)
    assert torch.allclose(model.pos_embed, vmae.resize_pos_embed(sd['pos_embed'], 32))
    assert torch.allclose(model.decoder_pos_embed, vmae.resize_pos_embed(sd['decoder_pos_embed'], 32))


def test_own_checkpoint_roundtrip(tmp_path):
    model = tiny(32, mask_token=True)
    path = tmp_path / 'last.pt'
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': model.args, 'model': model.state_dict(), 'step': 3}, path)
    loaded = vmae.load_vmae(str(path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).mean, model.eval().encode(x).mean)


def test_wrong_files_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'):
        vmae.load_vmae(str(tmp_path / 'missing.pt'))
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='not a PyTorch checkpoint'):
        vmae.load_vmae(str(tmp_path / 'junk.pt'))
    torch.save({'kind': 'dit', 'model': {}, 'ema': {}}, tmp_path / 'dit.pt')
    with pytest.raises(ValueError, match="not a VMAE checkpoint.*kind 'dit'"):
        vmae.load_vmae(str(tmp_path / 'dit.pt'))
    torch.save({'state_dict': {'encoder.conv_in.weight': torch.zeros(1)}}, tmp_path / 'sdvae.pt')
    with pytest.raises(ValueError, match='not a VMAE checkpoint'):
        vmae.load_vmae(str(tmp_path / 'sdvae.pt'))


def test_checkpoints_never_run_code(tmp_path):
    """A pickle whose loading would create a file: refused, and the file was never made (by the plain reader
    or by load_vmae, whose file looks like a VMAE checkpoint)."""
    marker = tmp_path / 'ran'

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    torch.save({'model': Evil()}, tmp_path / 'evil.pt')
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': {}, 'model': {'to_latent.weight': Evil()}}, tmp_path / 'evil_vmae.pt')
    with pytest.raises(ValueError, match='read safely'):
        fileio.read_checkpoint(str(tmp_path / 'evil.pt'))
    with pytest.raises(ValueError, match='read safely'):
        vmae.load_vmae(str(tmp_path / 'evil_vmae.pt'))
    assert not marker.exists()


def test_lpips_without_vgg_weights_explains_what_to_do(monkeypatch):
    import lpips

    def no_download(*args, **kwargs):
        raise RuntimeError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    monkeypatch.setattr(lpips, 'LPIPS', no_download)
    with pytest.raises(FileNotFoundError, match=r'vgg16-397923af\.pth.*perceptual_weight 0'):
        vmae.lpips_vgg(pretrained=True)


def test_lpips_random_backbone_offline():
    net = vmae.lpips_vgg(pretrained=False)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(x, x).abs().max().item() < 1e-6
    assert (net(x, -x) > 0).all()
