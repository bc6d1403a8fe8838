# The SD-VAE baseline (paper App. A, Eq. 6), small: LDM's objective for its KL autoencoders, L1 +
# LPIPS + 1e-6 x KL to N(0, I) on posterior samples, and a PatchGAN with the hinge loss and the adaptive
# weight from step disc_start. About eight minutes on a laptop CPU (the discriminator doubles a step):
#   python -m paper.train_convae paper/configs/sdvae_small.py
# LPIPS is off because its VGG16 weights are a download; with them, set perceptual_weight = 1.0 (LDM's).
data = 'builtin'
image_size = 32
model = 'ConvAE-small'
out_dir = 'out/sdvae_small'
sample_posterior = True
pixel_loss = 'l1'
pixel_weight = 1.0
perceptual_weight = 0.0
kl_weight = 1e-6
kl_standard = True
disc_weight = 0.5
disc_start = 500         # half-way (LDM's kl-f8: step 50001)
batch_size = 64
micro_batch_size = 64
blr = 4e-3               # lr = 4e-3 x 64 / 256 = 1e-3
beta1 = 0.5
beta2 = 0.9
weight_decay = 0.0
max_steps = 1000
warmup_steps = 80
dtype = 'fp32'
num_workers = 1
log_every = 100
image_every = 500
ckpt_every = 500
