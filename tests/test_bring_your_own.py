"""The README's "Bring your own autoencoder": its very code (read from README.md), registered as a new kind,
goes through latent extraction, DiT training, sampling and evaluate.py recon like the VMAE.
Run: python -m pytest tests/test_bring_your_own.py"""

import json
import os
import re
import sys

import numpy as np
import torch
from PIL import Image

import autoencoders
import data
import evaluate
import metrics
import sample
import train_dit
from test_train_dit import config, make_images_and_vmae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme_autoencoder(folder):
    """Writes the README's myae.py into `folder` and imports it."""
    readme = open(os.path.join(ROOT, 'README.md')).read()
    code = re.search(r"```python\n(# myae\.py.*?)```", readme, flags=re.S).group(1)
    (folder / 'myae.py').write_text(code)
    sys.path.insert(0, str(folder))
    try:
        import myae
    finally:
        sys.path.remove(str(folder))
    return myae


def test_the_readme_autoencoder_goes_through_the_pipeline(tmp_path, monkeypatch):
    root = make_images_and_vmae(tmp_path, per_class=8)
    myae = readme_autoencoder(tmp_path)
    monkeypatch.setitem(sys.modules, 'myae', myae)
    monkeypatch.setitem(autoencoders.REGISTRY, 'patchae', ('myae', 'load'))
    torch.manual_seed(0)
    model = myae.PatchAE(img_size=32, latent_dim=16)
    torch.save({'kind': 'patchae', 'args': model.args, 'model': model.state_dict()}, tmp_path / 'patchae.pt')

    loaded = autoencoders.load_autoencoder(str(tmp_path / 'patchae.pt'))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(loaded.encode(x).mean), model.decode(model.encode(x).mean))

    train_dit.main(config(root, tmp_path / 'dit', autoencoder=str(tmp_path / 'patchae.pt'), latents=str(tmp_path / 'latents'),
                          max_steps=2))
    meta = json.load(open(tmp_path / 'latents' / 'meta.json'))
    assert meta['posterior'] == 'mode' and meta['shape'] == [2, 32, 4, 4]          # its dit_latent, its 16 x 4 x 4 latents
    assert torch.load(tmp_path / 'dit' / 'last.pt', weights_only=True)['config']['posterior'] == 'mode'

    sample.main(sample.parse_args(['--dit', str(tmp_path / 'dit' / 'last.pt'), '--class', '0', '1', '--n', '2', '--steps', '3',
                                   '--out', str(tmp_path / 'grid.png'), '--device', 'cpu']))
    assert np.asarray(Image.open(tmp_path / 'grid.png')).shape[2] == 3

    evaluate.main(['recon', '--autoencoder', str(tmp_path / 'patchae.pt'), '--data', str(root / 'images'), '--rfid', 'false',
                   '--lpips', 'false', '--num_workers', '0', '--out', str(tmp_path / 'recon.json')])
    psnr = json.load(open(tmp_path / 'recon.json'))['autoencoders']['patchae']['psnr']
    dataset = data.build_dataset(str(root / 'images'), 32, train=False, split='val')
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():  # the same number by hand, from the autoencoder itself
        recon = loaded.decode(loaded.encode(images).mode())
    assert abs(psnr - metrics.psnr_per_image(data.to_uint8(images).numpy(), data.to_uint8(recon).numpy()).mean()) < 1e-3
