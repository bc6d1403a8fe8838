"""ConvAE (the SD3-style KL autoencoder) and the SD-VAE training pieces: layout, diffusers key names,
loading (ours, the authors', diffusers folders), wrong files, PatchGAN, losses. Run: python -m pytest tests/test_convae.py"""

import argparse
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import fileio
from paper import convae


def tiny(img_size=32, **kw):
    torch.manual_seed(0)
    return convae.ConvAE_models['ConvAE-tiny'](img_size=img_size, **kw)


def one_line_error(excinfo):
    assert '\n' not in str(excinfo.value)
    return str(excinfo.value)


def test_shapes_posterior_and_sizes():
    model = tiny().eval()
    assert (model.img_size, model.grid, model.patch_size, model.latent_dim) == (32, 4, 8, 16)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        moments = model.encoder(x)                                   # (2, 32, 4, 4)
        post = model.encode(x)
        assert moments.shape == (2, 32, 4, 4)
        assert torch.equal(post.mean, moments[:, :16]) and torch.equal(post.logvar, moments[:, 16:])  # mean first
        recon, train_post = model(x)
        assert recon.shape == (2, 3, 32, 32) and train_post.mean.shape == (2, 16, 4, 4)
        assert torch.equal(model(x, sample_posterior=False)[0], model.decode(post.mode()))
        # the network is convolutional: other multiples of 8 work, rectangles too
        assert model.encode(torch.zeros(1, 3, 32, 48)).mean.shape == (1, 16, 4, 6)
        assert model.decode(torch.zeros(1, 16, 2, 3)).shape == (1, 3, 16, 24)
        model.encoder.conv_out.bias[16:] = 100.0                     # log-variances far above the clamp
        assert torch.all(model.encode(x).logvar == 20.0)
        # the posterior is fp32 whatever the model's dtype; decode follows the model
        assert model.double().decode(post.mode()).dtype == torch.float64
    with pytest.raises(ValueError) as e:
        model.encode(torch.zeros(1, 3, 33, 32))
    assert 'multiples of 8' in one_line_error(e)
    with pytest.raises(ValueError, match='decodes latents of shape'):
        model.decode(torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match='not a multiple'):
        convae.ConvAE_tiny(img_size=36)


def test_sd3_preset_count_and_diffusers_key_names():
    with torch.device('meta'):
        model = convae.ConvAE_models['SD3-VAE']()
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 83_819_683
    assert sum(p.numel() for p in model.encoder.parameters()) == 34_274_208
    assert len(sd) == 244
    shapes = {'encoder.conv_in.weight': (128, 3, 3, 3),
              'encoder.down_blocks.1.resnets.0.conv_shortcut.weight': (256, 128, 1, 1),
              'encoder.down_blocks.0.downsamplers.0.conv.weight': (128, 128, 3, 3),
              'encoder.mid_block.attentions.0.group_norm.weight': (512,),
              'encoder.mid_block.attentions.0.to_q.weight': (512, 512),
              'encoder.conv_out.weight': (32, 512, 3, 3),
              'decoder.conv_in.weight': (512, 16, 3, 3),
              'decoder.mid_block.attentions.0.to_out.0.weight': (512, 512),
              'decoder.mid_block.resnets.1.norm2.bias': (512,),
              'decoder.up_blocks.0.resnets.2.conv2.weight': (512, 512, 3, 3),
              'decoder.up_blocks.2.upsamplers.0.conv.weight': (256, 256, 3, 3),
              'decoder.conv_norm_out.weight': (128,), 'decoder.conv_out.weight': (3, 128, 3, 3)}
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    assert {k.rsplit('.', 2)[0] for k in sd if 'conv_shortcut' in k} == {
        'encoder.down_blocks.1.resnets.0', 'encoder.down_blocks.2.resnets.0',
        'decoder.up_blocks.2.resnets.0', 'decoder.up_blocks.3.resnets.0'}
    assert not any(k.startswith('encoder.down_blocks.3.downsamplers') or k.startswith('decoder.up_blocks.3.upsamplers') for k in sd)
    assert not any('quant_conv' in k for k in sd)


