# The AE baseline (paper App. A, Eq. 3), small: the convolutional autoencoder of SD3 at widths 16-64,
# trained with the squared error alone, decoding the posterior mean. About five minutes on a laptop CPU:
#   python -m paper.train_convae paper/configs/ae_small.py
# The four baselines (ae, dae, vae, sdvae) share every setting but their objective, as in the paper;
# the optimizer is LDM's for its autoencoders (Adam, betas 0.5 / 0.9, no weight decay).
data = 'builtin'
image_size = 32
model = 'ConvAE-small'
out_dir = 'out/ae_small'
sample_posterior = False
pixel_loss = 'mse'
pixel_weight = 1.0
perceptual_weight = 0.0
kl_weight = 0.0
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
