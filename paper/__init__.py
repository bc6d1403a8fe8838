"""
The paper's comparison apparatus: everything LDMAE needs to *compare* autoencoders, beside the pipeline
a learner reads at the top level (vmae.py, train_vmae.py, dit.py, train_dit.py, sample.py, evaluate.py).

- convae.py, train_convae.py, configs/: the convolutional baselines (AE, DAE, VAE, SD-VAE with its
  PatchGAN) and their trainer (App. A);
- analyses.py, figures.py: the latent analyses of section 5 (smoothness, Fig. 6; perceptual and
  hierarchical compression, Figs. 4, 7, 8; the radar of Fig. 2) and their pictures;
- judges.py: the small recipe's judges (does a sample show its class? how accurate is a sampler?);
- __main__.py: the commands that run them (`python -m paper smoothness ...`);
- study.py: the paper's claims at small scale, end to end;
- ablation.py: where the VMAE's latent smoothness comes from, its recipe taken apart at the same scale.

This folder imports the top level; the top level imports it only to load a convolutional checkpoint
(autoencoders.py's registry) and where demo.py and bench.py run its commands.
"""