def test_downsample_pads_right_and_bottom_only():
    torch.manual_seed(0)
    down = convae.Downsample(4)
    x = torch.randn(2, 4, 8, 8)
    by_hand = F.conv2d(F.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    symmetric = F.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    assert down(x).shape == (2, 4, 4, 4)
    assert torch.allclose(down(x), by_hand, atol=1e-6)
    assert not torch.allclose(down(x), symmetric, atol=1e-3)


def test_upsample_is_nearest_then_conv():
    torch.manual_seed(0)
    up = convae.Upsample(4)
    x = torch.randn(1, 4, 3, 5)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.allclose(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1), atol=1e-6)


def test_attention_is_one_head_scaled_by_sqrt_channels():
    torch.manual_seed(0)
    C = 32
    attn = convae.MidAttention(C, groups=8)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, C, 3, 4)
    h = F.group_norm(x, 8, attn.group_norm.weight, attn.group_norm.bias, eps=1e-6).flatten(2).transpose(1, 2)  # (2, 12, C)
    q, k, v = attn.to_q(h), attn.to_k(h), attn.to_v(h)
    weights = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(C), dim=-1)        # one head over all C channels
    out = attn.to_out[0](weights @ v).transpose(1, 2).reshape(2, C, 3, 4)
    assert torch.allclose(attn(x), x + out, atol=1e-5)


def diffusers_state_dict(model, seed=0):
    """Random weights, GroupNorm affines included, under the model's (diffusers) key names."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in model.state_dict().items()}


def test_authors_file_loads_strictly(tmp_path):
    ref = convae.ConvAE(img_size=32, block_out_channels=(32, 64, 64, 64), layers_per_block=1, norm_num_groups=32)
    sd = diffusers_state_dict(ref)
    ref.load_state_dict(sd)
    path = tmp_path / 'sdvae.pth'
    # their files: weights under 'model' (here behind a DDP prefix), training args as an argparse.Namespace
    torch.save({'model': {'module.' + k: v for k, v in sd.items()}, 'args': argparse.Namespace(lr=1e-5)}, path)
    args, _ = convae.read_convae(str(path))
    assert args == dict(ref.args, img_size=256)
    model = convae.load_convae(str(path), img_size=32)
    assert not model.training and model.grid == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(model.decode(model.encode(x).mean), ref.eval().decode(ref.encode(x).mean))
    # the group count is in no shape: widths that 32 does not divide are refused, not guessed
    torch.save({'model': tiny().state_dict()}, tmp_path / 'odd.pth')
    with pytest.raises(ValueError) as e:
        convae.read_convae(str(tmp_path / 'odd.pth'))
    assert 'not multiples of 32' in one_line_error(e)
    torch.save({'model': {**sd, 'quant_conv.weight': torch.zeros(32, 32, 1, 1)}}, tmp_path / 'sd1.pth')
    with pytest.raises(ValueError) as e:
        convae.read_convae(str(tmp_path / 'sd1.pth'))
    assert 'quant_conv' in one_line_error(e)


SD3_STYLE_CONFIG = {'_class_name': 'AutoencoderKL', '_diffusers_version': '0.29.0.dev0', 'act_fn': 'silu',
                    'block_out_channels': [16, 32, 64, 64], 'down_block_types': ['DownEncoderBlock2D'] * 4,
                    'up_block_types': ['UpDecoderBlock2D'] * 4, 'force_upcast': True, 'in_channels': 3,
                    'out_channels': 3, 'latent_channels': 16, 'latents_mean': None, 'latents_std': None,
                    'layers_per_block': 1, 'norm_num_groups': 8, 'sample_size': 1024, 'scaling_factor': 1.5305,
                    'shift_factor': 0.0609, 'use_quant_conv': False, 'use_post_quant_conv': False}


def write_vae_folder(folder, config=SD3_STYLE_CONFIG):
    """A diffusers VAE folder holding the small preset's key names with random fp16 weights."""
    folder.mkdir()
    sd = {k: v.half() for k, v in diffusers_state_dict(convae.ConvAE_small()).items()}
    save_file(sd, str(folder / 'diffusion_pytorch_model.safetensors'))
    (folder / 'config.json').write_text(json.dumps(config))
    return sd


def test_diffusers_folder_loads_and_casts_to_float32(tmp_path):
    sd = write_vae_folder(tmp_path / 'vae')
    assert all(v.dtype == torch.float32 for v in convae.read_convae(str(tmp_path / 'vae'))[1].values())
    for path in (tmp_path / 'vae', tmp_path / 'vae' / 'diffusion_pytorch_model.safetensors'):
        model = convae.load_convae(str(path))
        assert model.args == dict(convae.ConvAE_small().args)
        for k, v in model.state_dict().items():
            assert v.dtype == torch.float32 and torch.equal(v, sd[k].float()), k
    with torch.no_grad():
        assert model.decode(model.encode(torch.zeros(1, 3, 16, 16)).mode()).shape == (1, 3, 16, 16)


