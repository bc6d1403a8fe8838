"""
The small recipe's judges, where the paper's scale has FID and people's eyes:
- the shape judge: a small classifier trained on real images of the built-in shapes (or any class folder)
  that names the class of samples, of held-out real images (its bar) and of their reconstructions;
- the solver study: Euler against Heun at equal cost, each against a fine reference from the same noise.
"""

import itertools

import torch
import torch.nn.functional as F
from tqdm import tqdm

from data import to_uint8
from dit import destandardise, flow_sample, heun_knot, timestep_grid
from metrics import psnr_per_image

# -----------------------------------------------------------------------------
# the shape judge

def colourless(x, generator=None):
    """(B, 3, H, W) -> (B, 1, H, W): a per-image random mix of the RGB channels (weights drawn from a flat
    Dirichlet) or, without a generator, their mean. Every built-in class has its own hue, so a classifier
    that sees colour can name a blob of the right colour; with random mixes the class colour carries no
    information (yellow is bright under one mix and dark under another) and only shape is left."""
    if generator is None:
        return x.mean(1, keepdim=True)
    w = -torch.rand(len(x), 3, 1, 1, generator=generator).log()  # Exp(1) draws, normalised: a flat Dirichlet
    return (x * (w / w.sum(1, keepdim=True))).sum(1, keepdim=True)


def degraded(x, generator):
    """(B, C, H, W) -> the same images mildly degraded, each its own way: edges moved by a smooth random warp
    (about half a pixel), a Gaussian blur of std up to 1 px and Gaussian noise of std up to 0.1. What an
    autoencoder's decoder does to an image; a judge that never saw it names a lumpy-edged disc a star."""
    B, C, H, W = x.shape
    flow = torch.randn(B, 2, 4, 4, generator=generator) * 0.7 * (2 / H)       # displacements, in grid units
    flow = F.interpolate(flow, size=(H, W), mode='bicubic', align_corners=True).permute(0, 2, 3, 1)   # (B, H, W, 2)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing='ij')
    x = F.grid_sample(x, torch.stack([xs, ys], -1) + flow, padding_mode='border', align_corners=True)
    sigma = torch.rand(B, 1, generator=generator).clamp_min(1e-2)                      # (B, 1) blur std in px
    kernel = torch.exp(-torch.arange(-2, 3.0) ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)          # (B * C, 5), one per channel
    x = x.reshape(1, B * C, H, W)
    x = F.conv2d(F.pad(x, (2, 2, 0, 0), mode='replicate'), kernel[:, None, None, :], groups=B * C)
    x = F.conv2d(F.pad(x, (0, 0, 2, 2), mode='replicate'), kernel[:, None, :, None], groups=B * C)
    noise_std = 0.1 * torch.rand(B, 1, 1, 1, generator=generator)
    return x.reshape(B, C, H, W) + noise_std * torch.randn(B, C, H, W, generator=generator)


class SmallClassifier(torch.nn.Module):
    """A small CNN that names the class of an image, the judge of whether samples show their class. It
    trains on mildly degraded images (see degraded), so that it judges shapes, not the decoder's edges.
    colour_blind: it sees a random mix of the RGB channels in training and their mean at test (see
    colourless), so on the built-in set, where every class has its own hue, only shape is left."""

    def __init__(self, num_classes, colour_blind=False):
        super().__init__()
        self.colour_blind = colour_blind
        widths = [1 if colour_blind else 3, 32, 64, 64]
        self.convs = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Conv2d(i, o, 3, padding=1), torch.nn.BatchNorm2d(o))
                                          for i, o in zip(widths, widths[1:])])
        self.head = torch.nn.Linear(widths[-1], num_classes)
        self.generator = None

    def forward(self, x):
        augment = self.training and self.generator is not None
        if augment:
            x = degraded(x, self.generator)
        if self.colour_blind:
            x = colourless(x, self.generator if augment else None)
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)  # 32 -> 16 -> 8 -> 4
        return self.head(x.mean(dim=(2, 3)))


