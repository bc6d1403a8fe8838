"""
The paper's figures, drawn from what analyses.py and evaluate.py compute, for any set of autoencoders:
Fig. 6 (smoothness curves) with the latent channels' stds, Fig. 7 (the sigma^2 / rho plane), Fig. 4 (k-means maps of the latent
tokens), Fig. 8 (2-D projections of one image's tokens), Fig. 2 (the radar), and the sampler study's
error curves. Every function writes one PNG and returns its path.
"""

import math

import matplotlib
import numpy as np

matplotlib.use('Agg')  # files, no window: plots are written on servers without a display
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

import fileio  # noqa: E402
from common import print0  # noqa: E402
from metrics import METRIC_LABELS  # noqa: E402


def save(fig, path):
    """Write the figure as a PNG through a temporary file, so an interrupted run leaves no half a plot."""
    fig.tight_layout()
    with fileio.atomic_write(path) as f:
        fig.savefig(f, format='png', dpi=120)  # the format by name: the temporary file ends in .tmp
    plt.close(fig)
    print0(f"plot: {path}")
    return path


def plot_smoothness(curves, path, change=False):
    """Fig. 6: each metric against the perturbation level, one line per autoencoder; change=True adds a
    row of each metric's change from eps = 0. curves: {name: {eps: {metric: value}}}."""
    first = next(iter(curves.values()))
    metrics = [k for k in ('rfid', 'psnr', 'ssim', 'lpips') if k in first[min(first)]]
    rows = 2 if change else 1
    fig, axes = plt.subplots(rows, len(metrics), figsize=(3.4 * len(metrics) + 1.6 * change, 3.2 * rows), squeeze=False)
    for column, k in enumerate(metrics):
        for name, curve in curves.items():
            eps = sorted(curve)
            axes[0][column].plot(eps, [curve[e][k] for e in eps], 'o-', label=name)
            if change:
                axes[1][column].plot(eps, [curve[e][k] - curve[min(eps)][k] for e in eps], 'o-', label=name)
        axes[0][column].set(xlabel='eps (x latent std)', title=METRIC_LABELS[k])
        if change:
            axes[1][column].set(xlabel='eps (x latent std)', title=f'{METRIC_LABELS[k]}: change from eps 0')
    if change:  # many curves: the legend goes beside the panels
        axes[0][-1].legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.02, 1))
    else:
        axes[0][0].legend(fontsize=8)
    return save(fig, path)