@pytest.mark.parametrize('change, message', [({'use_quant_conv': True}, 'quant_conv'),
                                             ({'use_post_quant_conv': None}, 'quant_conv'),  # absent: diffusers' default, on
                                             ({'act_fn': 'gelu'}, "act_fn='gelu'"),
                                             ({'_class_name': 'UNet2DModel'}, 'not an AutoencoderKL config')])
def test_unsupported_configs_are_refused_in_one_line(tmp_path, change, message):
    config = {k: v for k, v in {**SD3_STYLE_CONFIG, **change}.items() if v is not None}
    write_vae_folder(tmp_path / 'vae', config)
    with pytest.raises(ValueError) as e:
        convae.load_convae(str(tmp_path / 'vae'))
    assert message in one_line_error(e)


def test_wrong_files_give_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='not found'):
        convae.load_convae(str(tmp_path / 'missing.pt'))
    (tmp_path / 'notes.txt').write_text('hello')
    (tmp_path / 'folder').mkdir()
    with pytest.raises(FileNotFoundError, match='config.json'):
        convae.load_convae(str(tmp_path / 'folder'))
    (tmp_path / 'folder' / 'config.json').write_text(json.dumps(SD3_STYLE_CONFIG))
    (tmp_path / 'folder' / 'diffusion_pytorch_model.safetensors').write_text('not safetensors')
    torch.save({'kind': 'vmae', 'version': 1, 'model_args': {}, 'model': {}}, tmp_path / 'vmae.pt')
    torch.save({'model': {'to_latent.weight': torch.zeros(1)}}, tmp_path / 'vmaef8d16.pth')
    torch.save({'model': {'x_embedder.proj.weight': torch.zeros(1)}, 'ema': {}}, tmp_path / 'dit.pt')
    torch.save({'kind': 'convae', 'version': 99, 'model_args': {}, 'model': {}}, tmp_path / 'future.pt')
    cases = {'notes.txt': 'not a PyTorch checkpoint', 'folder': 'not a safetensors file', 'vmae.pt': "kind 'vmae'",
             'vmaef8d16.pth': "keys like ['to_latent.weight']", 'dit.pt': 'not a convolutional autoencoder checkpoint',
             'future.pt': 'format version 99'}
    for name, message in cases.items():
        with pytest.raises(ValueError) as e:
            convae.load_convae(str(tmp_path / name))
        assert message in one_line_error(e), name


def test_pickled_code_never_runs(tmp_path):
    marker = tmp_path / 'ran'

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    torch.save({'kind': 'convae', 'model': Evil()}, tmp_path / 'evil.pt')
    with pytest.raises(ValueError, match='read safely'):
        convae.load_convae(str(tmp_path / 'evil.pt'))
    assert not marker.exists()


def test_own_checkpoint_roundtrip(tmp_path):
    model = tiny()
    path = str(tmp_path / 'last.pt')
    fileio.save_checkpoint(convae.convae_checkpoint(model, step=3), path)
    assert fileio.read_checkpoint(path)['step'] == 3
    loaded = convae.load_convae(path)
    assert loaded.args == model.args and loaded.img_size == 32
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).mean, model.eval().encode(x).mean)
    assert convae.load_convae(path, img_size=64).grid == 8


def test_patchgan_layout_count_and_output():
    torch.manual_seed(0)
    d = convae.NLayerDiscriminator()
    sd = d.state_dict()
    assert sum(p.numel() for p in d.parameters()) == 2_765_633
    assert {'main.0.bias', 'main.3.running_mean', 'main.9.weight', 'main.11.bias'} <= sd.keys()
    assert not {'main.2.bias', 'main.5.bias', 'main.8.bias'} & sd.keys()         # BatchNorm supplies the shift
    assert d.main[8].stride == (1, 1) and d.main[5].stride == (2, 2)
    assert abs(d.main[8].weight.std().item() - 0.02) < 1e-3
    assert abs(d.main[9].weight.mean().item() - 1.0) < 5e-3 and torch.all(d.main[9].bias == 0)
    with torch.no_grad():
        assert d(torch.randn(1, 3, 256, 256)).shape == (1, 1, 30, 30)
        assert d(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)