def train_classifier(train_set, colour_blind=False, steps=1000, batch_size=128, seed=0):
    """SmallClassifier trained on `train_set` (images in [-1, 1], labels) for `steps` Adam steps whatever
    the set's size (13 epochs of the 10,000 built-in images), the rate falling linearly to 0 over the last 30%
    (a judge stopped at a constant rate varies by several points with its seed); in eval mode after."""
    torch.manual_seed(seed)
    model = SmallClassifier(train_set.num_classes, colour_blind)
    model.generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(train_set, batch_size=min(batch_size, len(train_set)), shuffle=True, num_workers=0, drop_last=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    decay_steps = max(1, int(0.3 * steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (steps - step) / decay_steps))
    batches = (batch for _ in itertools.count() for batch in loader)
    for x, y in tqdm(itertools.islice(batches, steps), total=steps, desc='classifier'):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def predictions(classifier, images, batch_size=500):
    """The classes the classifier names for images (B, 3, H, W) in [-1, 1], batch by batch."""
    return torch.cat([classifier(images[i:i + batch_size].clamp(-1, 1)).argmax(1) for i in range(0, len(images), batch_size)])


def recognition_rate(classifier, images, labels):
    """Fraction of images that the classifier names as their label."""
    return (predictions(classifier, images) == labels).sum().item() / len(images)


def class_rates(classifier, images, labels, num_classes):
    """Per class, the fraction of its images the classifier names as it (nan for a class with none)."""
    hits = predictions(classifier, images) == labels
    return [hits[labels == c].float().mean().item() if (labels == c).any() else float('nan') for c in range(num_classes)]


@torch.no_grad()
def sample_latents(model, noise, labels, batch_size, solver='euler', **sampler):
    """Latents (N, C, h, w) as the DiT sees them, from noise (N, C, h, w): dit.flow_sample, batch by batch."""
    return torch.cat([flow_sample(model, noise[i:i + batch_size], labels[i:i + batch_size], solver=solver, **sampler)
                      for i in range(0, len(noise), batch_size)])


def decoded_samples(model, autoencoder, stats, noise, labels, batch_size, solver='euler', **sampler):
    """(latents (N, C, h, w) as the DiT sees them, images (N, 3, H, W)) from noise."""
    latents = sample_latents(model, noise, labels, batch_size, solver, **sampler)
    return latents, decode_latents(autoencoder, latents, stats, batch_size)


@torch.no_grad()
def decode_latents(autoencoder, latents, stats, batch_size=250):
    """Latents (N, C, h, w) as a DiT sees them -> images (N, 3, H, W): de-standardised, decoded, batch by batch."""
    return torch.cat([autoencoder.decode(destandardise(latents[i:i + batch_size], stats)).float()
                      for i in range(0, len(latents), batch_size)])


def labelled_images(dataset):
    """A dataset's images (N, 3, H, W) and labels (N,), stacked."""
    return map(torch.stack, zip(*[(x, torch.tensor(y)) for x, y in map(dataset.__getitem__, range(len(dataset)))]))


@torch.no_grad()
def reconstructions(autoencoder, images, batch_size=250):
    """The autoencoder's reconstructions of images (N, 3, H, W) from their posterior means, on the CPU."""
    device = next(autoencoder.parameters()).device
    return torch.cat([autoencoder.decode(autoencoder.encode(x.to(device)).mode()).float().cpu() for x in images.split(batch_size)])


@torch.no_grad()
def sample_rates(classifier, model, autoencoder, stats, noise, batch_size=250, **sampler):
    """Per class, the fraction of one class-balanced sample (label i % classes) per noise (N, C, h, w) that
    the classifier names as its label."""
    labels = torch.arange(len(noise)) % model.num_classes
    _, samples = decoded_samples(model, autoencoder, stats, noise, labels.to(noise.device), batch_size, **sampler)
    return class_rates(classifier, samples.cpu(), labels, model.num_classes)


def recognition_study(model, autoencoder, stats, train_set, held_out, colour_blind, noise, batch_size=250, **sampler):
    """Do a DiT's samples show their class? A SmallClassifier learns the classes from real images
    (train_set); its rate on real images it never saw (held_out) is the bar for its rate on one
    class-balanced sample (label i % classes) per noise (N, C, h, w). The autoencoder's reconstructions of
    the held-out images (posterior means) show how much of the gap its decoder makes and how much the DiT.
    -> {'real', 'reconstructions', 'samples'}: per-class rates"""
    classifier = train_classifier(train_set, colour_blind)
    real_images, real_labels = labelled_images(held_out)
    return {'real': class_rates(classifier, real_images, real_labels, model.num_classes),
            'reconstructions': class_rates(classifier, reconstructions(autoencoder, real_images, batch_size), real_labels, model.num_classes),
            'samples': sample_rates(classifier, model, autoencoder, stats, noise, batch_size, **sampler)}

# -----------------------------------------------------------------------------
# sampler accuracy: Euler against Heun at equal cost

SOLVER_GRID = {'euler': (10, 25, 50, 100, 250), 'heun': (5, 10, 25, 50, 60, 75, 100)}


def dit_forwards(steps, solver, shift, cfg_interval_start, guided):
    """DiT forwards per sample, as dit.flow_sample spends them: per step one evaluation (Euler) or two (Heun,
    on a grid with a knot at the guidance switch), each counting twice where the step is guided."""
    t = timestep_grid(steps, shift, heun_knot(solver, 2.0 if guided else 1.0, cfg_interval_start))[:-1]  # the steps' left ends
    per_step = 1 + (t >= cfg_interval_start).long() if guided else torch.ones_like(t, dtype=torch.long)
    return int(per_step.sum()) * (2 if solver == 'heun' else 1)


@torch.no_grad()
def solver_study(model, autoencoder, stats, labels, noise, grid=SOLVER_GRID, reference_steps=1000, batch_size=250,
                 classifier=None, **guidance):
    """Integrate the same noise (N, C, h, w) with each solver and step count of `grid` and with a fine
    reference (Heun, reference_steps), and compare: RMS error of the final latents (standardised, as the
    DiT sees them), PSNR of the decoded uint8 images against the reference's, DiT forwards per sample,
    and, with a classifier, the rate at which the samples show their label. -> list of rows (dicts)."""
    labels = torch.as_tensor(labels, device=noise.device)

    def run(solver, steps):
        return decoded_samples(model, autoencoder, stats, noise, labels, batch_size, solver, steps=steps, **guidance)

    reference, reference_images = run('heun', reference_steps)
    rows = []
    for solver, steps in tqdm([(s, n) for s, ns in grid.items() for n in ns], desc='solvers'):
        latents, images = run(solver, steps)
        rows.append({'solver': solver, 'steps': steps,
                     'forwards': dit_forwards(steps, solver, guidance.get('shift', 0.3), guidance.get('cfg_interval_start', 0.1),
                                              guidance.get('cfg_scale', 1.0) != 1),
                     'latent_rmse': (latents - reference).pow(2).mean().sqrt().item(),
                     'psnr': float(psnr_per_image(to_uint8(reference_images).cpu().numpy(), to_uint8(images).cpu().numpy()).mean()),
                     'recognised': None if classifier is None else recognition_rate(classifier, images.cpu(), labels.cpu())})
    return rows


def heun_match(rows, target=('euler', 250)):
    """The fewest Heun steps whose latent error is at most that of `target` (Euler-250), or None."""
    bound = next(r['latent_rmse'] for r in rows if (r['solver'], r['steps']) == target)
    return next((r for r in sorted(rows, key=lambda r: r['steps']) if r['solver'] == 'heun' and r['latent_rmse'] <= bound), None)