def plot_channel_stds(stds, path):
    """Each latent channel's std over the RMS of all of them, largest first, one line per autoencoder:
    flat when every channel carries the same share, steep when a few carry most. stds: {name: [std per channel]}."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for name, std in stds.items():
        std = np.sort(np.asarray(std, dtype=np.float64))[::-1]
        ax.plot(np.arange(1, len(std) + 1), std / np.sqrt(np.mean(std ** 2)), 'o-', markersize=3, label=name)
    ax.set(xlabel='latent channel, by its std', ylabel="channel's std / RMS of all")
    ax.legend(fontsize=8, loc='upper left', bbox_to_anchor=(1.02, 1))
    return save(fig, path)


def plot_compression(points, path, title=''):
    """Fig. 7: sigma^2 (lower: stronger compression) against rho (higher: segments kept apart), one point
    per autoencoder and one for the raw image. points: {name: {'sigma2', 'rho'}}."""
    fig, ax = plt.subplots(figsize=(4.6, 3.8))
    for name, p in points.items():
        raw = name == 'pixel'
        ax.scatter(p['sigma2'], p['rho'], marker='*' if raw else 'o', s=120 if raw else 50, color='k' if raw else None,
                   label='raw image' if raw else name)
    ax.axhline(1.0, color='grey', lw=0.6, ls=':')
    ax.set(xlabel='sigma^2 (lower: more compressed)', ylabel='rho (higher: segments kept apart)', title=title)
    ax.annotate('\u2196 ideal', xy=(0, 1), xycoords='axes fraction', xytext=(0, 3), textcoords='offset points', va='bottom',
                color='grey')  # above the corner: the raw image often sits in it
    ax.legend(fontsize=8)
    return save(fig, path)


def overlay(image, clusters, grid, alpha=0.55):
    """A uint8 image (H, W, 3) tinted by a (grid*grid,) cluster map, one colour per cluster."""
    colours = plt.get_cmap('tab10')(np.arange(10))[:, :3]
    h, w = image.shape[:2]
    cells = colours[np.asarray(clusters) % 10].reshape(grid, grid, 3)
    tint = np.kron(cells, np.ones((h // grid, w // grid, 1)))              # nearest-neighbour upsampling to (H, W, 3)
    return (1 - alpha) * image / 255 + alpha * tint


def plot_kmeans(images, maps, ks, grid, path):
    """Fig. 4: one row per autoencoder; for each image a group of columns: the image, then its latent tokens'
    k-means clusters for each k over it. maps: {name: [per image: [per k: (grid*grid,) clusters]]}."""
    names, group = list(maps), 1 + len(ks)
    fig, axes = plt.subplots(len(names), group * len(images), figsize=(1.3 * group * len(images), 1.4 * len(names)), squeeze=False)
    for r, (row, name) in enumerate(zip(axes, names)):
        row[0].set_ylabel(name, fontsize=9)
        for i, image in enumerate(images):
            row[i * group].imshow(image)
            for j, (k, clusters) in enumerate(zip(ks, maps[name][i]), 1):
                row[i * group + j].imshow(overlay(image, clusters, grid))
                if r == 0:
                    row[i * group + j].set_title(f'k = {k}', fontsize=9)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return save(fig, path)


def plot_projection(panels, image, path):
    """Fig. 8: one image's latent tokens on their two principal axes, coloured by segment, one panel per
    autoencoder with its sigma^2. panels: {name: (xy (n, 2), labels (n,), sigma2)}."""
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(2.8 * (1 + len(panels)), 2.8), squeeze=False)
    axes[0][0].imshow(image)
    axes[0][0].set_title('image', fontsize=9)
    axes[0][0].axis('off')
    for ax, (name, (xy, labels, sigma2)) in zip(axes[0][1:], panels.items()):
        xy = np.asarray(xy)
        ax.scatter(xy[:, 0], xy[:, 1], c=np.asarray(labels), cmap='tab10', vmin=0, vmax=9, s=14)
        ax.set_title(f'{name}\nsigma^2 = {sigma2:.3f}', fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    return save(fig, path)


def plot_radar(scaled, path):
    """Fig. 2: one polygon per autoencoder over the axes, each axis rescaled (analyses.rescale) so that the
    outer ring is the best score and the inner ring the worst. scaled: {axis: {name: value in (0, 1]}}."""
    axes_names = list(scaled)
    names = list(next(iter(scaled.values())))
    angles = [2 * math.pi * i / len(axes_names) for i in range(len(axes_names))]
    fig, ax = plt.subplots(figsize=(4.6, 4.6), subplot_kw={'polar': True})
    for name in names:
        values = [scaled[a][name] for a in axes_names]
        ax.plot(angles + angles[:1], values + values[:1], 'o-', label=name)
        ax.fill(angles + angles[:1], values + values[:1], alpha=0.08)
    ax.set_xticks(angles)
    ax.set_xticklabels(axes_names)
    ax.tick_params(axis='x', pad=10)
    for label, angle in zip(ax.get_xticklabels(), angles):  # each label grows away from the ring
        label.set_horizontalalignment('left' if math.cos(angle) > 0.1 else 'right' if math.cos(angle) < -0.1 else 'center')
    ax.set_ylim(0, 1)
    ax.set_yticks([0.2, 0.6, 1.0])  # the inner ring: the worst score of each axis; the outer: the best
    ax.set_yticklabels([])
    ax.legend(loc='upper right', bbox_to_anchor=(1.3, 1.1), fontsize=8)
    return save(fig, path)


def plot_solvers(rows, path):
    """Latent error and image PSNR against DiT forwards per sample, one line per solver (log-log)."""
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for solver in dict.fromkeys(r['solver'] for r in rows):
        mine = [r for r in rows if r['solver'] == solver]
        axes[0].loglog([r['forwards'] for r in mine], [r['latent_rmse'] for r in mine], 'o-', label=solver)
        axes[1].semilogx([r['forwards'] for r in mine], [r['psnr'] for r in mine], 'o-', label=solver)
    axes[0].set(xlabel='DiT forwards per sample', ylabel='latent RMS error vs reference')
    axes[1].set(xlabel='DiT forwards per sample', ylabel='PSNR vs reference (dB)')
    for ax in axes:  # plain numbers at 1-2-5 steps: matplotlib's minor labels (2x10^1, 3x10^1, ...) run together
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[0].legend()
    return save(fig, path)