def test_hinge_loss_by_hand():
    real = torch.tensor([2.0, 0.5, -1.0])                       # relu(1 - real) = 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.0, 1.0])                       # relu(1 + fake) = 0, 1, 2
    assert convae.hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 3 / 3))
    assert convae.hinge_d_loss(torch.full((4,), 1.5), torch.full((4,), -1.5)).item() == 0.0


def test_adaptive_weight_by_hand():
    w = torch.tensor([0.5, -1.0, 2.0], requires_grad=True)     # the "last layer"
    a, t, c = torch.tensor([1.0, 2.0, -1.0]), torch.tensor([0.0, 1.0, 1.0]), torch.tensor([0.3, -0.2, 0.1])
    y = w * a                                                   # the "reconstruction"
    nll, g = ((y - t) ** 2).sum(), -(c * y).sum()
    d_nll, d_g = 2 * (w.detach() * a - t) * a, -c * a           # analytic gradients with respect to w
    weight = convae.adaptive_weight(nll, g, w)
    assert not weight.requires_grad
    assert weight.item() == pytest.approx((d_nll.norm() / (d_g.norm() + 1e-4)).item(), rel=1e-6)
    nll.backward()                                              # the graph survives for the real backward
    y = w * a                                                   # a tiny adversarial gradient: the clamp holds
    assert convae.adaptive_weight((y ** 2).sum(), 1e-12 * y.sum(), w).item() == 1e4


def test_disc_factor_warmup():
    assert convae.disc_factor_at(49_999, 50_000) == 0.0
    assert convae.disc_factor_at(50_000, 50_000) == 1.0
    assert convae.disc_factor_at(60_000, 50_000, factor=0.5) == 0.5


def test_tiny_convae_learns():
    torch.manual_seed(0)
    model = tiny()
    x = F.interpolate(torch.rand(4, 3, 4, 4) * 2 - 1, size=32, mode='bilinear')  # smooth images, like photos
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        recon, _ = model(x, sample_posterior=False)
        loss = F.mse_loss(recon, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_baseline_losses_by_hand():
    """LDM's reductions: sums over each sample's values, means over the batch; LPIPS weighs as 3HW pixels."""
    x = torch.tensor([[[[0.0, 1.0], [0.5, -1.0]]] * 3, [[[1.0, 1.0], [0.0, 0.0]]] * 3])  # (2, 3, 2, 2)
    x_rec = x + torch.tensor([0.1, -0.2]).view(2, 1, 1, 1)                                  # errors 0.1 and 0.2 everywhere
    mean, logvar = torch.tensor([[1.0], [0.0]]).view(2, 1, 1, 1), torch.tensor([[0.0], [math.log(4.0)]]).view(2, 1, 1, 1)
    posterior = convae.DiagonalGaussian(torch.cat([mean, logvar], 1))
    loss, nll, terms = convae.convae_loss(x, x_rec, posterior, 'l1')
    assert nll.item() == pytest.approx((12 * 0.1 + 12 * 0.2) / 2) and loss.item() == nll.item()
    assert terms['rec'].item() == pytest.approx(0.15) and set(terms) == {'rec'}
    _, nll, _ = convae.convae_loss(x, x_rec, posterior, 'mse', pixel_weight=2.0)
    assert nll.item() == pytest.approx(2 * (12 * 0.01 + 12 * 0.04) / 2)
    lpips = lambda a, b: torch.tensor([0.5, 1.5]).view(2, 1, 1, 1)                        # per-sample perceptual distances
    loss, nll, terms = convae.convae_loss(x, x_rec, posterior, 'l1', perceptual_weight=0.5, kl_weight=0.1, perceptual=lpips)
    kl = (0.5 * (1 + 1 - 1 - 0) + 0.5 * (0 + 4 - 1 - math.log(4.0))) / 2                   # 0.5 (mu^2 + var - 1 - log var), batch mean
    assert terms['lpips'].item() == 1.0 and terms['kl'].item() == pytest.approx(kl)
    assert nll.item() == pytest.approx(1.8 + 0.5 * 12 * 1.0)
    assert loss.item() == pytest.approx(nll.item() + 0.1 * kl)
    assert convae.generator_loss(torch.tensor([[1.0, 3.0]])).item() == -2.0               # raise D's logits on fakes
